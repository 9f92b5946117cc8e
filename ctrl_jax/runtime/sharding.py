"""Device meshes and shardings: a 'data' axis over every device (all hosts)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh ('data',) over `devices` (default: all devices of all processes).

  Built with `Mesh` directly: `jax.make_mesh` defaults to Explicit axes since jax 0.9, which
  diffusers' Flax code does not support; a plain `Mesh` has Auto axes on jax 0.10 and 0.11.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits dimension `batch_axis` over the data axis."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def check_divisible(batch: int, mesh: Mesh, what: str) -> None:
  n = mesh.shape[DATA]
  if batch % n:
    raise ValueError(f"{what}={batch} must be divisible by the number of devices on the "
                     f"'data' axis ({n}).")


def jit(fun, mesh: Mesh, in_shardings, out_shardings, donate_argnums=()):
  """`jax.jit` with explicit in/out shardings over `mesh`, except on a one-device mesh.

  On one device the shardings carry no information, and on XLA:CPU (jax 0.10.2) passing them
  made the same train step ~5× slower (digits pre-training step, batch 128: 0.55 s without,
  2.9–3.5 s with in_shardings, out_shardings or both, with identical HLO); committed inputs
  (`jax.device_put(x, NamedSharding)`) keep their placement either way.
  """
  if mesh.devices.size == 1:
    return jax.jit(fun, donate_argnums=donate_argnums)
  return jax.jit(fun, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums)


def put(tree, sharding: jax.sharding.Sharding):
  """`tree` placed with `sharding` (one sharding for every leaf), in any number of processes.

  One process: `jax.device_put`. Several (multi-host): every process holds the same global
  value on the host (built from the same seed, step or files) and each array is assembled from
  the process-local shards (`jax.make_array_from_callback`); `device_put` of a host value onto
  another process's devices is refused by jax. Global arrays are resharded by a jitted identity.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(lambda x: _global(x, sharding), tree)


def _global(x, sharding: jax.sharding.Sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_global(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x if x.sharding == sharding else jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
