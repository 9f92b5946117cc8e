"""The SD classifiers' offline data, prepared once and read back shard by shard.

`write_dataset` turns image files (folders, or a list of paths; local or URIs) into a dataset
folder (local or URI) of fixed-size shards holding what the classifiers are fitted on:

  shard-NNNNN.npz  index       int64 [n]            position of each image in the source list
                   embeddings  float32 [n, D]       aesthetic: L2-normalised CLIP image embedding
                   laion_score float32 [n]          aesthetic: the LAION predictor's score
                   jpeg_kb     float64 [n]          compress: JPEG size (kB) at jpeg_quality
                   images      uint8 [n, S, S, 3]   compress: the image the size is measured on
  manifest.json    source, settings, model file hashes, per-shard counts, skipped files

Every image is decoded (EXIF orientation applied), converted to RGB (alpha dropped, grey
replicated), centre-cropped to a square and resized to S² = image_size² (bicubic), as uint8; the
CLIP embedding and LAION score are computed on that image as the reward's ground truth scores a
generated S² image (`models.aesthetic.laion_score`), the JPEG size as `compressibility.jpeg_size_kb`
measures it. Shard k holds source files [k·shard_size, (k+1)·shard_size) that could be read, so
a shard is a function of its files alone: a killed run resumes at the first shard the manifest
does not list, and ends with the shards an uninterrupted run writes. Shards are written whole
(`fs.write_bytes`), the manifest after each one.

Readers (`read_columns`, `iter_shards`) hold one shard at a time; `fit_compressibility` fits the
compressibility CNN from shards, so memory does not grow with the dataset.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctrl_jax.core import calibration
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import progress

FORMAT = 1
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AESTHETIC_FIELDS = ("embeddings", "laion_score")
COMPRESS_FIELDS = ("jpeg_kb", "images")
# Files of a CLIP folder that `models.aesthetic.load_clip_vision` may read (hashed when present).
CLIP_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
              "model.fp16.safetensors", "model.safetensors.index.fp16.json",
              "flax_model.msgpack")
SKIPPED_LISTED = 100  # skipped files named in the manifest (all are counted)


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.npz"


# ----------------------------------------------------------------------------- sources


def list_sources(images: Sequence[str] = (), list_file: str = "") -> list[str]:
  """The image files to prepare, in order: every file with an image suffix
  (IMAGE_EXTENSIONS, any case) under each folder of `images` (recursive, sorted), then the
  lines of `list_file` (one path or URI per line; relative paths are relative to the list's
  folder; blank lines and lines starting with '#' ignored). Raises FileNotFoundError /
  ValueError naming the bad folder or file."""
  if not images and not list_file:
    raise ValueError("no images: give --images=FOLDER[,FOLDER…] or --list=FILE.")
  out = []
  for folder in images:
    if not fs.isdir(folder):
      raise FileNotFoundError(f"--images={folder!r} is not a folder.")
    found = [fs.join(folder, rel) for rel in fs.walk_files(folder)
             if rel.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
      raise FileNotFoundError(f"--images={folder!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files.")
    out += found
  if list_file:
    if not fs.exists(list_file):
      raise FileNotFoundError(f"--list={list_file!r} does not exist.")
    base = fs.dirname(list_file)
    for line in fs.read_text(list_file).splitlines():
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      absolute = fs.is_remote(line) or os.path.isabs(line) or line.startswith("file://")
      out.append(line if absolute else fs.join(base, line))
    if not out:
      raise ValueError(f"--list={list_file!r} names no files.")
  return out


def load_image(path: str, size: int) -> np.ndarray:
  """The image file `path` (local or URI) → uint8 [size, size, 3]: EXIF orientation applied,
  RGB, centre square crop, bicubic resize. Raises what reading or decoding raises."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(fs.read_bytes(path))) as image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":  # palette (maybe with transparency): through RGBA, as PIL advises
      image = image.convert("RGBA")
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.resize((size, size), Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side))
    return np.asarray(image, np.uint8)


def jpeg_kb(image: np.ndarray, quality: int) -> float:
  """PIL JPEG size of uint8 [H, W, 3] at `quality`, in kB (bytes / 1000), as
  `compressibility.jpeg_size_kb`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality)
  return buf.tell() / 1000.0


# Errors of an unreadable or undecodable file (PIL raises all of these for broken images).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError)


def _read_one(path: str, size: int, quality: Optional[int]):
  """(uint8 image, JPEG kB or None) of one file, or the error message when it cannot be read."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    image = load_image(path, size)
  except _READ_ERRORS + (Image.DecompressionBombError,) as e:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
  return image, (jpeg_kb(image, quality) if quality is not None else None)


# ----------------------------------------------------------------------------- model hashes


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with fs.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def model_hashes(clip_params, mlp_params, clip_folder: str, laion_path: str) -> dict:
  """What embeddings and scores are computed with: the sha256 of the CLIP tower's and the LAION
  MLP's parameter values (`multihost.digest`: equal for a `.pth` and its `.safetensors` copy;
  what fitting checks) and of the files they were read from (CLIP_FILES present)."""
  clip = {name: sha256_file(os.path.join(clip_folder, name)) for name in CLIP_FILES
          if os.path.exists(os.path.join(clip_folder, name))}
  return {"clip_params_sha256": multihost.digest(clip_params),
          "laion_params_sha256": multihost.digest(mlp_params),
          "clip_files": clip,
          "laion_files": {os.path.basename(laion_path): sha256_file(laion_path)}}


# ----------------------------------------------------------------------------- writing


def _scorer(clip_model, clip_params, mlp_params) -> Callable[[np.ndarray], tuple]:
  """uint8 images [B, S, S, 3] → (embeddings float32 [B, D], LAION scores float32 [B]),
  jitted once per batch shape."""
  from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top

  @jax.jit
  def score(clip_params, mlp_params, images):
    x = jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))
    emb = aesthetic.image_embedding(clip_model, clip_params, x)
    return emb, aesthetic.LaionMLP(1).apply({"params": mlp_params}, emb)[:, 0]

  return lambda images: score(clip_params, mlp_params, jnp.asarray(images))


def _padded_batches(images: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
  """(images[s:s + batch] zero-padded to `batch` rows, rows that are real) over `images`."""
  for s in range(0, len(images), batch):
    part = images[s:s + batch]
    n = len(part)
    if n < batch:
      part = np.concatenate([part, np.zeros((batch - n,) + part.shape[1:], part.dtype)])
    yield part, n


def write_dataset(sources: Sequence[str], out: str, *, fields: Sequence[str], image_size: int,
                  jpeg_quality: int, shard_size: int, batch: int, workers: int,
                  aesthetic_models: Optional[tuple] = None, model_files: Optional[dict] = None,
                  source_info: Optional[dict] = None, stop_after: Optional[int] = None) -> dict:
  """Prepares `sources` (image files) into the dataset folder `out` (see the module docstring);
  resumes where a previous run on the same `out` stopped. Returns the manifest.

  Args:
    fields: the shard arrays to compute: AESTHETIC_FIELDS and/or COMPRESS_FIELDS.
    image_size, jpeg_quality: S of the stored/scored images; JPEG quality of jpeg_kb.
    shard_size: source files per shard; batch: images per CLIP call (fixed, one compilation);
      workers: decoding threads.
    aesthetic_models: (CLIP model, CLIP params, LAION MLP params), needed for AESTHETIC_FIELDS;
      model_files: {"clip": folder, "laion": file} they were loaded from (hashed).
    source_info: what the sources are (folders, list file), recorded in the manifest.
    stop_after: stop after writing this many shards (None: all), as a killed run would.
  Raises ValueError when `out` holds a dataset prepared from other sources or settings.
  """
  fields = tuple(f for f in AESTHETIC_FIELDS + COMPRESS_FIELDS if f in fields)
  wants_aesthetic = any(f in fields for f in AESTHETIC_FIELDS)
  wants_compress = any(f in fields for f in COMPRESS_FIELDS)
  if wants_aesthetic and aesthetic_models is None:
    raise ValueError("the aesthetic fields need the CLIP tower and the LAION MLP.")
  num_shards = -(-len(sources) // shard_size)
  settings = {"format": FORMAT, "fields": list(fields), "image_size": int(image_size),
              "jpeg_quality": int(jpeg_quality) if wants_compress else None,
              "shard_size": int(shard_size), "num_files": len(sources),
              "files_sha256": hashlib.sha256("\n".join(sources).encode()).hexdigest(),
              "models": (model_hashes(aesthetic_models[1], aesthetic_models[2],
                                      model_files["clip"], model_files["laion"])
                         if wants_aesthetic else None)}
  manifest_path = fs.join(out, MANIFEST)
  manifest = fs.read_json(manifest_path) if fs.exists(manifest_path) else None
  if manifest is not None:
    diff = [f"{k}: there {manifest.get(k)!r} vs now {v!r}" for k, v in settings.items()
            if k != "models" and manifest.get(k) != v]
    if manifest.get("models") != settings["models"]:
      diff.append("models: other CLIP / LAION files")
    if diff:
      raise ValueError(f"--out={out!r} holds a dataset prepared from other images or settings "
                       f"({'; '.join(diff)}); use another --out or delete it.")
  else:
    manifest = {**settings, "source": source_info or {}, "shards": [], "count": 0,
                "skipped": 0, "skipped_files": [], "complete": False}
  for name in fs.listdir(out):  # a killed run's half-written shard (never renamed)
    if name.startswith("shard-") and ".tmp" in name:
      fs.remove(fs.join(out, name))
  done = {s["name"] for s in manifest["shards"] if fs.exists(fs.join(out, s["name"]))}
  manifest["shards"] = [s for s in manifest["shards"] if s["name"] in done]
  manifest["skipped_files"] = [s for s in manifest["skipped_files"]
                               if shard_name(s["index"] // shard_size) in done]
  todo = [i for i in range(num_shards) if shard_name(i) not in done]
  score = _scorer(*aesthetic_models) if wants_aesthetic else None
  quality = int(jpeg_quality) if wants_compress else None
  bar = progress.Progress("prepare_data", num_shards, start=num_shards - len(todo))
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

    def submit(i):  # decoding of shard i's files, in the pool
      paths = sources[i * shard_size:(i + 1) * shard_size]
      return [pool.submit(_read_one, p, image_size, quality) for p in paths]

    pending = submit(todo[0]) if todo else []
    for j, i in enumerate(todo[:stop_after] if stop_after is not None else todo):
      futures = pending
      pending = submit(todo[j + 1]) if j + 1 < len(todo) else []  # the next shard decodes now
      results = [f.result() for f in futures]
      keep = [k for k, r in enumerate(results) if not isinstance(r, str)]
      skipped = [{"index": i * shard_size + k, "file": sources[i * shard_size + k], "error": r}
                 for k, r in enumerate(results) if isinstance(r, str)]
      images = (np.stack([results[k][0] for k in keep]) if keep else
                np.zeros((0, image_size, image_size, 3), np.uint8))
      arrays = {"index": np.asarray([i * shard_size + k for k in keep], np.int64)}
      if wants_aesthetic:
        outs = [(score(part), n) for part, n in _padded_batches(images, batch)]  # async
        dim = aesthetic_models[0].config.projection_dim
        arrays["embeddings"] = np.concatenate(
            [np.asarray(o[0])[:n] for o, n in outs] or [np.zeros((0, dim), np.float32)])
        arrays["laion_score"] = np.concatenate(
            [np.asarray(o[1])[:n] for o, n in outs] or [np.zeros((0,), np.float32)])
      if wants_compress:
        arrays["jpeg_kb"] = np.asarray([results[k][1] for k in keep], np.float64)
        arrays["images"] = images
      fs.save_npz(fs.join(out, shard_name(i)), **arrays)
      manifest["shards"].append({"name": shard_name(i), "count": len(keep),
                                 "skipped": len(skipped)})
      manifest["shards"].sort(key=lambda s: s["name"])
      manifest["count"] = sum(s["count"] for s in manifest["shards"])
      manifest["skipped"] = sum(s["skipped"] for s in manifest["shards"])
      manifest["skipped_files"] = sorted(manifest["skipped_files"] + skipped,
                                         key=lambda s: s["index"])[:SKIPPED_LISTED]
      manifest["complete"] = len(manifest["shards"]) == num_shards
      fs.write_json(manifest_path, manifest)
      bar.update(len(manifest["shards"]), {"images": manifest["count"],
                                            "skipped": manifest["skipped"]})
    for f in pending:
      f.cancel()
  if manifest["complete"] and manifest["count"] == 0:
    raise ValueError(f"none of the {len(sources)} files could be read as an image (first: "
                     f"{manifest['skipped_files'][:1]}).")
  if not todo:
    manifest["complete"] = True
    fs.write_json(manifest_path, manifest)
  manifest["wall_time_s"] = time.time() - t0
  return manifest


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str, field: str = "config.classifier.data") -> dict:
  """The manifest of the prepared dataset `path`; ValueError / FileNotFoundError naming
  `field` unless it is a complete one."""
  manifest_path = fs.join(path, MANIFEST)
  if not fs.exists(manifest_path):
    raise FileNotFoundError(f"{field}={path!r} is not a prepared dataset (no {MANIFEST}); make "
                            "one with `python -m ctrl_jax.launch.prepare_data`.")
  manifest = fs.read_json(manifest_path)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{field}={path!r}: dataset format {manifest.get('format')!r}, expected "
                     f"{FORMAT}.")
  if not manifest.get("complete"):
    raise ValueError(f"{field}={path!r} is incomplete ({len(manifest['shards'])} shards of "
                     f"{-(-manifest['num_files'] // manifest['shard_size'])}); rerun "
                     "prepare_data with the same arguments to finish it.")
  return manifest


def iter_shards(path: str, manifest: dict, fields: Sequence[str],
                order: Optional[Sequence[int]] = None) -> Iterator[tuple[int, dict]]:
  """(shard position, {field: array}) of each non-empty shard, one in memory at a time, in
  manifest order or in `order` (positions)."""
  shards = manifest["shards"]
  for k in (range(len(shards)) if order is None else order):
    if shards[k]["count"] == 0:
      continue
    arrays = fs.load_npz(fs.join(path, shards[k]["name"]))
    yield k, {f: arrays[f] for f in fields}


def read_columns(path: str, manifest: dict, fields: Sequence[str]) -> dict[str, np.ndarray]:
  """The small per-image fields (index, embeddings, laion_score, jpeg_kb) of every shard,
  concatenated in dataset order; never `images`."""
  if "images" in fields:
    raise ValueError("read_columns does not load images; stream them with iter_shards.")
  parts = {f: [] for f in fields}
  for _, arrays in iter_shards(path, manifest, fields):
    for f in fields:
      parts[f].append(arrays[f])
  return {f: np.concatenate(v) for f, v in parts.items()}


# ----------------------------------------------------------------------------- fitting


def _float_images(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] → float32 [N, 3, H, W] in [-1, 1] (to_uint8's inverse)."""
  return np.asarray(images_uint8, np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def fit_compressibility(path: str, manifest: dict, labels: np.ndarray, num_classes: int,
                        seed: int, *, steps: int, batch: int, lr: float, calib_fraction: float,
                        width: int, input_size: int, arch: str) -> tuple[dict, dict]:
  """`compressibility.fit_classifier` on the prepared dataset `path`, one shard in memory at a
  time: labels int32 [N] in dataset order; the same seeded calibration split; minibatches of
  `batch` drawn from the shards in a seeded order (shards shuffled every pass, images shuffled
  within each shard, leftovers carried into the next shard's batches); logits of every image
  at T = 1 in fixed-size chunks, then `calibration.fit_temperature` on the held-back ones.
  Returns (variables, info) with fit_classifier's keys."""
  # pylint: disable=protected-access  (the compressibility CNN's own jitted step and apply)
  from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
  compressibility.check_arch(arch)
  labels = np.asarray(labels, np.int32)
  counts = np.asarray([s["count"] for s in manifest["shards"]])
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  if labels.shape != (counts.sum(),):
    raise ValueError(f"labels {labels.shape} vs {counts.sum()} images in {path!r}.")
  rng = np.random.default_rng(seed)
  cal, fit = calibration.calibration_split(rng, len(labels), calib_fraction)
  if not len(fit):
    raise ValueError(f"{path!r}: {len(labels)} images leave none to fit on besides the "
                     f"{len(cal)} held back for calibration.")
  is_fit = np.zeros(len(labels), bool)
  is_fit[fit] = True
  batch = min(batch, len(fit))
  resize_chunk = min(compressibility.EVAL_CHUNK, int(counts.max()))

  def prepared(images_uint8):  # "official": uint8 as stored; "resized": resized once, float
    if arch != "resized" or not len(images_uint8):
      return images_uint8
    resize = functools.partial(compressibility._resize_chunk, size=input_size)
    return np.concatenate([np.asarray(resize(jnp.asarray(_float_images(p))))[:n]
                           for p, n in _padded_batches(images_uint8,
                                                       min(resize_chunk, len(images_uint8)))])

  def model_input(x):  # a batch as the CNN takes it: float [B, 3, H, W] in [-1, 1]
    return jnp.asarray(_float_images(x) if x.dtype == np.uint8 else x)

  model = compressibility.CompressibilityCNN(num_classes, width=width, input_size=input_size,
                                             arch=arch)
  variables = compressibility.init_variables(model, seed)
  net = {k: v for k, v in variables["params"].items() if k != "temperature"}
  state = {"net": net, "batch_stats": variables["batch_stats"], "opt": optax.adam(lr).init(net)}
  loss, step = jnp.nan, 0
  carry_x, carry_y = None, None
  while step < steps:
    for k, arrays in iter_shards(path, manifest, ("images",), rng.permutation(len(counts))):
      rows = np.flatnonzero(is_fit[starts[k]:starts[k] + counts[k]])
      rows = rows[rng.permutation(len(rows))]
      x, y = prepared(arrays["images"][rows]), labels[starts[k] + rows]
      if carry_x is not None:
        x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
      s = 0
      while s + batch <= len(x) and step < steps:
        state, loss = compressibility._train_step(model, state, model_input(x[s:s + batch]),
                                                  jnp.asarray(y[s:s + batch]), lr=lr)
        s, step = s + batch, step + 1
      carry_x, carry_y = x[s:], y[s:]
      if step >= steps:
        break

  variables = {"params": {**state["net"], "temperature": jnp.ones((), jnp.float32)},
               "batch_stats": state["batch_stats"]}
  size = manifest["image_size"] if arch == "official" else input_size
  chunk = max(1, min(compressibility.EVAL_CHUNK, compressibility.EVAL_PIXELS // size ** 2,
                     int(counts.max())))
  logits = np.zeros((len(labels), num_classes), np.float32)
  for k, arrays in iter_shards(path, manifest, ("images",)):
    x = prepared(arrays["images"])
    logits[starts[k]:starts[k] + counts[k]] = np.concatenate(
        [np.asarray(compressibility._eval_chunk(model, variables, model_input(p)))[:n]
         for p, n in _padded_batches(x, chunk)])
  temperature, nll_before, nll_after = calibration.fit_temperature(logits[cal], labels[cal])
  variables["params"]["temperature"] = jnp.asarray(temperature, jnp.float32)
  z = logits[cal].astype(np.float64) / temperature
  probs_cal = np.exp(z - z.max(-1, keepdims=True))
  probs_cal /= probs_cal.sum(-1, keepdims=True)
  info = {"train_acc": float((logits[fit].argmax(-1) == labels[fit]).mean()),
          "calib_acc": float((logits[cal].argmax(-1) == labels[cal]).mean()),
          "temperature": temperature, "nll_before": nll_before, "nll_after": nll_after,
          "ece_after": calibration.expected_calibration_error(probs_cal, labels[cal]),
          "final_loss": float(loss), "num_train": int(len(fit)), "num_calib": int(len(cal))}
  return variables, info
