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
