"""The JPEG-compressibility tasks: ground-truth labels from PIL JPEG sizes, and the reward
classifier p̂(y | x), a small residual CNN with temperature calibration, in one of two
architectures (CNN_ARCHS): "official" (the image at full resolution, stride-1 first block, as the
official CTRL `train_reward_cnn.py`) or "resized" (the image resized to input_size² first).

Ground truth (docs/method.md §6): size = len(JPEG(image, quality 95)) / 1000 in kB, of the
512×512 RGB image as uint8.
  "compress4": class 3 if size ≤ 60, 2 if 60 < size ≤ 85, 1 if 85 < size ≤ 110, 0 if > 110.
  "compress2" (multi-task): class 1 iff size ≤ 70.
Smaller file = higher class in both. Images are float [N, 3, H, W] in [-1, 1] (NCHW, as the VAE
decodes them) unless a function says uint8 [N, H, W, 3].
"""
from __future__ import annotations

import functools
import io
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from ctrl_jax.core import calibration
from ctrl_jax.models.aesthetic import CLIP_MEAN
from ctrl_jax.models.aesthetic import CLIP_STD

JPEG_QUALITY = 95
# Increasing size edges in kB; a size equal to an edge goes to the smaller-file (higher) class.
BIN_EDGES_KB = {"compress4": (60.0, 85.0, 110.0), "compress2": (70.0,)}
NUM_CLASSES = {"compress4": 4, "compress2": 2}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
EVAL_CHUNK = 256  # images per jitted call when resizing / evaluating a whole set
# Pixels per jitted evaluation call: at 512² (the "official" CNN on full-size images) a chunk of
# 256 would hold ~17 GB per activation, so chunks shrink to keep this many pixels (256 · 128²).
EVAL_PIXELS = EVAL_CHUNK * 128 * 128
CNN_ARCHS = ("official", "resized")


def _check_task(task: str) -> None:
  if task not in BIN_EDGES_KB:
    raise ValueError(f"unknown compressibility task {task!r}; expected one of "
                     f"{tuple(BIN_EDGES_KB)}.")


# ----------------------------------------------------------------------------------------------
# Ground truth.


def to_uint8(images) -> np.ndarray:
  """float [N, 3, H, W] in [-1, 1] (numpy or jax) → uint8 numpy [N, H, W, 3].

  Pixel = round((x + 1) / 2 · 255), clipped to [0, 255].
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[1] != 3:
    raise ValueError(f"need images [N, 3, H, W]; got shape {x.shape}.")
  u = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def jpeg_size_kb(images_uint8: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
  """PIL JPEG size at `quality` (PIL's other defaults) in kB = bytes / 1000.

  images_uint8 [N, H, W, 3] → float64 [N].
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
    raise ValueError("need uint8 images [N, H, W, 3]; got "
                     f"{images_uint8.dtype} {images_uint8.shape}.")
  sizes = np.empty(len(images_uint8), np.float64)
  for i, image in enumerate(images_uint8):
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality)
    sizes[i] = buf.tell() / 1000.0
  return sizes


def labels_from_size(size_kb, task: str) -> np.ndarray:
  """JPEG sizes in kB [N] → class int32 [N] of `task` ("compress4" or "compress2").

  class = (K − 1) − #{edges e : size > e}: the smallest files get the highest class.
  """
  _check_task(task)
  size = np.asarray(size_kb, np.float64)
  above = sum((size > e).astype(np.int32) for e in BIN_EDGES_KB[task])
  return (NUM_CLASSES[task] - 1 - above).astype(np.int32)


def true_labels(images, task: str) -> np.ndarray:
  """images [N, 3, H, W] in [-1, 1] → ground-truth class int32 [N] of `task`."""
  _check_task(task)
  return labels_from_size(jpeg_size_kb(to_uint8(images)), task)


# ----------------------------------------------------------------------------------------------
# Reward classifier p̂(y | x).


def resize_images(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, C, H, W] → [B, C, size, size] by jax.image.resize "linear" (antialiased when shrinking).

  The identity when H = W = size, so images resized once in advance go through the module
  unchanged (fit_classifier relies on this).
  """
  if images.shape[-2:] == (size, size):
    return images
  return jax.image.resize(images, images.shape[:-2] + (size, size), "linear")


class _ResidualBlock(nn.Module):
  """conv3×3 (stride s)-BN-relu-conv3×3-BN + skip, then relu. The skip is BN(conv1×1 stride s)
  when the stride or the channel count changes, else the identity.

  x [B, H, W, C] → [B, ⌈H/s⌉, ⌈W/s⌉, features].
  """
  features: int
  strides: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype)
    s = (self.strides, self.strides)
    h = nn.Conv(self.features, (3, 3), strides=s, use_bias=False, dtype=self.dtype)(x)
    h = nn.relu(norm()(h))
    h = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(h)
    h = norm()(h)
    skip = x
    if self.strides != 1 or x.shape[-1] != self.features:
      skip = nn.Conv(self.features, (1, 1), strides=s, use_bias=False, dtype=self.dtype)(x)
      skip = norm()(skip)
    return nn.relu(h + skip)


def clip_normalise(images: jnp.ndarray) -> jnp.ndarray:
  """[B, 3, H, W] in [-1, 1] → clip to [0, 1] → (x − CLIP_MEAN) / CLIP_STD per channel: the
  official classifier's input (it was trained on CLIP-normalised images; pixels outside
  [-1, 1] are clipped, as the JPEG ground truth clips them, and carry no gradient)."""
  x = jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)
  mean = jnp.asarray(CLIP_MEAN, x.dtype)[:, None, None]
  std = jnp.asarray(CLIP_STD, x.dtype)[:, None, None]
  return (x - mean) / std


class CompressibilityCNN(nn.Module):
  """The compressibility classifier, images [B, 3, H, W] in [-1, 1] → calibrated logits float32
  [B, num_classes]; differentiable in the images.

  arch "official": CLIP-normalise (clip_normalise) → 3 residual blocks at full resolution
    (width·1 channels stride 1, width·2 stride 2, width·4 stride 2; width 64 is the official
    64/128/256) → global average pool → Dense. Any H, W; the first convolution sees every
    pixel, which is where JPEG size lives (fine texture, noise).
  arch "resized": resize to input_size² (resize_images) → stem conv-BN-relu → 3 residual
    blocks (width·1, 2, 4 channels, each stride 2) → global average pool → Dense. Cheaper by
    (H / input_size)² but blind to detail finer than the resize keeps.

  params["params"]["temperature"] (scalar, init 1) divides the logits: calibration sets it,
  the optimiser never touches it. train=False (the reward) normalises with the BatchNorm
  running averages and updates nothing; train=True uses batch statistics and needs
  mutable=["batch_stats"]. input_size is unused by "official".
  """
  num_classes: int
  width: int = 64
  input_size: int = 128
  arch: str = "official"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    check_arch(self.arch)
    if self.arch == "official":
      x = jnp.transpose(clip_normalise(images), (0, 2, 3, 1)).astype(self.dtype)  # → NHWC
      strides = (1, 2, 2)
    else:
      x = resize_images(images, self.input_size)
      x = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)  # NCHW → NHWC
      x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      x = nn.relu(x)
      strides = (2, 2, 2)
    for i, s in enumerate(strides):
      x = _ResidualBlock(self.width * 2 ** i, strides=s, dtype=self.dtype)(x, train)
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))
    temperature = self.param("temperature", nn.initializers.ones, ())
    return logits.astype(jnp.float32) / temperature


def check_arch(arch: str, field: str = "arch") -> None:
  """ValueError naming `field` unless arch is one of CNN_ARCHS."""
  if arch not in CNN_ARCHS:
    raise ValueError(f"{field}={arch!r}; expected one of {CNN_ARCHS}.")


def init_variables(model: CompressibilityCNN, seed: int) -> dict:
  """Fresh {"params", "batch_stats"} of `model`, deterministic for a seed.

  Initialised on input_size² images for "resized" and on 16² images for "official" (whose
  parameters do not depend on the image size; a 512² init would only cost compile time).
  Drawn with the "rbg" PRNG: XLA:CPU takes ~20 s to compile the default (partitionable
  threefry) initialisers of this module on a busy 2-core machine and ~4 s for "rbg".
  """
  size = model.input_size if model.arch == "resized" else 16
  images = jnp.zeros((1, 3, size, size), jnp.float32)
  return _init(model, jax.random.key(seed, impl="rbg"), images)


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, key, images):
  return model.init(key, images, train=False)


def classifier_apply(module: nn.Module) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """The reward's form of the classifier: apply(variables, images) → calibrated logits.

  BatchNorm in inference mode (running averages, frozen during RL).
  """

  def apply(variables, images):
    return module.apply(variables, images, train=False)

  return apply


@functools.partial(jax.jit, static_argnames=("size",))
def _resize_chunk(images, *, size):
  return resize_images(images, size)


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_chunk(model, variables, images):
  return model.apply(variables, images, train=False)


def _map_in_chunks(fn: Callable[[jnp.ndarray], jnp.ndarray], images: np.ndarray,
                   chunk: int) -> np.ndarray:
  """fn over images [N, ...] in chunks of min(chunk, N), the last one zero-padded (one compile)."""
  chunk = min(chunk, len(images))
  out = []
  for start in range(0, len(images), chunk):
    part = images[start:start + chunk]
    n = len(part)
    if n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(fn(jnp.asarray(part)))[:n])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("model", "lr"))
def _train_step(model, state, images, labels, *, lr):
  """One Adam step on the mean cross-entropy of a batch, BatchNorm in train mode.

  state = {"net": params without the temperature, "batch_stats", "opt"}; the temperature is
  held at 1. images [B, 3, S, S], labels [B]. Returns (state, loss).
  """
  opt = optax.adam(lr)

  def loss_fn(net):
    variables = {"params": {**net, "temperature": jnp.ones((), jnp.float32)},
                 "batch_stats": state["batch_stats"]}
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["net"])
  updates, opt_state = opt.update(grads, state["opt"], state["net"])
  return {"net": optax.apply_updates(state["net"], updates), "batch_stats": batch_stats,
          "opt": opt_state}, loss


def fit_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, *,
                   steps: int = 1000, batch: int = 64, lr: float = 1e-3,
                   calib_fraction: float = 0.2, width: int = 64, input_size: int = 128,
                   arch: str = "official") -> tuple[dict, dict]:
  """Fits CompressibilityCNN(num_classes, width, input_size, arch) on (images [N, 3, H, W] in
  [-1, 1], labels int32 [N] in [0, num_classes)).

  A seeded permutation holds back round(calib_fraction · N) pairs for calibration. "official"
  trains on the images as given; "resized" resizes them to input_size² once (the module's own
  resize is then the identity, so this is the same function the reward applies). Adam
  minimises cross-entropy on the rest in seeded minibatches (consecutive shuffled epochs) with
  BatchNorm in train mode; then
  `calibration.fit_temperature` on the held-back logits at T = 1 sets params["params"]
  ["temperature"]. Deterministic for a given seed.

  Returns (variables {"params", "batch_stats"} for the module's apply, info) with info keys
  train_acc, calib_acc (at the fitted T, argmax is unchanged by T), temperature, nll_before /
  nll_after (mean calibration NLL at T = 1 / at T), ece_after (calibration set, at T),
  final_loss (last minibatch), num_train, num_calib.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  if images.ndim != 4 or images.shape[1] != 3 or labels.ndim != 1 \
     or images.shape[0] != labels.shape[0]:
    raise ValueError(f"need images [N, 3, H, W] and labels [N]; got images {images.shape}, "
                     f"labels {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes
                      or not np.all(labels == np.round(labels))):
    raise ValueError(f"labels {labels.shape} must be integers in [0, {num_classes}); got range "
                     f"[{labels.min()}, {labels.max()}].")
  check_arch(arch)
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(seed)
  cal, fit = calibration.calibration_split(rng, len(images), calib_fraction)
  n_cal = len(cal)
  perm = np.concatenate([cal, fit])

  if arch == "resized":
    images = _map_in_chunks(functools.partial(_resize_chunk, size=input_size), images,
                            EVAL_CHUNK)
  eval_chunk = max(1, min(EVAL_CHUNK, EVAL_PIXELS // (images.shape[2] * images.shape[3])))
  model = CompressibilityCNN(num_classes, width=width, input_size=input_size, arch=arch)
  variables = init_variables(model, seed)
  net = {k: v for k, v in variables["params"].items() if k != "temperature"}
  state = {"net": net, "batch_stats": variables["batch_stats"], "opt": optax.adam(lr).init(net)}
  loss = jnp.nan
  for idx in calibration.batch_indices(rng, len(fit), steps, batch):
    chosen = fit[idx]
    state, loss = _train_step(model, state, jnp.asarray(images[chosen]),
                              jnp.asarray(labels[chosen]), lr=lr)

  variables = {"params": {**state["net"], "temperature": jnp.ones((), jnp.float32)},
               "batch_stats": state["batch_stats"]}
  logits = _map_in_chunks(functools.partial(_eval_chunk, model, variables), images[perm],
                          eval_chunk)  # at T = 1
  logits_cal, logits_fit = logits[:n_cal], logits[n_cal:]
  temperature, nll_before, nll_after = calibration.fit_temperature(logits_cal, labels[cal])
  variables["params"]["temperature"] = jnp.asarray(temperature, jnp.float32)
  z = logits_cal.astype(np.float64) / temperature
  probs_cal = np.exp(z - z.max(-1, keepdims=True))
  probs_cal /= probs_cal.sum(-1, keepdims=True)
  info = {"train_acc": float((logits_fit.argmax(-1) == labels[fit]).mean()),
          "calib_acc": float((logits_cal.argmax(-1) == labels[cal]).mean()),
          "temperature": temperature, "nll_before": nll_before, "nll_after": nll_after,
          "ece_after": calibration.expected_calibration_error(probs_cal, labels[cal]),
          "final_loss": float(loss), "num_train": int(len(fit)), "num_calib": int(n_cal)}
  return variables, info


# ----------------------------------------------------------------------------------------------
# Data.


def load_image_folder(path: str, size: int = 512) -> np.ndarray:
  """*.png / *.jpg / *.jpeg / *.webp in `path` (not recursive), sorted by file name, as RGB
  resized to size×size (bicubic) → float32 [N, 3, size, size] in [-1, 1]."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"image folder {path!r} does not exist.")
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {path!r}.")
  out = np.empty((len(names), 3, size, size), np.float32)
  for i, name in enumerate(names):
    with Image.open(os.path.join(path, name)) as image:
      image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
      out[i] = np.asarray(image, np.float32).transpose(2, 0, 1)
  return out / 127.5 - 1.0
