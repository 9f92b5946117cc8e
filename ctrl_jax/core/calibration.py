"""Calibrating a reward classifier p̂(y | x): temperature scaling, its error, batch order.

CTRL's objective rewards log p̂(y | x0); an over-confident classifier makes that reward (and the
fine-tuned model) chase its mistakes, so every classifier the problems fit is temperature-scaled
on held-back pairs (Guo et al. 2017) with `fit_temperature` and reported with
`expected_calibration_error`.
"""
from __future__ import annotations

import numpy as np
import scipy.special


def calibration_split(rng: np.random.Generator, n: int,
                      calib_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(held-back indices, fitting indices) of n labelled items: a seeded permutation whose first
  round(calib_fraction · n) items are held back to fit the temperature on."""
  perm = rng.permutation(n)
  n_cal = int(round(calib_fraction * n))
  if n_cal < 1 or n - n_cal < 1:
    raise ValueError(f"calib_fraction={calib_fraction} leaves an empty part of {n}.")
  return perm[:n_cal], perm[n_cal:]


def batch_indices(rng: np.random.Generator, n: int, steps: int, batch: int) -> np.ndarray:
  """[steps, batch] indices into n items: consecutive shuffled epochs (full batch if batch ≥ n)."""
  if batch >= n:
    return np.tile(np.arange(n), (steps, 1))
  epochs = -(-steps * batch // n)
  flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
  return flat[:steps * batch].reshape(steps, batch)


LOG_T_RANGE = (-3.0, 3.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    prior_std: float = 1.0) -> tuple[float, float, float]:
  """MAP temperature of softmax(logits / T) on (logits [N, K], labels [N]).

  Minimises Σ_i NLL_i(T) + (log T)² / (2·prior_std²) by grid search over log T in LOG_T_RANGE
  (steps of 0.005, plus log T = 0 exactly). The objective at the optimum is ≤ its value at
  T = 1, where the prior term is 0, so the mean NLL after is ≤ the NLL at T = 1 by construction.
  The prior matters when the calibration pairs are all classified correctly: the NLL then
  falls monotonically as T → 0, and plain NLL minimisation would sharpen to the range's end.
  Returns (T, mean NLL at T = 1, mean NLL at T).
  """
  log_t = np.concatenate([[0.0], np.linspace(*LOG_T_RANGE, 1201)])
  z = np.asarray(logits, np.float64)[None] / np.exp(log_t)[:, None, None]  # [G, N, K]
  logp = z - scipy.special.logsumexp(z, axis=-1, keepdims=True)
  nll = -np.take_along_axis(logp, np.asarray(labels)[None, :, None], axis=-1)[..., 0].mean(-1)
  objective = nll * len(labels) + log_t ** 2 / (2.0 * prior_std ** 2)
  best = int(np.argmin(objective))  # first minimum: T = 1 wins ties
  return float(np.exp(log_t[best])), float(nll[0]), float(nll[best])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
  """Top-label ECE: Σ_bins (n_b / N)·|acc_b − conf_b|, equal-width bins ((m−1)/M, m/M].

  probs [N, K], labels [N].
  """
  probs = np.asarray(probs, np.float64)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == np.asarray(labels)).astype(np.float64)
  bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
  ece = 0.0
  for b in range(n_bins):
    m = bins == b
    if m.any():
      ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
  return float(ece)
