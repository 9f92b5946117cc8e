"""The augmented UNet: identity at init, gradient routing, LoRA merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.models import augmented
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems import tiny as tiny_problem


@pytest.fixture(scope="module")
def tiny():
  unet = unet_lib.build_unet(tiny_problem.micro_unet_config())
  params = unet_lib.init_unet_params(unet, jax.random.key(0))
  model = augmented.AugmentedUNet(unet, num_labels=3, lora_rank=4)
  ctrl = model.init_ctrl_params(jax.random.key(1), params)
  x = jax.random.normal(jax.random.key(2), (4, 4, 8, 8))
  ctx = jax.random.normal(jax.random.key(3), (4, 2, 16))
  return model, params, ctrl, x, ctx


def test_identical_to_pretrained_at_init_for_every_label(tiny):
  """Zero label table + zero LoRA up-projection: bit-identical output, NULL label included."""
  model, params, ctrl, x, ctx = tiny
  ref = jax.jit(model.apply_pretrained)(params, x, 501, ctx)
  apply = jax.jit(model.apply)
  for label in range(model.num_labels + 1):
    out = apply(params, ctrl, x, 501, ctx, jnp.full((4,), label))
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_lora_targets_every_attention_projection(tiny):
  """q, k, v, out of attn1 and attn2 in every transformer block of the UNet."""
  model, params, ctrl, _, _ = tiny
  paths = augmented.dense_paths(params, model.lora_targets)
  names = {p[-2] + "/" + p[-1] for p in paths}
  assert names == {f"attn{i}/{w}" for i in (1, 2) for w in ("to_q", "to_k", "to_v", "to_out_0")}
  num_blocks = len(_find(params, "transformer_blocks_0"))
  assert num_blocks == 4  # down 1, mid 1, up 2 (up blocks have layers_per_block + 1)
  assert len(paths) == num_blocks * 2 * 4
  leaves = jax.tree_util.tree_leaves(ctrl["lora"])
  assert len(leaves) == 2 * len(paths)


def test_label_embedding_changes_output_and_gradients_route(tiny):
  """Gradients reach used label rows and LoRA (up) only; unused rows and NULL get none."""
  model, params, ctrl, x, ctx = tiny
  labels = jnp.array([0, 2, 0, 2])
  probe = jax.random.normal(jax.random.key(4), x.shape)

  def loss(c):
    return jnp.sum(model.apply(params, c, x, 501, ctx, labels) * probe)

  g = jax.grad(loss)(ctrl)
  row_norms = np.linalg.norm(np.asarray(g["label_embedding"]), axis=1)
  assert row_norms[0] > 0 and row_norms[2] > 0
  assert row_norms[1] == 0 and row_norms[3] == 0  # unused label, NULL
  ups = [np.abs(np.asarray(v["up"])).sum() for v in _lora_nodes(g["lora"])]
  assert all(u > 0 for u in ups)
  # A non-zero label row changes the output.
  c2 = dict(ctrl, label_embedding=ctrl["label_embedding"].at[2].set(1.0))
  out = model.apply(params, c2, x, 501, ctx, labels)
  base = model.apply(params, ctrl, x, 501, ctx, labels)
  assert float(jnp.abs(out - base).max()) > 1e-4
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(base[0]))  # label 0 unchanged


def _find(tree, name):
  if not isinstance(tree, dict):
    return []
  return ([tree[name]] if name in tree else []) + [
      n for v in tree.values() for n in _find(v, name)]


def _lora_nodes(tree):
  if isinstance(tree, dict) and "up" in tree:
    return [tree]
  return [n for v in tree.values() for n in _lora_nodes(v)]


def test_merge_lora_matches_unmerged(tiny):
  """W + scale·A B merged into the UNet gives the same ε as the intercepted LoRA."""
  model, params, ctrl, x, ctx = tiny
  rng = np.random.default_rng(0)
  ctrl = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, jnp.float32), ctrl)
  ctrl["label_embedding"] = jnp.zeros_like(ctrl["label_embedding"])
  labels = jnp.zeros((4,), jnp.int32)
  out = model.apply(params, ctrl, x, 301, ctx, labels)
  merged = model.merge_lora(params, ctrl)
  out_merged = model.apply_pretrained(merged, x, 301, ctx)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_merged), atol=1e-5)
  assert float(jnp.abs(out - model.apply_pretrained(params, x, 301, ctx)).max()) > 1e-3


def test_bad_lora_targets_raise_clear_error(tiny):
  model, params, _, _, _ = tiny
  bad = augmented.AugmentedUNet(model.unet, num_labels=3, lora_targets=r"nothing_here$")
  with pytest.raises(ValueError, match="lora_targets"):
    bad.init_ctrl_params(jax.random.key(0), params)
