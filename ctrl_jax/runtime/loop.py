"""The one training loop every stage uses: resume from the last orbax checkpoint, step, log
scalars (JSONL + TensorBoard) and images (TensorBoard), print progress with ETA, checkpoint;
stop cleanly when preempted.

Batches are a function of the step number only (`batch_fn(step)`), and step keys are folded in
from the step inside the jitted step, so a run killed at any point and rerun ends exactly where
an uninterrupted run ends.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import progress

# Stop after this many updates in a row were skipped for a non-finite loss, gradient or result
# (steps that report a "skipped" metric; see core.train.make_train_step).
MAX_CONSECUTIVE_SKIPS = 5


class Preempted(Exception):
  """A SIGTERM (a scheduler's or Cloud TPU's preemption) or SIGINT arrived: the update under
  way was finished and checkpointed. `exit_code` is what the launcher exits with."""

  def __init__(self, stage: str, step: int, signum: int, directory: str):
    self.exit_code = 130 if signum == signal.SIGINT else 0
    name = signal.Signals(signum).name
    super().__init__(f"[{stage}] {name}: stopped after update {step}, checkpoint saved in "
                     f"{directory}/{step}; rerun the same command to resume.")


class _StopRequests:
  """Records SIGTERM / SIGINT while installed (main thread only); a second SIGINT interrupts
  at once, as usual. Not installed in multi-process runs: there jax.distributed's preemption
  notifier takes SIGTERM, and every process stops at the same sync point
  (`Checkpointer.reached_preemption`)."""

  def __init__(self, enabled: bool):
    self.signum: Optional[int] = None
    self._enabled = enabled
    self._previous = {}

  def __enter__(self):
    if self._enabled and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n[loop] {signal.Signals(signum).name} received: finishing this update, then "
          "saving a checkpoint.", flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def run(stage: str, workdir: str, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]],
        batch_fn: Callable[[int], Any], num_steps: int, *, log_every: int,
        checkpoint_every: int, max_checkpoints: Optional[int] = 3,
        shown: Sequence[str] = ("loss",),
        on_running: Optional[Callable[[], None]] = None,
        max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
        step_scalars: Optional[Callable[[int], dict]] = None,
        images_fn: Optional[Callable[[Any], dict]] = None,
        images_every: int = 0) -> tuple[Any, list[dict], int]:
  """Runs (or resumes) `state = step_fn(state, batch_fn(step))` for steps [start, num_steps).

  Checkpoints go to `workdir/<stage>/ckpt/<step>`, scalars to `workdir/<stage>.jsonl` and
  `workdir/tb/<stage>`. A checkpoint that does not restore is moved aside and the previous one
  used (`Checkpointer.restore_latest`).

  Non-finite values: a step whose metrics carry "skipped" (1 = the update was not applied)
  stops the run after `max_consecutive_skips` in a row; for other steps a non-finite loss
  stops it. Either way no checkpoint is written from a state after a non-finite loss.
  On SIGTERM / SIGINT the update under way finishes, is checkpointed, and `Preempted` is raised.
  `on_running()` is called once the first step has run (compiled, metrics fetched): the moment
  to start background work that should not compete with this stage's compilation.
  `step_scalars(step)`: host-side scalars of update `step` (0-based; e.g. its learning rates),
  logged with its metrics.
  `images_fn(state) -> {tag: uint8 [H, W, 3]}`: TensorBoard images, every `images_every`
  updates (0 = never), at the last one, and (a run from scratch) at step 0 before the first.
  It is called by every process (it may sample over the global mesh); process 0 writes.
  Returns (final state, logged history, step the run started from).
  """
  ckpt = checkpoint.Checkpointer(fs.join(workdir, stage, "ckpt"),
                                 max_to_keep=max_checkpoints)
  writer = progress.ScalarWriter(workdir, stage)
  start = 0
  if ckpt.latest_step():
    state, start = ckpt.restore_latest(state)
    writer.truncate_after(start)
    if jax.process_index() == 0:
      print(f"[{stage}] resumed from {ckpt.directory}/{start}", flush=True)
  skips = 0
  images_every = images_every if images_fn is not None else 0
  try:
    multi_process = jax.process_count() > 1
    if images_every and start == 0 and num_steps > 0:
      writer.write_images(0, images_fn(state))  # the model before any update
    bar = progress.Progress(stage, num_steps, start)  # after it: not in the first step's time
    with _StopRequests(enabled=not multi_process) as stop:
      for step in range(start, num_steps):
        state, metrics = step_fn(state, batch_fn(step))
        done = step + 1
        if "skipped" in metrics:
          skips = skips + 1 if float(metrics["skipped"]) > 0 else 0
        stop_now = skips >= max_consecutive_skips
        to_log = done % log_every == 0 or done == num_steps or step == start or stop_now
        to_save = done % checkpoint_every == 0 or done == num_steps
        if to_log or (to_save and "skipped" not in metrics):
          host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if "skipped" not in host and not np.isfinite(host["loss"]):
            raise FloatingPointError(
                f"[{stage}] loss is {host['loss']} at step {done}; last good checkpoint: "
                f"{ckpt.latest_step()} in {ckpt.directory}.")
          if to_log:
            if step_scalars is not None:
              host.update(step_scalars(step))
            writer.write(done, host)
            bar.update(done, {k: host[k] for k in shown if k in host})
        if images_every and (done % images_every == 0 or done == num_steps):
          writer.write_images(done, images_fn(state))
        if stop_now:
          raise FloatingPointError(
              f"[{stage}] {skips} updates in a row skipped at step {done} (non-finite loss, "
              "gradient or parameters; none was applied); last checkpoint: "
              f"{ckpt.latest_step()} in {ckpt.directory}. Lower the learning rates.")
        if step == start and on_running is not None:
          on_running()
        preempted = (ckpt.reached_preemption(done) if multi_process
                     else stop.signum is not None)
        if to_save or preempted:
          ckpt.save(done, state, force=preempted)
        if preempted:
          ckpt.wait()
          raise Preempted(stage, done, stop.signum or signal.SIGTERM, ckpt.directory)
  finally:
    ckpt.close()
    writer.close()
  return state, writer.read(), start
