"""A plain-PyTorch client of ctrl_jax exports: what a user does in PyTorch, written once and
tested. Needs torch (`pip install torch==2.13.0`); nothing here imports JAX.

  unet = diffusers.UNet2DConditionModel.from_pretrained(f"{OUT}/unet")       # merged export
  unet = apply_ctrl_lora(f"{OUT}/unet", f"{OUT}/ctrl_lora.safetensors")      # --lora_only
  images = sample_digits(OUT, c=[3, 3], y=[[0], [2]])                         # digits exports
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


def apply_ctrl_lora(base_unet_dir: str, lora_path: str, torch_dtype=None):
  """The pre-trained PyTorch UNet in `base_unet_dir` + a `--lora_only` export: adds
  `class_embedding` (num_class_embeds = K + 1) and merges W += scale · up @ down."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(lora_path, framework="pt") as f:
    meta = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if meta.get("format") != "ctrl_jax.lora.v1":
    raise ValueError(f"{lora_path}: format {meta.get('format')!r}, expected 'ctrl_jax.lora.v1'.")
  scale = float(meta["lora_scale"])
  table = tensors.pop("class_embedding.weight")
  unet = UNet2DConditionModel.from_pretrained(base_unet_dir, num_class_embeds=table.shape[0],
                                              low_cpu_mem_usage=False)
  modules = dict(unet.named_modules())
  with torch.no_grad():
    unet.class_embedding.weight.copy_(table)
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
      name = key[:-len(".lora_down.weight")]
      if name not in modules:
        raise KeyError(f"{lora_path}: LoRA module {name!r} is not in the UNet {base_unet_dir}.")
      up = tensors[f"{name}.lora_up.weight"]
      modules[name].weight += scale * (up @ tensors[key])
  return unet.to(torch_dtype) if torch_dtype is not None else unet


def load_c_tokens(export_dir: str):
  """c_encoder.safetensors["c_tokens"] [11, 1, D] as a torch tensor (row 10 = null token)."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  return load_file(os.path.join(export_dir, "c_encoder.safetensors"))["c_tokens"]


def load_digits_unet(export_dir: str):
  labels = read_labels(export_dir)
  if labels.get("lora_only"):
    return apply_ctrl_lora(os.path.join(export_dir, "unet"),
                           os.path.join(export_dir, "ctrl_lora.safetensors"))
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  return UNet2DConditionModel.from_pretrained(os.path.join(export_dir, "unet"))


def read_labels(export_dir: str) -> dict:
  with open(os.path.join(export_dir, "ctrl_labels.json")) as f:
    return json.load(f)


def sample_digits(export_dir: str, c: Sequence[int], y: Sequence[Sequence[int]], *,
                  unet=None, guidance_scale: Optional[float] = None,
                  eta: Optional[float] = None, num_inference_steps: Optional[int] = None,
                  seed: int = 0, batch_size: int = 1000,
                  x_T: Optional[np.ndarray] = None,
                  noise: Optional[np.ndarray] = None) -> np.ndarray:
  """Samples digits c [N] with control labels y [N, T] by a plain PyTorch DDIM loop.

  diffusers' `DDIMScheduler` (from OUT/scheduler), the exported UNet with `class_labels`, and
  classifier-free guidance with the null c token + NULL label as the unconditional branch.
  Defaults (guidance, η, steps) are the ones used in training (ctrl_labels.json).
  x_T: optional initial noise [N, 1, 8, 8] (default: drawn from `seed`).
  noise: optional per-step noise z_i [num_inference_steps, N, 1, 8, 8] of the η > 0 steps
    (diffusers' `variance_noise`; default: drawn from `seed`), e.g. the JAX sampler's own, to
    compare the two samplers sample by sample.
  Returns float32 images [N, 8, 8] in [0, 1].
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  info = read_labels(export_dir)
  w = info["guidance_scale"] if guidance_scale is None else guidance_scale
  eta = info["eta"] if eta is None else eta
  steps = info["num_inference_steps"] if num_inference_steps is None else num_inference_steps
  unet = load_digits_unet(export_dir) if unet is None else unet
  unet.eval()
  tokens = load_c_tokens(export_dir)
  null_c, null_label = tokens.shape[0] - 1, info["null_label"]
  sizes = [t["num_classes"] for t in info["tasks"]]
  y = np.asarray(y, np.int64).reshape(len(c), len(sizes))
  labels = np.zeros(len(c), np.int64)
  for i, k in enumerate(sizes):  # row-major combined index (ctrl_labels.json "label_encoding")
    labels = labels * k + y[:, i]
  scheduler = DDIMScheduler.from_pretrained(os.path.join(export_dir, "scheduler"))
  generator = torch.Generator().manual_seed(seed)
  out = []
  with torch.no_grad():
    for start in range(0, len(c), batch_size):
      cc = torch.as_tensor(np.asarray(c[start:start + batch_size], np.int64))
      ll = torch.as_tensor(labels[start:start + batch_size])
      b = len(cc)
      ctx = torch.cat([tokens[torch.full((b,), null_c)], tokens[cc]])
      cls = torch.cat([torch.full((b,), null_label), ll])
      scheduler.set_timesteps(steps)
      x = (torch.randn((b, 1, 8, 8), generator=generator) if x_T is None else
           torch.as_tensor(np.asarray(x_T[start:start + batch_size], np.float32)))
      if noise is not None and np.shape(noise)[:2] != (len(scheduler.timesteps), len(c)):
        raise ValueError(f"noise: shape {np.shape(noise)}; expected ({len(scheduler.timesteps)}, "
                         f"{len(c)}, 1, 8, 8) (steps, samples, ...).")
      for i, t in enumerate(scheduler.timesteps):
        e_unc, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx,
                          class_labels=cls).sample.chunk(2)
        z = (None if noise is None else
             torch.as_tensor(np.asarray(noise[i, start:start + batch_size], np.float32)))
        x = scheduler.step(e_unc + w * (e_c - e_unc), t, x, eta=eta,
                           generator=generator if z is None else None,
                           variance_noise=z).prev_sample
      out.append(((x[:, 0] + 1) / 2).clamp(0, 1).numpy())
  return np.concatenate(out).astype(np.float32)


def set_class_labels(unet, labels, null_label: int, cfg: bool = True):
  """Makes a CTRL UNet usable inside diffusers' stock pipelines (which never pass
  `class_labels`): a forward pre-hook adds them. `labels`: one int or int [b], the labels of
  the conditional samples. With `cfg` (guidance scale > 1) the pipeline's UNet batch is
  [unconditional half, conditional half] and gets [NULL]·(n/2) + labels; without, labels.
  Returns the hook handle (`.remove()` to undo)."""
  import torch  # pylint: disable=g-import-not-at-top
  labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)

  def hook(module, args, kwargs):
    n = (args[0] if args else kwargs["sample"]).shape[0]
    m = n // 2 if cfg else n
    y = labels.expand(m) if len(labels) == 1 else labels
    if len(y) != m or (cfg and n % 2):
      raise ValueError(f"set_class_labels: {len(labels)} labels for a UNet batch of {n} "
                       f"(cfg={cfg}).")
    if cfg:
      y = torch.cat([torch.full_like(y, null_label), y])
    kwargs["class_labels"] = y.to(next(module.parameters()).device)
    return args, kwargs

  return unet.register_forward_pre_hook(hook, with_kwargs=True)
