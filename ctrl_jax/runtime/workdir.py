"""The workdir of a run: checked before any work, and locked for the run's lifetime so that two
runs never write the same checkpoints."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from typing import Optional

from ctrl_jax.runtime import fs


class WorkdirError(ValueError):
  """The workdir cannot be used (a file, not writable, locked by another run)."""


def check(path: str) -> None:
  """Creates `path` if missing; raises WorkdirError naming it if it is not a writable folder.
  Remote paths (gs://…) are left to the storage client; file:// is a local path."""
  if not path:
    raise WorkdirError("--workdir is empty; give a folder for checkpoints, logs and outputs.")
  if fs.is_remote(path):
    return
  path = fs.local_path(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={path!r} is a file, not a folder.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={path!r} cannot be created: {e.strerror}.") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={path!r} is not writable.")


class Lock:
  """An exclusive `flock` on WORKDIR/.lock held while the run lives (the OS drops it when the
  process dies, even by kill -9). A second run on the same workdir fails at once, naming the
  holder's pid, start time and command. No-op for remote workdirs, and when not `enabled` (the
  other processes of a multi-process run: they work on the run process 0 holds)."""

  def __init__(self, workdir: str, enabled: bool = True):
    local = fs.local_path(workdir)
    self.path = None if local is None or not enabled else os.path.join(local, ".lock")
    self._fd: Optional[int] = None

  def __enter__(self) -> "Lock":
    if self.path is None:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise WorkdirError(
          f"--workdir={os.path.dirname(self.path)!r} is in use by another run ({holder}); wait "
          "for it to finish or stop it, or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  @staticmethod
  def _holder(fd: int) -> str:
    try:
      info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
      return (f"pid {info.get('pid', '?')}, started {info.get('started', '?')}: "
              f"{info.get('command', '?')}")
    except (OSError, ValueError):
      return "holder unknown"

  def __exit__(self, *exc) -> bool:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    return False
