"""Our own Flax ↔ PyTorch name mapping for diffusers / transformers weights.

diffusers 0.39's Flax→PyTorch path is broken (`from_flax=True` fails, its converter leaves the
VAE mid-block attention random) and transformers' `from_pt` fails with torch 2.13, so both
directions are done here, on plain numpy arrays (no torch needed).

One rule serves the three components (UNet, VAE, CLIP text encoder): for every leaf of the
Flax parameter tree,
  * the module path is joined with "." and the numbered children `down_blocks_0`, `resnets_1`,
    `to_out_0`, `net_2`, … become `down_blocks.0`, `resnets.1`, `to_out.0`, `net.2`;
  * VAE attention (Flax `query`/`key`/`value`/`proj_attn`) is PyTorch `to_q`/`to_k`/`to_v`/
    `to_out.0`; older PyTorch checkpoints that still use the Flax names are read too;
  * leaves: `kernel` [kh, kw, in, out] → `weight` [out, in, kh, kw]; `kernel` [in, out] →
    `weight` [out, in]; `scale` (norms) and `embedding` → `weight`; `bias` → `bias`.
Loading checks that every Flax leaf is found with the right shape and that no PyTorch tensor
is left over, and names the offending keys otherwise: a silently random layer is impossible.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

COMPONENTS = ("unet", "vae", "text_encoder", "clip_vision")

# Flax module names "<name>_<i>" that are PyTorch ModuleList / Sequential children "<name>.<i>".
_NUMBERED = ("down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks",
             "downsamplers", "upsamplers", "to_out", "net")
_NUMBERED_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_NUMBERED))
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# PyTorch buffers that are not parameters (absent from the Flax tree).
_IGNORED_TORCH_KEYS = re.compile(r"(^|\.)position_ids$")


def _check_component(component: str) -> None:
  if component not in COMPONENTS:
    raise ValueError(f"component={component!r}; expected one of {COMPONENTS}.")


def torch_module_name(flax_module_path: tuple[str, ...], component: str) -> str:
  """PyTorch module name of a Flax module path, e.g. ("down_blocks_0", "attentions_0", …,
  "to_out_0") → "down_blocks.0.attentions.0.….to_out.0"."""
  _check_component(component)
  parts = []
  for name in flax_module_path:
    if component == "vae" and name in _VAE_ATTENTION:
      parts.append(_VAE_ATTENTION[name])
      continue
    m = _NUMBERED_RE.match(name)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
  return ".".join(parts)


def _torch_leaf(leaf: str) -> str:
  return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def torch_key(flax_path: tuple[str, ...], component: str) -> str:
  """PyTorch state-dict key of a Flax parameter path (module path + leaf name)."""
  return f"{torch_module_name(flax_path[:-1], component)}.{_torch_leaf(flax_path[-1])}"


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def _to_flax_layout(leaf: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and len(flax_shape) == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if leaf == "kernel" and len(flax_shape) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # old checkpoints: 1×1 conv as Linear
      value = value[:, :, 0, 0]
    return value.T
  return value


def to_torch_state_dict(flax_params: Mapping[str, Any], component: str) -> dict[str, np.ndarray]:
  """Flax params (nested dict) → PyTorch state dict {key: contiguous float32 numpy array}."""
  _check_component(component)
  out = {}
  for path, value in traverse_util.flatten_dict(dict(flax_params)).items():
    key = torch_key(path, component)
    if key in out:
      raise ValueError(f"two Flax parameters map to the PyTorch key {key!r}.")
    out[key] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(value, np.float32)))
  return out


def _legacy_aliases(key: str, component: str) -> list[str]:
  """Other names the same tensor has in older PyTorch checkpoints."""
  if component != "vae":
    return []
  aliases = []
  for flax_name, torch_name in _VAE_ATTENTION.items():
    token = f".{torch_name}."
    if token in key:
      aliases.append(key.replace(token, f".{flax_name}."))
  return aliases


def from_torch_state_dict(state_dict: Mapping[str, Any], abstract_params: Mapping[str, Any],
                          component: str, *, source: str = "state dict",
                          dtype: Any = np.float32, ignore: str | None = None,
                          hint: str = "Is the config.json from the same model?") -> dict:
  """PyTorch state dict → Flax params shaped like `abstract_params`.

  Args:
    state_dict: {key: array} (numpy, jax or torch-free arrays from safetensors).
    abstract_params: the Flax tree to fill (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(module.init_weights, key)`).
    component: one of COMPONENTS.
    source: named in error messages (e.g. the file path).
    ignore: regex of PyTorch keys that are not ours to load (e.g. the other tower of a CLIP).
    hint: appended to the error message.
  Returns:
    Nested dict of numpy arrays of `dtype`.
  Raises:
    ValueError naming every missing key, shape mismatch and unused PyTorch tensor.
  """
  _check_component(component)
  remaining = {k: v for k, v in state_dict.items() if not _IGNORED_TORCH_KEYS.search(k)
               and not (ignore and re.search(ignore, k))}
  flat, missing, mismatched = {}, [], []
  for path, leaf in traverse_util.flatten_dict(dict(abstract_params)).items():
    key = torch_key(path, component)
    found = next((k for k in [key, *_legacy_aliases(key, component)] if k in remaining), None)
    if found is None:
      missing.append(key)
      continue
    value = _to_flax_layout(path[-1], np.asarray(remaining.pop(found), dtype), tuple(leaf.shape))
    if value.shape != tuple(leaf.shape):
      mismatched.append(f"{found}: PyTorch {tuple(value.shape)} vs Flax {tuple(leaf.shape)} "
                        f"(after layout change)")
      continue
    flat[path] = value
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensors, e.g. {missing[:5]}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:5]}")
  if remaining:
    problems.append(f"{len(remaining)} unused tensors, e.g. {sorted(remaining)[:5]}")
  if problems:
    raise ValueError(f"{component} weights from {source} do not match the model config: "
                     + "; ".join(problems) + ". " + hint)
  return traverse_util.unflatten_dict(flat)
