"""PNG figures of a digits evaluation: sample grids, per-cell accuracy tables, training curves.
Paths are local or URIs (`ctrl_jax.runtime.fs`)."""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from ctrl_jax.core import rewards  # noqa: E402
from ctrl_jax.runtime import fs  # noqa: E402

_MODELS = (("pretrained", "pre-trained p(x | c)"), ("finetuned", "CTRL p(x | c, y)"))


def save_figure(path: str, fig, dpi: int = 110) -> None:
  """Writes `fig` to `path` (local or URI; format from the suffix, default PNG) at `dpi`, then
  closes it. (`fs.save_image` would crop the figure to its contents.)"""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".").lower() or "png", dpi=dpi)
  plt.close(fig)
  fs.write_bytes(path, buf.getvalue())


def _models(title: str | None):
  """The two panels (key, title); `title` renames the second (a baseline instead of CTRL)."""
  return _MODELS if title is None else (_MODELS[0], ("finetuned", title))


def tile_cells(images: np.ndarray, c: np.ndarray, label: np.ndarray, num_labels: int,
               per_cell: int, pad: int = 1) -> np.ndarray:
  """[rows = digit 0..9, columns = label] mosaic of the first `per_cell` samples of each cell.

  images [N, 8, 8] in [0, 1] → float [10·(8+pad)+pad, K·(per_cell·(8+pad)+pad)+pad], padding
  = 0.5 grey between samples and 1.0 between cells.
  """
  s = 8 + pad
  cell_w = per_cell * s + pad
  out = np.full((10 * s + pad, num_labels * cell_w + pad), 0.5, np.float32)
  for col in range(num_labels):
    x0 = col * cell_w
    out[:, x0] = 1.0  # cell separator
    for row in range(10):
      idx = np.flatnonzero((c == row) & (label == col))[:per_cell]
      for j, i in enumerate(idx):
        y, x = row * s + pad, x0 + pad + j * s
        out[y:y + 8, x:x + 8] = images[i]
  return out


def save_grid(path: str, images: dict, c: np.ndarray, y: np.ndarray,
              label_space: rewards.LabelSpace, per_cell: int, metrics: dict,
              title: str | None = None) -> None:
  """Pre-trained and fine-tuned sample mosaics side by side (rows c, columns y)."""
  label = np.zeros(len(c), np.int64)
  for t, k in enumerate(label_space.task_classes):
    label = label * k + y[:, t]
  k = label_space.num_labels
  fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * k * per_cell, 5.4))
  names = metrics["cells"]
  for ax, (key, name) in zip(axes, _models(title)):
    mosaic = tile_cells(images[key], c, label, k, per_cell)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    cell_w = per_cell * 9 + 1
    ax.set_xticks([i * cell_w + cell_w / 2 for i in range(k)])
    ax.set_xticklabels(names, rotation=30 if k > 3 else 0, fontsize=8)
    ax.set_yticks([r * 9 + 5 for r in range(10)])
    ax.set_yticklabels([f"c={r}" for r in range(10)], fontsize=8)
    m = metrics[key]
    ax.set_title(f"{name}\njoint y-acc {m['joint_accuracy']:.3f}, "
                 f"digit acc {m['digit_accuracy']:.3f}", fontsize=9)
  fig.tight_layout()
  save_figure(path, fig)


def save_cell_tables(path: str, metrics: dict, title: str | None = None) -> None:
  """Heat maps of per-cell y-accuracy (joint) for both models, annotated."""
  names = metrics["cells"]
  fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.6 * len(names), 4.6))
  for ax, (key, name) in zip(axes, _models(title)):
    table = np.asarray(metrics[key]["cell_accuracy"])
    ax.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (r, q), v in np.ndenumerate(table):
      ax.text(q, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 3 else 0, fontsize=8)
    ax.set_yticks(range(10))
    ax.set_yticklabels([f"c={r}" for r in range(10)], fontsize=8)
    ax.set_title(f"{name}: y-accuracy per (c, y) cell", fontsize=9)
  fig.tight_layout()
  save_figure(path, fig)


def save_curves(path: str, jsonl_path: str, task_names) -> None:
  """Reward, KL and the reward classifier's accuracy on the training trajectories vs update."""
  rows = fs.read_jsonl(jsonl_path)  # [] if there is no training log
  if not rows:
    return
  step = [r["step"] for r in rows]
  panels = [("reward", "mean log p̂(y | x0)"), ("kl", "KL (config convention)")]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for ax, (key, title) in zip(axes, panels):
    ax.plot(step, [r[key] for r in rows])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("update")
  for name in task_names:
    ax = axes[2]
    ax.plot(step, [r.get(f"classifier_acc/{name}", np.nan) for r in rows], label=name)
  axes[2].set_title("p̂ accuracy on training samples", fontsize=9)
  axes[2].set_xlabel("update")
  axes[2].set_ylim(0, 1)
  flags = [r.get("exact_kl_grad", 0) > 0 for r in rows]
  if any(flags) and not flags[0]:  # `reference_grad_from`: mark the switch (after the last
    switch = step[flags.index(True) - 1]  # logged biased update)
    for ax in axes:
      ax.axvline(switch, color="gray", ls=":", lw=1, label="exact KL gradient from here")
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  save_figure(path, fig)


def save_run_comparison(path: str, runs: dict[str, str],
                        keys: tuple[str, ...] = ("reward", "kl", "grad_norm")) -> None:
  """Training curves of several CTRL runs side by side: one panel per scalar in `keys`, one
  line per run. `runs` maps a legend label to a run's `finetune.jsonl`."""
  if not runs:
    raise ValueError("save_run_comparison: no runs given.")
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for label, jsonl_path in runs.items():
    if not fs.exists(jsonl_path):
      raise FileNotFoundError(f"run {label!r}: no training log at {jsonl_path!r}.")
    rows = fs.read_jsonl(jsonl_path)
    for ax, key in zip(axes[0], keys):
      missing = [r["step"] for r in rows if key not in r]
      if missing:
        raise KeyError(f"run {label!r}: no {key!r} at update(s) {missing[:3]} of {jsonl_path!r}.")
      ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
  for ax, key in zip(axes[0], keys):
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("update")
  if "grad_norm" in keys:
    axes[0][keys.index("grad_norm")].set_yscale("log")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  save_figure(path, fig)
