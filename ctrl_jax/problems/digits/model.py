"""The pre-trained model of the digits benchmark: p(x | c) with c = digit class 0..9.

It plays the role of Stable Diffusion: diffusers' `FlaxUNet2DConditionModel` (tiny config,
8×8×1 pixels in [-1, 1]) with c entering through cross-attention. A learned class → token
table [11, 1, D] stands in for the text encoder (row 10 = the null token of classifier-free
guidance); trained with ε-prediction, label dropout and an EMA of the weights.

Params: {"unet": UNet params, "c_table": float32 [num_classes + 1, 1, D]}.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctrl_jax.core import schedules
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.runtime import loop
from ctrl_jax.runtime import sharding as shd

NUM_DIGITS = 10


def unet_config(config: ml_collections.ConfigDict) -> dict:
  """The digits UNet: 8×8×1, cross-attention blocks (≥ 64 channels per block: diffusers'
  Flax UNet has 32 GroupNorm groups, and 32-channel blocks erase the time embedding)."""
  return unet_lib.tiny_unet_config(
      sample_size=8, in_channels=1, block_out_channels=tuple(config.block_out_channels),
      cross_attention_dim=config.context_dim, attention_head_dim=config.attention_head_dim,
      layers_per_block=config.layers_per_block)


def to_model_space(x01):
  """Images in [0, 1] [..., 8, 8] → model space [-1, 1] [..., 1, 8, 8]."""
  return (2.0 * x01 - 1.0)[..., None, :, :]


def to_images(x):
  """Model space [..., 1, 8, 8] → images [..., 8, 8] clipped to [0, 1] (what every judge and
  the reward classifiers see)."""
  return jnp.clip((x[..., 0, :, :] + 1.0) / 2.0, 0.0, 1.0)


def contexts(params: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(per-digit contexts [10, 1, D], null context [1, D]) from the c → token table."""
  return params["c_table"][:NUM_DIGITS], params["c_table"][NUM_DIGITS]


def init_params(key: jax.Array, unet, context_dim: int) -> dict:
  k_unet, k_tab = jax.random.split(key)
  return {"unet": unet_lib.init_unet_params(unet, k_unet),
          "c_table": jax.random.normal(k_tab, (NUM_DIGITS + 1, 1, context_dim), jnp.float32)}


def denoising_loss(params: dict, unet, schedule: schedules.Schedule, x0: jnp.ndarray,
                   c: jnp.ndarray, key: jax.Array, p_uncond: float) -> jnp.ndarray:
  """ε-prediction MSE at uniform t ∈ [0, T); c replaced by the null token with prob p_uncond.

  x0: [B, 1, 8, 8] in [-1, 1]; c: int [B].
  """
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  abar = schedule.alphas_cumprod[t][:, None, None, None]
  x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
  c = jnp.where(jax.random.uniform(k_drop, (b,)) < p_uncond, NUM_DIGITS, c)
  pred = unet.apply({"params": params["unet"]}, x_t, t, params["c_table"][c]).sample
  return jnp.mean((pred - eps) ** 2)


def make_pretrain_step(unet, schedule: schedules.Schedule, optimizer, mesh, p_uncond: float,
                       ema_max_decay: float):
  """Jitted `step(state, batch) -> (state, metrics)`; state {"step", "params", "ema", "opt",
  "key" (raw key data)}, batch {"x" [B, 1, 8, 8], "c" [B]} sharded over the data axis.

  EMA decay at update n is min(ema_max_decay, (1 + n) / (10 + n)) (warm-up, so a short run's
  EMA is not dominated by the random init).
  """

  def step(state, batch):
    # The seed key is stored as raw uint32 data: orbax saves and restores it as a plain array.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    loss, grads = jax.value_and_grad(denoising_loss)(state["params"], unet, schedule,
                                                     batch["x"], batch["c"], key, p_uncond)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    n = state["step"].astype(jnp.float32)
    decay = jnp.minimum(ema_max_decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
    return ({"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt,
             "key": state["key"]},
            {"loss": loss, "grad_norm": optax.tree.norm(grads)})

  repl = shd.replicated(mesh)
  return shd.jit(step, mesh, in_shardings=(repl, shd.data_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def pretrain(config: ml_collections.ConfigDict, x_train: np.ndarray, c_train: np.ndarray,
             workdir: str, on_running: Optional[Callable[[], None]] = None
             ) -> tuple[Any, dict]:
  """Trains (or resumes training) p(x | c) on the train split; returns (unet, EMA params).

  config: the `pretrain` sub-config (configs/digits.py). Batches are drawn with replacement by
  `default_rng([seed, step])`, so the run is resumable and reproducible. `on_running`: see
  `loop.run`.
  """
  if not 0 <= config.warmup_steps < config.num_steps:
    raise ValueError(f"config.pretrain.num_steps={config.num_steps} must exceed "
                     f"config.pretrain.warmup_steps={config.warmup_steps} (≥ 0).")
  mesh = shd.make_mesh()
  shd.check_divisible(config.batch_size, mesh, "config.pretrain.batch_size")
  unet = unet_lib.build_unet(unet_config(config))
  schedule = make_schedule(config)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.num_steps,
                                         config.lr * 0.1), weight_decay=config.weight_decay))
  params = init_params(jax.random.key(config.seed), unet, config.context_dim)
  state = jax.device_put(
      {"step": jnp.zeros((), jnp.int32), "params": params,
       "ema": jax.tree_util.tree_map(jnp.copy, params), "opt": optimizer.init(params),
       "key": jax.random.key_data(jax.random.key(config.seed + 1))}, shd.replicated(mesh))
  step_fn = make_pretrain_step(unet, schedule, optimizer, mesh, config.p_uncond,
                               config.ema_decay)
  x_model = np.asarray(to_model_space(np.asarray(x_train, np.float32)))
  c_train = np.asarray(c_train, np.int32)

  def batch_fn(step):
    idx = np.random.default_rng([config.seed, step]).integers(0, len(x_model), config.batch_size)
    return {"x": x_model[idx], "c": c_train[idx]}

  state, _, _ = loop.run("pretrain", workdir, state, step_fn, batch_fn,
                         config.num_steps, log_every=config.log_every,
                         checkpoint_every=config.checkpoint_every, on_running=on_running)
  return unet, jax.device_get(state["ema"])


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  return schedules.make_schedule(num_train_timesteps=1000, beta_start=config.beta_start,
                                 beta_end=config.beta_end, beta_schedule=config.beta_schedule)
