"""What the processes of a multi-host run (Cloud TPU slice, multi-node GPU, or several
processes on one machine) agree on outside jitted code: who writes, when the others may read
what it wrote, and whether inputs every process built on its own are the same.

All of it is a no-op in a single-process run. Every process must call these functions in the
same order (they are collective), which the stages do: they are the same program on every host.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Optional, TypeVar

import jax
import numpy as np

T = TypeVar("T")
# Longest a process waits for another (process 0 fitting a classifier on a large dataset, a
# slow host downloading weights): a day.
TIMEOUT_S = 24 * 3600
_calls = itertools.count()


def is_main() -> bool:
  """Whether this process writes the run's logs, JSON, images and stage outputs."""
  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("a multi-process run without jax.distributed.initialize(); set "
                       "CTRL_JAX_DISTRIBUTED=1.")
  return client


def _key(name: str) -> str:
  # Unique per call (the same sequence on every process): a name can be used again.
  return f"ctrl_jax/{next(_calls)}/{name}"


def main_first(name: str, fn: Callable[[], T], timeout_s: float = TIMEOUT_S) -> Optional[T]:
  """Process 0 runs `fn()` (e.g. fits and saves the classifier) while the others wait; then all
  go on (the others typically read back what process 0 saved). A failure on process 0 is
  raised on every process, with process 0's message. Returns fn's result on process 0, None on
  the others."""
  if jax.process_count() == 1:
    return fn()
  key = _key(name)
  client = _client()
  if is_main():
    try:
      out = fn()
    except BaseException as e:
      client.key_value_set(key, f"error: {type(e).__name__}: {e}".splitlines()[0][:1000])
      raise
    client.key_value_set(key, "ok")
    return out
  status = client.blocking_key_value_get(key, int(timeout_s * 1000))
  if status != "ok":
    raise RuntimeError(f"process 0 failed in {name} ({status[len('error: '):]}).")
  return None


def barrier(name: str, timeout_s: float = TIMEOUT_S) -> None:
  """Every process waits until all have reached this point."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(_key(name), int(timeout_s * 1000))


def digest(tree: Any) -> str:
  """SHA-256 of a pytree's structure, dtypes, shapes and values (host copies)."""
  h = hashlib.sha256(str(jax.tree_util.tree_structure(tree)).encode())
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def check_same(tree: Any, what: str, timeout_s: float = TIMEOUT_S) -> None:
  """Raises on every process unless every process holds the same `tree` (by `digest`): inputs
  that each process builds or loads on its own, then treats as one replicated value."""
  if jax.process_count() == 1:
    return
  key, client, mine = _key(what), _client(), digest(tree)
  client.key_value_set(f"{key}/{jax.process_index()}", mine)
  differ = [p for p in range(jax.process_count())
            if client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)) != mine]
  if differ:
    raise RuntimeError(f"{what} differs between processes {jax.process_index()} and {differ} "
                       "(each built its own copy; they must be equal).")


def compile_together(jitted, *args, name: str) -> None:
  """Compiles `jitted` for `args` (or loads it from the compilation cache) on every process,
  then waits for all: the first collective then starts on every process at once. (A process
  that loaded the program from the cache would otherwise wait inside the first collective for
  one still compiling, and CPU collectives give up after 30 s.) The executable stays in jax's
  in-memory cache, so the first call does not compile again."""
  if jax.process_count() > 1:
    jitted.lower(*args).compile()
    barrier(f"compiled {name}")
