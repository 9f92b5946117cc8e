"""ctrl_jax.runtime.checkpoint: restores come back with the target's types (optax state included),
and the read-only `latest_step` sees only finished checkpoints and creates nothing."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctrl_jax.runtime import checkpoint


def _state(scale):
  params = {"w": jnp.full((3, 2), scale, jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return {"step": jnp.asarray(int(scale), jnp.int32), "params": params, "opt": opt_state}


def test_latest_step_of_missing_dir_is_none_and_creates_nothing(tmp_path):
  path = str(tmp_path / "nothing" / "ckpt")
  assert checkpoint.latest_step(path) is None
  assert not os.path.exists(path)


def test_checkpointer_roundtrip_keeps_optax_types_and_latest_step(tmp_path):
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  assert checkpoint.latest_step(directory) == 3
  assert sorted(os.listdir(directory)) == ["2", "3"]  # max_to_keep
  target = _state(0)
  restored = checkpoint.Checkpointer(directory).restore(target, step=2)
  # The optax state comes back as optax's named tuples (not plain dicts), with the saved values.
  assert type(restored["opt"][0]) is type(target["opt"][0])
  expected = _state(2)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_latest_step_ignores_an_unfinished_write(tmp_path):
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(5, _state(5))
  ckpt.close()
  # A crash mid-write leaves orbax's temporary directory, which is not a finished step.
  os.makedirs(os.path.join(directory, "7.orbax-checkpoint-tmp-123"))
  assert checkpoint.latest_step(directory) == 5


def test_load_tree_missing_path_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved tree at"):
    checkpoint.load_tree(str(tmp_path / "absent"), {"a": jnp.zeros(2)})
