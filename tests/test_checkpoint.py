"""ctrl_jax.runtime.checkpoint: restores come back with the target's types (optax state included),
and the read-only `latest_step` sees only finished checkpoints and creates nothing."""
import os
import signal
import subprocess
import sys

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


_CRASH_DURING_SAVE = """
import os, signal, sys
import jax.numpy as jnp
import numpy as np
from ctrl_jax.runtime import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1])
ckpt.save(1, {"w": jnp.ones((4,), jnp.float32)})
ckpt.wait()
big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(32_000_000, np.float32))}
ckpt.save(2, big)  # asynchronous: the write has only begun when save returns
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_is_ignored_and_the_previous_checkpoint_restores(tmp_path):
  """A process killed (SIGKILL) while orbax writes checkpoint 2: the latest finished step is
  still 1, it restores, and the next run saves 2 again over the debris."""
  directory = str(tmp_path / "ckpt")
  out = subprocess.run([sys.executable, "-c", _CRASH_DURING_SAVE, directory],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
  assert checkpoint.latest_step(directory) == 1
  assert any(name != "1" for name in os.listdir(directory))  # the killed write left debris
  ckpt = checkpoint.Checkpointer(directory)
  state, step = ckpt.restore_latest({"w": jnp.zeros((4,), jnp.float32)})
  assert step == 1 and np.all(np.asarray(state["w"]) == 1.0)
  ckpt.save(2, {"w": jnp.full((4,), 2.0, jnp.float32)})
  ckpt.close()
  assert checkpoint.Checkpointer(directory).restore({"w": jnp.zeros((4,), jnp.float32)},
                                                    step=2)["w"][0] == 2.0


def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_restores(
    tmp_path, capsys):
  """Garbage bytes in checkpoint 3's files: `restore_latest` warns naming it, moves it to
  ckpt_broken/ (nothing deleted) and returns checkpoint 2."""
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  corrupted = []
  for root, _, files in os.walk(os.path.join(directory, "3")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "wb") as f:
        f.write(b"\x00garbage" * 7)
      corrupted.append(os.path.relpath(path, os.path.join(directory, "3")))
  assert corrupted
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  state, step = ckpt.restore_latest(_state(0))
  ckpt.close()
  assert step == 2
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_state(2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = capsys.readouterr().err
  assert f"{directory}/3 does not restore" in err and "moved to" in err
  (moved,) = os.listdir(directory + "_broken")
  assert moved.startswith("3-")
  kept = {os.path.relpath(os.path.join(r, n), os.path.join(directory + "_broken", moved))
          for r, _, fs in os.walk(os.path.join(directory + "_broken", moved)) for n in fs}
  assert set(corrupted) <= kept
  assert checkpoint.latest_step(directory) == 2


def test_load_tree_missing_path_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved tree at"):
    checkpoint.load_tree(str(tmp_path / "absent"), {"a": jnp.zeros(2)})
