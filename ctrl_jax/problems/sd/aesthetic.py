"""The aesthetic reward classifier p̂(y | x) of the SD problem: a calibrated two-class head
(`models.aesthetic.HEAD`) on CLIP ViT-L/14 image embeddings, fitted on embeddings labelled by the
LAION aesthetic predictor's score (the official code's recipe), and the `.npz` of embeddings and
scores it is fitted on."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctrl_jax.core import calibration
from ctrl_jax.models.aesthetic import HEAD


@functools.partial(jax.jit, static_argnames=("lr",))
def _adam_epoch(net, opt_state, temperature, embeddings, labels, batch_idx, key, *, lr):
  """One epoch of Adam on cross-entropy (dropout on) over batch_idx [steps, batch].

  Returns (net, opt_state, per-step loss [steps]).
  """
  opt = optax.adam(lr)

  def loss_fn(net, idx, step_key):
    logits = HEAD.apply({"params": {**net, "temperature": temperature}}, embeddings[idx],
                        deterministic=False, rngs={"dropout": step_key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

  def step(carry, xs):
    net, opt_state = carry
    i, idx = xs
    loss, grads = jax.value_and_grad(loss_fn)(net, idx, jax.random.fold_in(key, i))
    updates, opt_state = opt.update(grads, opt_state, net)
    return (optax.apply_updates(net, updates), opt_state), loss

  steps = jnp.arange(batch_idx.shape[0])
  (net, opt_state), losses = jax.lax.scan(step, (net, opt_state), (steps, batch_idx))
  return net, opt_state, losses


def _epoch_batches(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
  """[ceil(n / batch), batch] indices covering a fresh permutation of n items once (the last
  batch is topped up from the start of the permutation)."""
  perm = rng.permutation(n)
  steps = -(-n // batch)
  return np.concatenate([perm, perm[:steps * batch - n]]).reshape(steps, batch)


def fit_head(embeddings: np.ndarray, labels: np.ndarray, seed: int, *, epochs: int = 100,
             batch: int = 256, lr: float = 1e-3, calib_fraction: float = 0.2
             ) -> tuple[dict, dict]:
  """Fits the classifier head HEAD = LaionMLP(2, with_temperature=True) on CLIP embeddings.

  Args:
    embeddings: [N, D] L2-normalised CLIP image embeddings (as from `image_embedding`).
    labels: [N] int classes in {0, 1} (e.g. `aesthetic_labels(scores)`).
    seed: fixes the split, init, batch order and dropout; same seed ⇒ same params.
    epochs, batch, lr: Adam on cross-entropy, dropout on, temperature held at 1.
    calib_fraction: share held back (seeded permutation) to fit the temperature with
      `calibration.fit_temperature`.
  Returns:
    (params for HEAD.apply({"params": params}, emb), with "temperature" set;
     info {train_acc, calib_acc, temperature, nll_before, nll_after, ece_after, final_loss,
     num_train, num_calib}); nll_* / ece_after are on the calibration part.
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels)
  if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
    raise ValueError(f"need embeddings [N, D] and labels [N]; got {embeddings.shape}, "
                     f"{labels.shape}.")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0 or 1; got values {np.unique(labels)[:10]}.")
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(seed)
  cal, fit = calibration.calibration_split(rng, len(labels), calib_fraction)
  n_cal = len(cal)
  key = jax.random.key(seed)
  params = HEAD.init(jax.random.fold_in(key, 0), jnp.asarray(embeddings[:1]))["params"]
  net = {k: v for k, v in params.items() if k != "temperature"}
  temperature = params["temperature"]
  opt_state = optax.adam(lr).init(net)
  emb_fit, lab_fit = jnp.asarray(embeddings[fit]), jnp.asarray(labels[fit])
  batch = min(batch, len(fit))
  losses = None
  for epoch in range(epochs):
    net, opt_state, losses = _adam_epoch(
        net, opt_state, temperature, emb_fit, lab_fit,
        jnp.asarray(_epoch_batches(rng, len(fit), batch)),
        jax.random.fold_in(jax.random.fold_in(key, 1), epoch), lr=lr)
  params = {**net, "temperature": temperature}
  logits_fit = np.asarray(HEAD.apply({"params": params}, emb_fit))  # T = 1
  logits_cal = np.asarray(HEAD.apply({"params": params}, jnp.asarray(embeddings[cal])))
  t, nll_before, nll_after = calibration.fit_temperature(logits_cal, labels[cal])
  params = {**net, "temperature": jnp.asarray(t, jnp.float32)}
  info = {"train_acc": float((logits_fit.argmax(-1) == labels[fit]).mean()),
          "calib_acc": float((logits_cal.argmax(-1) == labels[cal]).mean()),
          "temperature": t, "nll_before": nll_before, "nll_after": nll_after,
          "ece_after": calibration.expected_calibration_error(
              np.asarray(jax.nn.softmax(logits_cal / t, axis=-1)), labels[cal]),
          "final_loss": float(losses[-1]) if losses is not None else float("nan"),
          "num_train": int(len(fit)), "num_calib": int(n_cal)}
  return params, info


def load_embeddings_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings float32 [N, D], scores float32 [N]) from an `.npz` with arrays `embeddings`
  and `scores` (e.g. LAION scores of the same images). Embeddings are L2-normalised here
  (idempotent), matching `image_embedding`.

  Raises FileNotFoundError / ValueError naming the file and the expected keys.
  """
  expected = "arrays 'embeddings' [N, D] and 'scores' [N]"
  if not os.path.exists(path):
    raise FileNotFoundError(f"embeddings file {path!r} does not exist; expected an .npz with "
                            f"{expected}.")
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("embeddings", "scores") if k not in data.files]
    if missing:
      raise ValueError(f"{path!r} lacks {missing} (has {sorted(data.files)}); expected "
                       f"{expected}.")
    emb = np.asarray(data["embeddings"], np.float32)
    scores = np.asarray(data["scores"], np.float32)
  if emb.ndim != 2 or scores.shape != (emb.shape[0],):
    raise ValueError(f"{path!r}: embeddings {emb.shape}, scores {scores.shape}; expected "
                     f"{expected}.")
  norms = np.linalg.norm(emb, axis=-1, keepdims=True)
  if not (np.isfinite(norms).all() and (norms > 0).all()):
    raise ValueError(f"{path!r}: some embeddings are zero or not finite.")
  return emb / norms, scores
