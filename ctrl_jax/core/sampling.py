"""DDIM sampling and the side-by-side CTRL trajectory, as pure functions.

Conventions: latents `x` are float32 [B, C, H, W] (diffusers' NCHW); an ε-model is a function
`eps_fn(params, x, t) -> eps` with `t` an int32 scalar timestep, already including any
classifier-free guidance. Timesteps run noisiest first; step i goes t_i → t_i − T/N.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from ctrl_jax.core.schedules import Schedule

EpsFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]

REMAT_POLICIES = {
    # Saves nothing: each model call is recomputed in the backward pass (least memory).
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Keeps matmul outputs without batch dims (weights-only dots): a little more memory.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keeps every intermediate: same as no remat, but still one remat boundary per call.
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def _bcast(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def alpha_prev(schedule: Schedule, t_prev: jnp.ndarray) -> jnp.ndarray:
  """ᾱ at the previous timestep; `t_prev < 0` selects the schedule's final ᾱ."""
  t_prev = jnp.asarray(t_prev)
  return jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)],
                   schedule.final_alpha_cumprod)


def predict_x0(schedule: Schedule, x_t: jnp.ndarray, eps: jnp.ndarray,
               t: jnp.ndarray) -> jnp.ndarray:
  """x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
  a_t = _bcast(schedule.alphas_cumprod[t], x_t)
  return (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)


def ddim_mean_std(schedule: Schedule, x_t: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray,
                  t_prev: jnp.ndarray, eta: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mean and std of the DDIM transition p(x_{t_prev} | x_t) for an ε-prediction.

  σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t) · (1−ᾱ_t/ᾱ_prev)); μ = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε.
  `t`, `t_prev` are scalars or [B]; returns μ with x_t's shape and σ broadcastable to it.
  """
  a_t = _bcast(schedule.alphas_cumprod[t], x_t)
  a_prev = _bcast(alpha_prev(schedule, t_prev), x_t)
  eps = eps.astype(x_t.dtype)
  x0 = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
  variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = jnp.asarray(eta, x_t.dtype) * jnp.sqrt(variance)
  # max(·, 0) only guards rounding at η ≥ 1; for η ≤ 1 the argument is positive.
  mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
  return mean, std


def ddim_step(schedule: Schedule, x_t: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray,
              t_prev: jnp.ndarray, eta: jnp.ndarray,
              noise: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """One DDIM step for an ε-prediction model (diffusers' `DDIMScheduler.step`, no clipping).

  Args:
    schedule: the noise schedule.
    x_t: [B, ...] current sample.
    eps: [B, ...] predicted noise.
    t: int timestep of x_t; `t_prev`: the next (smaller) timestep, < 0 for "after t = 0".
    eta: η ∈ [0, 1]; 0 is deterministic DDIM, 1 the DDPM-like posterior variance.
    noise: [B, ...] standard normal draw (used only if η > 0).

  Returns:
    (x_prev, mean, std) with x_prev = mean + std · noise.
  """
  mean, std = ddim_mean_std(schedule, x_t, eps, t, t_prev, eta)
  return mean + std * noise, mean, std


def classifier_free_guidance(eps_uncond: jnp.ndarray, eps_cond: jnp.ndarray,
                             scale: jnp.ndarray) -> jnp.ndarray:
  """ε = ε_∅ + w (ε_c − ε_∅); `scale` may be a traced array."""
  return eps_uncond + jnp.asarray(scale, eps_cond.dtype) * (eps_cond - eps_uncond)


def step_noise(key: jax.Array, num_steps: int, shape: tuple[int, ...],
               dtype=jnp.float32) -> jnp.ndarray:
  """[N, *shape] the per-step draws z_i = N(0, I) from `fold_in(key, i)`: the values
  `ctrl_trajectory` and `ddim_sample` draw step by step."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, dtype))(
      jnp.arange(num_steps))


def device_truncation_mask(key: jax.Array, num_steps: int, device: jnp.ndarray) -> jnp.ndarray:
  """The random truncation mask of data-parallel device `device` (an int, maybe traced): device
  0 draws from `key` itself (so a one-device run draws `random_truncation_mask(key)`), device
  d > 0 from `fold_in(key, d)`. Each device back-propagates its own set of steps, as the
  official code does per GPU."""
  own = random_truncation_mask(jax.random.fold_in(key, device), num_steps)
  return jnp.where(jnp.asarray(device) == 0, random_truncation_mask(key, num_steps), own)


def random_truncation_mask(key: jax.Array, num_steps: int) -> jnp.ndarray:
  """CTRL's random truncated back-prop: bool [N], True where step i carries gradient.

  Per step i (0 = noisiest) K_i ~ U{0, …, N}; the step's ε is stop-gradiented iff i < K_i, so
  P(gradient at step i) = (i + 1) / (N + 1): late steps almost always, early ones rarely.
  """
  k = jax.random.randint(key, (num_steps,), 0, num_steps + 1)
  return jnp.arange(num_steps) >= k


def gaussian_kl_same_std(mean_p: jnp.ndarray, mean_q: jnp.ndarray,
                         std: jnp.ndarray) -> jnp.ndarray:
  """KL(N(μ_p, σ²I) ‖ N(μ_q, σ²I)) per sample, summed over all non-batch dims: [B].

  Zero where σ = 0 (η = 0 has no path KL; the guard keeps gradients finite).
  """
  std = jnp.broadcast_to(std, mean_p.shape)
  positive = std > 0
  inv_two_var = jnp.where(positive, 0.5 / jnp.where(positive, std, 1.0)**2, 0.0)
  per_dim = (mean_p - mean_q)**2 * inv_two_var
  return jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=-1)


@flax.struct.dataclass
class Trajectory:
  """Output of `ctrl_trajectory`.

  Attributes:
    x0: [B, ...] final sample of the fine-tuned model.
    kl: [N, B] per-step KL(p_new ‖ p_pre) of the DDIM transition, summed over latent dims (the
      Girsanov path KL of the discretised chain is kl.sum(0)).
    grad_mask: bool [N], which steps carried gradient through ε.
  """
  x0: jnp.ndarray
  kl: jnp.ndarray
  grad_mask: jnp.ndarray


def _maybe_remat(fn: EpsFn, remat_policy: Optional[str]) -> EpsFn:
  if remat_policy is None:
    return fn
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={remat_policy!r}; expected None or one of "
                     f"{sorted(REMAT_POLICIES)}.")
  # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE.
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)


def gated_call(fn: Callable, active: jnp.ndarray, diff: tuple, nondiff: tuple):
  """`fn(*diff, *nondiff)` whose backward is computed only where `active` (a traced bool),
  rematerialised: the forward keeps only the inputs; the backward recomputes `fn` and takes
  its VJP w.r.t. `diff` inside a `lax.cond`, or returns zeros. Nothing else gets a cotangent.

  This is random truncation without a `lax.cond` in the forward pass: through a forward cond,
  every loop-invariant input of the differentiated branch (the frozen UNet's weights) became a
  per-step residual of the trajectory scan, i.e. N copies of the weights.
  """
  # Closure conversion of every closed-over value (ints too, unlike `jax.closure_convert`): the
  # backward is traced elsewhere, where a captured tracer would have escaped.
  flat, in_tree = jax.tree_util.tree_flatten((tuple(diff), tuple(nondiff)))

  def flat_fn(*flat_args):
    d, nd = jax.tree_util.tree_unflatten(in_tree, list(flat_args))
    return fn(*d, *nd)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
  out_tree = jax.tree_util.tree_structure(out_shape)
  jaxpr = closed.jaxpr

  def conv(diff, nondiff, consts):
    flat_args = jax.tree_util.tree_leaves((tuple(diff), tuple(nondiff)))
    out = jax.core.eval_jaxpr(jaxpr, list(consts), *flat_args)
    return jax.tree_util.tree_unflatten(out_tree, out)

  @jax.custom_vjp
  def call(active, diff, nondiff, consts):
    del active
    return conv(diff, nondiff, consts)

  def fwd(active, diff, nondiff, consts):
    return conv(diff, nondiff, consts), (active, diff, nondiff, consts)

  def bwd(res, ct):
    active, diff, nondiff, consts = res

    def grad(diff, ct):
      _, vjp = jax.vjp(lambda *d: conv(d, nondiff, consts), *diff)
      return tuple(vjp(ct))

    def zeros(diff, ct):
      del ct
      return jax.tree_util.tree_map(jnp.zeros_like, tuple(diff))

    return (None, jax.lax.cond(active, grad, zeros, tuple(diff), ct), None, None)

  call.defvjp(fwd, bwd)
  return call(active, tuple(diff), tuple(nondiff), tuple(closed.consts))


def ctrl_trajectory(policy_eps: EpsFn, reference_eps: EpsFn, params: Any, ref_params: Any,
                    schedule: Schedule, timesteps: jnp.ndarray, x_T: jnp.ndarray,
                    key: jax.Array, eta: jnp.ndarray, *, grad_mask: Optional[jnp.ndarray] = None,
                    num_no_grad_steps: int = 0, remat_policy: Optional[str] = "nothing_saveable",
                    reference_grad: bool = True,
                    reference_grad_mask: Optional[jnp.ndarray] = None,
                    noise: Optional[jnp.ndarray] = None) -> Trajectory:
  """Runs the fine-tuned and the reference model side by side from the same x_T.

  The sample follows the fine-tuned model: x_prev = μ_new + σ_t z_i with
  z_i = N(0, I) drawn from `fold_in(key, i)`; μ_pre is the reference model's mean at the same
  x_t, giving the per-step KL. Gradient w.r.t. `params` flows back through the chain.

  Cost control (each is a structural choice, not a stop_gradient mask, so skipped steps do no
  backward work):
    * `num_no_grad_steps` (static): the first n steps run in a separate scan with no tangents
      at all (the "last-K" truncation with K = N − n).
    * `grad_mask` (bool [N], traced): for the remaining steps, a step whose mask is False has
      ε stop-gradiented (its backward is the linear DDIM coefficient on x_t only: CTRL's random
      truncation, latents not stop-gradiented). With remat "nothing_saveable" every model call
      is a `gated_call` (the cond is in the backward pass only); with any other policy a
      forward `lax.cond` per step picks the branch, which keeps the loop-invariant inputs of
      the differentiated branch (the frozen weights) once per step: memory grows with N.
    * `reference_grad_mask` (bool [N], traced; with reference_grad=True): of the steps that
      carry gradient, those where it is False take ε_pre as a constant (no backward through
      the reference model, as reference_grad=False does); a `lax.switch` over three branches.
    * `remat_policy`: `jax.checkpoint` around every model call.

  Args:
    policy_eps: fine-tuned ε-model `(params, x, t) -> eps` (guidance included).
    reference_eps: pre-trained ε-model `(ref_params, x, t) -> eps`.
    params / ref_params: their parameters (ref_params are never differentiated).
    schedule: noise schedule. timesteps: int [N], noisiest first.
    x_T: [B, ...] initial noise. key: PRNG key for the per-step noise.
    eta: DDIM η (traced scalar).
    reference_grad: also back-propagate through the reference model's input x_t (the exact
      pathwise gradient of the KL); False treats ε_pre as a constant (cheaper).
    reference_grad_mask: per step, whether reference_grad applies (None = every step). Lets
      one compiled step switch between the exact and the cheaper gradient per update.
    noise: [N, B, ...] the per-step draws z_i, given instead of drawing them from `key` (a
      shard of the global draws, inside `shard_map`).

  Returns:
    A `Trajectory`.
  """
  timesteps = jnp.asarray(timesteps, jnp.int32)
  num_steps = timesteps.shape[0]
  if not 0 <= num_no_grad_steps <= num_steps:
    raise ValueError(f"num_no_grad_steps={num_no_grad_steps} not in [0, {num_steps}].")
  ratio = schedule.num_train_timesteps // num_steps
  prev_timesteps = timesteps - ratio
  policy_eps_raw, reference_eps_raw = policy_eps, reference_eps
  policy_eps = _maybe_remat(policy_eps, remat_policy)
  reference_eps = _maybe_remat(reference_eps, remat_policy)
  sg = jax.lax.stop_gradient

  def transition(x, e_new, e_ref, t, t_prev, z):
    mean_new, std = ddim_mean_std(schedule, x, e_new, t, t_prev, eta)
    mean_ref, _ = ddim_mean_std(schedule, x, e_ref, t, t_prev, eta)
    return mean_new + std * z, gaussian_kl_same_std(mean_new, mean_ref, std)

  def step_with_grad(x, t, t_prev, z):
    e_new = policy_eps(params, x, t)
    e_ref = reference_eps(ref_params, x if reference_grad else sg(x), t)
    return transition(x, e_new, e_ref, t, t_prev, z)

  def step_policy_grad(x, t, t_prev, z):  # ε_pre a constant at x_t
    e_new = policy_eps(params, x, t)
    e_ref = reference_eps(ref_params, sg(x), t)
    return transition(x, e_new, e_ref, t, t_prev, z)

  def step_without_grad(x, t, t_prev, z):
    e_new = policy_eps(sg(params), sg(x), t)
    e_ref = reference_eps(ref_params, sg(x), t)
    return transition(x, e_new, e_ref, t, t_prev, z)

  given_noise = noise

  def noise(i, x):
    if given_noise is not None:
      return given_noise[i].astype(x.dtype)
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)

  def body_no_grad(x, inp):
    i, t, t_prev = inp
    x_prev, kl = step_without_grad(x, t, t_prev, noise(i, x))
    return x_prev, kl

  switch_reference = reference_grad and reference_grad_mask is not None
  # Truncation under full remat: no forward `lax.cond` (see `gated_call`).
  gated = grad_mask is not None and remat_policy == "nothing_saveable"

  def gated_body(x, inp):
    i, t, t_prev, g, r = inp
    z = noise(i, x)
    e_new = gated_call(policy_eps_raw, g, (params, x), (t,))
    if reference_grad:
      active = g & r if switch_reference else g
      e_ref = gated_call(lambda x, rp, t: reference_eps_raw(rp, x, t), active, (x,), (ref_params, t))
    else:
      e_ref = reference_eps(ref_params, sg(x), t)
    return transition(x, e_new, e_ref, t, t_prev, z)

  def body(x, inp):
    if gated:
      return gated_body(x, inp)
    i, t, t_prev, g, r = inp
    z = noise(i, x)
    if switch_reference:
      branch = jnp.where(g, jnp.where(r, 2, 1), 0)
      return jax.lax.switch(branch, (step_without_grad, step_policy_grad, step_with_grad),
                            x, t, t_prev, z)
    if grad_mask is None:
      return step_with_grad(x, t, t_prev, z)
    return jax.lax.cond(g, step_with_grad, step_without_grad, x, t, t_prev, z)

  steps = jnp.arange(num_steps)
  mask = jnp.ones((num_steps,), bool) if grad_mask is None else jnp.asarray(grad_mask, bool)
  mask = mask & (steps >= num_no_grad_steps)
  ref_mask = (jnp.ones((num_steps,), bool) if reference_grad_mask is None
              else jnp.broadcast_to(jnp.asarray(reference_grad_mask, bool), (num_steps,)))
  n0 = num_no_grad_steps
  x = x_T
  kls = []
  if n0 > 0:
    x, kl0 = jax.lax.scan(body_no_grad, sg(x),
                          (steps[:n0], timesteps[:n0], prev_timesteps[:n0]))
    kls.append(kl0)
  if n0 < num_steps:
    x, kl1 = jax.lax.scan(body, x, (steps[n0:], timesteps[n0:], prev_timesteps[n0:],
                                    mask[n0:], ref_mask[n0:]))
    kls.append(kl1)
  kl = jnp.concatenate(kls, axis=0) if len(kls) > 1 else kls[0]
  return Trajectory(x0=x, kl=kl, grad_mask=mask)


def ddim_sample(eps_fn: EpsFn, params: Any, schedule: Schedule, timesteps: jnp.ndarray,
                x_T: jnp.ndarray, key: jax.Array, eta: jnp.ndarray) -> jnp.ndarray:
  """Plain DDIM sampling (no gradient, no reference): x_T [B, ...] → x_0 [B, ...].

  Uses the same per-step noise stream as `ctrl_trajectory` (z_i from `fold_in(key, i)`), so
  the same key gives the same sample as the fine-tuned branch of a trajectory.
  """
  timesteps = jnp.asarray(timesteps, jnp.int32)
  num_steps = timesteps.shape[0]
  prev_timesteps = timesteps - schedule.num_train_timesteps // num_steps

  def body(x, inp):
    i, t, t_prev = inp
    z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    x_prev, _, _ = ddim_step(schedule, x, eps_fn(params, x, t), t, t_prev, eta, z)
    return x_prev, None

  x0, _ = jax.lax.scan(body, x_T, (jnp.arange(num_steps), timesteps, prev_timesteps))
  return x0
