"""Attention implementations (models/attention.py) and the precision policy of the augmented
UNet: parity with diffusers' own attention, forward and gradient; bfloat16 policy against a
float32 reference."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.core import train
from ctrl_jax.models import attention
from ctrl_jax.models import augmented
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems import tiny as tiny_problem


@pytest.fixture(scope="module")
def unet16():
  """A tiny SD-shaped UNet at 16×16 latents: 256-token self-attention (chunked in 4 × 64),
  cross-attention over 5 context tokens."""
  cfg = unet_lib.tiny_unet_config(sample_size=16, in_channels=4, cross_attention_dim=16)
  unet = unet_lib.build_unet(cfg)
  params = unet_lib.init_unet_params(unet, jax.random.key(0))
  model = augmented.AugmentedUNet(unet, num_labels=2, lora_rank=4)
  ctrl = model.init_ctrl_params(jax.random.key(1), params)
  # A non-zero LoRA and label table, so their gradients and paths are exercised.
  ctrl = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), ctrl)
  x = jax.random.normal(jax.random.key(2), (2, 4, 16, 16))
  ctx = jax.random.normal(jax.random.key(3), (2, 5, 16))
  return model, params, ctrl, x, ctx


def _run(model, params, ctrl, x, ctx, impl, query_chunk=64):
  labels = jnp.array([0, 2])

  def eps(ctrl, x):
    def call():
      return model.apply(params, ctrl, x, 301, ctx, labels)
    icpt = attention.interceptor(impl, query_chunk=query_chunk, chunk_threshold=0)
    if icpt is None:
      return call()
    with nn.intercept_methods(icpt):
      return call()

  def loss(ctrl, x):
    e = eps(ctrl, x)
    return jnp.sum(e * jnp.cos(jnp.arange(e.size).reshape(e.shape)))

  out = jax.jit(eps)(ctrl, x)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(ctrl, x)
  return out, grads


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_attention_matches_naive_forward_and_gradient(unet16, impl):
  """Every attention layer run by `impl` (chunked: 4 query chunks of 64 under remat) gives
  diffusers' naive ε and gradients (LoRA, label table, input) to ≤ 1e-5 in float32."""
  model, params, ctrl, x, ctx = unet16
  ref_out, ref_g = _run(model, params, ctrl, x, ctx, "naive")
  out, g = _run(model, params, ctrl, x, ctx, impl)
  scale = float(np.abs(ref_out).max())
  np.testing.assert_allclose(out, ref_out, atol=1e-5 * scale, rtol=0)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-12, rtol=0)
  # The implementation did run: the naive path differs from it in the last bits somewhere.
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)))


def test_chunked_attention_matches_softmax_closed_form():
  """chunked_attention = softmax(q kᵀ/√d) v computed directly in float64 (numpy), for a query
  length that the chunk size does not divide (the largest divisor is used)."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, n, 3, 8)).astype(np.float32) for n in (90, 70, 70))
  out = attention.chunked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    8 ** -0.5, query_chunk=32)
  s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", p, v)
  np.testing.assert_allclose(out, want, atol=2e-6)


def test_auto_never_picks_cudnn_on_cpu_and_unknown_names_are_refused():
  q_long = jnp.zeros((1, 4096, 8, 40), jnp.bfloat16)
  assert not attention.cudnn_applies(q_long)  # CPU
  with pytest.raises(ValueError, match="attention='flash'"):
    attention.check("flash")


def _precision_setup(policy_dtype, reference_dtype):
  cfg = tiny_problem.micro_unet_config()
  unet = unet_lib.build_unet(cfg, dtype=policy_dtype)
  params = unet_lib.init_unet_params(unet, jax.random.key(0))
  model = augmented.AugmentedUNet(unet, num_labels=2, lora_rank=4,
                                  reference_dtype=reference_dtype)
  ctrl = model.init_ctrl_params(jax.random.key(1), params)
  return model, params, ctrl


@pytest.mark.parametrize("policy,reference", [(jnp.float32, jnp.float32),
                                              (jnp.bfloat16, jnp.bfloat16),
                                              (jnp.bfloat16, jnp.float32)])
def test_precision_policy_at_init(policy, reference):
  """At init (zero LoRA up, zero label table) the KL of a CFG trajectory is exactly 0 when the
  policy and the reference compute in the same dtype; with a bfloat16 policy and the official
  float32 reference, the guided ε (combined in float32) matches the reference's to bfloat16
  rounding and the KL is small but not 0."""
  model, params, ctrl = _precision_setup(policy, reference)
  setup, frozen, _ = tiny_problem.build(jax.random.key(0), batch_latent=(4, 8, 8), num_steps=4,
                                        truncation="none",
                                        unet_config=tiny_problem.micro_unet_config())
  setup = dataclasses.replace(setup, model=model)
  frozen = dict(frozen, unet=params)
  mb = jax.tree_util.tree_map(lambda v: v[0], tiny_problem.make_batch(0, 0, setup, 3, 1, 4))
  labels = setup.label_space.encode(mb["y"])
  pol, ref = train.eps_functions(setup, frozen, mb["prompt"], labels)
  x = jax.random.normal(jax.random.key(5), (4, 4, 8, 8))
  e_pol, e_ref = jax.jit(pol)(ctrl, x, 501), jax.jit(ref)(params, x, 501)
  assert e_pol.dtype == jnp.float32 and e_ref.dtype == jnp.float32  # CFG in float32
  _, metrics = jax.jit(lambda p, f, b, k: train.loss_fn(p, f, b, k, setup))(
      ctrl, frozen, mb, jax.random.key(3))
  if policy == reference:
    # Inside one compiled trajectory both models round the same way: exactly 0. (Two separate
    # jits of the two ε may fuse differently, hence only a tolerance for those.)
    assert float(metrics["kl_exact"]) == 0.0
    tol = 1e-5 if policy == jnp.float32 else 0.05
    np.testing.assert_allclose(e_pol, e_ref, atol=tol * float(jnp.max(jnp.abs(e_ref))))
  else:
    # bfloat16 has an 8-bit mantissa: relative rounding 2^-8 per op; through the UNet and a
    # guidance scale of 2 the ε error stays within a few percent of its scale, never exact.
    err = float(jnp.max(jnp.abs(e_pol - e_ref)) / jnp.max(jnp.abs(e_ref)))
    assert 0 < err < 0.05
    assert float(metrics["kl_exact"]) > 0.0
