"""Orbax checkpoints of the train state (restored against an abstract target, so optax state
comes back as the right types and shardings), with a fallback past a checkpoint that does not
restore."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ctrl_jax.runtime import fs


class Checkpointer:
  """Saves / restores a state pytree under `directory` (local path or gs://...)."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
    self.directory = fs.orbax_path(directory)
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, force: bool = False) -> None:
    """Saves asynchronously; `wait()` (or the next save / close) finishes the write."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) with the structure, dtypes and shardings of `target`
    (a pytree of arrays or `jax.ShapeDtypeStruct`s)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, target: Any) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint that restores.

    A checkpoint that fails to restore (truncated or corrupt files) is reported on stderr,
    moved aside to `<directory>_broken/<step>-<time>` (never deleted) and the previous one is
    tried. Raises FileNotFoundError when none is left.
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(target, step), step
      except Exception as e:  # pylint: disable=broad-except  (any failure: try an older one)
        moved = self._move_aside(step)
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"[checkpoint] warning: {self.directory}/{step} does not restore "
              f"({type(e).__name__}: {reason}); moved to {moved}; trying the previous one.",
              file=sys.stderr, flush=True)
    raise FileNotFoundError(f"no checkpoint in {self.directory} restores")

  def _move_aside(self, step: int) -> str:
    dest = fs.join(self.directory + "_broken", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      fs.move(fs.join(self.directory, str(step)), dest)
    self._manager.close()
    self._manager = self._open()
    return dest

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has reached the preemption sync point (multi-process runs on a
    platform that delivers preemption notices, e.g. Cloud TPU)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def latest_step(directory: str) -> Optional[int]:
  """The latest finished checkpoint step under `directory` (None: no directory, or nothing
  finished in it), read without creating anything."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def all_steps(directory: str) -> list[int]:
  """Every finished checkpoint step under `directory`, ascending ([]: no directory, or nothing
  finished in it), read without creating anything."""
  if not fs.isdir(directory):
    return []
  directory = fs.orbax_path(directory)
  with _silent_absl():  # a read-only manager warns that it is read-only, on every resume
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
      return sorted(manager.all_steps())
    finally:
      manager.close()


class _DropAll(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def _silent_absl():
  """No absl log records (orbax's channel) inside the block."""
  logger, drop = logging.getLogger("absl"), _DropAll()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def save_tree(path: str, tree: Any) -> None:
  """Saves a pytree of arrays to `path` (an orbax directory; must not exist yet)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(fs.orbax_path(path), tree)


def load_tree(path: str, target: Any) -> Any:
  """Loads a pytree saved by `save_tree`, with the structure and dtypes of `target` (arrays or
  `jax.ShapeDtypeStruct`s; without a target orbax returns plain dicts and loses key types)."""
  if not fs.isdir(path):
    raise FileNotFoundError(f"no saved tree at {path!r}.")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(fs.orbax_path(path), abstract)
