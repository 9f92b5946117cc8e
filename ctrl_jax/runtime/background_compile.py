"""Compiling a jitted function on a background thread while the main thread does other work.

The CTRL train step depends on the pre-trained model and the reward classifier only through
their shapes, so it can be compiled from `jax.ShapeDtypeStruct`s while those stages run. On
the 2-core CPU of the digits benchmark a pre-training step keeps ~1.5 cores busy and the
compiler, mostly single-threaded, fills the rest; on an accelerator the host is idle anyway.

`jitted.lower(*abstract).compile()` fills the same in-memory caches as a call, so the first
real call `jitted(*args)` reuses the executable when `args` have exactly the abstract
arguments' shapes, dtypes, weak types and shardings (committed arrays: `jax.device_put` with
the sharding the abstract argument names). Otherwise that call compiles as usual: a mismatch
costs time, never correctness. `count_compiles` tells which happened.
"""
from __future__ import annotations

import contextlib
import threading
import time
import traceback
from typing import Any, Iterator, Optional

import jax


class BackgroundCompile:
  """Starts `jitted.lower(*abstract_args).compile()` on a daemon thread.

  Attributes (valid after `wait()`): seconds (lower + compile), error (the exception text if
  it failed; the real call then compiles in the main thread).
  """

  def __init__(self, jitted, *abstract_args: Any, name: str = ""):
    self.name = name or getattr(jitted, "__name__", "function")
    self.seconds: Optional[float] = None
    self.error: Optional[str] = None
    self._thread = threading.Thread(target=self._run, args=(jitted, abstract_args),
                                    name=f"compile-{self.name}", daemon=True)
    self._thread.start()

  def _run(self, jitted, abstract_args) -> None:
    t0 = time.time()
    try:
      jitted.lower(*abstract_args).compile()
    except Exception:  # pylint: disable=broad-except  (reported; the call compiles instead)
      self.error = traceback.format_exc(limit=3)
    self.seconds = time.time() - t0

  def done(self) -> bool:
    return not self._thread.is_alive()

  def wait(self) -> "BackgroundCompile":
    self._thread.join()
    return self


def abstract_like(tree: Any, sharding=None) -> Any:
  """`jax.ShapeDtypeStruct`s (weak types kept) of a tree of arrays or ShapeDtypeStructs, all
  with `sharding` (None: unspecified), or each with its own (a tree of shardings shaped like
  `tree`)."""
  def struct(a, s):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                weak_type=getattr(a, "weak_type", False))

  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda a: struct(a, sharding), tree)
  return jax.tree_util.tree_map(struct, tree, sharding)


@contextlib.contextmanager
def count_compiles(fun_name: str) -> Iterator[list]:
  """Counts XLA compilations of functions named `fun_name` made by this thread in the block:
  `with count_compiles("train_step") as n: ...`, then `n[0]` (a persistent-cache hit counts
  too; an in-memory cache hit does not)."""
  count = [0]
  me = threading.get_ident()

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if (event == "/jax/core/compile/backend_compile_duration"
        and kwargs.get("fun_name") in (fun_name, f"jit({fun_name})")  # jax names it "jit(f)"
        and threading.get_ident() == me):
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
