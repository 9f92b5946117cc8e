"""Rewards from calibrated classifiers p̂(y | x), and the label space of one or more tasks.

reward(x, y) = Σ_tasks w_task · log(p̂_task(y_task | x) + 1e-6)   (docs/method.md §4)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOG_EPS = 1e-6  # the official code's log(p + 1e-6)

# apply(params, images [B, ...]) -> logits [B, num_classes]; temperature scaling inside.
ClassifierApply = Callable[[Any, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """One or more classification tasks combined into a single label index.

  The combined index is mixed radix with the first task most significant, e.g. for the
  paper's multi-task (aesthetic: 2, compress: 2): ℓ = 2·aesthetic + compress, aesthetic = ℓ // 2,
  compress = ℓ % 2. The augmented model embeds the combined index (K = Π classes).
  """
  task_names: tuple[str, ...]
  task_classes: tuple[int, ...]

  def __post_init__(self):
    if len(self.task_names) != len(self.task_classes) or not self.task_names:
      raise ValueError("LabelSpace needs one class count per task name, at least one task; got "
                       f"names={self.task_names}, classes={self.task_classes}.")
    if any(k < 2 for k in self.task_classes):
      raise ValueError(f"every task needs ≥ 2 classes, got {self.task_classes}.")

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  @property
  def num_labels(self) -> int:
    return int(np.prod(self.task_classes))

  def encode(self, y: jnp.ndarray) -> jnp.ndarray:
    """[B, T] per-task labels → [B] combined index."""
    out = jnp.zeros(y.shape[:-1], jnp.int32)
    for i, k in enumerate(self.task_classes):
      out = out * k + y[..., i].astype(jnp.int32)
    return out

  def decode(self, label: jnp.ndarray) -> jnp.ndarray:
    """[B] combined index → [B, T] per-task labels."""
    cols = []
    for k in reversed(self.task_classes):
      cols.append(label % k)
      label = label // k
    return jnp.stack(cols[::-1], axis=-1)


def sample_labels(rng: np.random.Generator, label_space: LabelSpace, n: int) -> np.ndarray:
  """y uniform over each task's classes, independently: int32 [n, T]."""
  return np.stack([rng.integers(0, k, size=n) for k in label_space.task_classes],
                  axis=-1).astype(np.int32)


def sample_requests(seed: int, step: int, label_space: LabelSpace, num_prompts: int,
                    num_micro: int, micro_batch: int) -> dict:
  """The (c, y) requests of update `step`: a function of (seed, step) only, so a resumed run
  sees the same batches. c uniform over prompts, y uniform over each task's classes.

  Returns {"prompt": int32 [num_micro, micro_batch], "y": int32 [num_micro, micro_batch, T]}.
  """
  rng = np.random.default_rng([seed, step])
  n = num_micro * micro_batch
  y = sample_labels(rng, label_space, n)
  prompt = rng.integers(0, num_prompts, size=n).astype(np.int32)
  return {"prompt": prompt.reshape(num_micro, micro_batch),
          "y": y.reshape(num_micro, micro_batch, -1)}


def make_reward_fn(classifiers: Sequence[ClassifierApply], weights: Sequence[float],
                   takes_prompt: Sequence[bool] = (), log_eps: float = LOG_EPS
                   ) -> Callable[..., tuple[jnp.ndarray, dict]]:
  """reward_fn(params_per_task, images, y [B, T], prompt [B] = None) → (reward [B], aux).

  takes_prompt[t]: classifier t is p̂(y_t | x, c), called as apply(params, images, prompt)
  (the condition c of each trajectory); the others are p̂(y_t | x), called without it.
  aux["probs"] is a list of per-task calibrated probabilities [B, K_t]; aux["log_prob"] a list
  of per-task log(p̂(y_t | ·) + log_eps) [B]. log_eps = 1e-6 is the official form: a sample
  the classifier places firmly in another class gets reward ≈ log 1e-6 and no gradient;
  log_eps = 0 takes log p̂ from log-softmax, whose gradient does not vanish there.
  """
  if log_eps < 0:
    raise ValueError(f"reward log_eps={log_eps}: expected ≥ 0.")
  if len(classifiers) != len(weights):
    raise ValueError(f"{len(classifiers)} classifiers but {len(weights)} reward weights.")
  takes_prompt = tuple(takes_prompt) or (False,) * len(classifiers)

  def reward_fn(params, images, y, prompt=None):
    total = 0.0
    aux = {"probs": [], "log_prob": []}
    for t, (apply, w) in enumerate(zip(classifiers, weights)):
      if takes_prompt[t] and prompt is None:
        raise ValueError(f"reward classifier {t} is p̂(y | x, c): the caller must pass prompt.")
      args = (prompt,) if takes_prompt[t] else ()
      logits = apply(params[t], images, *args).astype(jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1)
      yt = y[:, t:t + 1].astype(jnp.int32)
      if log_eps > 0:
        log_p = jnp.log(jnp.take_along_axis(probs, yt, axis=-1)[:, 0] + log_eps)
      else:
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), yt, axis=-1)[:, 0]
      total = total + w * log_p
      aux["probs"].append(probs)
      aux["log_prob"].append(log_p)
    return total, aux

  return reward_fn
