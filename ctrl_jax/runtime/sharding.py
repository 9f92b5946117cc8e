"""Device meshes and shardings over every device of every host.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both (every device holds its
own trajectories); large frozen weights (and, for full fine-tuning, the trained UNet and its
optimiser state) can be split over 'fsdp' as well (`fsdp_sharding`), ZeRO-3 style: each device
stores 1/F of them and XLA gathers a layer's weights when it runs. F = 1 (the default) is the
plain data-parallel mesh with every parameter replicated.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH = (DATA, FSDP)  # the batch dimension is split over both axes
# Leaves with fewer elements stay replicated under FSDP (LoRA factors, biases, norms: gathering
# them would cost more latency than their memory is worth).
FSDP_MIN_ELEMENTS = 2**14


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, fsdp: int = 1) -> Mesh:
  """A mesh ('data', 'fsdp') of shape (n / fsdp, fsdp) over `devices` (default: all devices of
  all processes, in `jax.devices()` order, so an fsdp group is `fsdp` consecutive devices: on a
  TPU slice, neighbours on one host).

  Built with `Mesh` directly: `jax.make_mesh` defaults to Explicit axes since jax 0.9, which
  diffusers' Flax code does not support; a plain `Mesh` has Auto axes on jax 0.10 and 0.11.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp!r} must be a positive divisor of the number of devices "
                     f"({len(devices)}).")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split: the devices on the batch axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH if a in mesh.shape]))


def fsdp_size(mesh: Mesh) -> int:
  return int(mesh.shape.get(FSDP, 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh):
  """The PartitionSpec entry of a batch dimension on `mesh`."""
  axes = tuple(a for a in BATCH if a in mesh.shape)
  return axes[0] if len(axes) == 1 else axes


def data_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits dimension `batch_axis` over the batch axes ('data' × 'fsdp')."""
  return NamedSharding(mesh, P(*([None] * batch_axis), batch_spec(mesh)))


def check_divisible(batch: int, mesh: Mesh, what: str) -> None:
  n = batch_shards(mesh)
  if batch % n:
    raise ValueError(f"{what}={batch} must be divisible by the number of devices the batch is "
                     f"split over ({n}).")


def fsdp_leaf_sharding(shape: Sequence[int], mesh: Mesh,
                       min_elements: int = FSDP_MIN_ELEMENTS) -> NamedSharding:
  """The leaf's sharding under FSDP: its largest dimension divisible by the 'fsdp' axis size is
  split over 'fsdp' (the last such on ties: a kernel's output features); small leaves and
  leaves with no divisible dimension are replicated. Replicated on a mesh without 'fsdp' > 1."""
  f = fsdp_size(mesh)
  if f == 1 or int(np.prod(shape)) < min_elements:
    return replicated(mesh)
  dims = [i for i, d in enumerate(shape) if d % f == 0 and d >= f]
  if not dims:
    return replicated(mesh)
  best = max(dims, key=lambda i: (shape[i], i))
  return NamedSharding(mesh, P(*[FSDP if i == best else None for i in range(len(shape))]))


def fsdp_sharding(tree, mesh: Mesh, min_elements: int = FSDP_MIN_ELEMENTS):
  """A tree of shardings for `tree` (arrays or ShapeDtypeStructs): `fsdp_leaf_sharding` of
  every leaf (all replicated when the mesh's 'fsdp' axis has size 1)."""
  return jax.tree_util.tree_map(
      lambda x: fsdp_leaf_sharding(np.shape(x), mesh, min_elements), tree)


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


def put(tree, sharding):
  """`tree` placed with `sharding` (one sharding for every leaf, or a tree of shardings with
  the structure of `tree`), in any number of processes.

  One process: `jax.device_put`. Several (multi-host): every process holds the same global
  value on the host (built from the same seed, step or files) and each array is assembled from
  the process-local shards (`jax.make_array_from_callback`); `device_put` of a host value onto
  another process's devices is refused by jax. Global arrays are resharded by a jitted identity.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: _global(x, sharding), tree)
  return jax.tree_util.tree_map(_global, tree, sharding)


def _global(x, sharding: jax.sharding.Sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_global(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x if x.sharding == sharding else jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
