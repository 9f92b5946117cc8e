"""The one training loop every stage uses: resume from the last orbax checkpoint, step, log
scalars (JSONL + TensorBoard), print progress with ETA, checkpoint.

Batches are a function of the step number only (`batch_fn(step)`), and step keys are folded in
from the step inside the jitted step, so a run killed at any point and rerun ends exactly where
an uninterrupted run ends.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import progress


def run(stage: str, workdir: str, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]],
        batch_fn: Callable[[int], Any], num_steps: int, *, log_every: int,
        checkpoint_every: int, max_checkpoints: Optional[int] = 3,
        shown: Sequence[str] = ("loss",),
        on_running: Optional[Callable[[], None]] = None) -> tuple[Any, list[dict], int]:
  """Runs (or resumes) `state = step_fn(state, batch_fn(step))` for steps [start, num_steps).

  Checkpoints go to `workdir/<stage>/ckpt/<step>`, scalars to `workdir/<stage>.jsonl` and
  `workdir/tb/<stage>`. A non-finite loss stops the run with the last good checkpoint named.
  `on_running()` is called once the first step has run (compiled, metrics fetched): the moment
  to start background work that should not compete with this stage's compilation.
  Returns (final state, logged history, step the run started from).
  """
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, stage, "ckpt"),
                                 max_to_keep=max_checkpoints)
  writer = progress.ScalarWriter(workdir, stage)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(state)
    writer.truncate_after(start)
    print(f"[{stage}] resumed from {ckpt.directory}/{start}", flush=True)
  bar = progress.Progress(stage, num_steps, start)
  try:
    for step in range(start, num_steps):
      state, metrics = step_fn(state, batch_fn(step))
      done = step + 1
      if done % log_every == 0 or done == num_steps or step == start:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(f"[{stage}] loss is {host['loss']} at step {done}; last good "
                                   f"checkpoint: {ckpt.latest_step()} in {ckpt.directory}.")
        writer.write(done, host)
        bar.update(done, {k: host[k] for k in shown if k in host})
      if step == start and on_running is not None:
        on_running()
      if done % checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state)
  finally:
    ckpt.close()
    writer.close()
  return state, writer.read(), start
