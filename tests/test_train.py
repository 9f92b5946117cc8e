"""The CTRL train step: sharding invariance, no recompiles, optimiser masking, learning."""
import dataclasses
import os
import sys

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctrl_jax.core import sampling
from ctrl_jax.core import train
from ctrl_jax.problems import tiny as tiny_problem
from ctrl_jax.runtime import sharding as shd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
import smoke  # noqa: E402  pylint: disable=g-import-not-at-top

MICRO = 8  # divisible by the 8 fake devices


def _problem(**kw):
  return tiny_problem.build(jax.random.key(0), batch_latent=(4, 8, 8), num_steps=4,
                            unet_config=tiny_problem.micro_unet_config(), **kw)


@pytest.fixture(scope="module")
def problem():
  return _problem()


def _params_after(problem, mesh, steps=1, hparams=None, opt=None, fsdp_min_elements=None):
  """State and metrics after `steps` updates on `mesh`; with `fsdp_min_elements`, the frozen
  inputs and the state are split over the mesh's 'fsdp' axis (leaves from that size on)."""
  setup, frozen, params = problem
  if hparams is not None:
    frozen = dict(frozen, hparams=hparams)
  opt = opt or train.make_optimizer(1e-3, 1e-2)
  state_s = frozen_s = None
  if fsdp_min_elements is not None:
    state_s = train.state_sharding(params, opt, mesh, min_elements=fsdp_min_elements)
    frozen_s = shd.fsdp_sharding(frozen, mesh, min_elements=fsdp_min_elements)
    frozen = shd.put(frozen, frozen_s)
  state = train.create_train_state(params, opt, mesh, sharding=state_s)
  step_fn = train.make_train_step(setup, opt, mesh, state_shardings=state_s,
                                  frozen_shardings=frozen_s)
  metrics = []
  for i in range(steps):
    batch = tiny_problem.make_batch(0, i, setup, 3, 2, MICRO)
    state, m = step_fn(state, batch, jax.random.key(7), frozen)
    metrics.append(jax.device_get(m))
  if frozen_s is not None:
    metrics.append(frozen)  # the placed frozen inputs, for the caller to inspect
  return jax.device_get(state), metrics


def test_eight_devices_match_one_device(problem):
  """Same loss, metrics and gradient on a 1-device and an 8-device data mesh. The update is
  plain SGD with lr 1 (params − gradient), so a gradient summed instead of averaged over the
  devices (8× too large), or a wrong sign, shows; Adam's first step (≈ −lr·sign(g)) would hide
  both."""
  assert jax.device_count() == 8
  setup, frozen, params = problem
  # One truncation mask per micro-batch (per-device masks make 8 devices differ by design:
  # test_per_device_truncation_masks).
  problem = (dataclasses.replace(setup, mask_per_device=False), frozen, params)
  sgd = optax.sgd(1.0)
  s1, m1 = _params_after(problem, shd.make_mesh(jax.devices()[:1]), opt=sgd)
  s8, m8 = _params_after(problem, shd.make_mesh(), opt=sgd)
  np.testing.assert_allclose(m1[0]["loss"], m8[0]["loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m1[0]["grad_norm"], m8[0]["grad_norm"], rtol=1e-4)
  g1 = jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a), s1["params"], params)
  g8 = jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a), s8["params"], params)
  flat1, flat8 = (jax.flatten_util.ravel_pytree(g)[0] for g in (g1, g8))
  assert np.abs(flat1).max() > 0
  np.testing.assert_allclose(flat8, flat1, atol=1e-4 * np.abs(flat1).max())


def test_fsdp_mesh_splits_the_frozen_unet_and_gives_the_same_update(problem):
  """On a (data 2, fsdp 4) mesh with the frozen UNet split over 'fsdp' (every leaf of ≥ 1024
  elements: the micro UNet's kernels), the loss, metrics and SGD update equal the replicated
  8-device ones; each device holds 1/4 of a split kernel."""
  setup, frozen, params = problem
  problem = (dataclasses.replace(setup, mask_per_device=False), frozen, params)
  sgd = optax.sgd(1.0)
  s8, m8 = _params_after(problem, shd.make_mesh(), opt=sgd)
  mesh = shd.make_mesh(fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  s4, m4 = _params_after(problem, mesh, opt=sgd, fsdp_min_elements=1024)
  placed = m4.pop()
  split = [x for x in jax.tree_util.tree_leaves(placed["unet"]) if x.size >= 1024]
  assert split and all("fsdp" in x.sharding.spec for x in split)
  for x in split:
    dim = list(x.sharding.spec).index("fsdp")
    assert x.addressable_shards[0].data.shape[dim] * 4 == x.shape[dim]
  np.testing.assert_allclose(m4[0]["loss"], m8[0]["loss"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(m4[0]["grad_norm"], m8[0]["grad_norm"], rtol=1e-5)
  flat8, flat4 = (jax.flatten_util.ravel_pytree(
      jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a), s["params"], params))[0]
      for s in (s8, s4))
  np.testing.assert_allclose(flat4, flat8, atol=1e-5 * np.abs(flat8).max())


def test_fsdp_state_sharding_splits_a_full_finetune_and_keeps_lora_replicated():
  """`state_sharding`: a full fine-tune's UNet copy and its two Adam moments are split over
  'fsdp' like the frozen UNet (leaf by leaf), LoRA, the label table and the step stay
  replicated; with fsdp = 1 everything is replicated."""
  setup, frozen, params = _problem()
  params = train.init_trainable(setup, jax.random.key(1), frozen["unet"], full_finetune=True)
  opt = train.make_optimizer(1e-3, 1e-2, lr_unet=1e-4)
  mesh = shd.make_mesh(fsdp=4)
  s = train.state_sharding(params, opt, mesh, min_elements=1024)
  frozen_s = shd.fsdp_sharding(frozen["unet"], mesh, min_elements=1024)
  assert s["params"]["unet"] == frozen_s
  split = [x for x in jax.tree_util.tree_leaves(frozen_s) if x.spec != jax.sharding.PartitionSpec()]
  assert len(split) > 10
  inner = s["opt"][2].inner_states["unet"].inner_state[0]  # adamw: ScaleByAdamState
  assert inner.mu["unet"] == frozen_s and inner.nu["unet"] == frozen_s
  for leaf in jax.tree_util.tree_leaves((s["params"]["lora"], s["params"]["label_embedding"],
                                         s["step"])):
    assert leaf.spec == jax.sharding.PartitionSpec()
  flat = jax.tree_util.tree_leaves(train.state_sharding(params, opt, shd.make_mesh()))
  assert all(x.spec == jax.sharding.PartitionSpec() for x in flat)


def test_sharding_rules_and_mesh_errors():
  mesh = shd.make_mesh(fsdp=4)
  rule = lambda shape: shd.fsdp_leaf_sharding(shape, mesh).spec  # noqa: E731
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  assert rule((3, 3, 320, 640)) == P(None, None, None, "fsdp")  # largest divisible dim
  assert rule((1280, 320)) == P("fsdp", None)
  assert rule((1280,)) == P()  # small: replicated
  assert rule((3, 3, 321, 643)) == P()  # nothing divisible by 4
  assert shd.fsdp_leaf_sharding((3, 3, 320, 640), shd.make_mesh()).spec == P()
  assert shd.batch_shards(mesh) == 8 and shd.fsdp_size(mesh) == 4
  assert shd.data_sharded(mesh, 1).spec == P(None, ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"fsdp=3 must be a positive divisor of the number of "
                                       r"devices \(8\)"):
    shd.make_mesh(fsdp=3)
  setup, frozen, params = _problem()  # per-device masks cannot split the weights
  mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, MICRO))
  with pytest.raises(ValueError, match="truncation_mask_per_device"):
    jax.eval_shape(lambda p: train.loss_fn(p, frozen, mb, jax.random.key(0), setup, mesh),
                   params)


def test_device_truncation_masks_differ_and_keep_the_rate():
  """Device 0 draws the micro-batch's own mask, devices 1…7 other ones; per device, step i
  carries gradient with probability (i + 1) / (N + 1), as the single mask does."""
  n, key = 10, jax.random.key(4)
  masks = np.stack([np.asarray(sampling.device_truncation_mask(key, n, d)) for d in range(8)])
  np.testing.assert_array_equal(masks[0], sampling.random_truncation_mask(key, n))
  assert len({m.tobytes() for m in masks}) >= 6
  keys = jax.random.split(jax.random.key(5), 4000)
  rate = np.asarray(jax.vmap(lambda k: sampling.device_truncation_mask(k, n, 3))(keys)).mean(0)
  want = (np.arange(n) + 1) / (n + 1)
  assert np.all(np.abs(rate - want) < 4 * np.sqrt(want * (1 - want) / len(keys)))


def test_per_device_truncation_masks(problem):
  """On 8 devices with `mask_per_device`, the trajectory runs in shard_map with one mask per
  device: the forward (loss) equals the 1-device one, `grad_steps` is the mean of the 8
  devices' own masks, and the gradient differs from one shared mask's."""
  setup, frozen, params = problem
  sgd = optax.sgd(1.0)
  shared = (dataclasses.replace(setup, mask_per_device=False), frozen, params)
  s1, m1 = _params_after(problem, shd.make_mesh(jax.devices()[:1]), opt=sgd)
  s8, m8 = _params_after(problem, shd.make_mesh(), opt=sgd)
  s8_shared, m8_shared = _params_after(shared, shd.make_mesh(), opt=sgd)
  np.testing.assert_allclose(m8[0]["loss"], m1[0]["loss"], rtol=1e-5, atol=1e-6)
  n, step_key = len(setup.timesteps), jax.random.fold_in(jax.random.key(7), 0)
  per_device = np.array([[  # [micro-batch m, device d]: differentiated steps
      int(np.sum(sampling.device_truncation_mask(
          jax.random.split(jax.random.fold_in(step_key, m), 3)[2], n, d))) for d in range(8)]
      for m in range(2)])
  assert float(m8[0]["grad_steps"]) == pytest.approx(per_device.mean())
  assert float(m8_shared[0]["grad_steps"]) == pytest.approx(per_device[:, 0].mean())
  assert float(m1[0]["grad_steps"]) == pytest.approx(per_device[:, 0].mean())
  flat8, flat_shared = (jax.flatten_util.ravel_pytree(s["params"])[0] for s in (s8, s8_shared))
  assert np.abs(flat8 - flat_shared).max() > 1e-6


def test_gated_truncation_matches_the_forward_cond():
  """Random truncation under full remat runs each model call through `sampling.gated_call`
  (no forward `lax.cond`, so the frozen weights are not per-step residuals); without remat it
  is a `lax.cond` per step. Same key, same mask: same loss and gradients, with the exact KL
  gradient switched on and off by `reference_grad_from`."""
  out = {}
  for policy in ("nothing_saveable", None):
    setup, frozen, params = _problem(remat_policy=policy, truncation="random",
                                     reference_grad_from=1)
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.ones_like(a), params)
    mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, 4))
    f = jax.jit(jax.value_and_grad(
        lambda p, fr, b, k, n, setup=setup: train.loss_fn(p, fr, b, k, setup, step=n),
        has_aux=True))
    out[policy] = [f(params, frozen, mb, jax.random.key(11), jnp.asarray(n)) for n in (0, 1)]
  for n in (0, 1):
    ((l1, m1), g1), ((l2, m2), g2) = out["nothing_saveable"][n], out[None][n]
    assert 0 < float(m1["grad_steps"]) < len(_problem()[0].timesteps)  # a real truncation
    np.testing.assert_allclose(l1, l2, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, atol=1e-6, rtol=1e-5)
  # The exact KL gradient (update 1) differs from the constant-ε_pre one (update 0).
  flat0, flat1 = (jax.flatten_util.ravel_pytree(out[None][n][1])[0] for n in (0, 1))
  assert np.abs(flat0 - flat1).max() > 0


def test_reward_remat_in_groups_does_not_change_loss_or_gradients():
  """Loss and gradient with the reward path rematerialised one image at a time (4 groups)
  equal those without reward remat."""
  out = {}
  for policy, group in (("nothing_saveable", 1), (None, 0)):
    setup, frozen, params = _problem(remat_policy=None, truncation="none")
    setup = dataclasses.replace(setup, reward_remat_policy=policy, reward_micro_batch=group)
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.ones_like(a), params)
    mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, 4))
    f = jax.jit(jax.value_and_grad(
        lambda p, fr, b, k, setup=setup: train.loss_fn(p, fr, b, k, setup), has_aux=True))
    out[policy] = f(params, frozen, mb, jax.random.key(3))
  ((l1, m1), g1), ((l2, m2), g2) = out["nothing_saveable"], out[None]
  np.testing.assert_allclose(l1, l2, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(m1["reward"], m2["reward"], atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_changing_gamma_guidance_eta_does_not_recompile(problem):
  """γ, guidance scale and η are traced: one trace for different values of each, and the values
  reach the computation. Every call starts from the same state, batch and key, so the initial
  KL is 0 (zero LoRA and label table) and loss = −γ · mean(reward): doubling γ doubles it."""
  setup, frozen, params = problem
  mesh = shd.make_mesh(jax.devices()[:1])
  opt = train.make_optimizer(1e-3, 1e-2)
  traced = chex.assert_max_traces(n=1)
  step_fn = train.make_train_step(setup, opt, mesh, wrap=traced)
  losses = []
  for g, w, eta in [(1.0, 2.0, 1.0), (2.0, 2.0, 1.0), (1.0, 5.0, 0.5)]:
    state = train.create_train_state(params, opt, mesh)  # donated by each call
    fr = dict(frozen, hparams=train.make_hparams(g, 0.01, w, eta))
    state, m = step_fn(state, tiny_problem.make_batch(0, 0, setup, 3, 1, MICRO),
                       jax.random.key(0), fr)
    assert float(m["kl"]) == 0.0
    losses.append(float(m["loss"]))
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_allclose(losses[1], 2 * losses[0], rtol=1e-5)  # γ reached the loss
  assert abs(losses[2] - losses[0]) > 1e-4 * abs(losses[0])  # guidance / η reached the samples


def test_optimizer_state_only_for_trainable_and_null_row_stays_zero(problem):
  """No optimiser state for frozen weights; the NULL row is used (CFG) but never updated."""
  setup, frozen, params = problem
  opt = train.make_optimizer(1e-2, 1e-1)
  state = train.create_train_state(params, opt, None)
  n_params = len(jax.tree_util.tree_leaves(params))
  opt_leaves = [x for x in jax.tree_util.tree_leaves(state["opt"]) if np.ndim(x) > 0]
  assert len(opt_leaves) == 2 * n_params  # adam mu, nu per trainable leaf; none for the UNet
  s, _ = _params_after(problem, shd.make_mesh(jax.devices()[:1]), steps=2)
  table = np.asarray(s["params"]["label_embedding"])
  assert np.all(table[-1] == 0.0)
  assert np.abs(table[:-1]).sum() > 0
  # The frozen inputs are never donated: after two steps they are still alive (a donated
  # buffer is deleted once the step consumed it).
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(frozen["unet"]))


def test_remat_does_not_change_loss_or_gradients():
  """Loss and gradient of one micro-batch with and without jax.checkpoint per model call."""
  out = {}
  for policy in ("nothing_saveable", None):
    setup, frozen, params = _problem(remat_policy=policy, truncation="none")
    # Perturb LoRA / labels so the policy differs from the reference (KL ≠ 0).
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.ones_like(a), params)
    mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, 4))
    f = jax.jit(jax.value_and_grad(
        lambda p, fr, b, k, setup=setup: train.loss_fn(p, fr, b, k, setup), has_aux=True))
    (loss, m), g = f(params, frozen, mb, jax.random.key(3))
    out[policy] = (loss, m, g)
  (l1, m1, g1), (l2, _, g2) = out["nothing_saveable"], out[None]
  assert float(m1["kl"]) > 0
  np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_reward_goes_up_over_training():
  """20 real updates on a tiny UNet with a linear-probe reward raise the reward and the
  classifier-judged accuracy, measured on a fixed evaluation batch with a fixed key."""
  setup, frozen, params = _problem(truncation="random")
  mesh = shd.make_mesh(jax.devices()[:1])
  opt = train.make_optimizer(3e-3, 5e-2)
  state = train.create_train_state(params, opt, mesh)
  step_fn = train.make_train_step(setup, opt, mesh)
  eval_mb = jax.tree_util.tree_map(lambda v: v[0],
                                   tiny_problem.make_batch(123, 0, setup, 3, 1, 32))
  evaluate = jax.jit(lambda p: train.loss_fn(p, frozen, eval_mb, jax.random.key(99), setup)[1])
  before = jax.device_get(evaluate(state["params"]))
  for i in range(20):
    state, _ = step_fn(state, tiny_problem.make_batch(0, i, setup, 3, 1, MICRO),
                       jax.random.key(1), frozen)
  after = jax.device_get(evaluate(state["params"]))
  print("reward before/after", before["reward"], after["reward"],
        "acc", before["classifier_acc/task0"], after["classifier_acc/task0"], "kl", after["kl"])
  assert after["reward"] > before["reward"] + 0.05
  assert after["classifier_acc/task0"] > before["classifier_acc/task0"]
  assert after["kl"] > 0


@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_warms_up_then_decays_every_group_to_its_final_fraction(warmup):
  """With a constant gradient Adam's bias-corrected step is exactly lr (weight decay 0), so the
  size of update n is the schedule: lr · (n + 1) / W during a warm-up of W updates, then (m =
  n − W, M = N − W) lr · (f + (1 − f)(1 + cos(π m / M)) / 2), lr · f from m = M on; "constant"
  keeps lr after the warm-up."""
  params = {"lora": {"w": jnp.zeros(3)}, "label_embedding": jnp.zeros((3, 2))}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  n_total, frac = 8, 0.1
  for schedule in ("cosine", "constant"):
    opt = train.make_optimizer(1e-3, 1e-2, weight_decay=0.0, lr_schedule=schedule,
                               num_updates=n_total, lr_final_fraction=frac,
                               lr_warmup_steps=warmup)
    state = opt.init(params)
    for n in range(n_total + 2):
      updates, state = opt.update(grads, state, params)
      m, big_m = n - warmup, n_total - warmup
      if m < 0:
        factor = (n + 1) / warmup
      elif schedule == "cosine":
        factor = frac + (1 - frac) * (1 + np.cos(np.pi * min(m, big_m) / big_m)) / 2
      else:
        factor = 1.0
      np.testing.assert_allclose(updates["lora"]["w"], -1e-3 * factor, rtol=1e-4)
      # The NULL row (last) is never updated; the others follow their own group's lr.
      np.testing.assert_allclose(updates["label_embedding"][:-1], -1e-2 * factor, rtol=1e-4)
      np.testing.assert_array_equal(updates["label_embedding"][-1], 0.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr_schedule": "linear"}, "lr_schedule='linear'"),
    ({"lr_schedule": "cosine", "num_updates": 0}, "num_updates"),
    ({"lr_schedule": "cosine", "num_updates": 5, "lr_final_fraction": 2.0}, "lr_final_fraction"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps=-1"),
    ({"lr_schedule": "cosine", "num_updates": 5, "lr_warmup_steps": 5}, "lr_warmup_steps=5"),
])
def test_bad_lr_schedule_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(1e-3, 1e-2, **kwargs)


def test_reference_grad_from_switches_to_the_exact_kl_gradient_at_that_update():
  """reference_grad_from=2: one compiled step (traced once) whose update 1 equals the biased
  setup's (reference_grad=False) and whose update 2 equals the exact setup's, from the same
  state, batch and key; the exact and the biased update differ (so both checks can fail).
  Plain SGD with lr 1, so an update is the gradient itself (Adam's first step is ±lr where
  a gradient is near 0, which hides what is compared)."""
  import optax  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh(jax.devices()[:1])
  opt = optax.sgd(1.0)
  exact, frozen, params = _problem(truncation="none")
  params = jax.tree_util.tree_map(lambda a: a + 0.02 * jnp.ones_like(a), params)
  batch = tiny_problem.make_batch(0, 0, exact, 3, 1, MICRO)
  out = {}
  for name, kw in (("exact", {}), ("biased", {"reference_grad": False}),
                   ("switched", {"reference_grad_from": 2})):
    setup = dataclasses.replace(exact, **kw)
    chex.clear_trace_counter()
    step_fn = train.make_train_step(setup, opt, mesh, wrap=chex.assert_max_traces(n=1))
    for k in (1, 2):
      state = train.create_train_state(params, opt, mesh)
      state["step"] = jnp.asarray(k, jnp.int32)
      new, m = step_fn(state, batch, jax.random.key(5), frozen)
      grad = jax.tree_util.tree_map(jnp.subtract, params, new["params"])
      out[name, k] = (jax.flatten_util.ravel_pytree(grad)[0], jax.device_get(m))
  scale = float(jnp.max(jnp.abs(out["exact", 2][0])))
  for k, same in ((1, "biased"), (2, "exact")):
    np.testing.assert_allclose(out["switched", k][0], out[same, k][0], rtol=1e-4,
                               atol=1e-5 * scale)
    assert float(out["switched", k][1]["exact_kl_grad"]) == float(same == "exact")
  for k in (1, 2):
    assert float(jnp.max(jnp.abs(out["exact", k][0] - out["biased", k][0]))) > 1e-3 * scale


def test_reference_grad_from_needs_the_exact_gradient_and_an_update_inside_the_run(problem):
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="reference_grad_from=3.*reference_grad=True"):
    dataclasses.replace(problem[0], reference_grad=False, reference_grad_from=3)
  config = smoke.get_config()
  config.update(dict(num_updates=10, micro_batch=8, num_micro_batches=1, reference_grad=True,
                     reference_grad_from=10))
  mesh = shd.make_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config.reference_grad_from=10.*num_updates=10"):
    experiment.validate_config(config, mesh)
  config.reference_grad_from = 9
  experiment.validate_config(config, mesh)


def test_a_non_finite_update_is_skipped_and_leaves_the_state_unchanged(problem):
  """Finite or skip: with γ = NaN the loss is NaN; the step reports skipped = 1 and returns the
  same params and optimiser state (only the step counter advances); a finite step applies."""
  setup, frozen, params = problem
  mesh = shd.make_mesh(jax.devices()[:1])
  opt = train.make_optimizer(1e-2, 1e-1)
  step_fn = train.make_train_step(setup, opt, mesh)
  batch = tiny_problem.make_batch(0, 0, setup, 3, 1, MICRO)
  state = train.create_train_state(params, opt, mesh)
  before = jax.device_get(state)
  bad = dict(frozen, hparams=train.make_hparams(float("nan"), 0.01, 2.0, 1.0))
  state, m = step_fn(state, batch, jax.random.key(0), bad)
  after = jax.device_get(state)
  assert not np.isfinite(float(m["loss"])) and float(m["skipped"]) == 1.0
  chex.assert_trees_all_equal(after["params"], before["params"])
  chex.assert_trees_all_equal(after["opt"], before["opt"])
  assert int(after["step"]) == 1
  state, m = step_fn(state, batch, jax.random.key(0), frozen)
  assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                 jax.device_get(state)["params"], before["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_all_finite():
  assert bool(train.all_finite({"a": jnp.ones(3), "b": jnp.zeros((), jnp.int32)}))
  assert not bool(train.all_finite({"a": jnp.array([1.0, jnp.inf])}))
  assert not bool(train.all_finite([jnp.ones(2), jnp.array([jnp.nan])]))


def test_bfloat16_frozen_storage_rounds_the_weights_and_nothing_else():
  """config.frozen_dtype = "bfloat16" stores the frozen UNet and reward weights in bf16 (half
  the bytes) and leaves contexts, schedule and scalars in float32; the models still compute in
  their activation dtype (float32 here), so the loss equals float32 storage of the same
  bf16-rounded weights."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  setup, frozen, params = _problem()
  stored = experiment.frozen_storage(frozen, ml_collections.ConfigDict({"frozen_dtype": "bfloat16"}))
  for name in ("unet", "reward"):
    assert {x.dtype for x in jax.tree_util.tree_leaves(stored[name])} == {jnp.dtype(jnp.bfloat16)}
  for name in ("contexts", "uncond_context", "schedule", "hparams"):
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(stored[name]))
  nbytes = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
  assert nbytes(stored["unet"]) * 2 == nbytes(frozen["unet"])
  rounded = jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, stored)
  assert experiment.frozen_storage(frozen, ml_collections.ConfigDict({"frozen_dtype": ""})) is frozen
  mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, MICRO))
  loss = jax.jit(lambda f: train.loss_fn(params, f, mb, jax.random.key(3), setup)[0])
  a, b, c = float(loss(stored)), float(loss(rounded)), float(loss(frozen))
  assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
  assert a != c  # the rounding itself is visible
