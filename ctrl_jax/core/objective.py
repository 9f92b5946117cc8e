"""The CTRL objective: γ · reward − KL(fine-tuned ‖ pre-trained), in two KL conventions.

loss = −γ · mean_B(reward) + kl_weight · KL, with KL from `path_kl`:
  * "official" (the authors' code): per step, the mean over the D latent dims of
    (μ_new − μ_pre)² / (2σ_t²), summed over steps, averaged over the batch. Their loss
    0.1 · mean(−log(p̂ + 1e-6)) + 0.01 · KL is γ = 0.1, kl_weight = 0.01.
  * "exact": the sum over dims, i.e. the Girsanov path KL of the discretised chain, so
    γ = γ of the theory with kl_weight = 1: the optimum samples p(y | x)^γ p_pre(x).
Since KL_official = KL_exact / D, the official loss optimises the exact objective with an
effective γ_eff = γ · D / kl_weight (SD1.5: D = 4·64·64 → 0.1 · 16384 / 0.01 ≈ 1.6e5).
"""
from __future__ import annotations

import jax.numpy as jnp

KL_CONVENTIONS = ("official", "exact")


def path_kl(kl_steps: jnp.ndarray, num_dims: int, convention: str) -> jnp.ndarray:
  """Path KL from per-step KLs.

  Args:
    kl_steps: [N, B] per-step Gaussian KL summed over the D latent dims
      (`Trajectory.kl`).
    num_dims: D, the number of latent dims per sample.
    convention: "official" (mean over dims) or "exact" (sum over dims).
  Returns:
    Scalar, averaged over the batch.
  """
  if convention == "official":
    return jnp.mean(jnp.sum(kl_steps, axis=0)) / num_dims
  if convention == "exact":
    return jnp.mean(jnp.sum(kl_steps, axis=0))
  raise ValueError(f"kl_convention={convention!r}; expected one of {KL_CONVENTIONS}.")


def effective_gamma(gamma: float, kl_weight: float, num_dims: int, convention: str) -> float:
  """γ of the exact objective γ·log p̂ − KL_exact that a (γ, kl_weight, convention) optimises."""
  if convention == "official":
    return gamma * num_dims / kl_weight
  if convention == "exact":
    return gamma / kl_weight
  raise ValueError(f"kl_convention={convention!r}; expected one of {KL_CONVENTIONS}.")


def ctrl_loss(reward: jnp.ndarray, kl: jnp.ndarray, gamma: jnp.ndarray,
              kl_weight: jnp.ndarray) -> jnp.ndarray:
  """−γ · mean(reward) + kl_weight · KL (γ, kl_weight may be traced)."""
  return -gamma * jnp.mean(reward) + kl_weight * kl
