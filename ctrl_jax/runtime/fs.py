"""Every read and write of a run's workdir, local or remote, through one path API.

A workdir is a local path or a URI: `gs://bucket/run` (Cloud TPU: needs `gcsfs`), `s3://…`, or
any scheme fsspec knows (`memory://` in tests; `file:///abs/path` is the local path). Local
paths use the OS directly; URIs go through fsspec. Object stores cannot append or rename, so
writers here replace whole files: `write_text`/`write_bytes` are atomic on local disks (temporary
file + rename) and per object on stores.

Orbax checkpoints take `orbax_path(path)` (orbax reads gs:// itself); libraries that need a real
folder (diffusers' `save_pretrained`, PIL folder scans) take `local_path(path)`, which is None
for a remote path.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from typing import Any, Iterator, Optional

_FILE = "file://"


def scheme(path: str) -> str:
  """'' for a local path (and file://), else the URI scheme ('gs', 'memory', …)."""
  path = os.fspath(path)
  if "://" not in path or path.startswith(_FILE):
    return ""
  return path.split("://", 1)[0]


def is_remote(path: str) -> bool:
  return bool(scheme(path))


def local_path(path: str) -> Optional[str]:
  """The OS path of a local path or file:// URI; None for a remote one."""
  path = os.fspath(path)
  if path.startswith(_FILE):
    return path[len(_FILE):]
  return None if is_remote(path) else path


def orbax_path(path: str) -> str:
  """What orbax is given: an absolute local path, or the URI (gs://…) as is."""
  local = local_path(path)
  return os.path.abspath(local) if local is not None else path


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def _fs(path: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    raise ValueError(f"{path!r}: no filesystem for the {scheme(path)}:// scheme ({e}); for "
                     "gs:// install gcsfs (`pip install gcsfs`).") from None


def _call(path: str, method: str):
  """`fs.<method>(p)` of the fsspec filesystem of URI `path`."""
  fs, p = _fs(path)
  return getattr(fs, method)(p)


def exists(path: str) -> bool:
  local = local_path(path)
  return os.path.exists(local) if local is not None else _call(path, "exists")


def isdir(path: str) -> bool:
  local = local_path(path)
  return os.path.isdir(local) if local is not None else _call(path, "isdir")


def makedirs(path: str) -> None:
  local = local_path(path)
  if local is not None:
    os.makedirs(local, exist_ok=True)
    return
  fs, p = _fs(path)
  fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of folder `path`, sorted; [] if it does not exist."""
  local = local_path(path)
  if local is not None:
    return sorted(os.listdir(local)) if os.path.isdir(local) else []
  fs, p = _fs(path)
  if not fs.isdir(p):
    return []
  return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def remove(path: str) -> None:
  """Deletes a file or a folder tree; nothing if it does not exist."""
  local = local_path(path)
  if local is not None:
    if os.path.isdir(local):
      shutil.rmtree(local)
    elif os.path.exists(local):
      os.remove(local)
    return
  fs, p = _fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def move(src: str, dst: str) -> None:
  """Moves a file or folder (a copy + delete on object stores)."""
  local_src, local_dst = local_path(src), local_path(dst)
  if local_src is not None and local_dst is not None:
    os.makedirs(os.path.dirname(local_dst) or ".", exist_ok=True)
    shutil.move(local_src, local_dst)
    return
  fs, p = _fs(src)
  fs.mv(p, _fs(dst)[1], recursive=True)


def open_file(path: str, mode: str = "rb"):
  """A file object for `path` ('rb', 'r', 'wb', 'w'); writes are not atomic: use
  `write_bytes`/`write_text` for files a crash must not leave half written."""
  local = local_path(path)
  if local is not None:
    if "w" in mode or "a" in mode:
      os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    return open(local, mode)  # pylint: disable=unspecified-encoding
  fs, p = _fs(path)
  if "w" in mode:
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
  return fs.open(p, mode)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` whole: through a temporary file + rename locally (a crash never
  leaves a half-written file), as one object on a store."""
  local = local_path(path)
  if local is not None:
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, local)
    return
  fs, p = _fs(path)
  fs.makedirs(posixpath.dirname(p), exist_ok=True)
  fs.pipe_file(p, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write_json(path: str, obj: Any, sort_keys: bool = False) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file; [] if it does not exist."""
  if not exists(path):
    return []
  return [json.loads(l) for l in read_text(path).splitlines() if l.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_npz(path: str, **arrays) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(read_bytes(path))) as data:
    return {k: data[k] for k in data.files}


def save_image(path: str, image) -> None:
  """A PIL image (format from the suffix: .png, .jpg) or a matplotlib figure."""
  buf = io.BytesIO()
  fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
  if hasattr(image, "savefig"):
    image.savefig(buf, format=fmt, dpi=image.dpi, bbox_inches="tight")
  else:
    image.save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
  write_bytes(path, buf.getvalue())


def walk_files(path: str) -> Iterator[str]:
  """Relative paths of every file under folder `path` (sorted)."""
  local = local_path(path)
  if local is not None:
    for root, _, files in sorted(os.walk(local)):
      for name in sorted(files):
        yield os.path.relpath(os.path.join(root, name), local)
    return
  fs, p = _fs(path)
  for f in sorted(fs.find(p)):
    yield posixpath.relpath(f, p)


# ----------------------------------------------------------------------------- TensorBoard


class _WholeFileWriter:
  """A tensorboardX record writer for URIs: keeps the event file's bytes and rewrites the
  object on every flush (stores cannot append; event files of one stage are small)."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _WholeFileWriterFactory:

  def open(self, path: str) -> _WholeFileWriter:
    return _WholeFileWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # stores have no folders to create


def summary_writer(logdir: str):
  """A tensorboardX SummaryWriter for a local folder or a URI (events through fsspec)."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  local = local_path(logdir)
  if local is not None:
    return SummaryWriter(local)
  record_writer.register_writer_factory(scheme(logdir), _WholeFileWriterFactory())
  return SummaryWriter(logdir)
