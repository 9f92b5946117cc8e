"""The augmented model: frozen pre-trained UNet + zero-init label embedding + LoRA.

diffusers' Flax UNet is used unchanged: `flax.linen.intercept_methods` adds
  * `label_embedding[labels]` to the output of the UNet's `time_embedding` module (the
    PyTorch equivalent is `UNet2DConditionModel(num_class_embeds=K+1)` with `class_labels=`),
  * a low-rank update `scale · (x A) B` to the output of every matched attention projection
    (`attn1`/`attn2` `to_q`, `to_k`, `to_v`, `to_out_0`).
The new parameters live in their own tree ("ctrl params"), mirroring the UNet's module paths
for LoRA, so the frozen UNet parameters are never copied or differentiated.

At init A ~ N(0, 1/r²), B = 0 and the label table is zero, so the output is bit-identical to
the pre-trained UNet's for every label. Row K (the last) is the NULL label used by the
unconditional branch of classifier-free guidance; the optimiser masks its gradient.

Precision: the UNet computes in its activation dtype (`unet.dtype`, e.g. bfloat16); the LoRA
delta and the label embedding are computed and added in float32 (one rounding of the sum to the
activation dtype), so a small update is not lost to bfloat16 rounding of the delta itself. The
KL reference can run in another dtype (`reference_dtype`, official: float32) with the same
parameters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from ctrl_jax.models import attention as attention_lib
from ctrl_jax.models import remat as remat_lib
from diffusers import FlaxUNet2DConditionModel

# Attention projections of the UNet's transformer blocks (self: attn1, cross: attn2).
DEFAULT_LORA_TARGETS = r"(^|.*/)attn[12]/(to_q|to_k|to_v|to_out_0)$"


def _get_path(tree: dict, path: tuple[str, ...]) -> Optional[dict]:
  node = tree
  for name in path:
    if not isinstance(node, dict) or name not in node:
      return None
    node = node[name]
  return node


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def dense_paths(params: dict, pattern: str) -> list[tuple[str, ...]]:
  """Paths (module names) of the Dense layers whose '/'-joined path matches `pattern`."""
  out = []

  def walk(node, path):
    if not isinstance(node, dict):
      return
    if "kernel" in node and getattr(node["kernel"], "ndim", 0) == 2:
      if re.match(pattern, "/".join(path)):
        out.append(path)
      return
    for name in sorted(node):
      walk(node[name], path + (name,))

  walk(params, ())
  return out


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_options(config) -> dict:
  """The `AugmentedUNet` keyword arguments a run config sets: `attention` (default naive),
  `reference_dtype` ("" = the UNet's activation dtype)."""
  ref = config.get("reference_dtype", "") or None
  if ref is not None and ref not in DTYPES:
    raise ValueError(f"config.reference_dtype={ref!r}; expected '' or one of {sorted(DTYPES)}.")
  return dict(attention=attention_lib.check(config.get("attention", "naive")),
              reference_dtype=None if ref is None else DTYPES[ref],
              remat_layers=bool(config.get("remat_layers", False)))


@dataclasses.dataclass(frozen=True)
class AugmentedUNet:
  """A pre-trained diffusers Flax UNet with a new label control.

  Attributes:
    unet: the (frozen) diffusers UNet module definition.
    num_labels: number of label values K (the table has K + 1 rows; row K is NULL). For
      several tasks the labels are combined into one index (see `rewards.LabelSpace`).
    lora_rank: LoRA rank r; 0 disables LoRA (label embedding only).
    lora_alpha: LoRA scale = lora_alpha / r; None means scale 1 (diffusers' default).
    lora_targets: regex over '/'-joined Dense module paths that get LoRA.
    attention: attention implementation of every UNet attention layer (models.attention).
    reference_dtype: activation dtype of the pre-trained reference (`apply_pretrained`); None
      = the UNet's own dtype.
    remat_layers: rematerialise every resnet / transformer layer inside a UNet call
      (models.remat): the backward of one call holds one layer's activations at a time.
  """
  unet: FlaxUNet2DConditionModel
  num_labels: int
  lora_rank: int = 4
  lora_alpha: Optional[float] = None
  lora_targets: str = DEFAULT_LORA_TARGETS
  attention: str = "naive"
  reference_dtype: Any = None
  remat_layers: bool = False

  def __post_init__(self):
    attention_lib.check(self.attention)
    if self.num_labels < 1:
      raise ValueError(f"num_labels must be ≥ 1, got {self.num_labels}.")
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be ≥ 0, got {self.lora_rank}.")

  @property
  def null_label(self) -> int:
    return self.num_labels

  @property
  def time_embed_dim(self) -> int:
    return self.unet.block_out_channels[0] * 4

  @property
  def lora_scale(self) -> float:
    if self.lora_rank == 0 or self.lora_alpha is None:
      return 1.0
    return self.lora_alpha / self.lora_rank

  def init_ctrl_params(self, key: jax.Array, unet_params: dict) -> dict:
    """New trainable parameters: {"label_embedding": [K+1, D] zeros, "lora": {path: A, B}}."""
    ctrl = {"label_embedding": jnp.zeros((self.num_labels + 1, self.time_embed_dim),
                                         jnp.float32)}
    if self.lora_rank > 0:
      paths = dense_paths(unet_params, self.lora_targets)
      if not paths:
        raise ValueError(f"lora_targets={self.lora_targets!r} matches no Dense layer of the "
                         "UNet; expected paths like 'down_blocks_0/.../attn1/to_q'.")
      lora = {}
      for i, path in enumerate(paths):
        d_in, d_out = _get_path(unet_params, path)["kernel"].shape
        down = jax.random.normal(jax.random.fold_in(key, i), (d_in, self.lora_rank),
                                 jnp.float32) / self.lora_rank
        _set_path(lora, path, {"down": down,
                               "up": jnp.zeros((self.lora_rank, d_out), jnp.float32)})
      ctrl["lora"] = lora
    return ctrl

  def _interceptor(self, ctrl_params: dict, labels: jnp.ndarray):
    table = ctrl_params["label_embedding"]
    lora = ctrl_params.get("lora", {})
    scale = self.lora_scale

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      module = context.module
      path = module.path
      if path == ("time_embedding",):
        emb = next_fun(*args, **kwargs)
        return (emb.astype(jnp.float32) + table[labels]).astype(emb.dtype)
      if lora and isinstance(module, nn.Dense):
        node = _get_path(lora, path)
        if node is not None:
          y = next_fun(*args, **kwargs)
          x = args[0].astype(jnp.float32)
          delta = (x @ node["down"]) @ node["up"]
          return (y.astype(jnp.float32) + scale * delta).astype(y.dtype)
      return next_fun(*args, **kwargs)

    return interceptor

  def apply(self, unet_params: dict, ctrl_params: dict, x: jnp.ndarray, t: jnp.ndarray,
            context: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """ε of the augmented model.

    Args:
      unet_params: frozen UNet parameters (or fine-tuned ones, for full fine-tuning).
      ctrl_params: from `init_ctrl_params`.
      x: [B, C, H, W] latents. t: int timestep, scalar or [B].
      context: [B, L, D] encoder hidden states (text / c tokens).
      labels: int [B] in [0, K]; K is NULL.
    Returns:
      ε, [B, C, H, W], in the UNet's activation dtype.
    """
    with nn.intercept_methods(self._interceptor(ctrl_params, labels)):
      return self._apply_unet(self.unet, unet_params, x, t, context)

  def apply_pretrained(self, unet_params: dict, x: jnp.ndarray, t: jnp.ndarray,
                       context: jnp.ndarray) -> jnp.ndarray:
    """ε of the plain pre-trained UNet (the KL reference), in `reference_dtype`."""
    return self._apply_unet(self.reference_unet, unet_params, x, t, context)

  def _apply_unet(self, unet, unet_params, x, t, context):
    """unet.apply with the attention implementation and per-layer remat of this model."""
    with contextlib.ExitStack() as stack:
      for icpt in (attention_lib.interceptor(self.attention),
                   remat_lib.interceptor() if self.remat_layers else None):
        if icpt is not None:
          stack.enter_context(nn.intercept_methods(icpt))
      return unet.apply({"params": unet_params}, x, t, context, return_dict=False)[0]

  @property
  def reference_unet(self) -> FlaxUNet2DConditionModel:
    if self.reference_dtype is None or self.reference_dtype == self.unet.dtype:
      return self.unet
    return self.unet.clone(dtype=self.reference_dtype)

  def merge_lora(self, unet_params: dict, ctrl_params: dict) -> dict:
    """UNet parameters with W + scale · A B merged in (for export / fast sampling)."""
    merged = jax.tree_util.tree_map(lambda p: p, unet_params)  # new dicts, same leaves
    lora = ctrl_params.get("lora", {})

    def walk(node, path):
      if isinstance(node, dict) and "down" in node and "up" in node:
        dense = _get_path(merged, path)
        dense["kernel"] = dense["kernel"] + self.lora_scale * (node["down"] @ node["up"])
        return
      for name, child in node.items():
        walk(child, path + (name,))

    walk(lora, ())
    return merged
