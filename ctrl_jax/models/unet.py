"""Building and loading diffusers' Flax UNet (the frozen pre-trained model)."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from diffusers import FlaxUNet2DConditionModel


def tiny_unet_config(sample_size: int = 16, in_channels: int = 4,
                     block_out_channels: tuple[int, ...] = (32, 64),
                     cross_attention_dim: int = 32, attention_head_dim: int = 8,
                     layers_per_block: int = 1) -> dict[str, Any]:
  """A ~0.8 M-parameter SD-shaped UNet config (cross-attention in every block but the last
  down / first up), for tests, benchmarks and the digits model."""
  n = len(block_out_channels)
  return dict(
      sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
      attention_head_dim=attention_head_dim, cross_attention_dim=cross_attention_dim)


def build_unet(config: dict[str, Any], dtype: Any = jnp.float32) -> FlaxUNet2DConditionModel:
  """A Flax UNet from a diffusers config dict; `dtype` is the activation dtype (params stay
  float32)."""
  config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
  return FlaxUNet2DConditionModel(**config, dtype=dtype)


def jit_init(init_fn):
  """`jax.jit` for a one-off parameter init. Un-jitted, Flax init of the digits UNet takes ~20 s
  on CPU; jitted at XLA's default optimisation level it compiles in ~16 s, at level 0 in ~8 s
  (an init runs once, so its own speed does not matter; values agree to 1e-7). Under a trace
  (`jax.eval_shape`, an outer jit) the init is traced as is: compiler options are top-level only.
  """
  jitted = jax.jit(init_fn, compiler_options={"xla_backend_optimization_level": 0})

  def init(key, *args):
    if isinstance(key, jax.core.Tracer):
      return init_fn(key, *args)
    return jitted(key, *args)

  return init


def init_unet_params(unet: FlaxUNet2DConditionModel, key: jax.Array) -> dict:
  """Random UNet parameters (a plain dict, float32)."""
  params = jit_init(unet.init_weights)(key)
  return jax.tree_util.tree_map(jnp.asarray, dict(params))


def load_pretrained_unet(path_or_hub_id: str, subfolder: Optional[str] = "unet",
                         dtype: Any = jnp.float32) -> tuple[FlaxUNet2DConditionModel, dict]:
  """Loads Flax UNet weights from a local diffusers folder or a hub id.

  A local path must hold `config.json` and `diffusion_flax_model.msgpack` (in `subfolder` when
  given). Hub ids are tried only when the path does not exist locally.
  """
  local = os.path.join(path_or_hub_id, subfolder) if subfolder else path_or_hub_id
  if os.path.exists(path_or_hub_id) and not os.path.exists(
      os.path.join(local, "config.json")):
    raise FileNotFoundError(
        f"pretrained UNet: {local!r} has no config.json; expected a diffusers UNet folder "
        "(config.json + diffusion_flax_model.msgpack).")
  try:
    unet, params = FlaxUNet2DConditionModel.from_pretrained(
        path_or_hub_id, subfolder=subfolder, dtype=dtype)
  except OSError as e:
    raise FileNotFoundError(
        f"pretrained UNet {path_or_hub_id!r} could not be loaded ({e}). Give a local diffusers "
        "folder, or a hub id on a machine that is online.") from e
  return unet, jax.tree_util.tree_map(jnp.asarray, dict(params))
