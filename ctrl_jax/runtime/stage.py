"""A stage's files in the workdir: JSON written atomically (a stage's `info.json`, written last,
marks it done) and the check that a reused stage was made with the config asked for now."""
from __future__ import annotations

import json
import os
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
