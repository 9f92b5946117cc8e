"""Evaluation of the digits benchmark: sample every (c, y) cell from the fine-tuned and the
pre-trained model with the same seeds, judge the samples with the true label rule and an
independent digit judge, and write samples, metrics, image grids and training curves.

Posterior fidelity (config.eval.posterior, `ctrl_jax.problems.digits.posterior`): per (c, y)
cell the kernel MMD² of both models' samples to an exact reference of p(x | c, y) (and of the
p̂(y | x)^γ-weighted target), against the noise floor, in metrics["posterior"], summary.md and
posterior.png; the reference draws are cached in DIR/eval/posterior_reference.npz.

Outputs in DIR/eval/: samples.npz, metrics.json, summary.md, grid.png, cells.png, curves.png,
posterior.png (DIR local or a URI, `ctrl_jax.runtime.fs`; written by process 0 of a
multi-process run).
"""
from __future__ import annotations

import io
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sklearn.metrics

from ctrl_jax.core import generate
from ctrl_jax.core import rewards
from ctrl_jax.core import train
from ctrl_jax.problems import base
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.problems.digits import posterior
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost


def eval_requests(label_space: rewards.LabelSpace, samples_per_cell: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Every (digit c, combined label ℓ) cell, `samples_per_cell` times, c-major then ℓ.

  Returns (c int32 [N], y int32 [N, T]) with N = 10 · K · samples_per_cell.
  """
  k = label_space.num_labels
  c = np.repeat(np.arange(digits_model.NUM_DIGITS), k * samples_per_cell).astype(np.int32)
  label = np.tile(np.repeat(np.arange(k), samples_per_cell), digits_model.NUM_DIGITS)
  return c, np.asarray(label_space.decode(jnp.asarray(label)), np.int32)


def score(images: np.ndarray, c: np.ndarray, y: np.ndarray, rule: digits_data.LabelRule,
          judge: digits_data.DigitJudge, heldout_features: np.ndarray,
          label_space: rewards.LabelSpace) -> dict:
  """Metrics of samples `images` [N, 8, 8] asked for (c [N], y [N, T]).

  Per task: accuracy and macro-F1 of the true class (the label rule on the sample) against the
  asked one; joint accuracy (all tasks right); per-cell tables [10, K] of joint accuracy and
  digit accuracy (K = combined labels); digit accuracy by the judge; Fréchet distance to the
  held-out digits in the judge's PCA space.
  """
  y_true = np.asarray(rule.labels(images, c))
  out: dict[str, Any] = {"num_samples": int(len(c)), "tasks": {}}
  for t, name in enumerate(rule.names):
    k = label_space.task_classes[t]
    out["tasks"][name] = {
        "accuracy": float((y_true[:, t] == y[:, t]).mean()),
        "macro_f1": float(sklearn.metrics.f1_score(y[:, t], y_true[:, t], average="macro",
                                                   labels=list(range(k)))),
        "per_class_accuracy": [float((y_true[y[:, t] == j, t] == j).mean()) for j in range(k)],
    }
  correct = (y_true == y).all(-1)
  digit = judge.predict(images)
  out["joint_accuracy"] = float(correct.mean())
  out["digit_accuracy"] = float((digit == c).mean())
  out["frechet_distance"] = digits_data.frechet_distance(judge.features(images), heldout_features)
  label = np.asarray(label_space.encode(jnp.asarray(y)))
  k = label_space.num_labels
  cell = c * k + label
  count = np.bincount(cell, minlength=10 * k)
  out["cell_accuracy"] = (np.bincount(cell, correct, 10 * k) / np.maximum(count, 1)
                          ).reshape(10, k).round(4).tolist()
  out["cell_digit_accuracy"] = (np.bincount(cell, digit == c, 10 * k) / np.maximum(count, 1)
                                ).reshape(10, k).round(4).tolist()
  return out


def cell_names(label_space: rewards.LabelSpace) -> list[str]:
  """Column names of the combined labels, e.g. "ink3=1" or "ink2=1,edge2=0"."""
  ys = np.asarray(label_space.decode(jnp.arange(label_space.num_labels)))
  return [",".join(f"{n}={v}" for n, v in zip(label_space.task_names, row)) for row in ys]


def evaluate(config: ml_collections.ConfigDict, workdir: str, problem: base.Problem,
             params: dict, method_sampler: Optional[Callable] = None,
             title: Optional[str] = None, out_name: str = "eval") -> dict:
  """Evaluates `params` (the fine-tuned CTRL params) on every (c, y) cell against the
  pre-trained model, into DIR/<out_name>/ (samples.npz, metrics.json, summary.md, PNG figures).

  method_sampler: samples "finetuned" instead of CTRL's sampler (a baseline on the pre-trained
  model, `ctrl_jax.baselines.compare.evaluate_run`), called with the same arguments; `title`
  names it in the figures and metrics.
  """
  t0 = time.time()
  out_dir = fs.join(workdir, out_name)
  writes = multihost.is_main()
  if writes:
    fs.makedirs(out_dir)
  setup = problem.setup
  sampler = generate.make_sampler(setup)
  method_sampler = method_sampler or sampler
  rule = digits_data.LabelRule.from_dict(problem.info["classifier"]["label_rule"])
  cls_info = problem.info["classifier"]
  frozen = {**problem.frozen, "hparams": train.hparams_from_config(config)}
  e = config.eval
  c, y = eval_requests(setup.label_space, e.samples_per_cell)
  # Both param trees as host arrays: the same argument placement ⇒ one compilation.
  images = {name: generate.sample_all(fn, jax.device_get(p), frozen, c, y, e.seed, e.batch_size,
                                      name)
            for name, fn, p in (("finetuned", method_sampler, params),
                                ("pretrained", sampler, problem.params))}
  splits = digits_data.load_splits()
  judge = digits_data.fit_digit_judge(splits["x_train"], splits["c_train"])
  held_feats = judge.features(splits["x_heldout"])
  metrics: dict[str, Any] = {
      name: score(imgs, c, y, rule, judge, held_feats, setup.label_space)
      for name, imgs in images.items()}
  metrics["reference"] = {
      "judge_heldout_accuracy": float((judge.predict(splits["x_heldout"])
                                       == splits["c_heldout"]).mean()),
      "frechet_distance_train_vs_heldout": digits_data.frechet_distance(
          judge.features(splits["x_train"]), held_feats),
      "classifiers": cls_info["tasks"],
  }
  metrics["cells"] = cell_names(setup.label_space)
  if posterior.enabled(config):
    metrics["posterior"] = posterior.posterior_fidelity(
        config, workdir, problem, sampler, frozen, rule, images, c, y, write=writes,
        log=lambda msg: print(msg, flush=True) if writes else None)
  metrics["config"] = {"variant": config.get("variant", ""), "task": config.task,
                       "method": "ctrl" if title is None else title}
  if writes:
    buf = io.BytesIO()  # compressed, which fs.save_npz is not
    np.savez_compressed(buf, images=images["finetuned"], c=c,
                        y=y[:, 0] if y.shape[1] == 1 else y,
                        images_pretrained=images["pretrained"])
    fs.write_bytes(fs.join(out_dir, "samples.npz"), buf.getvalue())
  metrics["wall_time_s"] = stage_wall_times(workdir)
  metrics["wall_time_s"]["eval"] = time.time() - t0
  if writes:
    # matplotlib only when figures are drawn  # pylint: disable-next=g-import-not-at-top
    from ctrl_jax.problems.digits import plots as digits_plots
    digits_plots.save_grid(fs.join(out_dir, "grid.png"), images, c, y, setup.label_space,
                           e.grid_samples, metrics, title)
    digits_plots.save_cell_tables(fs.join(out_dir, "cells.png"), metrics, title)
    digits_plots.save_curves(fs.join(out_dir, "curves.png"),
                             fs.join(workdir, "finetune.jsonl"), setup.label_space.task_names)
    if "posterior" in metrics:
      posterior.save_ratio_plot(fs.join(out_dir, "posterior.png"), metrics["posterior"],
                                metrics["cells"], titles={"finetuned": title or "fine-tuned"})
    fs.write_json(fs.join(out_dir, "metrics.json"), metrics)
    fs.write_text(fs.join(out_dir, "summary.md"), summary_table(metrics))
    print(summary_table(metrics), flush=True)
  multihost.barrier(f"{out_name} written")  # the evaluation is done for every process
  return metrics


def stage_wall_times(workdir: str) -> dict:
  """Wall time of each completed stage, from its info.json."""
  out = {}
  for stage in ("pretrain", "classifier", "finetune"):
    path = fs.join(workdir, stage, "info.json")
    if fs.exists(path):
      out[stage] = fs.read_json(path)["wall_time_s"]
  return out


def summary_table(metrics: dict) -> str:
  """A markdown table: pre-trained vs fine-tuned."""
  tasks = list(metrics["finetuned"]["tasks"])
  head = (["model"] + [f"{t} acc" for t in tasks] + [f"{t} macro-F1" for t in tasks]
          + (["joint acc"] if len(tasks) > 1 else []) + ["digit acc", "Fréchet dist."])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in ("pretrained", "finetuned"):
    m = metrics[name]
    vals = ([m["tasks"][t]["accuracy"] for t in tasks] + [m["tasks"][t]["macro_f1"] for t in tasks]
            + ([m["joint_accuracy"]] if len(tasks) > 1 else [])
            + [m["digit_accuracy"], m["frechet_distance"]])
    rows.append("| " + " | ".join([name] + [f"{v:.3f}" for v in vals]) + " |")
  ref = metrics["reference"]
  if "posterior" in metrics:
    rows += posterior.summary_lines(metrics["posterior"], metrics["cells"])
  rows.append("")
  rows.append(f"Digit judge held-out accuracy {ref['judge_heldout_accuracy']:.3f}; Fréchet "
              f"distance train vs held-out digits {ref['frechet_distance_train_vs_heldout']:.3f}."
              " Wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                             for k, v in metrics["wall_time_s"].items()) + ".")
  return "\n".join(rows) + "\n"
