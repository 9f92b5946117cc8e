"""Noise schedules of discrete-time diffusion models and DDIM timestep spacing.

Pure functions returning pytrees, so a schedule can be passed through `jax.jit` as an argument
(no recompilation when it changes) and sharded like any other array.
"""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule with `T` training timesteps.

  Attributes:
    betas: float32 [T], β_t.
    alphas_cumprod: float32 [T], ᾱ_t = Π_{s≤t} (1 − β_s).
    final_alpha_cumprod: float32 [], ᾱ used for the step after t = 0 (t_prev < 0): 1.0 with
      `set_alpha_to_one=True`, ᾱ_0 otherwise (Stable Diffusion uses ᾱ_0).
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  final_alpha_cumprod: jnp.ndarray

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


def _betas(beta_schedule: str, beta_start: float, beta_end: float, n: int) -> np.ndarray:
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if beta_schedule == "scaled_linear":
    # Stable Diffusion's schedule: linear in sqrt(β).
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if beta_schedule == "squaredcos_cap_v2":
    # Nichol & Dhariwal's cosine ᾱ(t), β capped at 0.999 to avoid a singular last step.
    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                     for i in range(n)], dtype=np.float64)
  raise ValueError(
      f"beta_schedule={beta_schedule!r} is not supported; expected one of {BETA_SCHEDULES}.")


def make_schedule(beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                  beta_end: float = 0.012, num_train_timesteps: int = 1000,
                  set_alpha_to_one: bool = False) -> Schedule:
  """Builds a noise schedule; the defaults are Stable Diffusion v1.5's.

  Same β's as diffusers' schedulers for `beta_schedule` in {"linear", "scaled_linear",
  "squaredcos_cap_v2"}. ᾱ is accumulated in float64 and stored as float32.
  """
  if num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps must be ≥ 2, got {num_train_timesteps}.")
  if not 0.0 < beta_start <= beta_end < 1.0 and beta_schedule != "squaredcos_cap_v2":
    raise ValueError(f"need 0 < beta_start ≤ beta_end < 1, got {beta_start}, {beta_end}.")
  betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
  alphas_cumprod = np.cumprod(1.0 - betas)
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
                  final_alpha_cumprod=jnp.asarray(final, jnp.float32))


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int,
                   steps_offset: int = 1) -> np.ndarray:
  """DDIM timesteps, noisiest first, with diffusers' "leading" spacing.

  `ddim_timesteps(1000, 50)` → [981, 961, …, 1] (Stable Diffusion's `steps_offset=1`). The
  step after timesteps[i] is timesteps[i] − T // num_inference_steps (negative after the last).

  Returns:
    int32 [num_inference_steps].
  """
  if not 0 < num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got "
                     f"{num_inference_steps}.")
  ratio = num_train_timesteps // num_inference_steps
  return (np.arange(num_inference_steps)[::-1] * ratio + steps_offset).astype(np.int32)


def previous_timesteps(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
  """The t_prev of each DDIM step (negative means "past t = 0": use the final ᾱ)."""
  ratio = num_train_timesteps // len(timesteps)
  return (np.asarray(timesteps) - ratio).astype(np.int32)
