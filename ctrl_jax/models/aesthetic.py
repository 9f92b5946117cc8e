"""The aesthetic task: the LAION aesthetic predictor (ground truth) and the reward classifier p̂.

Ground truth (LAION "sac+logos+ava1-l14-linearMSE"): the CLIP ViT-L/14 projected image
embedding (768-d), L2-normalised, through a purely linear MLP
  Linear(768, 1024) → Dropout(0.2) → Linear(1024, 128) → Dropout(0.2) → Linear(128, 64)
  → Dropout(0.1) → Linear(64, 16) → Linear(16, 1)
gives a score; class 1 iff score ≥ AESTHETIC_THRESHOLD. The reward classifier p̂ is the same MLP
with a 2-class head, fitted on CLIP embeddings and calibrated by one temperature.

Image path (differentiable w.r.t. the images, the RL reward back-propagates through it):
images [B, 3, H, W] in [-1, 1] → [0, 1] (clipped) → centre square crop → resize to the CLIP
image size (bicubic, antialiased) → CLIP mean / std → vision tower + visual projection →
L2-normalise → MLP.

transformers has no Flax CLIP vision-with-projection model, so `ClipVisionWithProjection` puts
transformers' `FlaxCLIPVisionTransformer` and a bias-free `visual_projection` Dense together;
its parameter tree {"vision_model": …, "visual_projection": …} mirrors the PyTorch
`CLIPVisionModelWithProjection` / `CLIPModel` state dicts, which are mapped here by our own
rule (transformers' `from_pt` is broken with torch 2.13).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from ctrl_jax.models import convert
from ctrl_jax.models import weights

AESTHETIC_THRESHOLD = 5.7  # LAION score ≥ this → class 1 ("aesthetic").
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per RGB channel, images in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HUB_ID = "openai/clip-vit-large-patch14"

# Output widths of the LAION MLP's Linear layers before the head, and the dropout rates that
# follow the first three (nn.Sequential indices 1, 3, 5).
_LAION_HIDDEN = (1024, 128, 64, 16)
_LAION_DROPOUT = (0.2, 0.2, 0.1)
_LAION_LINEAR_INDICES = (0, 2, 4, 6, 7)


# ----------------------------------------------------------------------------------------------
# The LAION MLP (ground-truth scorer and, with 2 outputs and a temperature, the classifier head).


class LaionMLP(nn.Module):
  """The LAION aesthetic MLP: emb [B, D] → [B, num_outputs]; no activations ("linearMSE").

  Dense layers are named after their nn.Sequential index ("layers_0", "layers_2", "layers_4",
  "layers_6", "layers_7"), so PyTorch key "layers.N.weight" ↔ Flax params["layers_N"].
  Dropout is applied only when deterministic=False (training; needs a "dropout" rng).
  With with_temperature, a scalar param "temperature" (init 1) divides the output: calibration
  sets it, the optimiser never touches it.
  """
  num_outputs: int = 1
  with_temperature: bool = False

  @nn.compact
  def __call__(self, emb, deterministic: bool = True):
    h = emb.astype(jnp.float32)
    for i, width in enumerate(_LAION_HIDDEN):
      h = nn.Dense(width, name=f"layers_{_LAION_LINEAR_INDICES[i]}")(h)
      if i < len(_LAION_DROPOUT):
        h = nn.Dropout(_LAION_DROPOUT[i], name=f"layers_{2 * i + 1}")(h, deterministic)
    out = nn.Dense(self.num_outputs, name="layers_7")(h)
    if self.with_temperature:
      out = out / self.param("temperature", nn.initializers.ones, ())
    return out


def _laion_abstract(input_dim: int, num_outputs: int = 1) -> dict:
  model = LaionMLP(num_outputs)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, input_dim))))[
      "params"]


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading the PyTorch pickle {path!r} needs torch, which is not installed. Either use a "
        "safetensors copy of the same state dict (made once where torch is installed: `python "
        "-m ctrl_jax.launch.convert_laion IN.pth OUT.safetensors`), or `pip install "
        "torch==2.13.0`.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(
      state["state_dict"], Mapping):
    state = state["state_dict"]  # a Lightning-style checkpoint
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()
          if hasattr(v, "detach")}


def load_laion_mlp_params(path: str) -> dict:
  """LAION aesthetic MLP params for LaionMLP(num_outputs=1) from `.pth` or `.safetensors`.

  The `.pth` (e.g. `sac+logos+ava1-l14-linearMSE.pth`) is read with
  `torch.load(weights_only=True)` (torch imported only here); a `.safetensors` copy with the
  same keys needs no torch. Keys "layers.N.weight" [out, in] → params["layers_N"]["kernel"]
  [in, out], "layers.N.bias" → "bias", N ∈ {0, 2, 4, 6, 7}. The input width D is read from
  layers.0.weight (768 for ViT-L/14).
  Returns the params dict (use as LaionMLP().apply({"params": params}, emb [B, D])).
  Raises FileNotFoundError, or ValueError naming missing / unexpected / mis-shaped keys.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"LAION aesthetic MLP weights {path!r} do not exist; download "
        "`sac+logos+ava1-l14-linearMSE.pth` from github.com/christophschuhmann/"
        "improved-aesthetic-predictor (or a safetensors copy of it) and pass its path.")
  if path.endswith(".safetensors") or path.endswith(".safetensors.index.json"):
    state = weights.read_safetensors(path)
  else:
    state = _read_torch_pickle(path)
  return _laion_params_from_state(state, path)


def _laion_params_from_state(state: Mapping[str, Any], path: str) -> dict:
  """`load_laion_mlp_params` of a state dict read from `path` (named in errors)."""
  expected = {f"layers.{i}.{leaf}" for i in _LAION_LINEAR_INDICES for leaf in ("weight", "bias")}
  missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
  if missing or unexpected:
    raise ValueError(f"{path!r} is not a LAION aesthetic MLP state dict: missing keys {missing}, "
                     f"unexpected keys {unexpected}; expected {sorted(expected)}.")
  abstract = _laion_abstract(int(np.shape(state["layers.0.weight"])[-1]))
  params, mismatched = {}, []
  for i in _LAION_LINEAR_INDICES:
    w, b = np.asarray(state[f"layers.{i}.weight"]), np.asarray(state[f"layers.{i}.bias"])
    want = abstract[f"layers_{i}"]
    if w.T.shape != want["kernel"].shape or b.shape != want["bias"].shape:
      mismatched.append(f"layers.{i}: weight {w.shape}, bias {b.shape} vs expected "
                        f"{want['kernel'].shape[::-1]}, {want['bias'].shape}")
      continue
    params[f"layers_{i}"] = {"kernel": jnp.asarray(w.T, jnp.float32),
                             "bias": jnp.asarray(b, jnp.float32)}
  if mismatched:
    raise ValueError(f"{path!r}: shape mismatches {mismatched}.")
  return params


def laion_pth_to_safetensors(pth_path: str, out_path: str) -> None:
  """Writes the LAION aesthetic MLP `.pth` as a `.safetensors` copy with the same keys
  ("layers.N.weight" / "layers.N.bias", float32), which `load_laion_mlp_params` reads without
  torch. Needs torch where it runs (once); the state dict is checked as a load would check it
  before anything is written. CLI: `python -m ctrl_jax.launch.convert_laion IN.pth OUT`."""
  if not os.path.exists(pth_path):
    raise FileNotFoundError(f"LAION aesthetic MLP weights {pth_path!r} do not exist.")
  state = _read_torch_pickle(pth_path)
  _laion_params_from_state(state, pth_path)  # exactly the expected keys and shapes
  weights.write_safetensors(out_path, state)


# ----------------------------------------------------------------------------------------------
# CLIP vision tower + visual projection.


class ClipVisionWithProjection(nn.Module):
  """CLIP image tower with projection: pixel_values [B, 3, S, S] (CLIP-normalised, S =
  config.image_size) → image_embeds [B, config.projection_dim] (not normalised), equal to
  PyTorch `CLIPVisionModelWithProjection(...).image_embeds`."""
  config: Any  # transformers.CLIPVisionConfig (with projection_dim)
  dtype: Any = jnp.float32

  def setup(self):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer  # pylint: disable=g-import-not-at-top
    self.vision_model = FlaxCLIPVisionTransformer(self.config, dtype=self.dtype)
    self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                      dtype=self.dtype)

  def __call__(self, pixel_values):
    x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # Flax convs are NHWC
    _, pooled = self.vision_model(pixel_values=x, deterministic=True, output_attentions=False,
                                  output_hidden_states=False, return_dict=False)[:2]
    return self.visual_projection(pooled).astype(jnp.float32)


# Torch tensors that are not parameters of the vision tower: buffers, and the text tower /
# text projection / logit scale of a full CLIPModel.
_CLIP_IGNORED_KEYS = re.compile(
    r"(^|\.)position_ids$|^text_model\.|^text_projection\.|^logit_scale$")
_CLIP_TORCH_FILES = ("model.safetensors", "model.safetensors.index.json",
                     "model.fp16.safetensors", "model.safetensors.index.fp16.json")
_CLIP_FLAX_FILE = "flax_model.msgpack"


def clip_vision_from_torch(state_dict: Mapping[str, Any], abstract_params: Mapping[str, Any],
                           *, source: str = "state dict") -> dict:
  """PyTorch CLIPVisionModelWithProjection / CLIPModel state dict → ClipVisionWithProjection
  params shaped like `abstract_params`, by the project's one name mapping (`convert`); a
  CLIPModel's text tower is ignored, every other tensor must be used."""
  return convert.from_torch_state_dict(
      state_dict, abstract_params, "clip_vision", source=source,
      ignore=_CLIP_IGNORED_KEYS.pattern,
      hint="Expected a CLIPVisionModelWithProjection or CLIPModel checkpoint (a plain "
           "CLIPVisionModel has no visual_projection).")


def _clip_vision_config(folder: str):
  """CLIPVisionConfig from a CLIPVisionModelWithProjection config.json or a CLIPModel one
  (whose projection_dim lives at the top level)."""
  from transformers import CLIPVisionConfig  # pylint: disable=g-import-not-at-top
  config = weights.read_json(os.path.join(folder, "config.json"))
  if "vision_config" in config:
    vision = dict(config["vision_config"] or {})
    if "projection_dim" in config:
      vision["projection_dim"] = config["projection_dim"]
    vision.pop("model_type", None)
    return CLIPVisionConfig(**vision)
  return CLIPVisionConfig.from_dict(config)


def load_clip_vision(path_or_folder: str, dtype: Any = jnp.float32
                     ) -> tuple[ClipVisionWithProjection, dict]:
  """(ClipVisionWithProjection, float32 params) from a local folder with config.json and
  PyTorch `model.safetensors` (CLIPVisionModelWithProjection or full CLIPModel, e.g.
  `openai/clip-vit-large-patch14`) or `flax_model.msgpack` (FlaxCLIPModel). `dtype` is the
  activation dtype. Never uses transformers' `from_pt`.

  Raises FileNotFoundError naming the folder and what to download when files are missing.
  """
  folder = path_or_folder
  if os.path.isfile(folder):  # a weights file: its folder holds config.json
    folder = os.path.dirname(folder) or "."
  how = (f"download {CLIP_HUB_ID} on a machine with network (`huggingface-cli download "
         f"{CLIP_HUB_ID} --include config.json model.safetensors --local-dir <DIR>`) and pass "
         "<DIR>")
  if not os.path.exists(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"CLIP vision model folder {path_or_folder!r} does not exist or has "
                            f"no config.json; {how}.")
  config = _clip_vision_config(folder)
  model = ClipVisionWithProjection(config, dtype=dtype)
  dummy = jnp.zeros((1, 3, config.image_size, config.image_size), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]
  torch_file = next((os.path.join(folder, n) for n in _CLIP_TORCH_FILES
                     if os.path.exists(os.path.join(folder, n))), None)
  if torch_file is not None:
    params = clip_vision_from_torch(weights.read_safetensors(torch_file), abstract,
                                    source=torch_file)
  elif os.path.exists(os.path.join(folder, _CLIP_FLAX_FILE)):
    params = _clip_vision_from_msgpack(os.path.join(folder, _CLIP_FLAX_FILE), abstract)
  else:
    raise FileNotFoundError(f"{folder!r} has neither {_CLIP_TORCH_FILES[0]} nor "
                            f"{_CLIP_FLAX_FILE}; {how}.")
  return model, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def _clip_vision_from_msgpack(path: str, abstract: dict) -> dict:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  tree = tree.get("params", tree)
  params = {k: tree[k] for k in ("vision_model", "visual_projection") if k in tree}
  want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
  got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
  if got != want:
    flat_want, flat_got = traverse_util.flatten_dict(want), traverse_util.flatten_dict(got)
    bad = sorted("/".join(k) for k in set(flat_want) | set(flat_got)
                 if flat_want.get(k) != flat_got.get(k))
    raise ValueError(f"{path!r} does not match the CLIP vision config ({len(bad)} params "
                     f"missing or mis-shaped, e.g. {bad[:5]}).")
  return params


def preprocess_images(images, image_size: int):
  """images [B, 3, H, W] in [-1, 1] → CLIP pixel_values [B, 3, S, S], S = image_size.

  Clipped to [0, 1] (as saving to uint8 would), centre square crop (a no-op on square images,
  CLIP's own preprocessing crops too), bicubic antialiased resize, CLIP mean / std.
  Differentiable (almost everywhere) w.r.t. images.
  """
  x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
  h, w = x.shape[-2:]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[..., top:top + side, left:left + side]
  if side != image_size:
    x = jax.image.resize(x, x.shape[:-2] + (image_size, image_size), method="bicubic",
                         antialias=True)
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)[:, None, None]
  std = jnp.asarray(CLIP_STD, jnp.float32)[:, None, None]
  return (x - mean) / std


def image_embedding(clip_model: ClipVisionWithProjection, clip_params: dict, images):
  """images [B, 3, H, W] in [-1, 1] → L2-normalised projected CLIP embedding [B, D] (float32)."""
  pixels = preprocess_images(images, clip_model.config.image_size)
  emb = clip_model.apply({"params": clip_params}, pixels)
  return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Ground truth and the reward classifier.


def laion_score(clip_model: ClipVisionWithProjection, clip_params: dict, mlp_params: dict,
                images):
  """LAION aesthetic score [B] of images [B, 3, H, W] in [-1, 1]."""
  emb = image_embedding(clip_model, clip_params, images)
  return LaionMLP(1).apply({"params": mlp_params}, emb)[:, 0]


def aesthetic_labels(scores):
  """scores [B] (numpy or jax) → int32 [B], 1 iff score ≥ AESTHETIC_THRESHOLD."""
  xp = jnp if isinstance(scores, jax.Array) else np
  return (xp.asarray(scores) >= AESTHETIC_THRESHOLD).astype(xp.int32)


HEAD = LaionMLP(num_outputs=2, with_temperature=True)  # the classifier head module


def classifier_apply(clip_model: ClipVisionWithProjection
                     ) -> Callable[[dict, Any], jax.Array]:
  """The reward classifier as a pure function (params, images) → calibrated logits [B, 2].

  params = {"clip": clip_params, "head": head params from `fit_head`}; images [B, 3, H, W] in
  [-1, 1]. Differentiable w.r.t. images.
  """

  def apply(params, images):
    emb = image_embedding(clip_model, params["clip"], images)
    return HEAD.apply({"params": params["head"]}, emb)

  return apply
