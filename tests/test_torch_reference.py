"""The whole CTRL update against an independent PyTorch implementation (bench/torch_reference.py:
diffusers' PyTorch UNet with its own LoRA modules, DDIM written from the formulas, CFG in both
models, truncation mask, checkpointing, both KL conventions, reward, accumulation, NULL-row
mask, clipping, AdamW), on a tiny random problem whose every weight is perturbed away from its
init (LoRA up ≠ 0, label table ≠ 0, norm scales ≠ 1, biases ≠ 0).

Both sides get the same weights (through ctrl_jax's PyTorch name mapping) and the same x_T,
per-step noise and truncation masks (`torch_reference.jax_draws` reproduces the train step's
key mapping; a wrong mapping fails every comparison). Errors are relative to the largest |·| of
each quantity (per tensor for gradients and parameter updates); printed with -s.

The PyTorch side uses the tanh-approximate GELU in GEGLU, as diffusers' Flax UNet does (its
PyTorch UNet uses the exact GELU): that difference is a property of the two diffusers UNets, not
of CTRL, and is printed for the record.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ctrl_jax.core import schedules  # noqa: E402
from ctrl_jax.core import train  # noqa: E402
from ctrl_jax.problems import tiny  # noqa: E402
from ctrl_jax.runtime import sharding as shd  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import torch_reference as tr  # noqa: E402  pylint: disable=g-import-not-at-top

TOL = 1e-4
NUM_MICRO, MICRO, STEPS = 2, 2, 4
KEY = 7  # its masks have differentiated and truncated steps (checked below)
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1)
OPT = dict(lr_lora=1e-3, lr_label_embedding=1e-2, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
           grad_clip_norm=5.0)


def _perturb_unet(unet_params, seed=0, scale=0.05):
  leaves, treedef = jax.tree_util.tree_flatten(unet_params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape).astype(np.float32))
      for v in leaves])


def _problem(**kw):
  setup, frozen, params = tiny.build(jax.random.key(0), batch_latent=(4, 8, 8), num_steps=STEPS,
                                     unet_config=tiny.micro_unet_config(), **kw)
  frozen = dict(frozen, unet=_perturb_unet(frozen["unet"]))
  params = tr.perturb_ctrl(params, 1, setup.model.null_label)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  batch = {k: np.asarray(v) for k, v in tiny.make_batch(0, 0, setup, 3, NUM_MICRO, MICRO).items()}
  draws = tr.jax_draws(setup, jax.random.key(KEY), 0, batch)
  return setup, frozen, params, batch, draws


def _spec(setup, frozen, params, optimizer=None):
  return tr.export_spec(setup, frozen, params,
                        classifiers=[{"kind": "channel_mean_probe", "params": p}
                                     for p in frozen["reward"]],
                        decode="identity", schedule=SCHEDULE, optimizer=optimizer or OPT)


def _rel(a, b):
  return tr._rel(a, b)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def official():
  return _problem()


def test_ddim_step_and_timesteps_match_diffusers_scheduler():
  """The reference's own DDIM step (μ + σ z, η ∈ {0.5, 1}) equals diffusers' DDIMScheduler.step
  with the same ᾱ and variance_noise, at every step of a 10-step schedule including the last
  (t = 1 → ᾱ_0); its timesteps equal ctrl_jax's."""
  lib = tr.torch_lib()
  sched = lib.ddim_scheduler(SCHEDULE, 10)
  ours = lib.alphas_cumprod(SCHEDULE)
  np.testing.assert_array_equal(ours, np.asarray(schedules.make_schedule().alphas_cumprod))
  np.testing.assert_array_equal(sched.timesteps.numpy(), schedules.ddim_timesteps(1000, 10))
  f32_rel = float(np.max(np.abs(sched.alphas_cumprod.numpy() / ours - 1)))
  sched.alphas_cumprod = torch.from_numpy(ours)
  sched.final_alpha_cumprod = torch.tensor(ours[0])
  g = torch.Generator().manual_seed(0)
  x, eps, z = (torch.randn((2, 4, 8, 8), generator=g) for _ in range(3))
  worst = 0.0
  for eta in (0.5, 1.0):
    for t in sched.timesteps.tolist():
      t_prev = t - 100
      a_prev = torch.tensor(ours[t_prev] if t_prev >= 0 else ours[0])
      mean, std = lib.ddim_mean_std(x, eps, torch.tensor(ours[t]), a_prev, torch.tensor(eta))
      ref = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
      worst = max(worst, _rel(ref.numpy(), (mean + std * z).numpy()))
  print(f"\nDDIM step vs diffusers max rel err {worst:.1e}; diffusers' float32 ᾱ cumprod vs "
        f"float64-accumulated: max rel {f32_rel:.1e}")
  assert worst <= 1e-6


def _grad_capture():
  """An optax transformation that leaves the parameters alone and keeps the (averaged,
  unmasked) gradient it is given in its state: a train step run with it exposes its gradient."""
  import optax  # pylint: disable=g-import-not-at-top

  def update(grads, state, params=None):
    del state, params
    return jax.tree_util.tree_map(jnp.zeros_like, grads), {"grads": grads}

  return optax.GradientTransformation(
      lambda p: {"grads": jax.tree_util.tree_map(jnp.zeros_like, p)}, update)


def _train_step(setup, frozen, params, batch, opt):
  """One `train.make_train_step` update from `params`: (state, metrics), on host."""
  mesh = shd.make_mesh(jax.devices()[:1])
  state = train.create_train_state(params, opt, mesh)
  state, metrics = train.make_train_step(setup, opt, mesh)(state, batch, jax.random.key(KEY),
                                                           frozen)
  return jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def _make_optimizer(o):
  return train.make_optimizer(o["lr_lora"], o["lr_label_embedding"],
                              weight_decay=o["weight_decay"], b1=o["b1"], b2=o["b2"],
                              eps=o["eps"], grad_clip_norm=o["grad_clip_norm"])


def _metric_errors(m_jax, m_torch, keys=("loss", "reward", "kl", "grad_norm")):
  return {k: abs(m_torch[k] - m_jax[k]) / abs(m_jax[k]) for k in keys}


def test_train_step_gradients_metrics_and_adamw_update_match(official):
  """Official KL, exact KL gradient, clip 5 (inactive). The train step's loss, reward, KL and
  gradient norm, its gradient (averaged over the 2 micro-batches, NULL row included) of every
  LoRA down / up and of the label table, and the parameters after make_optimizer's AdamW step
  (weight decay 0.1) applied to that gradient, as the train step applies it."""
  setup, frozen, params, batch, draws = official
  assert draws["mask"].any() and not draws["mask"].all(), draws["mask"]
  state, m_jax = _train_step(setup, frozen, params, batch, _grad_capture())
  g_tree = jax.tree_util.tree_map(jnp.asarray, state["opt"]["grads"])
  g_jax = tr._named(setup.model, g_tree)  # pylint: disable=protected-access
  opt = _make_optimizer(OPT)
  updates, _ = opt.update(g_tree, opt.init(params), params)
  p_jax = tr._named(setup.model, jax.device_get(  # pylint: disable=protected-access
      jax.tree_util.tree_map(jnp.add, params, updates)))

  lib = tr.torch_lib()
  spec = _spec(setup, frozen, params)
  model = lib.TorchCtrl(spec)
  m_torch, _ = model.accumulate(batch, draws)
  g_torch = model.gradients()
  m_torch.update(model.optimizer_step())
  p_torch = model.params()
  exact = lib.TorchCtrl(spec, geglu="exact")
  m_exact, _ = exact.accumulate(batch, draws)
  g_exact = exact.gradients()

  assert set(g_torch) == set(g_jax)
  m_err = _metric_errors(m_jax, m_torch)
  g_err = {k: _rel(g_jax[k], g_torch[k]) for k in g_jax}
  p_err = {k: _rel(p_jax[k], p_torch[k]) for k in p_jax}
  worst = max(g_err, key=g_err.get)
  print(f"\n{len(g_err)} trainable tensors; loss {m_jax['loss']:.4f}, reward "
        f"{m_jax['reward']:.4f}, KL {m_jax['kl']:.4f}, grad norm {m_jax['grad_norm']:.4f}")
  print("rel err (tanh GEGLU): " + ", ".join(f"{k} {v:.1e}" for k, v in m_err.items())
        + f"; gradients max {g_err[worst]:.1e} ({worst}), label table "
        f"{g_err['class_embedding.weight']:.1e}; params after AdamW max "
        f"{max(p_err.values()):.1e}")
  print("rel err with PyTorch's exact-GELU GEGLU: " + ", ".join(
      f"{k} {v:.1e}" for k, v in _metric_errors(m_jax, m_exact, ("loss", "reward", "kl")).items())
      + f"; gradients max {max(_rel(g_jax[k], g_exact[k]) for k in g_jax):.1e}")
  assert all(np.abs(g_jax[k]).max() > 0 for k in g_jax)  # every gradient is nonzero
  assert m_jax["grad_norm"] < OPT["grad_clip_norm"] and not m_torch["clipped"]
  assert max(m_err.values()) <= TOL, m_err
  assert g_err[worst] <= TOL, (worst, g_err[worst])
  assert max(p_err.values()) <= TOL
  for p in (p_jax, p_torch):
    assert np.all(p["class_embedding.weight"][-1] == 0)


def test_full_train_step_with_clipping_exact_kl_and_constant_reference_matches():
  """Exact KL convention, ε_pre a constant (reference_grad=False), gradient through every step
  (truncation "none"), 2 micro-batches: one full `train.make_train_step` update with
  make_optimizer's AdamW and the clip active (clip = ‖g‖ / 4, weight decay 0). Adam's first step
  is ĝ / (|ĝ| + ε) per element (ĝ the clipped gradient): with the default ε = 1e-8 that is
  ≈ sign(g) and would see neither the clip nor the gradient's size, so here ε = max |ĝ| and
  lr = 1 (an update large against float32 rounding of p + Δ). Compared: the update
  Δ = p_new − p of every tensor (relative to its own max |Δ|), and JAX's Δ against
  −lr · ĝ / (|ĝ| + ε) from the reference's unclipped gradient (an unclipped update differs
  by up to 4×)."""
  setup, frozen, params, batch, draws = _problem(kl_convention="exact", reference_grad=False,
                                                 truncation="none")
  lib = tr.torch_lib()
  probe = lib.TorchCtrl(_spec(setup, frozen, params))
  probe.accumulate(batch, draws)
  g = probe.gradients()
  g["class_embedding.weight"][-1] = 0.0
  norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values())))
  clip = norm / 4
  eps = max(np.abs(v).max() for v in g.values()) / 4  # max |ĝ|
  optimizer = dict(OPT, grad_clip_norm=clip, eps=eps, weight_decay=0.0, lr_lora=1.0,
                   lr_label_embedding=1.0)

  before = tr._named(setup.model, jax.device_get(params))  # pylint: disable=protected-access
  state, m_jax = _train_step(setup, frozen, params, batch, _make_optimizer(optimizer))
  p_jax = tr._named(setup.model, state["params"])  # pylint: disable=protected-access
  model = lib.TorchCtrl(_spec(setup, frozen, params, optimizer))
  m_torch = model.update(batch, draws)
  p_torch = model.params()

  def lr(k):
    return optimizer["lr_label_embedding" if k.startswith("class_") else "lr_lora"]

  expected = {k: -lr(k) * (v * clip / norm) / (np.abs(v * clip / norm) + eps)
              for k, v in g.items()}
  m_err = _metric_errors(m_jax, m_torch)
  d_err = {k: _rel(p_jax[k] - before[k], p_torch[k] - before[k]) for k in before}
  f_err = {k: _rel(expected[k], p_jax[k] - before[k]) for k in before}
  print(f"\nexact KL, ε_pre constant: loss {m_jax['loss']:.4f}, KL {m_jax['kl']:.2f}, grad norm "
        f"{m_jax['grad_norm']:.4g} clipped to {clip:.4g}; rel err "
        + ", ".join(f"{k} {v:.1e}" for k, v in m_err.items())
        + f"; update Δ max {max(d_err.values()):.1e}; JAX Δ vs −lr·ĝ/(|ĝ|+ε) max "
        f"{max(f_err.values()):.1e}")
  assert m_jax["grad_norm"] > clip and m_torch["clipped"]
  assert max(m_err.values()) <= TOL, m_err
  assert max(d_err.values()) <= TOL, max(d_err.items(), key=lambda kv: kv[1])
  assert max(f_err.values()) <= TOL, max(f_err.items(), key=lambda kv: kv[1])
  assert np.all(p_jax["class_embedding.weight"][-1] == 0)
  assert np.all(p_torch["class_embedding.weight"][-1] == 0)
