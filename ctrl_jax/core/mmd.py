"""Kernel maximum mean discrepancy (MMD) between two samples, as pure jnp functions.

Used to ask whether a model *samples a distribution* (e.g. CTRL's p(x | c, y)), not only whether
its samples hit a label: the squared MMD between the model's samples and a reference sample of
the target, next to the same statistic for an independent reference sample of the same size
(the noise floor).

Conventions:
  * Gaussian kernel k(x, y) = exp(−‖x − y‖² / (2 σ²)); `bandwidth` is σ² (a variance), so
    k(x, x) = 1.
  * `mmd2` is the **biased** (V-statistic) estimate by default: the plug-in MMD² between the two
    empirical distributions, ≥ 0, and with weights it is exactly the MMD² between two weighted
    empirical measures (what a self-normalised importance-weighted reference is). Its value
    for two samples of the *same* distribution is positive, of order (1/n + 1/m)(1 − k̄)
    (`null_expectation`), which is the noise floor a method's number is compared with.
    `unbiased=True` gives the U-statistic (unweighted samples only; mean 0 under the null).
Samples are [N, D] float arrays (flatten images first); weights [N] are normalised inside.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def pairwise_sq_dists(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """‖x_i − y_j‖² for x [N, D], y [M, D] → [N, M] (float32, clipped at 0 against round-off)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  d = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
       - 2.0 * jnp.einsum("nd,md->nm", x, y, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(d, 0.0)


def gaussian_kernel(x: jnp.ndarray, y: jnp.ndarray, bandwidth) -> jnp.ndarray:
  """exp(−‖x_i − y_j‖² / (2 σ²)) for x [N, D], y [M, D], σ² = `bandwidth` → [N, M]."""
  return jnp.exp(-pairwise_sq_dists(x, y) / (2.0 * bandwidth))


@jax.jit
def median_bandwidth(x: jnp.ndarray) -> jnp.ndarray:
  """The median heuristic: σ² = the median over pairs i < j of ‖x_i − x_j‖², i.e. σ = the
  median pairwise distance (Gretton et al. 2012), so k = e^{−1/2} at the median pair. x [N, D],
  N ≥ 2 → scalar."""
  n = x.shape[0]
  d = pairwise_sq_dists(x, x)
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  return jnp.nanmedian(jnp.where(upper, d, jnp.nan))


def _normalised(w, n: int) -> jnp.ndarray:
  if w is None:
    return jnp.full((n,), 1.0 / n, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  return w / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("unbiased",))
def mmd2(x: jnp.ndarray, y: jnp.ndarray, bandwidth, x_weights=None, y_weights=None,
         unbiased: bool = False) -> jnp.ndarray:
  """Squared MMD between samples x [N, D] and y [M, D] with the Gaussian kernel of variance
  `bandwidth` (σ², traced).

  Biased (default): Σ a_i a_i' k(x_i, x_i') + Σ b_j b_j' k(y_j, y_j') − 2 Σ a_i b_j k(x_i, y_j)
  with normalised weights a, b (uniform when None), diagonals included: ≥ 0.
  unbiased: the U-statistic of Gretton et al. (2012, eq. 3) — diagonals excluded, uniform
  weights only (weights must be None); can be negative.
  """
  n, m = x.shape[0], y.shape[0]
  kxx, kyy, kxy = (gaussian_kernel(x, x, bandwidth), gaussian_kernel(y, y, bandwidth),
                   gaussian_kernel(x, y, bandwidth))
  if unbiased:
    if x_weights is not None or y_weights is not None:
      raise ValueError("mmd2(unbiased=True) takes uniform weights only.")
    return ((jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
            + (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1)) - 2.0 * jnp.mean(kxy))
  a, b = _normalised(x_weights, n), _normalised(y_weights, m)
  return a @ kxx @ a + b @ kyy @ b - 2.0 * a @ kxy @ b


@jax.jit
def null_expectation(y: jnp.ndarray, bandwidth, n, y_weights=None) -> jnp.ndarray:
  """The expected biased `mmd2` between n i.i.d. draws of a distribution P and a reference y
  [M, D] of P itself (weights b, normalised): (1/n + Σ b_j²) · (1 − k̄), with k̄ the
  (b-weighted) mean of k over distinct reference pairs — an estimate of E k(x, x') under P.

  Exact in expectation for an unweighted i.i.d. reference (Σ b² = 1/M); for a self-normalised
  importance-weighted one Σ b² = 1/ESS is the usual first-order variance term. The closed-form
  counterpart of an empirical floor (one independent sample of size n), without its noise.
  """
  m = y.shape[0]
  b = _normalised(y_weights, m)
  k = gaussian_kernel(y, y, bandwidth)
  off = (b @ k @ b - jnp.sum(b * b)) / jnp.maximum(1.0 - jnp.sum(b * b), 1e-12)
  return (1.0 / n + jnp.sum(b * b)) * (1.0 - off)


def effective_sample_size(weights: jnp.ndarray) -> jnp.ndarray:
  """(Σ w)² / Σ w² of nonnegative weights [N] (any scale)."""
  w = jnp.asarray(weights, jnp.float32)
  return jnp.sum(w) ** 2 / jnp.sum(w * w)
