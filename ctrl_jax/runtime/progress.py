"""Progress output with ETA, and scalar logging to JSONL + TensorBoard event files."""
from __future__ import annotations

import json
import os
import time
from typing import Optional


def _fmt_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
      f"{s // 60:d}:{s % 60:02d}"


class Progress:
  """Prints `[stage] step i/n … s/step, ETA` lines; the first step (compile) is excluded from
  the rate."""

  def __init__(self, stage: str, total: int, start: int = 0):
    self.stage, self.total, self.start = stage, total, start
    self._t0: Optional[float] = None
    self._n0 = start
    self.t_begin = time.time()

  def update(self, step: int, metrics: Optional[dict] = None) -> str:
    now = time.time()
    if self._t0 is None:  # after the first (compiling) step
      self._t0, self._n0 = now, step
      rate = None
    else:
      rate = (now - self._t0) / max(step - self._n0, 1)
    parts = [f"[{self.stage}] {step}/{self.total}"]
    if metrics:
      parts.append(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if rate is not None:
      parts.append(f"{rate:.2f}s/step ETA {_fmt_seconds(rate * (self.total - step))}")
    else:
      parts.append(f"(first step incl. compile: {now - self.t_begin:.1f}s)")
    line = "  ".join(parts)
    print(line, flush=True)  # stdout only: absl's logging would print every line twice
    return line


class ScalarWriter:
  """Writes scalars to `workdir/<name>.jsonl` and TensorBoard events in `workdir/tb/<name>`.

  On resume, `truncate_after(step)` drops JSONL lines written after the restored checkpoint,
  so the log of a resumed run equals that of an uninterrupted one.
  """

  def __init__(self, workdir: str, name: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tb", name)

  def truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [json.loads(l) for l in f if l.strip()]
    with open(self.path, "w") as f:
      for r in rows:
        if r["step"] <= step:
          f.write(json.dumps(r) + "\n")

  def write(self, step: int, scalars: dict) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(self._tb_dir)
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(l) for l in f if l.strip()]

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
