"""A stage's files in the workdir: JSON written atomically (a stage's `info.json`, written last,
marks it done), the check that a reused stage was made with the config asked for now, and the
record of who ran a stage with what (`record_run`: DIR/run_info/<stage>.json)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import ml_collections

from ctrl_jax.runtime import fs


def read_json(path: str) -> Any:
  return fs.read_json(path)


def write_json(path: str, obj: Any, sort_keys: bool = False) -> None:
  """Writes `obj` to `path` (local or remote) whole: a crash never leaves a half-written file."""
  fs.write_json(path, obj, sort_keys=sort_keys)


def config_dict(c: ml_collections.ConfigDict) -> dict:
  """A config section as its JSON form stores it (tuples become lists), for comparisons."""
  return json.loads(c.to_json())


def check_same(saved: dict, wanted: dict, path: str, field: str = "config",
               defaults: Optional[dict] = None) -> None:
  """Refuses to reuse a stage saved in `path` with another `field` than `wanted`.

  `defaults`: fields added after stages were saved; a saved stage without one was made with
  this value.
  """
  saved = {**(defaults or {}), **saved}
  diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
  if diff:
    raise ValueError(f"{path} was made with a different {field} ("
                     + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                     + f"); use a fresh --workdir or delete {os.path.dirname(path)}.")


# Distributions whose versions a run records (those not installed are recorded as None).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml_collections",
            "numpy", "diffusers", "transformers", "torch", "tensorboardX", "fsspec", "gcsfs")


def git_commit(path: Optional[str] = None) -> dict:
  """{"commit": HEAD's hash or None, "dirty": uncommitted changes to tracked files or None} of
  the git checkout holding `path` (default: this package); None values outside a checkout or
  without git."""
  path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args) -> Optional[str]:
    try:
      out = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                           timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"commit": commit or None, "dirty": None if status is None else bool(status)}


def package_versions(names=PACKAGES) -> dict:
  """{distribution: installed version or None}, from the installed metadata (nothing imported:
  torch is not loaded to learn its version)."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def run_metadata(config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """What ran: the resolved config, git commit, package versions, Python, devices, processes,
  host, command line and UTC date."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": [sys.executable] + sys.argv,
      "git": git_commit(),
      "python": sys.version.split()[0],
      "packages": package_versions(),
      "platform": platform.platform(),
      "host": platform.node(),
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                  "count": len(devices), "local_count": jax.local_device_count()},
      "process_count": jax.process_count(),
      "config": None if config is None else config_dict(config),
  }


def run_info_path(workdir: str, name: str) -> str:
  return fs.join(workdir, "run_info", f"{name}.json")


def record_run(workdir: str, name: str, config: Optional[ml_collections.ConfigDict] = None
               ) -> Optional[dict]:
  """Writes `run_metadata(config)` to DIR/run_info/<name>.json as the stage `name` starts
  (process 0 only; the others return None). Earlier invocations of the stage (a resumed run,
  a rerun evaluation) stay in its "previous" list, oldest first, so a run resumed on another
  commit or machine shows both."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  path = run_info_path(workdir, name)
  previous = []
  if fs.exists(path):
    try:
      old = fs.read_json(path)
      previous = old.pop("previous", []) + [old]
    except (ValueError, OSError):  # unreadable: replaced, not fatal
      previous = []
  info = {"stage": name, **run_metadata(config), "previous": previous}
  fs.write_json(path, info)
  return info
