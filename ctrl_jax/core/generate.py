"""Sampling a CTRL model p(x | c, y): one jitted sampler for the fine-tuned and the pre-trained
model, and chunked sampling of many requests with progress (what every evaluation uses)."""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.core import sampling
from ctrl_jax.core import train
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import progress
from ctrl_jax.runtime import sharding as shd


def make_sampler(setup: train.CtrlSetup):
  """`jax.jit(sample_fn(setup))`."""
  return jax.jit(sample_fn(setup))


def sample_fn(setup: train.CtrlSetup):
  """`sample(params, frozen, c [B], y [B, T], key) -> images (decoded x0)`.

  params = trainable CTRL params. The pre-trained model is sampled with the *initial* params
  (zero label table, zero LoRA up-projections), whose output is bit-identical to the frozen
  UNet's for every label (tests/test_augmented.py): one compiled sampler serves both models.
  The same key gives both the same x_T and per-step noise, so their samples are paired.
  """

  def sample(params, frozen, c, y, key):
    labels = setup.label_space.encode(y)
    policy_eps, _ = train.eps_functions(setup, frozen, c, labels)
    k_x, k_noise = jax.random.split(key)
    x_T = jax.random.normal(k_x, (c.shape[0],) + tuple(setup.latent_shape), jnp.float32)
    x0 = sampling.ddim_sample(policy_eps, params, frozen["schedule"],
                              jnp.asarray(setup.timesteps), x_T, k_noise,
                              frozen["hparams"]["eta"])
    return setup.decode_fn(frozen.get("decoder"), x0)

  return sample


def sample_all(sampler, params, frozen, c: np.ndarray, y: np.ndarray, seed: int,
               batch_size: int, name: str) -> np.ndarray:
  """Samples every request in chunks of `batch_size` (chunk i uses fold_in(key(seed), i)).

  The last chunk is padded to the full size (one compiled shape). Returns float32 [N, ...].
  """
  n = len(c)
  out = []
  bar = progress.Progress(f"eval/{name}", -(-n // batch_size))
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size) % n
    imgs = sampler(params, frozen, jnp.asarray(c[idx]), jnp.asarray(y[idx]),
                   jax.random.fold_in(jax.random.key(seed), i))
    out.append(np.asarray(imgs)[:min(batch_size, n - start)])
    bar.update(i + 1)
  return np.concatenate(out).astype(np.float32)


def make_sharded_sampler(setup: train.CtrlSetup, mesh):
  """`make_sampler`'s function jitted over `mesh`: requests and images split over the 'data'
  axis, params / frozen inputs / key replicated (every process of a multi-host run samples its
  share of each chunk)."""
  repl, data = shd.replicated(mesh), shd.data_sharded(mesh)
  return shd.jit(sample_fn(setup), mesh, in_shardings=(repl, repl, data, data, repl),
                 out_shardings=data)


def sample_chunks(sampler, params, frozen, c: np.ndarray, y: np.ndarray, seed: int,
                  batch_size: int, name: str, mesh
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`sample_all` over the mesh (`make_sharded_sampler`), one chunk at a time: chunk i uses
  fold_in(key(seed), i), as there; `batch_size` is rounded up to a multiple of the batch
  shards. Yields this process's share of each chunk: (images float32 [m, ...], their request
  positions int [m]); positions ≥ len(c) are the padding of the last chunk (every process gets
  the same m, so shares can be gathered, `gather_shares`)."""
  n, d = len(c), shd.batch_shards(mesh)
  batch_size = -(-batch_size // d) * d
  repl, data = shd.replicated(mesh), shd.data_sharded(mesh)
  params, frozen = shd.put(params, repl), shd.put(frozen, repl)
  first = np.arange(batch_size) % n
  multihost.compile_together(sampler, params, frozen, shd.put(np.asarray(c[first]), data),
                             shd.put(np.asarray(y[first]), data),
                             shd.put(jax.random.key(seed), repl), name=f"sampler {name}")
  bar = progress.Progress(f"eval/{name}", -(-n // batch_size))
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size) % n
    out = sampler(params, frozen, shd.put(np.asarray(c[idx]), data),
                  shd.put(np.asarray(y[idx]), data),
                  shd.put(jax.random.fold_in(jax.random.key(seed), i), repl))
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    images = np.concatenate([np.asarray(s.data, np.float32) for s in shards])
    positions = np.concatenate([start + np.arange(*s.index[0].indices(batch_size))
                                for s in shards])
    yield images, positions
    if i == 0 or (i + 1) % 10 == 0 or start + batch_size >= n:
      bar.update(i + 1)


def sample_shares(sampler, params, frozen, c: np.ndarray, y: np.ndarray, seed: int,
                  batch_size: int, name: str, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Every chunk of `sample_chunks`, concatenated: (images [M, ...], positions [M])."""
  parts = list(sample_chunks(sampler, params, frozen, c, y, seed, batch_size, name, mesh))
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def gather_shares(tree: dict, positions: np.ndarray, n: int) -> dict:
  """Every process's share of per-request arrays (`sample_shares` positions), gathered on every
  process, in request order, padding dropped."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    tree, positions = multihost_utils.process_allgather((tree, positions), tiled=True)
  keep = np.flatnonzero(positions < n)
  order = keep[np.argsort(positions[keep], kind="stable")]
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[order], tree)
