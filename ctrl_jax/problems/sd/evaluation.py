"""Evaluation of an SD CTRL run with the ground truths (true LAION score, true JPEG size).

Every (eval prompt, label) cell is sampled `samples_per_class` times from the fine-tuned and the
pre-trained model with the same seeds (paired noise); the true classes of the decoded images
are compared with the asked ones. Outputs in DIR/eval/: samples.npz (uint8 images
[N, H, W, 3]), metrics.json, summary.md, grid.png (rows = prompts, columns = classes; pre-trained | fine-tuned).
"""
from __future__ import annotations

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


def eval_requests(num_prompts: int, num_labels: int, per_cell: int, label_space
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt int32 [N], y int32 [N, T]): prompt-major, then label, `per_cell` each."""
  prompt = np.repeat(np.arange(num_prompts), num_labels * per_cell).astype(np.int32)
  label = np.tile(np.repeat(np.arange(num_labels), per_cell), num_prompts)
  return prompt, np.asarray(label_space.decode(jnp.asarray(label)), np.int32)


def score(y_true: np.ndarray, prompt: np.ndarray, y: np.ndarray, label_space,
          raw: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {"num_samples": int(len(y)), "tasks": {}}
  for t, (name, k) in enumerate(zip(label_space.task_names, label_space.task_classes)):
    out["tasks"][name] = {
        "accuracy": float((y_true[:, t] == y[:, t]).mean()),
        "macro_f1": float(sklearn.metrics.f1_score(y[:, t], y_true[:, t], average="macro",
                                                   labels=list(range(k)))),
        "per_class_accuracy": [float((y_true[y[:, t] == j, t] == j).mean()) for j in range(k)],
        "confusion": sklearn.metrics.confusion_matrix(y[:, t], y_true[:, t],
                                                      labels=list(range(k))).tolist(),
    }
  correct = (y_true == y).all(-1)
  out["joint_accuracy"] = float(correct.mean())
  label = np.asarray(label_space.encode(jnp.asarray(y)))
  k = label_space.num_labels
  p = int(prompt.max()) + 1
  cell = prompt * k + label
  out["cell_accuracy"] = (np.bincount(cell, correct, p * k) /
                          np.maximum(np.bincount(cell, minlength=p * k), 1)).reshape(p, k).tolist()
  for name, v in raw.items():
    out[f"mean_{name}_per_label"] = [float(v[label == j].mean()) for j in range(k)]
  return out


def save_grid(path: str, images: np.ndarray, images_pre: np.ndarray, prompt: np.ndarray,
              label: np.ndarray, num_prompts: int, num_labels: int, per_cell: int) -> None:
  """Rows = prompts, columns = labels (each `per_cell` samples); pre-trained | fine-tuned.
  images: uint8 [N, H, W, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def tile(imgs):
    h, w = imgs.shape[1:3]
    canvas = np.full((num_prompts * (h + 2), num_labels * per_cell * (w + 2), 3), 255, np.uint8)
    count = {}
    for img, p, l in zip(imgs, prompt, label):
      i = count.get((p, l), 0)
      if i >= per_cell:
        continue
      count[(p, l)] = i + 1
      r, col = p * (h + 2), (l * per_cell + i) * (w + 2)
      canvas[r:r + h, col:col + w] = img
    return canvas

  pre = tile(images_pre)
  both = np.concatenate([pre, np.zeros((pre.shape[0], 8, 3), np.uint8), tile(images)], axis=1)
  fs.save_image(path, Image.fromarray(both))


def evaluate(config: ml_collections.ConfigDict, workdir: str, problem: base.Problem,
             params: dict) -> dict[str, Any]:
  """Samples every (prompt, class) of config.eval from the fine-tuned `params` and the
  pre-trained model, labels them with the ground truths, writes DIR/eval/.

  Sampling is sharded over every device (all processes); each process labels and CLIP-scores
  its own share, the shares are gathered (labels, scores, uint8 images) and process 0 writes."""
  t0 = time.time()
  e = config.eval
  setup, sd, truth = problem.setup, problem.info["sd"], problem.info["truth"]
  ls = setup.label_space
  frozen = {**problem.frozen, "hparams": train.hparams_from_config(config),
            "contexts": jnp.asarray(sd_lib.encode_prompts(sd, list(e.prompts)))}
  prompt, y = eval_requests(len(e.prompts), ls.num_labels, e.samples_per_class, ls)
  label = np.asarray(ls.encode(jnp.asarray(y)))
  n = len(prompt)
  mesh = shd.make_mesh()
  sampler = generate.make_sharded_sampler(setup, mesh)
  scorer = None
  if e.get("clip_model"):
    from ctrl_jax.models import clip_score  # pylint: disable=g-import-not-at-top
    folder = e.clip_model
    if folder == "tiny":
      folder = sd_stages.tiny_aesthetic_models(workdir, config.seed)[0]
    scorer = clip_score.ClipScorer(folder)
  results, images = {}, {}
  for name, p in (("finetuned", params), ("pretrained", problem.params)):
    share, pos = generate.sample_shares(sampler, jax.device_get(p), frozen, prompt, y, e.seed,
                                        e.batch_size, name, mesh)
    y_true, raw = truth.labels(share)
    mine = {"y_true": y_true, "raw": raw,
            "images": compressibility.to_uint8(share)}
    if scorer is not None:
      mine["clip"] = scorer.score(share, [e.prompts[i] for i in prompt[pos % n]],
                                  tokenizer=sd.tokenizer)
    got = generate.gather_shares(mine, pos, n)
    images[name] = got["images"]
    results[name] = score(got["y_true"], prompt, y, ls, got["raw"])
    if scorer is not None:
      results[name]["clip_score"] = float(got["clip"].mean())
      results[name]["clip_score_per_label"] = [float(got["clip"][label == j].mean())
                                               for j in range(ls.num_labels)]
  metrics = {**results,
             "task": config.task, "eval_prompts": list(e.prompts),
             "samples_per_class": e.samples_per_class, "classifier": {
                 n: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, list))}
                 for n, v in problem.info["classifier"]["tasks"].items()},
             "eval_wall_time_s": time.time() - t0}
  lines = ["| model | " + " | ".join(f"{n} acc | {n} macro-F1" for n in ls.task_names) +
           " | joint | CLIP score |", "|---" * (2 * ls.num_tasks + 3) + "|"]
  for name in ("pretrained", "finetuned"):
    m = results[name]
    lines.append(f"| {name} | " + " | ".join(
        f"{m['tasks'][n]['accuracy']:.3f} | {m['tasks'][n]['macro_f1']:.3f}"
        for n in ls.task_names) + f" | {m['joint_accuracy']:.3f} | "
        f"{m.get('clip_score', float('nan')):.2f} |")
  if multihost.is_main():
    out_dir = fs.join(workdir, "eval")
    # uint8 [N, H, W, 3] (a quarter of float32's size), as the images' PNGs would store them
    fs.save_npz(fs.join(out_dir, "samples.npz"), images=images["finetuned"],
                images_pretrained=images["pretrained"], prompt=prompt, y=y,
                prompts=np.asarray(list(e.prompts)))
    save_grid(fs.join(out_dir, "grid.png"), images["finetuned"], images["pretrained"],
              prompt, label, len(e.prompts), ls.num_labels, e.grid_samples)
    fs.write_json(fs.join(out_dir, "metrics.json"), metrics)
    fs.write_text(fs.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
  multihost.barrier("eval written")
  return metrics
