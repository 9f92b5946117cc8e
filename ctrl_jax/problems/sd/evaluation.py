"""Evaluation of an SD CTRL run with the ground truths (true LAION score, true JPEG size).

Every (eval prompt, label) cell is sampled `samples_per_class` times from the fine-tuned and the
pre-trained model with the same seeds (paired noise); the true classes of the decoded images
are compared with the asked ones. Every image also gets its LAION aesthetic score (all tasks,
config.eval.laion_score), its JPEG size and its CLIP score (config.eval.clip_model).

Memory does not grow with the number of images: requests are sampled in chunks of
config.eval.batch_size over every device, each chunk is scored (in fixed-size batches of
config.eval.score_batch: one compilation), written and dropped; only per-image scores and the
few grid images are kept. Outputs in DIR/eval/:
  images/<model>/<NN>_<prompt>/<cell>_<i>.png   every image (config.eval.save_png)
  images_<model>.npy     uint8 [N, H, W, 3], request order (np.load(..., mmap_mode="r"))
  samples.npz            the requests (prompt, y, prompts, cells) and per-image scores per
                         model (y_true_<model>, laion_score_<model>, jpeg_kb_<model>,
                         clip_score_<model>)
  metrics.json, summary.md   per task accuracy / macro-F1, joint accuracy, per-cell tables
                         (prompt × class), LAION / CLIP / JPEG means per model, class and cell
  grid_<model>.png       rows = prompts, columns = classes (grid_samples each)
  grid.png               pre-trained | fine-tuned side by side
"""
from __future__ import annotations

import collections
import concurrent.futures
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sklearn.metrics

from ctrl_jax.core import generate
from ctrl_jax.core import train
from ctrl_jax.models import sd as sd_lib
from ctrl_jax.problems import base
from ctrl_jax.problems.sd import compressibility
from ctrl_jax.problems.sd import stages as sd_stages
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import sharding as shd

MODELS = ("finetuned", "pretrained")


def eval_requests(num_prompts: int, num_labels: int, per_cell: int, label_space
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt int32 [N], y int32 [N, T]): prompt-major, then label, `per_cell` each."""
  prompt = np.repeat(np.arange(num_prompts), num_labels * per_cell).astype(np.int32)
  label = np.tile(np.repeat(np.arange(num_labels), per_cell), num_prompts)
  return prompt, np.asarray(label_space.decode(jnp.asarray(label)), np.int32)


def cell_names(label_space) -> list[str]:
  """File-name-safe names of the combined labels, e.g. "aesthetic-1_compress2-0"."""
  ys = np.asarray(label_space.decode(jnp.arange(label_space.num_labels)))
  return ["_".join(f"{n}-{v}" for n, v in zip(label_space.task_names, row)) for row in ys]


def prompt_folder(index: int, prompt: str) -> str:
  """"03_a_photo_of_a_cat": the prompt's index (prompts may repeat) and a safe slug."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60] or "prompt"
  return f"{index:02d}_{slug}"


def true_labels(truth: sd_stages.GroundTruth, scores: dict[str, np.ndarray]) -> np.ndarray:
  """The ground truth's classes int32 [N, T] from the images' scores (`GroundTruth.labels`
  without recomputing them): LAION score ≥ the threshold, JPEG-size bins."""
  cols = []
  for name in truth.names:
    if name == "aesthetic":
      cols.append((scores["laion_score"] >= truth.info["aesthetic_threshold"]).astype(np.int32))
    else:
      cols.append(sd_stages.size_classes(scores["jpeg_kb"], tuple(truth.info["edges_kb"][name])))
  return np.stack(cols, -1)


def score(y_true: np.ndarray, prompt: np.ndarray, y: np.ndarray, label_space,
          raw: dict[str, np.ndarray], num_prompts: int | None = None) -> dict[str, Any]:
  """Metrics of one model's images asked for (prompt [N], y [N, T]) whose true classes are
  y_true [N, T]: per task accuracy, macro-F1, per-class accuracy, confusion and per-cell
  accuracy [P, K]; joint accuracy and its per-cell table; per raw score v (LAION, JPEG kB,
  CLIP; [N] each): its mean `v`, `v_per_label` [K] and `cell_v` [P, K]."""
  out: dict[str, Any] = {"num_samples": int(len(y)), "tasks": {}}
  label = np.asarray(label_space.encode(jnp.asarray(y)))
  k = label_space.num_labels
  p = num_prompts or int(prompt.max()) + 1
  cell = prompt * k + label
  count = np.maximum(np.bincount(cell, minlength=p * k), 1)

  def per_cell(values) -> list:
    return (np.bincount(cell, np.asarray(values, np.float64), p * k) / count).reshape(p, k
                                                                                      ).tolist()

  for t, (name, kt) in enumerate(zip(label_space.task_names, label_space.task_classes)):
    out["tasks"][name] = {
        "accuracy": float((y_true[:, t] == y[:, t]).mean()),
        "macro_f1": float(sklearn.metrics.f1_score(y[:, t], y_true[:, t], average="macro",
                                                   labels=list(range(kt)))),
        "per_class_accuracy": [float((y_true[y[:, t] == j, t] == j).mean()) for j in range(kt)],
        "confusion": sklearn.metrics.confusion_matrix(y[:, t], y_true[:, t],
                                                      labels=list(range(kt))).tolist(),
        "cell_accuracy": per_cell(y_true[:, t] == y[:, t]),
    }
  correct = (y_true == y).all(-1)
  out["joint_accuracy"] = float(correct.mean())
  out["cell_accuracy"] = per_cell(correct)
  for name, v in raw.items():
    out[name] = float(np.mean(v))
    out[f"{name}_per_label"] = [float(v[label == j].mean()) for j in range(k)]
    out[f"cell_{name}"] = per_cell(v)
  return out


# ----------------------------------------------------------------------------- scoring


class Scorers:
  """Per-image scores of decoded images [B, 3, H, W] in [-1, 1]: "laion_score" (the LAION
  aesthetic predictor on CLIP ViT-L/14: the aesthetic ground truth, and for every task with
  config.eval.laion_score), "jpeg_kb" (JPEG size at the ground truth's quality) and
  "clip_score" (100 · max(cos, 0) of image and prompt, with config.eval.clip_model). The CLIP
  towers run jitted on fixed batches of `batch` images (the last one padded)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               truth: sd_stages.GroundTruth, sd, prompts: list[str], batch: int):
    from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top
    e = config.eval
    self.batch, self.jpeg_quality = batch, truth.jpeg_quality
    self._laion = self._clip = None
    models = truth.aesthetic_models
    if models is None and e.get("laion_score", True):
      # pylint: disable-next=protected-access
      models = sd_stages._load_aesthetic_truth(config.classifier, workdir, config.seed)
    if models is not None:
      clip_model, clip_params, mlp = models
      fn = jax.jit(lambda cp, mp, x: aesthetic.laion_score(clip_model, cp, mp, x))
      self._laion = lambda x: fn(clip_params, mlp, x)
    if e.get("clip_model"):
      from ctrl_jax.models import clip_score  # pylint: disable=g-import-not-at-top
      folder = e.clip_model
      if folder == "tiny":
        folder = sd_stages.tiny_aesthetic_models(workdir, config.seed)[0]
      scorer = clip_score.ClipScorer(folder)
      self._text = scorer.text_embedding(prompts, tokenizer=sd.tokenizer)  # [P, D]
      embed = jax.jit(lambda p, x: aesthetic.image_embedding(scorer.vision, p, x))
      self._clip = lambda x: embed(scorer.vision_params, x)

  def _batched(self, fn, images: np.ndarray) -> np.ndarray:
    out = []
    for s in range(0, len(images), self.batch):
      part = images[s:s + self.batch]
      padded = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), 0)])
      out.append(np.asarray(fn(jnp.asarray(padded)), np.float32)[:len(part)])
    return np.concatenate(out)

  def __call__(self, images: np.ndarray, images_uint8: np.ndarray,
               prompt: np.ndarray) -> dict[str, np.ndarray]:
    """Scores [B] of images [B, 3, H, W] in [-1, 1] (their uint8 [B, H, W, 3]) asked with
    prompts `prompt` int [B]."""
    out = {"jpeg_kb": compressibility.jpeg_size_kb(images_uint8, quality=self.jpeg_quality)}
    if self._laion is not None:
      out["laion_score"] = self._batched(self._laion, images)
    if self._clip is not None:
      emb = self._batched(self._clip, images)
      out["clip_score"] = 100.0 * np.maximum(np.sum(emb * self._text[prompt], -1), 0.0)
    return out


# ----------------------------------------------------------------------------- sampling


class ImageSink:
  """Where one model's images go as they come (process 0): PNG files (on a few threads, at most
  `max_pending` images in flight), the uint8 array file written as a stream, and the first
  `grid_samples` images of every (prompt, class) cell for the grids."""

  def __init__(self, out_dir: str, model: str, n: int, prompts: list[str], cells: list[str],
               per_cell: int, grid_samples: int, save_png: bool, max_pending: int = 256):
    self.out_dir, self.model, self.n = out_dir, model, n
    self.folders = [prompt_folder(i, p) for i, p in enumerate(prompts)]
    self.cells, self.per_cell, self.grid_samples = cells, per_cell, grid_samples
    self.save_png, self.max_pending = save_png, max_pending
    self.grid: np.ndarray | None = None  # uint8 [P, K, G, H, W, 3]
    self._array = None
    self._written = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(4) if save_png else None
    self._pending: collections.deque = collections.deque()

  def png_path(self, position: int) -> str:
    k = len(self.cells)
    p, rest = divmod(int(position), k * self.per_cell)
    label, i = divmod(rest, self.per_cell)
    return fs.join(self.out_dir, "images", self.model, self.folders[p],
                   f"{self.cells[label]}_{i:04d}.png")

  def add(self, images: np.ndarray, positions: np.ndarray) -> None:
    """uint8 [m, H, W, 3] of requests `positions` (consecutive, in order)."""
    if self._array is None:
      self._open_array(images.shape[1:])
    if len(positions) and positions[0] != self._written:
      raise RuntimeError(f"images arrived out of order ({positions[0]} after {self._written}).")
    self._array.write(np.ascontiguousarray(images, np.uint8).tobytes())
    self._written += len(images)
    k = len(self.cells)
    for img, pos in zip(images, positions):
      p, rest = divmod(int(pos), k * self.per_cell)
      label, i = divmod(rest, self.per_cell)
      if i < self.grid_samples:
        self.grid[p, label, i] = img
      if self._pool is not None:
        self._pending.append(self._pool.submit(_write_png, self.png_path(pos), img))
    while len(self._pending) > self.max_pending:
      self._pending.popleft().result()

  def _open_array(self, shape: tuple[int, ...]) -> None:
    h, w, ch = shape
    self.grid = np.full((len(self.folders), len(self.cells), self.grid_samples, h, w, ch), 255,
                        np.uint8)
    self._array = fs.open_file(fs.join(self.out_dir, f"images_{self.model}.npy"), "wb")
    np.lib.format.write_array_header_1_0(self._array, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
        "shape": (self.n, h, w, ch)})

  def close(self) -> None:
    while self._pending:
      self._pending.popleft().result()
    if self._pool is not None:
      self._pool.shutdown()
    if self._array is not None:
      self._array.close()
    if self._written != self.n:
      raise RuntimeError(f"{self.model}: {self._written} of {self.n} images written.")

  def grid_image(self) -> np.ndarray:
    """Rows = prompts, columns = classes × grid_samples: uint8 [H, W, 3]."""
    p, k, g = self.grid.shape[:3]
    return base.image_grid(self.grid.reshape((p * k * g,) + self.grid.shape[3:]), p, k * g)


def _write_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fs.save_image(path, Image.fromarray(image))


def evaluate_model(name: str, sampler, params, frozen: dict, prompt: np.ndarray, y: np.ndarray,
                   scorers: Scorers, sink: ImageSink | None, e: ml_collections.ConfigDict,
                   mesh) -> dict[str, np.ndarray]:
  """Samples every request from `params` chunk by chunk; each process scores its share, the
  shares are gathered per chunk and handed to `sink` (process 0; None on the others). Returns
  the per-image scores {"laion_score", "jpeg_kb", "clip_score"} [N] in request order."""
  n = len(prompt)
  kept = collections.defaultdict(list)
  for share, pos in generate.sample_chunks(sampler, params, frozen, prompt, y, e.seed,
                                           e.batch_size, name, mesh):
    u8 = compressibility.to_uint8(share)
    mine = {"images": u8, "pos": pos, **scorers(share, u8, prompt[pos % n])}
    got = generate.gather_shares(mine, pos, n)
    if sink is not None:
      sink.add(got.pop("images"), got["pos"])
    for k, v in got.items():
      if k != "images":
        kept[k].append(v)
  out = {k: np.concatenate(v) for k, v in kept.items()}
  if not np.array_equal(out.pop("pos"), np.arange(n)):
    raise RuntimeError(f"{name}: the gathered images do not cover the {n} requests.")
  return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(config: ml_collections.ConfigDict, workdir: str, problem: base.Problem,
             params: dict) -> dict[str, Any]:
  """Samples every (prompt, class) of config.eval from the fine-tuned `params` and the
  pre-trained model, scores them with the ground truths, writes DIR/eval/ (module docstring).

  Sampling is sharded over every device (all processes); each process scores its own share of
  each chunk, the shares are gathered (scores, uint8 images) and process 0 writes."""
  t0 = time.time()
  e = config.eval
  setup, sd, truth = problem.setup, problem.info["sd"], problem.info["truth"]
  ls = setup.label_space
  prompts = list(e.prompts)
  frozen = {**problem.frozen, "hparams": train.hparams_from_config(config),
            "contexts": jnp.asarray(sd_lib.encode_prompts(sd, prompts))}
  prompt, y = eval_requests(len(prompts), ls.num_labels, e.samples_per_class, ls)
  n, cells = len(prompt), cell_names(ls)
  mesh = shd.make_mesh()
  sampler = generate.make_sharded_sampler(setup, mesh)
  scorers = Scorers(config, workdir, truth, sd, prompts, int(e.get("score_batch", 32)))
  writes = multihost.is_main()
  out_dir = fs.join(workdir, "eval")
  results, per_image, grids = {}, {}, {}
  for name, p in zip(MODELS, (params, problem.params)):
    sink = (ImageSink(out_dir, name, n, prompts, cells, e.samples_per_class, e.grid_samples,
                      bool(e.get("save_png", True))) if writes else None)
    try:
      raw = evaluate_model(name, sampler, jax.device_get(p), frozen, prompt, y, scorers, sink,
                           e, mesh)
    finally:
      if sink is not None:
        sink.close()
    y_true = true_labels(truth, raw)
    per_image[name] = {"y_true": y_true, **raw}
    results[name] = score(y_true, prompt, y, ls, raw, len(prompts))
    if sink is not None:
      grids[name] = sink.grid_image()
  metrics = {**results,
             "task": config.task, "eval_prompts": prompts, "cells": cells,
             "samples_per_class": e.samples_per_class, "classifier": {
                 n: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, list))}
                 for n, v in problem.info["classifier"]["tasks"].items()},
             "eval_wall_time_s": time.time() - t0}
  summary = summary_table(metrics, ls.task_names)
  if writes:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    fs.save_npz(fs.join(out_dir, "samples.npz"), prompt=prompt, y=y,
                prompts=np.asarray(prompts), cells=np.asarray(cells),
                **{f"{k}_{name}": v for name, d in per_image.items() for k, v in d.items()})
    for name, grid in grids.items():
      fs.save_image(fs.join(out_dir, f"grid_{name}.png"), Image.fromarray(grid))
    pre, fine = grids["pretrained"], grids["finetuned"]
    both = np.concatenate([pre, np.zeros((pre.shape[0], 8, 3), np.uint8), fine], axis=1)
    fs.save_image(fs.join(out_dir, "grid.png"), Image.fromarray(both))
    fs.write_json(fs.join(out_dir, "metrics.json"), metrics)
    fs.write_text(fs.join(out_dir, "summary.md"), summary)
    print(summary, flush=True)
  multihost.barrier("eval written")
  return metrics


def summary_table(metrics: dict, task_names) -> str:
  """Markdown: per model the task accuracies / macro-F1, joint accuracy and mean scores; then
  per model the per-cell table (prompt × class) of joint accuracy and mean scores."""
  scores = [(k, title) for k, title in (("laion_score", "LAION"), ("clip_score", "CLIP score"),
                                        ("jpeg_kb", "JPEG kB"))
            if k in metrics["finetuned"]]
  head = (["model"] + [f"{t} {m}" for t in task_names for m in ("acc", "macro-F1")]
          + ["joint acc"] + [title for _, title in scores])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in ("pretrained", "finetuned"):
    m = metrics[name]
    vals = ([f"{m['tasks'][t][k]:.3f}" for t in task_names for k in ("accuracy", "macro_f1")]
            + [f"{m['joint_accuracy']:.3f}"] + [f"{m[k]:.2f}" for k, _ in scores])
    lines.append("| " + " | ".join([name] + vals) + " |")
  for name in ("pretrained", "finetuned"):
    m = metrics[name]
    lines += ["", f"**{name}** per cell: joint accuracy"
              + "".join(f" / {title}" for _, title in scores), "",
              "| prompt | " + " | ".join(metrics["cells"]) + " |",
              "|" + "---|" * (len(metrics["cells"]) + 1)]
    for p, prompt in enumerate(metrics["eval_prompts"]):
      row = [" / ".join([f"{m['cell_accuracy'][p][j]:.2f}"]
                        + [f"{m[f'cell_{k}'][p][j]:.2f}" for k, _ in scores])
             for j in range(len(metrics["cells"]))]
      lines.append(f"| {prompt} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
