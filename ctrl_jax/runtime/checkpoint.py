"""Orbax checkpoints of the train state (restored against an abstract target, so optax state
comes back as the right types and shardings)."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves / restores a state pytree under `directory` (local path or gs://...)."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def latest_step(directory: str) -> Optional[int]:
  """The latest finished checkpoint step under `directory` (None: no directory, or nothing
  finished in it), read without creating anything."""
  if "://" not in directory:
    if not os.path.isdir(directory):
      return None
    directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def save_tree(path: str, tree: Any) -> None:
  """Saves a pytree of arrays to `path` (an orbax directory; must not exist yet)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path) if "://" not in path else path, tree)


def load_tree(path: str, target: Any) -> Any:
  """Loads a pytree saved by `save_tree`, with the structure and dtypes of `target` (arrays or
  `jax.ShapeDtypeStruct`s; without a target orbax returns plain dicts and loses key types)."""
  if "://" not in path and not os.path.isdir(path):
    raise FileNotFoundError(f"no saved tree at {path!r}.")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path) if "://" not in path else path, abstract)
