"""Posterior fidelity on digits: does a model sample p(x | c, y), or only hit the label?

On digits the target of CTRL can be sampled exactly, from the pre-trained model alone:

  * **hard-label reference** p(x | c, y) ∝ 1[rule(x) = y] · p_pre(x | c): draw x ~ p_pre(x | c)
    (the evaluation's DDIM steps, η and CFG scale) and keep x when its *true* label (the ink /
    edge rule) is y — rejection sampling, exact;
  * **γ-weighted reference** p_γ(x | c, y) ∝ p̂(y | x)^γ · p_pre(x | c), the tempered target of
    the CTRL objective with the calibrated reward classifier (p̂^γ = exp(γ · reward), the reward
    CTRL is trained on, task weights included): every draw of p_pre(x | c), self-normalised
    importance weights ∝ p̂(y | x)^γ; its effective sample size (ESS) is reported.

A model's samples of a cell (c, y) are compared with the cell's reference by the biased
(V-statistic) squared kernel MMD (`ctrl_jax.core.mmd`) on pixels, Gaussian kernel with the
bandwidth of the median heuristic on the cell's hard-label reference (one kernel per cell, the
same for every model and both references). The number means little alone: the **noise floor**
is the same statistic for an independent sample of the target of the same size (accepted
draws never used in the reference; for the weighted reference, draws resampled by weight from a
disjoint half of the pool), and its closed-form expectation (`mmd.null_expectation`).
Reported per cell, per class (the mean over the 10 digits) and overall, with method / floor.

The draws are cached in DIR/eval/posterior_reference.npz (`ctrl_jax.runtime.fs`); a rerun with
the same pre-trained model, sampler and seed reuses them, and a larger request continues the
sampling rounds where they stopped (the same draws as one long run).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctrl_jax.core import mmd
from ctrl_jax.core import rewards
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.runtime import fs

REFERENCE_FILE = "posterior_reference.npz"
MIN_REFERENCE = 10  # fewer accepted draws in a cell: its statistics are not computed (NaN)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether config.eval.posterior asks for the posterior-fidelity evaluation."""
  post = config.get("eval", {}).get("posterior")
  return post is not None and int(post.get("reference_per_cell", 0)) > 0


def reference_path(workdir: str) -> str:
  return fs.join(workdir, "eval", REFERENCE_FILE)


@dataclasses.dataclass
class Reference:
  """Draws of the pre-trained model p_pre(x | c), in sampling order.

  images [M, 8, 8] float32 in [0, 1]; c [M] the digit asked; label [M] the true combined label
  (the label rule; `LabelSpace` encoding); log_reward [M, K] CTRL's reward Σ_t w_t log p̂(y_t | x)
  for every combined label; rounds: sampling rounds done; meta: what the draws depend on.
  """
  images: np.ndarray
  c: np.ndarray
  label: np.ndarray
  log_reward: np.ndarray
  rounds: int
  meta: dict

  def counts(self, num_labels: int) -> np.ndarray:
    """Draws per (c, true label) cell: int [10, K]."""
    return np.bincount(self.c * num_labels + self.label,
                       minlength=digits_model.NUM_DIGITS * num_labels
                       ).reshape(digits_model.NUM_DIGITS, num_labels)

  def cell(self, c: int, label: int) -> np.ndarray:
    """Indices of the accepted draws of cell (c, label), in sampling order."""
    return np.flatnonzero((self.c == c) & (self.label == label))

  def digit(self, c: int) -> np.ndarray:
    """Indices of every draw of digit c, in sampling order."""
    return np.flatnonzero(self.c == c)


def _fingerprint(config: ml_collections.ConfigDict, problem) -> dict:
  """What the draws depend on: sampler settings, pre-trained params, label rule, classifiers."""
  post = config.eval.posterior
  leaves = jax.tree_util.tree_leaves(jax.device_get(problem.frozen["unet"]))
  checksum = float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in leaves))
  cls = problem.info.get("classifier", {})
  meta = {"seed": int(post.seed), "round_size": int(post.round_size),
          "batch_size": int(config.eval.batch_size),
          "num_inference_steps": int(config.num_inference_steps), "eta": float(config.eta),
          "guidance_scale": float(config.guidance_scale), "use_cfg": bool(config.use_cfg),
          "pretrained_checksum": checksum, "label_rule": cls.get("label_rule"),
          "classifier_config": cls.get("config"),
          "reward_weights": list(config.get("reward_weights") or ()),
          "reward_log_eps": float(config.get("reward_log_eps", rewards.LOG_EPS))}
  return json.loads(json.dumps(meta))  # as it reads back from the cache (tuples → lists)


def _needs(ref: Reference, num_labels: int, per_cell: int, pool_per_digit: int) -> np.ndarray:
  """The digits that still need draws: a cell below `per_cell` or fewer than `pool_per_digit`
  draws in all."""
  short_cell = (ref.counts(num_labels) < per_cell).any(-1)
  short_pool = np.bincount(ref.c, minlength=digits_model.NUM_DIGITS) < pool_per_digit
  return np.flatnonzero(short_cell | short_pool)


def build_reference(config: ml_collections.ConfigDict, workdir: str, problem, sampler,
                    params, frozen, rule: digits_data.LabelRule, write: bool = True,
                    log: Callable[[str], None] = print) -> Reference:
  """The cached draws of DIR/eval/posterior_reference.npz, extended until every cell has
  `reference_per_cell + floor_per_cell` accepted draws and every digit `2 · weighted_pool`
  draws, or `max_rounds` rounds are done (cells still short are named in one message).

  sampler: `generate.make_sampler(setup)` (the evaluation's, already compiled at
  config.eval.batch_size); params: the *pre-trained* (initial) trainable params; frozen: with
  "hparams". Round r samples `round_size` requests (chunks of eval.batch_size, keys
  fold_in(fold_in(key(seed), r), chunk)), spread evenly over the digits still short, so a rare
  cell gets the rounds it needs and the draws do not depend on where a run was interrupted.
  """
  post, e = config.eval.posterior, config.eval
  setup = problem.setup
  ls: rewards.LabelSpace = setup.label_space
  k = ls.num_labels
  per_cell = int(post.reference_per_cell) + int(post.floor_per_cell)
  pool = 2 * int(post.weighted_pool)
  if post.round_size % e.batch_size:
    raise ValueError(f"config.eval.posterior.round_size={post.round_size}: expected a multiple "
                     f"of config.eval.batch_size={e.batch_size}.")
  meta = _fingerprint(config, problem)
  path = reference_path(workdir)
  ref = None
  if fs.exists(path):
    saved = fs.load_npz(path)
    saved_meta = json.loads(str(saved["meta"]))
    if saved_meta == meta:
      ref = Reference(saved["images"], saved["c"], saved["label"], saved["log_reward"],
                      int(saved["rounds"]), meta)
    else:
      changed = sorted(f for f in set(meta) | set(saved_meta) if meta.get(f) != saved_meta.get(f))
      log(f"[posterior] {path} was drawn with other {changed}: sampling it again")
  if ref is None:
    ref = Reference(np.zeros((0, 8, 8), np.float32), np.zeros((0,), np.int32),
                    np.zeros((0,), np.int32), np.zeros((0, k), np.float32), 0, meta)
  all_labels = jnp.asarray(ls.decode(jnp.arange(k)), jnp.int32)  # [K, T]

  @jax.jit
  def log_reward_all(images, c):  # [B, 8, 8] → [B, K]
    def one(y):
      return setup.reward_fn(frozen["reward"], images, jnp.broadcast_to(y, (images.shape[0],)
                                                                          + y.shape), c)[0]
    return jax.vmap(one, out_axes=-1)(all_labels)

  start_rounds = ref.rounds
  key = jax.random.key(int(post.seed))
  y_dummy = jnp.zeros((e.batch_size, ls.num_tasks), jnp.int32)  # the pre-trained model ignores y
  while ref.rounds < post.max_rounds:
    short = _needs(ref, k, per_cell, pool)
    if not len(short):
      break
    c_round = np.resize(short, post.round_size).astype(np.int32)
    imgs, rew = [], []
    round_key = jax.random.fold_in(key, ref.rounds)
    for i, s in enumerate(range(0, post.round_size, e.batch_size)):
      cc = jnp.asarray(c_round[s:s + e.batch_size])
      x = sampler(params, frozen, cc, y_dummy, jax.random.fold_in(round_key, i))
      imgs.append(np.asarray(x, np.float32))
      rew.append(np.asarray(log_reward_all(x, cc), np.float32))
    imgs = np.concatenate(imgs)
    labels = np.asarray(ls.encode(jnp.asarray(rule.labels(imgs, c_round))), np.int32)
    ref = Reference(np.concatenate([ref.images, imgs]), np.concatenate([ref.c, c_round]),
                    np.concatenate([ref.label, labels]), np.concatenate([ref.log_reward,
                                                                         np.concatenate(rew)]),
                    ref.rounds + 1, meta)
    if write:  # every round: an interrupted run continues from the last one
      fs.save_npz(path, images=ref.images, c=ref.c, label=ref.label, log_reward=ref.log_reward,
                  rounds=np.asarray(ref.rounds), meta=np.asarray(json.dumps(meta)))
    log(f"[posterior] reference round {ref.rounds}: digits {short.tolist()}; accepted per cell "
        f"min {ref.counts(k).min()} (wanted {per_cell})")
  counts = ref.counts(k)
  if ref.rounds > start_rounds:
    log(f"[posterior] reference: {ref.rounds - start_rounds} sampling rounds "
        f"({len(ref.c)} draws of p_pre(x | c) in all); accepted per cell min "
        f"{counts.min()} median {int(np.median(counts))}")
  short = np.argwhere(counts < per_cell)
  if len(short):
    names = _cell_names(ls)
    log(f"[posterior] after max_rounds={post.max_rounds} rounds of {post.round_size} draws, "
        f"{len(short)} cell(s) have fewer than {per_cell} accepted draws (the pre-trained model "
        "rarely makes them): " + ", ".join(f"c={c} {names[q]}: {counts[c, q]}"
                                            for c, q in short[:12])
        + "; their reference is smaller (cells under "
        f"{MIN_REFERENCE + int(post.floor_per_cell)} get no statistic). Raise "
        "config.eval.posterior.max_rounds to fill them.")
  return ref


def _cell_names(ls: rewards.LabelSpace) -> list[str]:
  ys = np.asarray(ls.decode(jnp.arange(ls.num_labels)))
  return [",".join(f"{n}={v}" for n, v in zip(ls.task_names, row)) for row in ys]


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class CellTargets:
  """Per cell (c, label), cells c-major (index c·K + label), padded to fixed shapes so one
  compiled statistic serves every cell (zero weight = padding).

  hard [C·K, R, 64] + hard_w [C·K, R]: the hard-label reference (the first R accepted draws);
  floor [C·K, F, 64]: the next F accepted draws (the independent sample of the floor; a
  method with n per cell is compared with the first n); bandwidth [C·K] (σ², median heuristic
  on the hard reference); pool [C·K, P, 64] + pool_logw [C·K, P]: the digit's draws of even
  rank (the weighted reference, log weight = reward of the cell's label, −inf = padding);
  pool_b, pool_b_logw: the odd ranks (the weighted floor's resampling pool); counts [C·K] the
  accepted draws in the hard reference.
  """
  hard: np.ndarray
  hard_w: np.ndarray
  floor: np.ndarray
  floor_count: np.ndarray
  bandwidth: np.ndarray
  pool: np.ndarray
  pool_logw: np.ndarray
  pool_b: np.ndarray
  pool_b_logw: np.ndarray
  counts: np.ndarray
  num_labels: int


def cell_targets(ref: Reference, num_labels: int, reference_per_cell: int, floor_per_cell: int,
                 weighted_pool: int) -> CellTargets:
  """The reference of every cell from the draws: the first `reference_per_cell` accepted draws
  of a cell are its hard reference, the next `floor_per_cell` its floor sample; the first
  2 · `weighted_pool` draws of each digit, alternately, its weighted pools A and B."""
  r, f, p, k = reference_per_cell, floor_per_cell, weighted_pool, num_labels
  n_cells = digits_model.NUM_DIGITS * k
  flat = ref.images.reshape(len(ref.images), -1).astype(np.float32)
  hard = np.zeros((n_cells, r, flat.shape[1]), np.float32)
  hard_w = np.zeros((n_cells, r), np.float32)
  floor = np.zeros((n_cells, f, flat.shape[1]), np.float32)
  floor_count = np.zeros((n_cells,), np.int32)
  counts = np.zeros((n_cells,), np.int32)
  pool = np.zeros((n_cells, p, flat.shape[1]), np.float32)
  pool_logw = np.full((n_cells, p), -np.inf, np.float32)
  pool_b = np.zeros_like(pool)
  pool_b_logw = np.full_like(pool_logw, -np.inf)
  bandwidth = np.full((n_cells,), np.nan, np.float32)
  for c in range(digits_model.NUM_DIGITS):
    d = ref.digit(c)[:2 * p]
    a_idx, b_idx = d[0::2], d[1::2]
    for q in range(k):
      i = c * k + q
      acc = ref.cell(c, q)
      if len(acc) >= r + f:
        rest, flo = acc[:r], acc[r:r + f]
      elif len(acc) >= f:  # a short cell keeps its floor sample and has a smaller reference
        rest, flo = acc[:len(acc) - f], acc[len(acc) - f:]
      else:
        rest, flo = acc[:0], acc
      hard[i, :len(rest)], hard_w[i, :len(rest)] = flat[rest], 1.0
      floor[i, :len(flo)], floor_count[i] = flat[flo], len(flo)
      counts[i] = len(rest)
      pool[i, :len(a_idx)], pool_logw[i, :len(a_idx)] = flat[a_idx], ref.log_reward[a_idx, q]
      pool_b[i, :len(b_idx)] = flat[b_idx]
      pool_b_logw[i, :len(b_idx)] = ref.log_reward[b_idx, q]
      if len(rest) >= 2:
        bandwidth[i] = float(mmd.median_bandwidth(jnp.asarray(flat[rest])))
  return CellTargets(hard, hard_w, floor, floor_count, bandwidth, pool, pool_logw, pool_b,
                     pool_b_logw, counts, k)


@jax.jit
def _cell_mmd2(x, y, y_w, bandwidth):
  """Biased MMD² per cell: x [C, n, D] uniform, y [C, M, D] weights y_w [C, M] → [C]
  (cells in sequence: one cell's kernel matrices in memory at a time)."""
  return jax.lax.map(lambda a: mmd.mmd2(a[0], a[1], a[3], y_weights=a[2]),
                     (x, y, y_w, bandwidth))


@jax.jit
def _cell_null(y, y_w, bandwidth, n):
  return jax.lax.map(lambda a: mmd.null_expectation(a[0], a[2], n, y_weights=a[1]),
                     (y, y_w, bandwidth))


def _gamma_weights(logw: np.ndarray, gamma: float) -> np.ndarray:
  """exp(γ · log w) normalised per row, padding (−inf) → 0: [C, P]."""
  z = gamma * logw
  z = z - np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
  w = np.where(np.isfinite(z), np.exp(z), 0.0)
  return (w / w.sum(-1, keepdims=True)).astype(np.float32)


def _by_cell(images: np.ndarray, c: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
  """Samples of every cell, c-major: [C·K, n, 64] (every cell must hold the same n)."""
  cell = np.asarray(c) * k + np.asarray(label)
  counts = np.bincount(cell, minlength=digits_model.NUM_DIGITS * k)
  if (counts != counts[0]).any() or counts[0] < 2:
    raise ValueError(f"posterior fidelity needs the same number (≥ 2) of samples in every "
                     f"(c, y) cell; got {sorted(set(counts.tolist()))}.")
  order = np.argsort(cell, kind="stable")
  return np.asarray(images, np.float32).reshape(len(cell), -1)[order].reshape(
      len(counts), counts[0], -1)


def _valid(t: CellTargets, n: int) -> np.ndarray:
  return (t.counts >= MIN_REFERENCE) & (t.floor_count >= n) & np.isfinite(t.bandwidth)


def model_statistics(t: CellTargets, images: np.ndarray, c: np.ndarray, label: np.ndarray,
                     gammas) -> dict:
  """MMD² of a model's samples (images [N, 8, 8], asked cells (c [N], combined label [N]), the
  same n in every cell) to each cell's hard and γ-weighted references: {"hard": [C·K],
  "gamma=<γ>": [C·K]} (NaN where a cell's reference is too small)."""
  x = jnp.asarray(_by_cell(images, c, label, t.num_labels))
  n = x.shape[1]
  bw = jnp.asarray(np.nan_to_num(t.bandwidth, nan=1.0))
  valid = _valid(t, n)
  out = {"hard": np.where(valid, np.asarray(_cell_mmd2(x, t.hard, t.hard_w, bw)), np.nan)}
  for g in gammas:
    w = _gamma_weights(t.pool_logw, float(g))
    out[f"gamma={g:g}"] = np.where(valid, np.asarray(_cell_mmd2(x, t.pool, w, bw)), np.nan)
  return out


def floor_statistics(t: CellTargets, n: int, gammas, seed: int) -> dict:
  """The noise floor for n samples per cell: per reference, the empirical floor (an independent
  target sample of size n: the cell's held-out accepted draws; for γ, n draws resampled by
  weight from pool B, with replacement) and its expectation (`mmd.null_expectation`); the ESS
  of the γ-weights of pool A. Arrays [C·K]."""
  if n > t.floor.shape[1]:
    raise ValueError(f"{n} samples per cell but only floor_per_cell={t.floor.shape[1]} held-out "
                     "reference draws: raise config.eval.posterior.floor_per_cell.")
  bw = jnp.asarray(np.nan_to_num(t.bandwidth, nan=1.0))
  valid = _valid(t, n)
  mask = lambda v: np.where(valid, np.asarray(v), np.nan)  # noqa: E731
  out = {"hard": {"floor": mask(_cell_mmd2(t.floor[:, :n], t.hard, t.hard_w, bw)),
                  "floor_expected": mask(_cell_null(t.hard, t.hard_w, bw, n))}}
  rng = np.random.default_rng(seed)
  for g in gammas:
    w = _gamma_weights(t.pool_logw, float(g))
    wb = _gamma_weights(t.pool_b_logw, float(g))
    idx = np.stack([rng.choice(len(p), size=n, p=p / p.sum()) for p in wb.astype(np.float64)])
    resampled = np.take_along_axis(t.pool_b, idx[:, :, None], axis=1)
    out[f"gamma={g:g}"] = {"floor": mask(_cell_mmd2(resampled, t.pool, w, bw)),
                           "floor_expected": mask(_cell_null(t.pool, w, bw, n)),
                           "ess": np.asarray(jax.vmap(mmd.effective_sample_size)(w))}
  return out


def _mean(v: np.ndarray) -> float:
  v = v[np.isfinite(v)]
  return float(v.mean()) if len(v) else float("nan")


def summarise(models: dict[str, dict], floors: dict, k: int) -> dict:
  """Per reference: per-cell tables [10, K] (each model's MMD², the floor, its expectation and
  the ratios model / floor), per class (the mean over digits) and overall (the mean over cells),
  with each model's ratio to the floor (mean MMD² / mean floor MMD²). models: name →
  `model_statistics`; floors: `floor_statistics`."""
  out = {}
  for ref_name, fl in floors.items():
    table = {name: st[ref_name] for name, st in models.items()}
    table.update({key: v for key, v in fl.items()})
    res: dict[str, Any] = {"cells": {key: np.round(v.reshape(-1, k), 6).tolist()
                                     for key, v in table.items()},
                           "per_class": {}, "overall": {}}
    for key, v in table.items():
      grid = v.reshape(-1, k)
      res["per_class"][key] = [_mean(grid[:, q]) for q in range(k)]
      res["overall"][key] = _mean(v)
    for name in models:
      for floor in ("floor", "floor_expected"):
        with np.errstate(divide="ignore", invalid="ignore"):
          res["cells"][f"{name}/{floor}"] = np.round(
              (table[name] / table[floor]).reshape(-1, k), 4).tolist()
        for agg in ("per_class", "overall"):
          num, den = np.asarray(res[agg][name]), np.asarray(res[agg][floor])
          res[agg][f"{name}/{floor}"] = (num / den).tolist()
    out[ref_name] = res
  return out


class Fidelity:
  """The posterior-fidelity scorer of one workdir: the cells' references (`cell_targets`), the
  γ's, and the floors per sample size (computed once per n). `report` scores any set of models
  sampled on the same per-cell requests."""

  def __init__(self, config: ml_collections.ConfigDict, ref: Reference, num_labels: int):
    post = config.eval.posterior
    self.post, self.ref, self.k = post, ref, num_labels
    self.targets = cell_targets(ref, num_labels, int(post.reference_per_cell),
                                int(post.floor_per_cell), int(post.weighted_pool))
    self.gammas = tuple(float(g) for g in post.gammas)
    self._floors: dict[int, dict] = {}

  def floors(self, n: int) -> dict:
    if n not in self._floors:
      self._floors[n] = floor_statistics(self.targets, n, self.gammas, int(self.post.seed))
    return self._floors[n]

  def report(self, samples: dict[str, np.ndarray], c: np.ndarray, label: np.ndarray) -> dict:
    """`summarise`'s tables of `samples` (name → images [N, 8, 8]) asked for cells (c [N],
    combined label [N]; the same n in every cell), with the settings: what metrics["posterior"]
    holds."""
    n = int(np.bincount(np.asarray(c) * self.k + np.asarray(label)).max())
    models = {name: model_statistics(self.targets, imgs, c, label, self.gammas)
              for name, imgs in samples.items()}
    t = self.targets
    return {"estimator": "biased (V-statistic) MMD², Gaussian kernel on the 64 pixels, σ² = "
                         "median pairwise squared distance of the cell's hard-label reference",
            "samples_per_cell": n, "reference_per_cell": int(self.post.reference_per_cell),
            "floor_per_cell": int(self.post.floor_per_cell),
            "weighted_pool": int(self.post.weighted_pool), "gammas": list(self.gammas),
            "reference_draws": int(len(self.ref.c)), "reference_rounds": self.ref.rounds,
            "reference_counts": t.counts.reshape(-1, self.k).tolist(),
            "bandwidth": np.round(t.bandwidth.reshape(-1, self.k), 5).tolist(),
            "references": summarise(models, self.floors(n), self.k)}


def prepare(config: ml_collections.ConfigDict, workdir: str, problem, sampler, frozen,
            rule: digits_data.LabelRule, write: bool = True,
            log: Callable[[str], None] = print) -> Fidelity:
  """Builds (or reuses) the reference of `workdir` (`build_reference`, the pre-trained params
  of `problem`) and returns its scorer."""
  ref = build_reference(config, workdir, problem, sampler, jax.device_get(problem.params),
                        frozen, rule, write=write, log=log)
  return Fidelity(config, ref, problem.setup.label_space.num_labels)


def posterior_fidelity(config: ml_collections.ConfigDict, workdir: str, problem, sampler,
                       frozen, rule: digits_data.LabelRule, samples: dict[str, np.ndarray],
                       c: np.ndarray, y: np.ndarray, write: bool = True,
                       log: Callable[[str], None] = print) -> dict:
  """The posterior-fidelity metrics of `samples` (name → images [N, 8, 8], asked c [N],
  y [N, T]; the same n per cell), into metrics["posterior"]. Builds (or reuses) the reference
  first."""
  ls = problem.setup.label_space
  fid = prepare(config, workdir, problem, sampler, frozen, rule, write=write, log=log)
  return fid.report(samples, c, np.asarray(ls.encode(jnp.asarray(y))))


def reference_title(ref_name: str) -> str:
  """"hard" → the hard-label reference; "gamma=1" → the γ-weighted one."""
  return ("hard-label reference p(x | c, y)" if ref_name == "hard" else
          f"p̂(y | x)^γ-weighted reference, {ref_name.replace('gamma', 'γ')}")


def summary_lines(post: dict, cells: list[str], models=("pretrained", "finetuned"),
                  titles: Optional[dict] = None) -> list[str]:
  """Markdown: per reference, a table of each class's MMD² per model, the floor and the ratios."""
  titles = titles or {}
  lines = ["", f"Posterior fidelity ({post['estimator']}; {post['samples_per_cell']} samples per "
           f"cell against {post['reference_per_cell']} accepted pre-trained draws per cell; "
           "floor = an independent target sample of the same size; values × 1e3):", ""]
  for ref_name, res in post["references"].items():
    what = reference_title(ref_name)
    if ref_name != "hard":
      what += (f" (mean ESS {_mean(np.asarray(res['cells']['ess'], float)):.0f} of "
               f"{post['weighted_pool']} draws per cell)")
    head = ["class"] + [f"{titles.get(m, m)} MMD²" for m in models] + [
        "floor", "floor (expected)"] + [f"{titles.get(m, m)} / floor" for m in models]
    lines += [f"*{what}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pc, ov = res["per_class"], res["overall"]
    for q, name in enumerate(cells + ["all cells"]):
      get = (lambda key, q=q: pc[key][q]) if q < len(cells) else (lambda key: ov[key])
      row = ([name] + [f"{1e3 * get(m):.2f}" for m in models]
             + [f"{1e3 * get('floor'):.2f}", f"{1e3 * get('floor_expected'):.2f}"]
             + [f"{get(f'{m}/floor'):.2f}" for m in models])
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  return lines


def save_ratio_plot(path: str, post: dict, cells: list[str], models=("pretrained", "finetuned"),
                    titles: Optional[dict] = None) -> None:
  """Per reference one panel: per class, a bar per model of its MMD² / floor (log scale), with
  the floor (1) and 2× the floor marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  titles = titles or {}
  refs = list(post["references"])
  fig, axes = plt.subplots(1, len(refs), figsize=(1.2 + 0.9 * len(cells) * len(models) * len(refs)
                                                  + 1.5 * len(refs), 3.4), squeeze=False)
  width = 0.8 / len(models)
  for ax, ref_name in zip(axes[0], refs):
    pc = post["references"][ref_name]["per_class"]
    for j, m in enumerate(models):
      vals = np.asarray(pc[f"{m}/floor"], float)
      ax.bar(np.arange(len(cells)) + (j - (len(models) - 1) / 2) * width, vals, width,
             label=titles.get(m, m))
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(2.0, color="k", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(cells)))
    ax.set_xticklabels(cells, fontsize=8)
    ax.set_ylabel("MMD² / floor")
    ax.set_title(reference_title(ref_name), fontsize=9)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fs.save_image(path, fig)
  plt.close(fig)


def target_curve(fid: Fidelity, gammas, n: int) -> list[dict]:
  """The exact tempered targets p_γ(x | c, y) from the reference draws, for the trade-off plot:
  per γ, the true-label accuracy of p_γ (self-normalised weights p̂(y | x)^γ over all of a
  digit's draws, mean over cells) and the MMD² / floor a perfect p_γ sampler of n draws per
  cell would score against the hard reference on average: (MMD²(p_γ, hard) + floor) / floor
  with the expected floor at n, per class (mean over digits) and over all cells."""
  t, ref, k = fid.targets, fid.ref, fid.k
  flat = ref.images.reshape(len(ref.images), -1).astype(np.float32)
  floor = np.asarray(_cell_null(t.hard, t.hard_w, jnp.asarray(np.nan_to_num(t.bandwidth, nan=1.0)),
                                n))
  out = []
  for g in gammas:
    dist, acc = np.full(len(t.counts), np.nan), np.full(len(t.counts), np.nan)
    for c in range(digits_model.NUM_DIGITS):
      d = ref.digit(c)
      for q in range(k):
        i = c * k + q
        if not np.isfinite(t.bandwidth[i]) or t.counts[i] < MIN_REFERENCE:
          continue
        w = _gamma_weights(ref.log_reward[d, q][None], float(g))[0]
        acc[i] = float(w @ (ref.label[d] == q))
        dist[i] = float(mmd.mmd2(flat[d], t.hard[i, :t.counts[i]], t.bandwidth[i],
                                 x_weights=w))
    dq, fq = dist.reshape(-1, k), np.where(np.isfinite(dist), floor, np.nan).reshape(-1, k)
    out.append({"gamma": float(g), "accuracy": _mean(acc),
                "per_class_accuracy": [_mean(a) for a in acc.reshape(-1, k).T],
                "per_class": [(_mean(dq[:, q]) + _mean(fq[:, q])) / _mean(fq[:, q])
                              for q in range(k)],
                "overall": (_mean(dist) + _mean(fq)) / _mean(fq)})
  return out
