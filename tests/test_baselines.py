"""Tests of `ctrl_jax.baselines.guidance` on a closed-form problem: Gaussian data N(μ, s²I)
(exact ε) and a probit "classifier" p̂(y=1 | x) = Φ(a·x + b), whose noisy version p(y | x_t) and whose
posterior E[a·x0 | y] are known in closed form. No UNet except in the digits wiring test."""
import collections
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from ctrl_jax.baselines import guidance
from ctrl_jax.core import train
from ctrl_jax.core.sampling import ddim_sample
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.problems.digits import stages as digits_stages
from ctrl_jax.core.schedules import ddim_timesteps, make_schedule

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
import digits as digits_config  # noqa: E402  pylint: disable=g-import-not-at-top

SCHED = make_schedule("linear", 1e-4, 0.02, 1000)  # the digits benchmark's DDPM schedule
TS = jnp.asarray(ddim_timesteps(1000, 100))  # 20 steps: sample std 0.39 vs 0.5 (η = 1)
ITEM = (1, 2, 2)  # D = 4
D = 4
MU, S = -0.5, 0.5  # data x0 ~ N(μ·1, s² I)
A, B0 = 1.0, 0.0   # p̂(y=1 | x) = Φ(A Σ_d x_d + B0)
ETA = 1.0
N = 4096


def gaussian_eps(x, t):
  """E[ε | x_t] for x0 ~ N(μ, s²I): Cov(ε, x_t) = √(1−ᾱ) I, Var x_t = v I, v = ᾱs² + 1 − ᾱ."""
  a = SCHED.alphas_cumprod[t]
  v = a * S**2 + 1.0 - a
  return jnp.sqrt(1.0 - a) / v * (x - jnp.sqrt(a) * MU)


def _signed(y):
  return 2.0 * jnp.asarray(y, jnp.float32) - 1.0


def probit_log_prob(x0, y):
  """log p̂(y | x0), y ∈ {0, 1} [B]."""
  z = A * jnp.sum(x0.reshape(x0.shape[0], -1), -1) + B0
  return norm.logcdf(_signed(y) * z)


def noisy_probit_log_prob(x_t, t, y):
  """Exact log p(y | x_t) = log E[Φ(±(a·x0 + b)) | x_t]: x0 | x_t ~ N(m, τ²I) with
  m = μ + √ᾱ s²/v (x_t − √ᾱ μ), τ² = s²(1−ᾱ)/v, and E Φ(Z) = Φ(E Z / √(1 + Var Z))."""
  a = SCHED.alphas_cumprod[t]
  v = a * S**2 + 1.0 - a
  m = MU + jnp.sqrt(a) * S**2 / v * (x_t - jnp.sqrt(a) * MU)
  tau2 = S**2 * (1.0 - a) / v
  z = (A * jnp.sum(m.reshape(m.shape[0], -1), -1) + B0) / jnp.sqrt(1.0 + A**2 * D * tau2)
  return norm.logcdf(_signed(y) * z)


def posterior_mean_ax(y=1, mean=A * D * MU, var=A**2 * D * S**2):
  """E[a·x0 | y] under p(x0) Φ(±(a·x0 + b)), a·x0 ~ N(m, v) under p (skew-normal):
  m ± v φ(κ) / (Φ(κ) √(1 + v)), κ = ±(m + b)/√(1 + v)."""
  m = mean
  sign = 1.0 if y == 1 else -1.0
  kappa = sign * (m + B0) / math.sqrt(1.0 + var)
  pdf = math.exp(-kappa**2 / 2) / math.sqrt(2 * math.pi)
  cdf = 0.5 * (1 + math.erf(kappa / math.sqrt(2)))
  return m + sign * var * pdf / (cdf * math.sqrt(1.0 + var))


def ax(x):
  return np.asarray(A * x.reshape(x.shape[0], -1).sum(-1))


def mean_p(x, y=1):
  return float(np.exp(np.asarray(probit_log_prob(x, jnp.full((x.shape[0],), y)))).mean())


def x_T(n=N, k=None, seed=0):
  shape = (n,) + ((k,) if k else ()) + ITEM
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


KEY = jax.random.key(7)
Y1 = jnp.ones((N,), jnp.int32)
SMC_B, SMC_K = N // 16, 16  # B·K = N: the flattened particles reuse DDIM's compiled shape

# Every sampler jitted once at module level, with the per-run scalars as arguments; TRACES
# counts how often each was traced (the no-recompile test reads it).
TRACES = collections.Counter()


def _jit(name, fn):
  def traced(*args):
    TRACES[name] += 1
    return fn(*args)
  jitted = jax.jit(traced)
  return lambda *args: jitted(*(jnp.asarray(a, jnp.float32) if isinstance(a, float) else a
                                for a in args))


SAMPLERS = {
    "ddim": _jit("ddim", lambda xt, y, eta, w: ddim_sample(
        lambda _, x, t: gaussian_eps(x, t), None, SCHED, TS, xt, KEY, eta)),
    "cg": _jit("cg", lambda xt, y, eta, w: guidance.classifier_guidance_sample(
        gaussian_eps, noisy_probit_log_prob, SCHED, TS, xt, y, KEY, eta, w)),
    "mpgd_normalized": _jit("mpgd_normalized", lambda xt, y, eta, w: guidance.mpgd_sample(
        gaussian_eps, probit_log_prob, SCHED, TS, xt, y, KEY, eta, w, normalize=True)),
}
for _jac in (True, False):
  SAMPLERS[f"dps_jac={_jac}"] = _jit(f"dps_jac={_jac}", functools.partial(
      lambda xt, y, eta, w, jac: guidance.dps_sample(
          gaussian_eps, probit_log_prob, SCHED, TS, xt, y, KEY, eta, w, use_unet_jacobian=jac),
      jac=_jac))
for _implied in (True, False):
  SAMPLERS[f"mpgd_implied={_implied}"] = _jit(f"mpgd_implied={_implied}", functools.partial(
      lambda xt, y, eta, w, implied: guidance.mpgd_sample(
          gaussian_eps, probit_log_prob, SCHED, TS, xt, y, KEY, eta, w, implied_eps=implied),
      implied=_implied))
for _m in (1, 8):
  SAMPLERS[f"svdd_M={_m}"] = _jit(f"svdd_M={_m}", functools.partial(
      lambda xt, y, eta, alpha, m: guidance.svdd_sample(
          gaussian_eps, probit_log_prob, SCHED, TS, xt, y, KEY, eta, alpha, num_candidates=m),
      m=_m))
for _p in guidance.SMC_PROPOSALS:  # x_T [B, K, ...]; returns (x0, diagnostics)
  SAMPLERS[f"smc_{_p}"] = _jit(f"smc_{_p}", functools.partial(
      lambda xt, y, eta, w, p: guidance.smc_sample(
          gaussian_eps, probit_log_prob, SCHED, TS, xt, y, KEY, eta, w, 0.5, proposal=p),
      p=_p))


@pytest.fixture(scope="module")
def unguided():
  return SAMPLERS["ddim"](x_T(), Y1, ETA, 0.0)


def _same(a, b, atol=0.0):
  """Bit-identical (atol = 0), or equal up to float rounding of a differently fused program."""
  a, b = np.asarray(a), np.asarray(b)
  print(f" max|Δ|={np.max(np.abs(a - b)):.2e}", end="")
  if atol:
    np.testing.assert_allclose(a, b, rtol=0.0, atol=atol)
  else:
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- no guidance = DDIM


def test_unguided_ddim_matches_the_closed_form_data_distribution(unguided):
  """Sanity of the analytic problem: DDIM (100 steps, η = 1) with the exact ε ≈ N(μ, s²I)."""
  x = np.asarray(unguided).reshape(N, -1)
  assert abs(x.mean() - MU) < 0.02 and abs(x.std() - S) < 0.05, (x.mean(), x.std())


@pytest.mark.parametrize("name", ["dps_jac=True", "dps_jac=False", "mpgd_implied=True",
                                  "mpgd_implied=False", "mpgd_normalized", "cg"])
def test_weight_zero_is_ddim_bit_for_bit(unguided, name):
  _same(SAMPLERS[name](x_T(), Y1, ETA, 0.0), unguided)


def test_svdd_with_one_candidate_is_ddim(unguided):
  """M = 1 shares the noise stream (candidate noise [B, 1, ...] from fold_in(key, i)). Equal to
  float rounding, not bitwise: ε of step i+1 is computed inside step i (at the candidate), so
  XLA fuses it differently (measured max |Δ| ≤ 2.4e-7 over 100 steps)."""
  _same(SAMPLERS["svdd_M=1"](x_T(), Y1, ETA, 1.0), unguided, atol=2e-6)


@pytest.mark.parametrize("proposal", guidance.SMC_PROPOSALS)
def test_smc_with_weight_zero_is_ddim_on_every_particle(unguided, proposal):
  """Constant twist: equal weights, never resampled, every particle is the DDIM sample of the
  flattened [B·K] batch (to float rounding, as for SVDD); the returned sample is the chosen
  particle."""
  xt = x_T().reshape((SMC_B, SMC_K) + ITEM)
  out, diag = SAMPLERS[f"smc_{proposal}"](xt, Y1[:SMC_B], ETA, 0.0)
  _same(diag.particles, np.asarray(unguided).reshape(xt.shape), atol=2e-6)
  assert not np.asarray(diag.resampled).any()
  np.testing.assert_allclose(np.asarray(diag.weights), 1.0 / SMC_K, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(diag.ess), SMC_K, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(diag.particles)[np.arange(SMC_B), np.asarray(diag.chosen)])
  assert diag.ess.shape == (len(TS), SMC_B) and diag.log_prob.shape == (SMC_B, SMC_K)


def test_per_request_weights(unguided):
  """weight [B]: requests with w = 0 are exactly DDIM, the others are guided."""
  w = jnp.asarray(np.arange(N) % 2, jnp.float32)
  out = np.asarray(guidance.dps_sample(gaussian_eps, probit_log_prob, SCHED, TS, x_T(), Y1, KEY,
                                        ETA, w, use_unet_jacobian=False))
  np.testing.assert_array_equal(out[0::2], np.asarray(unguided)[0::2])
  assert mean_p(out[1::2]) > mean_p(np.asarray(unguided)[1::2]) + 0.3


# ----------------------------------------------------------------------------- SMC pieces


def test_normalize_log_weights_rows_sum_to_one():
  log_w = jnp.asarray([[0.0, 1.0, -2.0], [-1e4, -1e4 + 1, -jnp.inf], [-jnp.inf] * 3,
                       [jnp.nan, 0.0, 0.0]])
  w = np.asarray(guidance.normalize_log_weights(log_w))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[1], [1 / (1 + math.e), math.e / (1 + math.e), 0.0], rtol=1e-5)
  np.testing.assert_allclose(w[2], 1 / 3)  # no finite entry: uniform
  np.testing.assert_allclose(w[3], [0.0, 0.5, 0.5])
  ess = np.asarray(guidance.effective_sample_size(log_w))
  np.testing.assert_allclose(ess[2], 3.0, rtol=1e-6)


def test_resample_keeps_k_particles_and_respects_the_weights():
  k = 8
  one_hot = jnp.full((3, k), -jnp.inf).at[0, 5].set(0.0).at[1, 0].set(0.0).at[2, k - 1].set(0.0)
  for seed in range(5):
    idx = np.asarray(guidance.resample(jax.random.key(seed), one_hot))
    assert idx.shape == (3, k) and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, [[5] * k, [0] * k, [k - 1] * k])
  # Systematic: particle j appears ⌊K w_j⌋ or ⌈K w_j⌉ times; zero weights never.
  w = np.random.default_rng(0).dirichlet(np.ones(k), size=200)
  w[:, 3] = 0.0
  w /= w.sum(-1, keepdims=True)
  idx = np.asarray(guidance.resample(jax.random.key(1), jnp.log(jnp.asarray(w))))
  counts = np.stack([np.bincount(r, minlength=k) for r in idx])
  assert (counts >= np.floor(k * w) - 1e-6).all() and (counts <= np.ceil(k * w) + 1e-6).all()
  assert (counts[:, 3] == 0).all() and (counts.sum(-1) == k).all()


# ----------------------------------------------------------------------------- guidance works

GUIDED = {"dps_jac=True": 1.0, "dps_jac=False": 1.0, "cg": 1.0, "mpgd_implied=True": 0.05,
          "mpgd_implied=False": 0.05, "mpgd_normalized": 0.05, "svdd_M=8": 1.0}


@pytest.fixture(scope="module")
def guided():
  """name → samples [N, ...] (y = 1) at a moderate strength (SVDD: temperature α)."""
  return {name: SAMPLERS[name](x_T(), Y1, ETA, w) for name, w in GUIDED.items()}


@pytest.fixture(scope="module")
def smc_runs():
  xt = x_T(seed=1).reshape((SMC_B, SMC_K) + ITEM)
  return {p: SAMPLERS[f"smc_{p}"](xt, Y1[:SMC_B], ETA, 1.0) for p in guidance.SMC_PROPOSALS}


def test_every_baseline_raises_the_asked_class_probability(guided, smc_runs, unguided):
  base = mean_p(unguided)
  results = {name: mean_p(x) for name, x in guided.items()}
  results.update({f"smc_{p}": mean_p(r[0]) for p, r in smc_runs.items()})
  print(f"\n[mean p̂(y=1|x0)] unguided {base:.3f} (closed form "
        f"{0.5 * (1 + math.erf(A * D * MU / math.sqrt(2 * (1 + A**2 * D * S**2)))):.3f}); "
        + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
  for name, p in results.items():
    assert p > base + 0.1, (name, p, base)


def test_guidance_direction_follows_the_label(unguided):
  """y = 0 lowers a·x0, y = 1 raises it (one batch, mixed labels)."""
  y = jnp.asarray(np.arange(N) % 2, jnp.int32)
  out = np.asarray(SAMPLERS["dps_jac=False"](x_T(), y, ETA, 1.0))
  base = ax(unguided)
  assert ax(out)[1::2].mean() > base[1::2].mean() + 0.3
  assert ax(out)[0::2].mean() < base[0::2].mean() - 0.05


def test_smc_and_exact_classifier_guidance_reach_the_known_posterior(unguided, guided, smc_runs):
  """γ = 1: p(x0 | y=1) ∝ p(x0) Φ(a·x0 + b), E[a·x0 | y=1] in closed form.

  Classifier guidance with the exact noisy classifier approximates the *true* posterior (the
  Doob transform). SMC targets the tilt of the sampler's own marginal: 100-step DDIM has std
  0.47, not 0.5, so its reference uses the mean / variance of a·x0 fitted on unguided samples
  (a·x0 is exactly Gaussian under this linear sampler).
  """
  true = posterior_mean_ax(1)
  a_x = ax(unguided)
  tilted = posterior_mean_ax(1, mean=a_x.mean(), var=a_x.var())
  got = {"cg": ax(guided["cg"]).mean()}
  got.update({f"smc_{p}": ax(r[0]).mean() for p, r in smc_runs.items()})
  ess = {p: float(np.asarray(r[1].ess).mean()) for p, r in smc_runs.items()}
  print(f"\n[E a·x0 | y=1] true posterior {true:.3f}, tilt of the sampler's marginal "
        f"{tilted:.3f}, unguided {a_x.mean():.3f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in got.items()) + f"; mean ESS {ess}")
  assert abs(got["cg"] - true) < 0.1
  for p in guidance.SMC_PROPOSALS:  # 3 standard errors of a mean over 256 requests
    assert abs(got[f"smc_{p}"] - tilted) < 0.15, (p, got, tilted)  # measured 0.03, 0.08
  assert ess["twisted"] > ess["ddim"]  # the twisted proposal keeps the weights more even


def test_svdd_argmax_is_greedier_than_soft_selection():
  soft, greedy = (SAMPLERS["svdd_M=8"](x_T(), Y1, ETA, alpha) for alpha in (4.0, 0.0))
  assert mean_p(greedy) > mean_p(soft) + 0.05


# ----------------------------------------------------------------------------- compile once


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_jitted_samplers_do_not_recompile_for_new_weights(name):
  """A second weight / η / temperature is served by the same compiled sampler."""
  smc = name.startswith("smc")
  xt = x_T().reshape((SMC_B, SMC_K) + ITEM) if smc else x_T()
  y = Y1[:SMC_B] if smc else Y1
  first = SAMPLERS[name](xt, y, ETA, 0.5)
  traces = TRACES[name]
  second = SAMPLERS[name](xt, y, 0.5, 2.0)
  assert TRACES[name] == traces, name
  if name != "ddim":
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(first)[0]),
                              np.asarray(jax.tree_util.tree_leaves(second)[0])), name


def test_unet_evals_per_sample():
  f = guidance.unet_evals_per_sample
  assert f("ddim", 50) == 100 and f("ddim", 50, cfg=False) == 50
  assert f("dps", 50, use_unet_jacobian=True) == 200 and f("dps", 50) == 100
  assert f("mpgd", 50) == f("classifier_guidance", 50) == 100
  assert f("smc", 50, num_particles=4) == 400
  assert f("smc", 50, num_particles=4, use_unet_jacobian=True) == 800
  assert f("smc", 50, num_particles=4, use_unet_jacobian=True, proposal="ddim") == 400
  assert f("svdd", 50, num_candidates=8, cfg=False) == 400
  with pytest.raises(ValueError):
    f("cfg", 50)


# ----------------------------------------------------------------------------- noisy classifier


def test_noisy_digit_classifier_fits_and_guides_an_8x8_gaussian():
  """Data x0 ~ N(0, 0.5²) on 8×8 (images (x0+1)/2, "ink" = mean > 0.5): the fitted noisy
  classifier is near Bayes-optimal at every noise level (0.99 at t = 0 … chance at t = T−1),
  and classifier guidance with it raises the ink of y = 1 samples above unguided DDIM."""
  rng = np.random.default_rng(0)
  x0 = 0.5 * rng.standard_normal((2048, 1, 8, 8)).astype(np.float32)
  images = (x0[:, 0] + 1.0) / 2.0
  labels = (images.mean((1, 2)) > 0.5).astype(np.int32)
  kwargs = dict(hidden=(64,), time_dim=32)
  module = guidance.NoisyDigitClassifier(2, **kwargs)
  params = guidance.fit_noisy_classifier(images, labels, 2, SCHED, seed=0, steps=600, lr=3e-3,
                                          batch=256, **kwargs)
  for t in (0, 50, 300, 999):
    # Bayes-optimal accuracy: sign of mean(x0) [std s/8] from mean(x_t) = √ᾱ mean(x0) + noise
    # [std √(1−ᾱ)/8] is right with probability ½ + arctan(√ᾱ s / √(1−ᾱ)) / π.
    a = float(SCHED.alphas_cumprod[t])
    bayes = 0.5 + math.atan(math.sqrt(a) * 0.5 / math.sqrt(1 - a)) / math.pi
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal(x0.shape)
    logits = module.apply(params, jnp.asarray(x_t, jnp.float32), t)
    acc = float((np.asarray(logits).argmax(-1) == labels).mean())
    print(f" t={t}: acc {acc:.3f} (Bayes {bayes:.3f})", end="")
    assert bayes - 0.08 <= acc <= bayes + 0.04, (t, acc, bayes)  # measured: ≤ 0.05 below
  one = guidance.make_noisy_log_prob_fn([module], [1.0])
  two = guidance.make_noisy_log_prob_fn([module, module], [1.0, 0.5])
  y2 = jnp.stack([jnp.ones(64, jnp.int32), jnp.zeros(64, jnp.int32)], -1)
  xs = jnp.asarray(x0[:64])
  np.testing.assert_allclose(
      np.asarray(two([params, params], xs, 10, y2)),
      np.asarray(one([params], xs, 10, y2[:, :1]) + 0.5 * one([params], xs, 10, y2[:, 1:])),
      rtol=1e-5)

  def eps8(x, t):  # N(0, s²) data with s = 0.5
    a = SCHED.alphas_cumprod[t]
    return jnp.sqrt(1.0 - a) / (a * 0.25 + 1.0 - a) * x

  xt = jnp.asarray(rng.standard_normal((256, 1, 8, 8)), jnp.float32)
  y = jnp.ones((256, 1), jnp.int32)
  ts = jnp.asarray(ddim_timesteps(1000, 20))
  guided = jax.jit(lambda xt: guidance.classifier_guidance_sample(
      eps8, lambda x, t, y: one([params], x, t, y), SCHED, ts, xt, y, KEY, ETA, 1.0))(xt)
  plain = jax.jit(lambda xt: ddim_sample(lambda _, x, t: eps8(x, t), None, SCHED, ts, xt, KEY,
                                         ETA))(xt)
  ink = lambda x: float((np.asarray(x).mean((1, 2, 3)) > 0.0).mean())
  print(f"\n[8×8 ink=1] guided {ink(guided):.3f} unguided {ink(plain):.3f}")
  assert ink(guided) > ink(plain) + 0.2


# ----------------------------------------------------------------------------- digits wiring


def test_digits_wiring_with_a_random_unet():
  """pretrained_eps_fn + digits_log_prob_fn on a random one-level digits UNet (CFG 2) and a
  random ink3 classifier: DPS through the UNet Jacobian at weight 0 equals DDIM of the same
  closure; SVDD and SMC run on the request-major repeated batch; outputs are finite."""
  config = digits_config.get_config("quick")
  config.num_inference_steps = 2
  config.pretrain.block_out_channels = (64,)  # one level: the cheapest digits UNet to compile
  unet = unet_lib.build_unet(digits_model.unet_config(config.pretrain))
  abstract = jax.eval_shape(lambda: digits_model.init_params(
      jax.random.key(0), unet, config.pretrain.context_dim))
  rng = np.random.default_rng(0)  # random weights without compiling the Flax init
  pre = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)
  modules = digits_stages.classifier_modules(config.task)
  cls = [m.init(jax.random.key(1), jnp.zeros((1, 8, 8))) for m in modules]
  setup = digits_stages.build_setup(config, unet, modules)
  ctx, null_ctx = digits_model.contexts(pre)
  frozen = {"unet": pre["unet"], "reward": cls, "decoder": None, "contexts": ctx,
            "uncond_context": null_ctx, "schedule": digits_model.make_schedule(config.pretrain),
            "hparams": train.make_hparams(gamma=1.0, kl_weight=0.01, guidance_scale=2.0,
                                          eta=1.0)}
  b, k = 2, 2
  c = jnp.asarray([3, 7], jnp.int32)
  y = jnp.asarray([[0], [2]], jnp.int32)
  sched, ts = frozen["schedule"], jnp.asarray(setup.timesteps)
  xt = jax.random.normal(jax.random.key(2), (b, 1, 8, 8))
  eps_fn = guidance.pretrained_eps_fn(setup, frozen, c)
  log_prob = guidance.digits_log_prob_fn(setup, frozen)
  ref = jax.jit(lambda xt: ddim_sample(lambda _, x, t: eps_fn(x, t), None, sched, ts, xt, KEY,
                                       1.0))(xt)
  dps = jax.jit(functools.partial(guidance.dps_sample, eps_fn, log_prob,
                                  use_unet_jacobian=True))
  _same(dps(sched, ts, xt, y, KEY, 1.0, 0.0), ref, atol=1e-4)  # measured: bit-identical
  assert np.isfinite(np.asarray(dps(sched, ts, xt, y, KEY, 1.0, 5.0))).all()
  eps_k = guidance.pretrained_eps_fn(setup, frozen, guidance.repeat_requests(c, k))
  out = jax.jit(lambda xt: guidance.svdd_sample(eps_k, log_prob, sched, ts, xt, y, KEY, 1.0,
                                                 1.0, num_candidates=k))(xt)
  assert out.shape == xt.shape and np.isfinite(np.asarray(out)).all()
  out, diag = jax.jit(lambda xt: guidance.smc_sample(
      eps_k, log_prob, sched, ts, jnp.stack([xt] * k, 1), y, KEY, 1.0, 1.0,
      proposal="ddim"))(xt)
  assert out.shape == xt.shape and np.isfinite(np.asarray(diag.weights)).all()
  # soft_decode does not clip: the reward's gradient survives outside [0, 1].
  g = jax.grad(lambda x: log_prob(x, y).sum())(3.0 * jnp.ones((b, 1, 8, 8)))
  assert np.abs(np.asarray(g)).sum() > 0
