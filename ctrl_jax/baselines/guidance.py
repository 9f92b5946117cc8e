"""Inference-time guidance baselines against CTRL (docs/method.md §10), as pure functions.

Every sampler runs on the same schedule, DDIM timesteps, pre-trained ε-model and reward
classifiers as CTRL, and draws the DDIM noise of step i from `fold_in(key, i)` exactly like
`sampling.ddim_sample`, so with guidance switched off (weight 0, or one candidate) a sampler
reproduces plain DDIM sample for sample. Extra randomness (candidate selection, resampling) comes
from `fold_in(fold_in(key, i), 1)`, the final SMC pick from `fold_in(key, N)`.

Shared arguments:
  eps_fn: `(x [B, ...], t int []) -> ε [B, ...]`, the *pre-trained* model with CFG on c already
    applied (for digits: `pretrained_eps_fn`). SMC and SVDD call it on the expanded batch of
    B·K particles (B·M candidates), request-major (row b·K + k): build it for
    `repeat_requests(prompt, K)`.
  log_prob_fn: `(x0 [B, ...] model space, y) -> [B]`, differentiable Σ_task w_task log p̂(y | x0)
    (for digits: `digits_log_prob_fn`). Must be per-sample (no cross-batch statistics): its
    gradient is taken of the batch sum.
  y: the requested labels, any pytree with leading dim B (e.g. int [B, T]).
  weight, eta, temperature, resample_threshold: traced scalars (weight and temperature may
    also be [B], one per request), so a jitted sampler serves every value without recompiling.
Static (graph-changing) options are keyword-only: `use_unet_jacobian`, `num_candidates`,
`proposal`, `normalize`, `implied_eps`.

Sign conventions: log p̂ is ascended; ε̃ = ε − w √(1−ᾱ_t) ∇_{x_t} log p̂ is classifier
guidance (∇ log p(x_t) = −ε/√(1−ᾱ_t)).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctrl_jax.core import sampling
from ctrl_jax.core import train
from ctrl_jax.core.schedules import Schedule

EpsClosure = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
LogProbFn = Callable[[jnp.ndarray, Any], jnp.ndarray]
NoisyLogProbFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]

METHODS = ("ddim", "dps", "classifier_guidance", "mpgd", "smc", "svdd")
SMC_PROPOSALS = ("twisted", "ddim")


# ----------------------------------------------------------------------------- shared pieces


def _steps(schedule: Schedule, timesteps) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(step index [N], t [N], t_prev [N]) with `sampling.ddim_sample`'s spacing."""
  timesteps = jnp.asarray(timesteps, jnp.int32)
  n = timesteps.shape[0]
  return jnp.arange(n), timesteps, timesteps - schedule.num_train_timesteps // n


def _per_sample(v, x: jnp.ndarray) -> jnp.ndarray:
  """A scalar or [B] value, broadcastable against x [B, ...]."""
  v = jnp.asarray(v, x.dtype)
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _step_noise(key: jax.Array, i, shape, dtype) -> jnp.ndarray:
  return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def _aux_key(key: jax.Array, i) -> jax.Array:
  """Selection / resampling key of step i, distinct from its noise key fold_in(key, i)."""
  return jax.random.fold_in(jax.random.fold_in(key, i), 1)


def repeat_requests(tree: Any, n: int) -> Any:
  """Repeats every leaf n times along axis 0, request-major: [B, ...] → [B·n, ...]."""
  return jax.tree_util.tree_map(lambda a: jnp.repeat(jnp.asarray(a), n, axis=0), tree)


def _repeat_per_request(v, n: int):
  """A scalar stays scalar; a [B] value becomes [B·n]."""
  v = jnp.asarray(v)
  return v if v.ndim == 0 else jnp.repeat(v, n, axis=0)


def x0_log_prob_and_grad(eps_fn: EpsClosure, log_prob_fn: LogProbFn, schedule: Schedule,
                         x: jnp.ndarray, t: jnp.ndarray, y: Any, *, use_unet_jacobian: bool
                         ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Reconstruction-guidance terms at x_t.

  Returns (ε [B, ...], x̂0(x_t) [B, ...], log p̂(y | x̂0) [B], ∇_{x_t} log p̂(y | x̂0(x_t))).
  With `use_unet_jacobian` the gradient runs back through ε (one UNet back-prop); without it
  ε is a constant, so ∇_{x_t} = ∇_{x̂0} / √ᾱ_t (the authors' Stable Diffusion variant).
  """
  sqrt_a = jnp.sqrt(schedule.alphas_cumprod[t])
  if use_unet_jacobian:
    def objective(x):
      eps = eps_fn(x, t)
      x0 = sampling.predict_x0(schedule, x, eps, t)
      lp = log_prob_fn(x0, y)
      return jnp.sum(lp), (eps, x0, lp)
    grad, (eps, x0, lp) = jax.grad(objective, has_aux=True)(x)
    return eps, x0, lp, grad
  eps = eps_fn(x, t)
  x0 = sampling.predict_x0(schedule, x, eps, t)
  lp, grad_x0 = _value_and_grad_x0(log_prob_fn, x0, y)
  return eps, x0, lp, grad_x0 / sqrt_a


def _value_and_grad_x0(log_prob_fn: LogProbFn, x0: jnp.ndarray, y: Any):
  def objective(x0):
    lp = log_prob_fn(x0, y)
    return jnp.sum(lp), lp
  grad, lp = jax.grad(objective, has_aux=True)(x0)
  return lp, grad


# ----------------------------------------------------------------------------- DPS


def dps_sample(eps_fn: EpsClosure, log_prob_fn: LogProbFn, schedule: Schedule,
               timesteps: jnp.ndarray, x_T: jnp.ndarray, y: Any, key: jax.Array,
               eta: jnp.ndarray, weight: jnp.ndarray, *, use_unet_jacobian: bool
               ) -> jnp.ndarray:
  """Reconstruction guidance (DPS): x_T [B, ...] → x_0 [B, ...].

  ε̃ = ε − w √(1−ᾱ_t) ∇_{x_t} log p̂(y | x̂0(x_t)), then the DDIM step with ε̃. `weight` w is a
  scalar or [B]; `use_unet_jacobian` (static) see `x0_log_prob_and_grad`.
  """
  steps, ts, t_prevs = _steps(schedule, timesteps)

  def body(x, inp):
    i, t, t_prev = inp
    eps, _, _, grad = x0_log_prob_and_grad(eps_fn, log_prob_fn, schedule, x, t, y,
                                           use_unet_jacobian=use_unet_jacobian)
    eps = eps - _per_sample(weight, x) * jnp.sqrt(1.0 - schedule.alphas_cumprod[t]) * grad
    z = _step_noise(key, i, x.shape, x.dtype)
    return sampling.ddim_step(schedule, x, eps, t, t_prev, eta, z)[0], None

  return jax.lax.scan(body, x_T, (steps, ts, t_prevs))[0]


# ----------------------------------------------------------------------------- classifier guidance


def classifier_guidance_sample(eps_fn: EpsClosure, noisy_log_prob_fn: NoisyLogProbFn,
                               schedule: Schedule, timesteps: jnp.ndarray, x_T: jnp.ndarray,
                               y: Any, key: jax.Array, eta: jnp.ndarray,
                               weight: jnp.ndarray) -> jnp.ndarray:
  """Classifier guidance with a noise-conditional classifier: x_T [B, ...] → x_0 [B, ...].

  ε̃ = ε − w √(1−ᾱ_t) ∇_{x_t} log p(y | x_t, t); `noisy_log_prob_fn(x_t, t int [], y) -> [B]`
  (for digits: `make_noisy_log_prob_fn` over `fit_noisy_classifier`'s params). No UNet
  back-prop. At w = 1 with the exact noisy classifier this is the Doob h-transform of
  docs/method.md §2 at γ = 1 (up to discretisation).
  """
  steps, ts, t_prevs = _steps(schedule, timesteps)

  def body(x, inp):
    i, t, t_prev = inp
    eps = eps_fn(x, t)
    grad = jax.grad(lambda x: jnp.sum(noisy_log_prob_fn(x, t, y)))(x)
    eps = eps - _per_sample(weight, x) * jnp.sqrt(1.0 - schedule.alphas_cumprod[t]) * grad
    z = _step_noise(key, i, x.shape, x.dtype)
    return sampling.ddim_step(schedule, x, eps, t, t_prev, eta, z)[0], None

  return jax.lax.scan(body, x_T, (steps, ts, t_prevs))[0]


# ----------------------------------------------------------------------------- MPGD


def mpgd_sample(eps_fn: EpsClosure, log_prob_fn: LogProbFn, schedule: Schedule,
                timesteps: jnp.ndarray, x_T: jnp.ndarray, y: Any, key: jax.Array,
                eta: jnp.ndarray, weight: jnp.ndarray, *, normalize: bool = False,
                implied_eps: bool = True) -> jnp.ndarray:
  """Manifold-preserving guidance (MPGD, one gradient step per DDIM step): x_T → x_0.

  x̂0 = x̂0(x_t) with no UNet back-prop; x̂0' = x̂0 + w ∇_{x̂0} log p̂(y | x̂0); then
    implied_eps=True:  the DDIM step from x̂0' and the ε it implies at the same x_t,
                       ε' = (x_t − √ᾱ_t x̂0') / √(1−ᾱ_t) = ε − w √ᾱ_t/√(1−ᾱ_t) ∇ (x_{t−1}
                       moves by (√ᾱ_prev − √(1−ᾱ_prev−σ²) √ᾱ_t/√(1−ᾱ_t)) w ∇: conservative);
    implied_eps=False: the MPGD paper's update (He et al. 2023, Alg. "MPGD w/o projection"),
                       x_{t−1} = √ᾱ_prev x̂0' + √(1−ᾱ_prev−σ²) ε + σz: x_{t−1} moves by
                       √ᾱ_prev w ∇.
  normalize (static): ∇ is divided by its per-sample RMS over pixels, so w is the RMS step on
  x̂0 in model-space units (robust to the classifier's gradient scale, which varies by orders
  of magnitude with how confident p̂ is); False uses the raw gradient.
  """
  steps, ts, t_prevs = _steps(schedule, timesteps)

  def body(x, inp):
    i, t, t_prev = inp
    a_t = schedule.alphas_cumprod[t]
    eps = eps_fn(x, t)
    x0 = sampling.predict_x0(schedule, x, eps, t)
    _, grad = _value_and_grad_x0(log_prob_fn, x0, y)
    if normalize:
      rms = jnp.sqrt(jnp.mean(grad.reshape(grad.shape[0], -1) ** 2, axis=-1))
      grad = grad / _per_sample(rms + 1e-12, grad)
    shift = _per_sample(weight, x) * grad  # x̂0' − x̂0
    z = _step_noise(key, i, x.shape, x.dtype)
    if implied_eps:
      # Written as ε − … rather than from x̂0' so that w = 0 is bit-identical to DDIM.
      eps = eps - jnp.sqrt(a_t) / jnp.sqrt(1.0 - a_t) * shift
      return sampling.ddim_step(schedule, x, eps, t, t_prev, eta, z)[0], None
    mean, std = sampling.ddim_mean_std(schedule, x, eps, t, t_prev, eta)
    mean = mean + jnp.sqrt(sampling.alpha_prev(schedule, t_prev)) * shift
    return mean + std * z, None

  return jax.lax.scan(body, x_T, (steps, ts, t_prevs))[0]


# ----------------------------------------------------------------------------- SMC (TDS)


def normalize_log_weights(log_w: jnp.ndarray) -> jnp.ndarray:
  """log w [B, K] → normalised weights [B, K] (each row sums to 1).

  NaN counts as −inf; a row with no finite entry becomes uniform.
  """
  log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
  finite = jnp.isfinite(jnp.max(log_w, axis=-1, keepdims=True))
  return jax.nn.softmax(jnp.where(finite, log_w, 0.0), axis=-1)


def effective_sample_size(log_w: jnp.ndarray) -> jnp.ndarray:
  """ESS = 1 / Σ_k w_k² of the normalised weights: [B, K] → [B], in [1, K]."""
  w = normalize_log_weights(log_w)
  return 1.0 / jnp.sum(w * w, axis=-1)


def resample(key: jax.Array, log_w: jnp.ndarray) -> jnp.ndarray:
  """Systematic resampling: log w [B, K] → ancestor indices int32 [B, K] (sorted per row).

  One uniform u per row; particle j is picked for every k with u_k = (u + k)/K in
  [cdf_{j−1}, cdf_j), so it appears ⌊K w_j⌋ or ⌈K w_j⌉ times (lower variance than
  multinomial). Zero-weight particles are never picked.
  """
  b, k = log_w.shape
  cdf = jnp.cumsum(normalize_log_weights(log_w), axis=-1)
  u = (jax.random.uniform(key, (b, 1), cdf.dtype) + jnp.arange(k, dtype=cdf.dtype)) / k
  idx = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(cdf, u)
  return jnp.minimum(idx, k - 1).astype(jnp.int32)


@flax.struct.dataclass
class SmcDiagnostics:
  """Side outputs of `smc_sample` (N steps, B requests, K particles).

  Attributes:
    ess: [N, B] effective sample size at the start of each step (before its resampling).
    resampled: bool [N, B], whether the request's particles were resampled at that step.
    final_ess: [B] ESS of the final weights.
    weights: [B, K] final normalised importance weights.
    particles: [B, K, ...] final particles.
    log_prob: [B, K] log p̂(y | x0) of the final particles (unweighted by `weight`).
    chosen: int32 [B], the particle returned per request.
  """
  ess: jnp.ndarray
  resampled: jnp.ndarray
  final_ess: jnp.ndarray
  weights: jnp.ndarray
  particles: jnp.ndarray
  log_prob: jnp.ndarray
  chosen: jnp.ndarray


def smc_sample(eps_fn: EpsClosure, log_prob_fn: LogProbFn, schedule: Schedule,
               timesteps: jnp.ndarray, x_T: jnp.ndarray, y: Any, key: jax.Array,
               eta: jnp.ndarray, weight: jnp.ndarray, resample_threshold: jnp.ndarray = 0.5,
               *, proposal: str = "twisted", use_unet_jacobian: bool = True
               ) -> tuple[jnp.ndarray, SmcDiagnostics]:
  """Twisted-diffusion-sampler-style SMC targeting p_pre(x0) p̂(y | x0)^w.

  Per request K particles; twist log h_t(x_t) = w log p̂(y | x̂0(x_t)) (at the end, w log p̂(y | x0)
  itself, so the target is CTRL's tempered posterior p_γ with γ = w).
    proposal="twisted" (static): q(x_{t−1} | x_t) = N(μ_pre + σ_t² ∇_{x_t} log h_t, σ_t²)
      (TDS), the gradient through the UNet (`use_unet_jacobian`, static, default True as in
      TDS). The weights correct for whichever proposal is used, but only as K → ∞: without
      the Jacobian ∇_{x_t} = ∇_{x̂0}/√ᾱ_t is ~100× too large at high noise, the shift throws
      every particle of a request far out together and no reweighting brings them back
      (closed-form test problem: E[a·x0] 1.57 against a target of −0.78 with K = 16).
    proposal="ddim": q = p_pre, no gradients at all (bootstrap filter with twisted weights).
  Incremental weight log [p_pre(x_{t−1}|x_t) h_{t−1}(x_{t−1}) / (q(x_{t−1}|x_t) h_t(x_t))],
  with log p_pre/q = −σ z·∇ − σ²‖∇‖²/2 in closed form (0 when σ = 0, i.e. η = 0, where the
  proposal equals p_pre). Initial weights h_T(x_T). At the start of each step a request's
  particles are resampled (systematic, `resample`) when ESS < resample_threshold · K (traced;
  0 = never, > 1 = every step), then its weights reset to uniform. At the end one particle per
  request is drawn from the final weights (key fold_in(key, N)).

  Args:
    x_T: [B, K, ...] initial noise. y: per request, leading dim B (repeated K times inside).
    eps_fn, log_prob_fn: called on the flat [B·K, ...] particle batch, request-major.
    weight: scalar or [B] twist scale (0: plain DDIM particles, equal weights, no resampling).

  Returns:
    (x0 [B, ...], SmcDiagnostics).
  """
  if proposal not in SMC_PROPOSALS:
    raise ValueError(f"proposal={proposal!r}; expected one of {SMC_PROPOSALS}.")
  b, k = x_T.shape[:2]
  item = x_T.shape[2:]
  y_rep = repeat_requests(y, k)
  w_rep = _repeat_per_request(weight, k)  # scalar or [B·K]
  steps, ts, t_prevs = _steps(schedule, timesteps)
  n = ts.shape[0]

  def twist(x, t):
    """(ε, log h_t [B·K], ∇ log h_t) at flat particles x."""
    if proposal == "twisted":
      eps, _, lp, grad = x0_log_prob_and_grad(eps_fn, log_prob_fn, schedule, x, t, y_rep,
                                              use_unet_jacobian=use_unet_jacobian)
      return eps, w_rep * lp, _per_sample(w_rep, x) * grad
    eps = eps_fn(x, t)
    lp = log_prob_fn(sampling.predict_x0(schedule, x, eps, t), y_rep)
    return eps, w_rep * lp, jnp.zeros_like(x)

  def gather(a, idx):  # a [B·K, ...], idx [B, K] → a[b·K + idx[b, k]]
    return a[(jnp.arange(b)[:, None] * k + idx).reshape(-1)]

  def step(carry, i, t, t_prev, final):
    x, eps, log_h, grad, log_w = carry
    ess = effective_sample_size(log_w)
    do = ess < resample_threshold * k
    idx = jnp.where(do[:, None], resample(_aux_key(key, i), log_w), jnp.arange(k)[None])
    x, eps, log_h, grad = (gather(a, idx) for a in (x, eps, log_h, grad))
    log_w = jnp.where(do[:, None], 0.0, log_w)
    mean, std = sampling.ddim_mean_std(schedule, x, eps, t, t_prev, eta)
    z = _step_noise(key, i, x.shape, x.dtype)
    shift = std**2 * grad
    x_new = mean + shift + std * z
    flat = lambda a: jnp.sum(a.reshape(a.shape[0], -1), axis=-1)
    log_p_over_q = -flat(std * z * grad) - flat((std * grad) ** 2) / 2.0
    if final:
      lp = log_prob_fn(x_new, y_rep)
      eps_new, log_h_new, grad_new = eps, w_rep * lp, grad
    else:
      lp = None
      eps_new, log_h_new, grad_new = twist(x_new, t_prev)
    log_w = log_w + (log_p_over_q + log_h_new - log_h).reshape(b, k)
    return (x_new, eps_new, log_h_new, grad_new, log_w), (ess, do), lp

  x = x_T.reshape((b * k,) + item)
  eps, log_h, grad = twist(x, ts[0])
  carry = (x, eps, log_h, grad, log_h.reshape(b, k))
  outs = []
  if n > 1:
    def body(carry, inp):
      carry, out, _ = step(carry, *inp, final=False)
      return carry, out
    carry, out = jax.lax.scan(body, carry, (steps[:-1], ts[:-1], t_prevs[:-1]))
    outs.append(out)
  carry, (ess_last, do_last), log_prob = step(carry, steps[-1], ts[-1], t_prevs[-1], final=True)
  outs.append((ess_last[None], do_last[None]))
  ess = jnp.concatenate([o[0] for o in outs])
  resampled = jnp.concatenate([o[1] for o in outs])
  x, log_w = carry[0], carry[-1]
  weights = normalize_log_weights(log_w)
  chosen = jax.random.categorical(jax.random.fold_in(key, n), jnp.log(weights), axis=-1)
  particles = x.reshape((b, k) + item)
  x0 = particles[jnp.arange(b), chosen]
  return x0, SmcDiagnostics(ess=ess, resampled=resampled, final_ess=effective_sample_size(log_w),
                            weights=weights, particles=particles,
                            log_prob=log_prob.reshape(b, k), chosen=chosen.astype(jnp.int32))


# ----------------------------------------------------------------------------- SVDD


def svdd_sample(eps_fn: EpsClosure, log_prob_fn: LogProbFn, schedule: Schedule,
                timesteps: jnp.ndarray, x_T: jnp.ndarray, y: Any, key: jax.Array,
                eta: jnp.ndarray, temperature: jnp.ndarray, *, num_candidates: int
                ) -> jnp.ndarray:
  """SVDD (derivative-free soft-value decoding): x_T [B, ...] → x_0 [B, ...].

  At each step M = num_candidates (static) candidates x_{t−1} are drawn from the pre-trained
  DDIM transition (noise fold_in(key, i), shape [B, M, ...]); each is valued by
  v = log p̂(y | x̂0(x_{t−1})) with x̂0 from the ε at the next timestep (which is then reused as
  that step's ε: no extra call), or at the last step by log p̂(y | x_{t−1}) itself. One
  candidate per request is drawn from softmax(v / α), α = `temperature` (scalar or [B];
  α = 0 is argmax). Selection ∝ p̂^{1/α}: α plays 1/γ. No gradients.

  eps_fn and log_prob_fn are called on [B·M, ...] (request-major); step 0's ε is computed on
  x_T repeated M times (so one closure serves every call). With M = 1 the sample equals
  `sampling.ddim_sample` with the same key.
  """
  m = num_candidates
  b = x_T.shape[0]
  item = x_T.shape[1:]
  y_rep = repeat_requests(y, m)
  alpha = jnp.asarray(temperature, jnp.float32)
  steps, ts, t_prevs = _steps(schedule, timesteps)
  n = ts.shape[0]

  def choose(i, values):  # values [B, M] → index [B]
    a = jnp.broadcast_to(alpha, (b,))
    logits = values / jnp.where(a > 0, a, 1.0)[:, None]
    sampled = jax.random.categorical(_aux_key(key, i), logits, axis=-1)
    return jnp.where(a > 0, sampled, jnp.argmax(values, axis=-1))

  def candidates(x, eps, i, t, t_prev):
    mean, std = sampling.ddim_mean_std(schedule, x, eps, t, t_prev, eta)
    z = _step_noise(key, i, (b, m) + item, x.dtype)
    return (mean[:, None] + std * z).reshape((b * m,) + item)

  def pick(a, idx):  # a [B·M, ...] → a[b·M + idx[b]]
    return a[jnp.arange(b) * m + idx]

  def body(carry, inp):
    x, eps = carry
    i, t, t_prev = inp
    cand = candidates(x, eps, i, t, t_prev)
    eps_c = eps_fn(cand, t_prev)
    values = log_prob_fn(sampling.predict_x0(schedule, cand, eps_c, t_prev), y_rep)
    idx = choose(i, values.reshape(b, m))
    return (pick(cand, idx), pick(eps_c, idx)), None

  eps = eps_fn(repeat_requests(x_T, m), ts[0])[::m]
  carry = (x_T, eps)
  if n > 1:
    carry, _ = jax.lax.scan(body, carry, (steps[:-1], ts[:-1], t_prevs[:-1]))
  x, eps = carry
  cand = candidates(x, eps, steps[-1], ts[-1], t_prevs[-1])
  idx = choose(steps[-1], log_prob_fn(cand, y_rep).reshape(b, m))
  return pick(cand, idx)


# ----------------------------------------------------------------------------- cost


def unet_evals_per_sample(method: str, num_steps: int, *, cfg: bool = True,
                          use_unet_jacobian: bool = False, num_particles: int = 1,
                          num_candidates: int = 1, proposal: str = "twisted") -> int:
  """UNet evaluations spent per returned sample.

  With CFG every ε call is 2 UNet evaluations (conditional + unconditional, one batch). A
  back-prop through the UNet (DPS / TDS with `use_unet_jacobian`) counts as one more
  evaluation per ε call — in FLOPs a VJP costs ~2 forward passes, so this undercounts their
  compute. Classifier (p̂, noisy classifier) calls are not counted.
    ddim, classifier_guidance, mpgd: N ε calls. dps: N (×2 with the Jacobian).
    smc: K·N (x_T plus N − 1 intermediate states per particle; ×2 for the twisted proposal
      with the Jacobian). svdd: M·N (x_T repeated M times, then M candidates at each of the
      N − 1 intermediate steps; the last step's candidates are scored without ε).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {METHODS}.")
  calls = num_steps
  if method == "dps" and use_unet_jacobian:
    calls *= 2
  elif method == "smc":
    calls *= num_particles * (2 if proposal == "twisted" and use_unet_jacobian else 1)
  elif method == "svdd":
    calls *= num_candidates
  return calls * (2 if cfg else 1)


# ----------------------------------------------------------------------------- digits wiring


def soft_decode(x0: jnp.ndarray) -> jnp.ndarray:
  """Model space [..., 1, 8, 8] → images [..., 8, 8] by (x + 1) / 2, *not* clipped.

  `digits_model.to_images` clips to [0, 1], which zeroes the gradient of every pixel outside
  the range — at high noise most of x̂0 — and so silences guidance exactly where it should act.
  The classifiers then extrapolate slightly outside [0, 1]; final samples are still judged
  after `to_images`.
  """
  return (x0[..., 0, :, :] + 1.0) / 2.0


def digits_log_prob_fn(setup: train.CtrlSetup, frozen: dict) -> LogProbFn:
  """`(x0 [B, 1, 8, 8], y [B, T]) -> [B]`: CTRL's reward Σ_t w_t log(p̂_t(y_t | x) + 1e-6) on
  `soft_decode(x0)`, the same classifiers and weights CTRL is trained on."""
  return lambda x0, y: setup.reward_fn(frozen["reward"], soft_decode(x0), y)[0]


def pretrained_eps_fn(setup: train.CtrlSetup, frozen: dict, prompt: jnp.ndarray) -> EpsClosure:
  """The pre-trained ε(x, t) for prompts [B] with CFG (scale frozen["hparams"]["guidance_scale"]):
  `train.eps_functions`' reference closure bound to frozen["unet"]. For SMC / SVDD pass
  `repeat_requests(prompt, K)`."""
  labels = jnp.zeros(jnp.shape(prompt), jnp.int32)  # the reference model ignores y
  reference_eps = train.eps_functions(setup, frozen, prompt, labels)[1]
  return lambda x, t: reference_eps(frozen["unet"], x, t)


# ----------------------------------------------------------------------------- noisy classifier


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding of int timesteps [B] → [B, dim] (cos first, like diffusers' UNet)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoisyDigitClassifier(nn.Module):
  """p(y | x_t, t) for 8×8 digits: MLP on the pixels (plus, with neighbour_diffs, the squared
  right / down neighbour differences, as the clean classifiers use), with a sinusoidal t
  embedding added to every hidden layer. x_t [B, 1, 8, 8] model space, t int [] or [B] →
  logits [B, num_classes]."""
  num_classes: int
  hidden: tuple[int, ...] = (128, 128)
  time_dim: int = 64
  neighbour_diffs: bool = True

  @nn.compact
  def __call__(self, x_t, t):
    x = x_t.astype(jnp.float32)[..., 0, :, :]  # [B, 8, 8]
    feats = [x.reshape(x.shape[0], -1)]
    if self.neighbour_diffs:
      feats.append(((x[:, :, 1:] - x[:, :, :-1]) ** 2).reshape(x.shape[0], -1))
      feats.append(((x[:, 1:, :] - x[:, :-1, :]) ** 2).reshape(x.shape[0], -1))
    h = jnp.concatenate(feats, axis=-1)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    temb = nn.gelu(nn.Dense(self.time_dim)(timestep_embedding(t, self.time_dim)))
    for width in self.hidden:
      h = nn.gelu(nn.Dense(width)(h) + nn.Dense(width)(temb))
    return nn.Dense(self.num_classes)(h)


@functools.partial(jax.jit, static_argnames=("model", "steps", "batch", "lr"))
def _fit_noisy(model, params, x0, labels, schedule, key, *, steps, batch, lr):
  opt = optax.adam(lr)
  num_t = schedule.num_train_timesteps

  def loss_fn(params, k):
    k_idx, k_t, k_eps = jax.random.split(k, 3)
    idx = jax.random.randint(k_idx, (batch,), 0, x0.shape[0])
    t = jax.random.randint(k_t, (batch,), 0, num_t)
    a = schedule.alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0[idx] + jnp.sqrt(1.0 - a) * jax.random.normal(k_eps, x0[idx].shape)
    logits = model.apply(params, x_t, t)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

  def step(carry, i):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, i))
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
  return params, losses


def fit_noisy_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, schedule: Schedule,
                         seed: int, steps: int = 2000, lr: float = 1e-3, batch: int = 256,
                         **module_kwargs) -> Any:
  """Fits `NoisyDigitClassifier(num_classes, **module_kwargs)` on noised pairs.

  x [N, 8, 8] images in [0, 1], y int [N]. Each step draws `batch` pairs with replacement,
  t ~ U{0, …, T−1} and x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε with x0 = 2x − 1 [.., 1, 8, 8]; Adam on
  cross-entropy. Deterministic for a seed. Returns params for the module's `apply(params,
  x_t, t)`. Fit one per task name (`digits.task_names`) and combine with
  `make_noisy_log_prob_fn`.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  if x.ndim != 3 or y.shape != (x.shape[0],):
    raise ValueError(f"need x [N, H, W] and y [N]; got {x.shape}, {y.shape}.")
  model = NoisyDigitClassifier(num_classes, **module_kwargs)
  x0 = jnp.asarray(2.0 * x - 1.0)[:, None]
  key = jax.random.key(seed)
  params = model.init(jax.random.fold_in(key, 0), x0[:1], jnp.zeros((), jnp.int32))
  params, _ = _fit_noisy(model, params, x0, jnp.asarray(y), schedule,
                         jax.random.fold_in(key, 1), steps=steps, batch=batch, lr=lr)
  return params


def make_noisy_log_prob_fn(modules, weights) -> Callable[..., jnp.ndarray]:
  """`fn(params_per_task, x_t [B, ...], t, y [B, T]) -> Σ_t w_t log p(y_t | x_t, t)` [B].

  Exact log-softmax (no +1e-6 as in the clean reward: guidance wants the gradient of the
  log-probability itself even where p is tiny). Bind the params for
  `classifier_guidance_sample`: `lambda x, t, y: fn(params, x, t, y)`.
  """
  if len(modules) != len(weights):
    raise ValueError(f"{len(modules)} noisy classifiers but {len(weights)} weights.")

  def fn(params, x_t, t, y):
    total = 0.0
    for i, (module, w) in enumerate(zip(modules, weights)):
      logp = jax.nn.log_softmax(module.apply(params[i], x_t, t).astype(jnp.float32), axis=-1)
      total = total + w * jnp.take_along_axis(logp, y[:, i:i + 1].astype(jnp.int32), -1)[:, 0]
    return total

  return fn
