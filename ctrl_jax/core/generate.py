"""Sampling a CTRL model p(x | c, y): one jitted sampler for the fine-tuned and the pre-trained
model, and chunked sampling of many requests with progress (what every evaluation uses)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.core import sampling
from ctrl_jax.core import train
from ctrl_jax.runtime import progress


def make_sampler(setup: train.CtrlSetup):
  """Jitted `sample(params, frozen, c [B], y [B, T], key) -> images (decoded x0)`.

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

  return jax.jit(sample)


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
