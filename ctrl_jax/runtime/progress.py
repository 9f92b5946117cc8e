"""Progress output with ETA, and scalar (JSONL + TensorBoard) and image (TensorBoard) logging."""
from __future__ import annotations

import struct
import time
from typing import Optional

import jax
import numpy as np

from ctrl_jax.runtime import fs


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
    if jax.process_index() == 0:  # one copy of the progress of a multi-process run
      print(line, flush=True)  # stdout only: absl's logging would print every line twice
    return line


class ScalarWriter:
  """Writes scalars to `workdir/<name>.jsonl` and TensorBoard events in `workdir/tb/<name>`
  (local or remote workdir, `fs`), images to the same TensorBoard events; in a multi-process
  run only process 0 writes.

  The JSONL file is rewritten whole at each write (object stores cannot append). On resume,
  `truncate_after(step)` drops rows written after the restored checkpoint, so the log of a
  resumed run equals that of an uninterrupted one.
  """

  def __init__(self, workdir: str, name: str):
    self.path = fs.join(workdir, f"{name}.jsonl")
    self._tb = None
    self._tb_dir = fs.join(workdir, "tb", name)
    self._writes = jax.process_index() == 0
    self._rows = fs.read_jsonl(self.path) if self._writes else []

  def truncate_after(self, step: int) -> None:
    if self._writes and any(r["step"] > step for r in self._rows):
      self._rows = [r for r in self._rows if r["step"] <= step]
      fs.write_jsonl(self.path, self._rows)

  def write(self, step: int, scalars: dict) -> None:
    if not self._writes:
      return
    self._rows.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    fs.write_jsonl(self.path, self._rows)
    for k, v in scalars.items():
      self._writer().add_scalar(k, float(v), int(step))
    self._tb.flush()

  def write_images(self, step: int, images: dict) -> None:
    """TensorBoard image summaries {tag: uint8 [H, W, 3]} at `step` (not in the JSONL)."""
    if not self._writes or not images:
      return
    for tag, image in images.items():
      self._writer().add_image(tag, np.asarray(image, np.uint8), int(step), dataformats="HWC")
    self._tb.flush()

  def _writer(self):
    if self._tb is None:
      self._tb = fs.summary_writer(self._tb_dir)
    return self._tb

  def read(self) -> list[dict]:
    """The rows written so far (every process: read from the workdir)."""
    return list(self._rows) if self._writes else fs.read_jsonl(self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_tensorboard(logdir: str) -> list[dict]:
  """Every summary value in the TensorBoard event files of `logdir` (local or URI), in file
  order: {"step", "tag", "scalar": float} or {"step", "tag", "image": PNG bytes, "height",
  "width"}. For tests and scripts (CRCs are not checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(fs.listdir(logdir)):
    if "tfevents" not in name:
      continue
    data, pos = fs.read_bytes(fs.join(logdir, name)), 0
    while pos + 12 <= len(data):  # record: length u64, crc u32, data, crc u32
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        row = {"step": int(event.step), "tag": value.tag}
        if value.HasField("image"):
          row.update(image=value.image.encoded_image_string, height=value.image.height,
                     width=value.image.width)
        elif value.HasField("simple_value"):
          row["scalar"] = float(value.simple_value)
        else:
          continue
        out.append(row)
  return out
