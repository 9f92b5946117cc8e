"""CTRL on Stable Diffusion: the classifier stage and the "sd" problem builder.

Tasks (config.task) and their label spaces (several tasks → one index, row-major):
  "aesthetic"        ("aesthetic",)             2 classes: LAION score ≥ threshold
  "compressibility"  ("compress4",)             4 classes of JPEG size (q 95): ≤60 / ≤85 / ≤110 kB
  "multitask"        ("aesthetic", "compress2") 2 × 2; label ℓ: aesthetic = ℓ // 2, compress = ℓ % 2

Stages in DIR: classifier/ (fitted p̂(y | x) per task name, `info.json` written last), then
CTRL (`ctrl_jax.experiment.finetune`). The classifiers' offline data is read from a dataset
folder made once by `prepare_data` (config.classifier.data; shards, `data.py`), or from the
`.npz` / image folders of config.classifier.aesthetic_data / compress_data. The `:tiny` configs use `pretrained_model="tiny"`: a random
SD-shaped folder and synthetic offline data written into DIR by the same code path.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctrl_jax.core import rewards
from ctrl_jax.core import schedules
from ctrl_jax.core import train
from ctrl_jax.models import augmented
from ctrl_jax.models import sd as sd_lib
from ctrl_jax.models import weights
from ctrl_jax.problems import base
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import stage

TASKS = {"aesthetic": (("aesthetic",), (2,)),
         "compressibility": (("compress4",), (4,)),
         "multitask": (("aesthetic", "compress2"), (2, 2))}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def label_space(task: str) -> rewards.LabelSpace:
  if task not in TASKS:
    raise ValueError(f"config.task={task!r}; expected one of {sorted(TASKS)}.")
  return rewards.LabelSpace(*TASKS[task])


def activation_dtype(config: ml_collections.ConfigDict):
  if config.activation_dtype not in DTYPES:
    raise ValueError(f"config.activation_dtype={config.activation_dtype!r}; expected one of "
                     f"{sorted(DTYPES)}.")
  return DTYPES[config.activation_dtype]


def _looks_local(path: str) -> bool:
  """A filesystem path rather than a hub id ("org/name")."""
  return path.startswith(("/", ".", "~")) or os.path.exists(path) or path.count("/") > 1


def validate(config: ml_collections.ConfigDict) -> None:
  """The SD fields of `config` (task, dtype, prompts, the weight and data paths it names),
  before any work; raises ValueError / FileNotFoundError naming the first bad field."""
  label_space(config.task)
  activation_dtype(config)
  if not config.prompts or not all(isinstance(p, str) for p in config.prompts):
    raise ValueError(f"config.prompts={config.prompts!r}: expected a non-empty tuple of strings.")
  model = config.pretrained_model
  if model != "tiny" and _looks_local(model) and not os.path.isdir(os.path.expanduser(model)):
    raise FileNotFoundError(f"config.pretrained_model={model!r} is not a folder (a local "
                            "diffusers folder, or a hub id such as "
                            "'stable-diffusion-v1-5/stable-diffusion-v1-5').")
  k = config.classifier
  if "aesthetic" in TASKS[config.task][0] and k.clip_model != "tiny":
    if not os.path.isfile(os.path.expanduser(k.laion_weights)):
      raise FileNotFoundError(
          f"config.classifier.laion_weights={k.laion_weights!r} is not a file; download "
          "`sac+logos+ava1-l14-linearMSE.pth` (LAION improved-aesthetic-predictor) and give its "
          "path (or a safetensors copy).")
  from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
  compressibility.check_arch(k.cnn_arch, "config.classifier.cnn_arch")
  for name in ("aesthetic_data", "compress_data"):
    path = k.get(name, "")
    if path and not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(f"config.classifier.{name}={path!r} does not exist.")
  if k.get("data", ""):
    dataset_manifest(config)
  for name, least in (("shard_size", 1), ("batch", 1), ("workers", 1)):
    value = k.prepare[name] if "prepare" in k else least
    if not (isinstance(value, int) and value >= least):
      raise ValueError(f"config.classifier.prepare.{name}={value!r}: expected an integer ≥ "
                       f"{least}.")
  for name in ("samples_per_class", "batch_size", "grid_samples"):
    value = config.eval[name]
    if not (isinstance(value, int) and value >= 1):
      raise ValueError(f"config.eval.{name}={value!r}: expected an integer ≥ 1.")


def tiny_folder(workdir: str, name: str, write: Callable[[str], Any]) -> str:
  """A local folder DIR/<name> made by `write(folder)` (idempotent: random tiny models and data
  of the `:tiny` configs, written by libraries that need a real folder). Process 0 writes it
  while the others wait. A remote workdir gets a local folder per process instead (the files
  are a function of the seed)."""
  local = fs.local_path(workdir)
  if local is None:
    folder = os.path.join(tempfile.gettempdir(), "ctrl_jax_tiny",
                          f"{hashlib.sha256(workdir.encode()).hexdigest()[:16]}"
                          f"-p{jax.process_index()}",
                          name)
    write(folder)
    return folder
  folder = os.path.join(local, name)
  multihost.main_first(f"write {name}", lambda: write(folder))
  return folder


def pretrained_folder(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The diffusers folder (or hub id) of the pre-trained model; "tiny" → DIR/tiny_sd."""
  if config.pretrained_model == "tiny":
    return tiny_folder(workdir, "tiny_sd", lambda f: sd_lib.write_tiny_sd(f, seed=config.seed))
  return config.pretrained_model


# ----------------------------------------------------------------------------- offline data


def write_tiny_data(folder: str, n: int = 64, size: int = 16, seed: int = 0) -> str:
  """Synthetic offline images for `:tiny` configs: half smooth gradients, half noise (so JPEG
  size and any random feature vary), as PNGs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(folder, "done")):
    return folder
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    amount = i / (n - 1)
    base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    img = (1 - amount) * base + amount * rng.uniform(0, 255, (size, size, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{i:04d}.png"))
  open(os.path.join(folder, "done"), "w").close()
  return folder


def tiny_aesthetic_models(workdir: str, seed: int) -> tuple[str, str]:
  """(CLIP folder, LAION MLP file) of the `:tiny` configs' random models, in DIR/tiny_aesthetic
  (`tiny_folder`)."""
  folder = tiny_folder(workdir, "tiny_aesthetic", lambda f: _write_tiny_aesthetic_models(f, seed))
  return os.path.join(folder, "clip"), os.path.join(folder, "laion_mlp.safetensors")


def _write_tiny_aesthetic_models(folder: str, seed: int) -> tuple[str, str]:
  """A random tiny CLIP (FlaxCLIPModel msgpack) + random LAION MLP (safetensors)."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  clip_dir = os.path.join(folder, "clip")
  mlp_path = os.path.join(folder, "laion_mlp.safetensors")
  if not os.path.exists(mlp_path):
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=64, max_position_embeddings=16),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    FlaxCLIPModel(cfg, seed=seed).save_pretrained(clip_dir)
    rng = np.random.default_rng(seed)
    dims = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    tensors = {}
    for idx, (d_in, d_out) in zip((0, 2, 4, 6, 7), dims):
      tensors[f"layers.{idx}.weight"] = rng.normal(0, d_in ** -0.5, (d_out, d_in))
      tensors[f"layers.{idx}.bias"] = np.zeros(d_out)
    tensors["layers.7.bias"] = np.full(1, 5.7)
    weights.write_safetensors(mlp_path, tensors)
  return clip_dir, mlp_path


# ----------------------------------------------------------------------------- prepared data


def dataset_fields(task: str) -> tuple[str, ...]:
  """The arrays of a prepared dataset (`data.write_dataset`) that `task`'s classifiers need."""
  from ctrl_jax.problems.sd import data  # pylint: disable=g-import-not-at-top
  names = TASKS[task][0]
  return ((data.AESTHETIC_FIELDS if "aesthetic" in names else ())
          + (data.COMPRESS_FIELDS if any(n.startswith("compress") for n in names) else ()))


def dataset_manifest(config: ml_collections.ConfigDict) -> dict:
  """The manifest of config.classifier.data, checked against the config: complete, holding
  the task's fields, prepared at config.classifier.image_size (and jpeg_quality); errors name
  the field."""
  from ctrl_jax.problems.sd import data  # pylint: disable=g-import-not-at-top
  k = config.classifier
  field = "config.classifier.data"
  manifest = data.read_manifest(k.data, field)
  need = dataset_fields(config.task)
  missing = [f for f in need if f not in manifest["fields"]]
  if missing:
    raise ValueError(f"{field}={k.data!r} lacks {missing} (has {manifest['fields']}), which "
                     f"task {config.task!r} needs; prepare it with this task's config.")
  checks = [("image_size", k.image_size)]
  if any(f in data.COMPRESS_FIELDS for f in need):
    checks.append(("jpeg_quality", k.jpeg_quality))
  for name, value in checks:
    if manifest[name] != value:
      raise ValueError(f"{field}={k.data!r} was prepared with {name} {manifest[name]}, not "
                       f"config.classifier.{name}={value}; prepare it again with this config.")
  return manifest


def prepare_data(config: ml_collections.ConfigDict, out: str, images=(), list_file: str = "",
                 stop_after=None) -> dict:
  """Prepares image files (folders `images`, or the paths listed in `list_file`) into the
  dataset folder `out` with what config.task's classifiers need (`data.write_dataset`): CLIP
  embeddings and LAION scores from config.classifier.clip_model / laion_weights, JPEG sizes at
  image_size² and jpeg_quality. Resumes a killed run. Multi-process: process 0 works, the others
  wait. Returns the manifest (None on the other processes)."""
  from ctrl_jax.problems.sd import data  # pylint: disable=g-import-not-at-top
  k = config.classifier
  fields = dataset_fields(config.task)
  sources = data.list_sources(tuple(images), list_file)

  def prepare():
    models, files = None, None
    if any(f in data.AESTHETIC_FIELDS for f in fields):
      # tiny: the random models written into `out`, the same bytes as a workdir's (seeded)
      folder, mlp_path = aesthetic_model_paths(k, out, config.seed)
      models, files = _load_aesthetic_truth(k, out, config.seed), {"clip": folder,
                                                                   "laion": mlp_path}
    manifest = data.write_dataset(
        sources, out, fields=fields, image_size=k.image_size, jpeg_quality=k.jpeg_quality,
        shard_size=k.prepare.shard_size, batch=k.prepare.batch, workers=k.prepare.workers,
        aesthetic_models=models, model_files=files, stop_after=stop_after,
        source_info={"images": list(images), "list": list_file,
                     "clip_model": k.clip_model if models else None,
                     "laion_weights": k.laion_weights if models else None})
    print(f"[prepare_data] {manifest['count']} images in {len(manifest['shards'])} shards "
          f"({manifest['skipped']} unreadable skipped) in {out}"
          + ("" if manifest["complete"] else " (incomplete: rerun to finish)"), flush=True)
    return manifest

  return multihost.main_first("prepare data", prepare)


# ----------------------------------------------------------------------------- classifiers


def _edges(values: np.ndarray, edges: tuple, num_classes: int) -> tuple[float, ...]:
  """Configured edges, or (empty config) the quantiles of the offline data."""
  if edges:
    return tuple(float(e) for e in edges)
  return tuple(float(q) for q in np.quantile(values, np.arange(1, num_classes) / num_classes))


def size_classes(size_kb: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
  """JPEG size → class: #{edges e : size ≤ e} (smaller file = higher class)."""
  size_kb = np.asarray(size_kb, np.float64)
  return np.sum(size_kb[..., None] <= np.asarray(edges, np.float64), axis=-1).astype(np.int32)


def _save_msgpack(path: str, tree) -> None:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  fs.write_bytes(path, serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, tree)))


def _load_msgpack(path: str):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(jnp.asarray, serialization.msgpack_restore(fs.read_bytes(path)))


def _classifier_config(config: ml_collections.ConfigDict) -> dict:
  """The classifier stage's config as JSON would store it (tuples → lists)."""
  import json  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in config.classifier.to_dict().items() if k != "prepare"}
  return json.loads(json.dumps({"task": config.task, "seed": config.seed, **fields}))


class GroundTruth:
  """The true labels (evaluation): LAION score ≥ threshold, JPEG-size bins."""

  def __init__(self, names, info: dict, aesthetic_models=None, jpeg_quality: int = 95,
               chunk: int = 64):
    self.chunk = chunk
    self.names = tuple(names)
    self.info = info
    self.aesthetic_models = aesthetic_models
    self.jpeg_quality = jpeg_quality

  def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
    from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
    out = {}
    if "aesthetic" in self.names:
      from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top
      clip_model, clip_params, mlp = self.aesthetic_models
      # in fixed-size chunks: memory does not grow with the number of images
      out["laion_score"] = np.concatenate([np.asarray(aesthetic.laion_score(
          clip_model, clip_params, mlp, jnp.asarray(images[s:s + self.chunk])))
                                           for s in range(0, len(images), self.chunk)])
    if any(n.startswith("compress") for n in self.names):
      out["jpeg_kb"] = compressibility.jpeg_size_kb(compressibility.to_uint8(images),
                                                    quality=self.jpeg_quality)
    return out

  def labels(self, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """images [N, 3, H, W] in [-1, 1] → (y int32 [N, T], raw scores)."""
    s = self.scores(images)
    cols = []
    for name in self.names:
      if name == "aesthetic":
        cols.append((s["laion_score"] >= self.info["aesthetic_threshold"]).astype(np.int32))
      else:
        cols.append(size_classes(s["jpeg_kb"], tuple(self.info["edges_kb"][name])))
    return np.stack(cols, -1), s


def aesthetic_model_paths(k: ml_collections.ConfigDict, workdir: str, seed: int
                          ) -> tuple[str, str]:
  """(local CLIP folder, LAION MLP file) of config.classifier `k` (hub ids downloaded, "tiny"
  written into `workdir`)."""
  clip_path, mlp_path = k.clip_model, k.laion_weights
  if clip_path == "tiny":
    clip_path, mlp_path = tiny_aesthetic_models(workdir, seed)
  return weights.resolve_folder(clip_path), mlp_path


def _load_aesthetic_truth(k: ml_collections.ConfigDict, workdir: str, seed: int):
  from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top
  clip_folder, mlp_path = aesthetic_model_paths(k, workdir, seed)
  clip_model, clip_params = aesthetic.load_clip_vision(clip_folder)
  if not os.path.exists(mlp_path):
    raise FileNotFoundError(
        f"config.classifier.laion_weights={mlp_path!r} does not exist; download "
        "`sac+logos+ava1-l14-linearMSE.pth` (LAION improved-aesthetic-predictor) and give its "
        "path (or a safetensors copy).")
  return clip_model, clip_params, aesthetic.load_laion_mlp_params(mlp_path)


def _offline_images(path: str, size: int, what: str) -> np.ndarray:
  from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
  if not path:
    raise ValueError(f"config.classifier.{what} is empty; give a folder of images.")
  return compressibility.load_image_folder(path, size=size)


def ensure_classifiers(config: ml_collections.ConfigDict, workdir: str):
  """Fits p̂(y_t | x) per task name unless DIR/classifier/info.json exists (a different
  classifier config is refused). Returns (applies, params per task, info, ground truth).

  Multi-process: process 0 fits and saves while the others wait; then every process (process 0
  too) loads the saved stage, so all hold the same bytes."""
  from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top
  k = config.classifier
  ls = label_space(config.task)
  stage_dir = fs.join(workdir, "classifier")
  info_path = fs.join(stage_dir, "info.json")
  wanted = _classifier_config(config)
  truth_models = None
  if "aesthetic" in ls.task_names:
    truth_models = _load_aesthetic_truth(k, workdir, config.seed)
  applies = []
  for name, n in zip(ls.task_names, ls.task_classes):
    if name == "aesthetic":
      applies.append(aesthetic.classifier_apply(truth_models[0]))
    else:
      applies.append(compressibility.classifier_apply(compressibility.CompressibilityCNN(
          n, width=k.cnn_width, input_size=k.cnn_input_size, arch=k.cnn_arch)))

  def fit_unless_done():  # process 0 only: the others wait, then read what it saved
    if fs.exists(info_path):
      print(f"[classifier] reusing {stage_dir}", flush=True)
    else:
      _fit_classifiers(config, workdir, truth_models, stage_dir)

  multihost.main_first("fit classifier", fit_unless_done)
  info = fs.read_json(info_path)
  # A stage saved without a cnn_arch field was fitted with the "resized" CNN.
  stage.check_same(info["config"], wanted, info_path, "config.classifier",
                   defaults={"cnn_arch": "resized", "data": ""})
  params = []
  for name in ls.task_names:
    saved = _load_msgpack(fs.join(stage_dir, f"{name}.msgpack"))
    # The CLIP tower is the (frozen) ground-truth one: not saved again with the head.
    params.append({"clip": truth_models[1], "head": saved} if name == "aesthetic" else saved)
  return applies, params, info, GroundTruth(ls.task_names, info, truth_models)


def _check_dataset_models(config: ml_collections.ConfigDict, truth_models,
                          manifest: dict) -> None:
  """Refuses a dataset whose embeddings and scores were computed with other CLIP / LAION
  weights than config.classifier's (the reward's ground truth), by their parameters' sha256."""
  k = config.classifier
  _, clip_params, mlp = truth_models
  for what, params in (("clip", clip_params), ("laion", mlp)):
    if multihost.digest(params) != manifest["models"][f"{what}_params_sha256"]:
      raise ValueError(f"config.classifier.data={k.data!r} was scored with other {what} weights "
                       f"than config.classifier.clip_model={k.clip_model!r} / laion_weights="
                       f"{k.laion_weights!r} (sha256 differ); prepare it again with these.")


def _fit_classifiers(config: ml_collections.ConfigDict, workdir: str, truth_models,
                     stage_dir: str) -> None:
  """Fits every task's classifier on the offline data; writes DIR/classifier/<task>.msgpack,
  then info.json (the stage's done mark)."""
  from ctrl_jax.problems.sd import compressibility  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import aesthetic  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from ctrl_jax.problems.sd import aesthetic as aesthetic_head
  from ctrl_jax.problems.sd import data  # pylint: disable=g-import-not-at-top
  k = config.classifier
  ls = label_space(config.task)
  t0 = time.time()
  data_size = k.image_size
  if config.pretrained_model == "tiny":
    tiny = tiny_folder(workdir, "tiny_data", lambda f: write_tiny_data(f, seed=config.seed))
    compress_dir = k.compress_data or tiny
    aesthetic_data = k.aesthetic_data or tiny
  else:
    compress_dir, aesthetic_data = k.compress_data, k.aesthetic_data
  info: dict[str, Any] = {"config": _classifier_config(config), "tasks": {}, "edges_kb": {}}
  manifest = dataset_manifest(config) if k.data else None
  if manifest is not None:
    info["data"] = {"count": manifest["count"], "skipped": manifest["skipped"],
                    "files_sha256": manifest["files_sha256"]}
  for t, (name, n) in enumerate(zip(ls.task_names, ls.task_classes)):
    if name == "aesthetic":
      clip_model, clip_params, mlp = truth_models
      if manifest is not None:  # embeddings [N, D] and scores [N]: small, kept whole
        _check_dataset_models(config, truth_models, manifest)
        columns = data.read_columns(k.data, manifest, ("embeddings", "laion_score"))
        emb, scores = columns["embeddings"], columns["laion_score"]
      elif aesthetic_data.endswith(".npz"):
        emb, scores = aesthetic_head.load_embeddings_npz(aesthetic_data)
      else:
        images = _offline_images(aesthetic_data, data_size, "aesthetic_data")
        emb = np.concatenate([np.asarray(aesthetic.image_embedding(
            clip_model, clip_params, jnp.asarray(images[s:s + 64])))
                              for s in range(0, len(images), 64)])
        scores = np.asarray(aesthetic.laion_score(clip_model, clip_params, mlp,
                                                  jnp.asarray(images)))
      thr = float(np.median(scores)) if k.aesthetic_threshold < 0 else k.aesthetic_threshold
      info["aesthetic_threshold"] = thr
      labels = (scores >= thr).astype(np.int32)
      head, fit = aesthetic_head.fit_head(emb, labels, config.seed + t, epochs=k.head_epochs,
                                          batch=k.head_batch, lr=k.head_lr,
                                          calib_fraction=k.calib_fraction)
      fit.update(class_counts=np.bincount(labels, minlength=2).tolist(),
                 score_mean=float(scores.mean()), score_std=float(scores.std()))
      _save_msgpack(fs.join(stage_dir, f"{name}.msgpack"), head)
    else:
      options = dict(steps=k.cnn_steps, batch=k.cnn_batch, lr=k.cnn_lr,
                     calib_fraction=k.calib_fraction, width=k.cnn_width,
                     input_size=k.cnn_input_size, arch=k.cnn_arch)
      if manifest is not None:  # one shard of images in memory at a time
        size_kb = data.read_columns(k.data, manifest, ("jpeg_kb",))["jpeg_kb"]
      else:
        images = _offline_images(compress_dir, data_size, "compress_data")
        size_kb = compressibility.jpeg_size_kb(compressibility.to_uint8(images),
                                               quality=k.jpeg_quality)
      edges = _edges(size_kb, tuple(k.get(f"{name}_edges_kb") or ()), n)
      info["edges_kb"][name] = list(edges)
      labels = size_classes(size_kb, edges)
      if manifest is not None:
        variables, fit = data.fit_compressibility(k.data, manifest, labels, n, config.seed + t,
                                                  **options)
      else:
        variables, fit = compressibility.fit_classifier(images, labels, n, config.seed + t,
                                                        **options)
      fit.update(class_counts=np.bincount(labels, minlength=n).tolist())
      _save_msgpack(fs.join(stage_dir, f"{name}.msgpack"), variables)
    info["tasks"][name] = fit
    print(f"[classifier] {name}: train acc {fit['train_acc']:.3f} calib acc "
          f"{fit['calib_acc']:.3f} T={fit['temperature']:.3g}", flush=True)
  info["wall_time_s"] = time.time() - t0
  fs.write_json(fs.join(stage_dir, "info.json"), info, sort_keys=True)


# ----------------------------------------------------------------------------- the problem


def build_problem(config: ml_collections.ConfigDict, workdir: str) -> base.Problem:
  """Loads SD, encodes the prompts once, fits / reuses the classifiers; the CTRL problem."""
  dtype = activation_dtype(config)
  sd = sd_lib.load_sd(pretrained_folder(config, workdir), dtype=dtype)
  applies, cls_params, cls_info, truth = ensure_classifiers(config, workdir)
  ls = label_space(config.task)
  weights_ = tuple(config.reward_weights) or (1.0,) * ls.num_tasks
  if len(weights_) != ls.num_tasks:
    raise ValueError(f"config.reward_weights={weights_}: need one per task {ls.task_names}.")
  model = augmented.AugmentedUNet(sd.unet, num_labels=ls.num_labels, lora_rank=config.lora_rank,
                                  **augmented.model_options(config))
  setup = train.CtrlSetup(
      model=model, label_space=ls, reward_fn=rewards.make_reward_fn(applies, weights_),
      decode_fn=sd_lib.make_decode_fn(sd.vae), latent_shape=sd.latent_shape,
      timesteps=schedules.ddim_timesteps(1000, config.num_inference_steps),
      **train.setup_options(config))
  contexts = sd_lib.encode_prompts(sd, list(config.prompts))
  uncond = sd_lib.encode_prompts(sd, [""])[0]
  frozen = {"unet": sd.unet_params, "reward": list(cls_params), "decoder": sd.vae_params,
            "contexts": jnp.asarray(contexts), "uncond_context": jnp.asarray(uncond),
            "schedule": schedules.make_schedule()}
  params = train.init_trainable(setup, jax.random.key(config.seed), sd.unet_params)
  return base.Problem(setup=setup, frozen=frozen, params=params,
                            num_prompts=len(config.prompts),
                            info={"classifier": cls_info, "sd": sd, "truth": truth})
