"""Tests of `ctrl_jax.problems.sd.compressibility`: JPEG-size ground truth and its bins, the
residual-CNN reward classifier in both architectures ("official" at full resolution, "resized")
(temperature, frozen BatchNorm, input gradients, what each one sees), its fit, and the
image-folder loader. Tiny CNNs (width 8, "resized" input 32) on 64×64 images; the JPEG tests use
real 512² encodings."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ctrl_jax.models.aesthetic import CLIP_MEAN
from ctrl_jax.models.aesthetic import CLIP_STD
from ctrl_jax.problems.sd import compressibility as comp
from ctrl_jax.problems.sd import stages


def _flat(n, size, value=0.0):
  return np.full((n, 3, size, size), value, np.float32)


def _noise(n, size, seed=0, amplitude=1.0):
  return np.random.default_rng(seed).uniform(-amplitude, amplitude,
                                             (n, 3, size, size)).astype(np.float32)


def test_to_uint8_rounds_and_clips():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32).reshape(1, 1, 1, 5)
  u = comp.to_uint8(jnp.asarray(np.broadcast_to(x, (1, 3, 1, 5))))
  assert u.shape == (1, 1, 5, 3) and u.dtype == np.uint8
  np.testing.assert_array_equal(u[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_jpeg_size_flat_much_smaller_than_noise():
  sizes = comp.jpeg_size_kb(comp.to_uint8(np.concatenate([_flat(1, 512), _noise(1, 512)])))
  assert sizes.dtype == np.float64 and sizes.shape == (2,)
  assert sizes[0] < 10.0 < 250.0 < sizes[1]


def test_jpeg_size_grows_with_noise_amplitude():
  images = np.concatenate([_noise(1, 512, seed=i, amplitude=a)
                           for i, a in enumerate((0.0, 0.02, 0.05, 0.1, 0.3))])
  sizes = comp.jpeg_size_kb(comp.to_uint8(images))
  assert np.all(np.diff(sizes) > 0), sizes
  assert np.all(np.diff(comp.labels_from_size(sizes, "compress4")) <= 0)


def test_labels_at_bin_edges():
  sizes = [0.0, 60.0, 60.001, 85.0, 85.5, 110.0, 110.5, 1e4]
  np.testing.assert_array_equal(comp.labels_from_size(sizes, "compress4"),
                                [3, 3, 2, 2, 1, 1, 0, 0])
  y2 = comp.labels_from_size(np.array([70.0, 70.1]), "compress2")
  np.testing.assert_array_equal(y2, [1, 0])
  assert y2.dtype == np.int32
  assert comp.NUM_CLASSES == {k: len(e) + 1 for k, e in comp.BIN_EDGES_KB.items()}


def test_unknown_task_names_the_choices():
  with pytest.raises(ValueError, match=r"'compress3'.*compress4.*compress2"):
    comp.labels_from_size([1.0], "compress3")


def test_true_labels_of_constructed_images():
  images = np.concatenate([_flat(1, 512, 0.3), _noise(1, 512)])
  np.testing.assert_array_equal(comp.true_labels(images, "compress4"), [3, 0])
  np.testing.assert_array_equal(comp.true_labels(images, "compress2"), [1, 0])


@pytest.fixture(scope="module", params=comp.CNN_ARCHS)
def tiny_cnn(request):
  """(model, variables with non-trivial running averages, images [4, 3, 64, 64], eval_fn), once
  per architecture.

  eval_fn(variables, images) → (logits, batch_stats after the call): the reward's mode
  (train=False) with batch_stats made mutable so a test can see that nothing changes. One
  jitted function for all the forward checks (compiles are the slow part on CPU).
  """
  model = comp.CompressibilityCNN(num_classes=3, width=8, input_size=32, arch=request.param)
  images = jnp.asarray(_noise(4, 64, seed=1))
  variables = comp.init_variables(model, seed=0)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  variables = {**variables, "batch_stats": updates["batch_stats"]}

  @jax.jit
  def eval_fn(variables, images):
    logits, updates = model.apply(variables, images, train=False, mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  return model, variables, images, eval_fn


def test_cnn_shape_and_temperature(tiny_cnn):
  _, variables, images, eval_fn = tiny_cnn
  logits, _ = eval_fn(variables, images)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  assert float(variables["params"]["temperature"]) == 1.0
  hot = {**variables, "params": {**variables["params"], "temperature": jnp.asarray(2.0)}}
  np.testing.assert_allclose(eval_fn(hot, images)[0], logits / 2.0, rtol=1e-6, atol=1e-7)


def test_cnn_eval_mode_is_frozen_and_deterministic(tiny_cnn):
  _, variables, images, eval_fn = tiny_cnn
  logits, batch_stats = eval_fn(variables, images)
  jax.tree.map(np.testing.assert_array_equal, batch_stats, variables["batch_stats"])
  np.testing.assert_array_equal(eval_fn(variables, images)[0], logits)
  # Running averages, not batch statistics: an image's logits do not depend on its batch mates.
  mixed = jnp.concatenate([images[:2], jnp.zeros_like(images[2:])])
  np.testing.assert_allclose(eval_fn(variables, mixed)[0][:2], logits[:2], rtol=1e-5, atol=1e-6)


def test_cnn_gradient_wrt_images(tiny_cnn):
  model, variables, images, _ = tiny_cnn
  apply = comp.classifier_apply(model)
  grad = jax.jit(jax.grad(lambda x: jax.nn.log_softmax(apply(variables, x))[:, 0].sum()))(images)
  assert grad.shape == images.shape
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0.0


def _toy_problem(n=48, size=64, seed=0):
  """Flat images (random grey + faint noise) → class 1, strong noise → class 0, shuffled."""
  rng = np.random.default_rng(seed)
  y = rng.permutation(np.arange(n) % 2).astype(np.int32)
  grey = rng.uniform(-0.8, 0.8, (n, 1, 1, 1))
  amp = np.where(y[:, None, None, None] == 1, 0.02, rng.uniform(0.4, 1.0, (n, 1, 1, 1)))
  x = np.clip(grey + amp * rng.uniform(-1, 1, (n, 3, size, size)), -1, 1).astype(np.float32)
  return x, y


def test_fit_classifier_learns_and_is_deterministic():
  x, y = _toy_problem()
  kw = dict(steps=40, batch=16, lr=3e-3, width=8, input_size=32, arch="resized")
  variables, info = comp.fit_classifier(x, y, 2, seed=0, **kw)
  assert set(variables) == {"params", "batch_stats"}
  assert info["num_train"] + info["num_calib"] == len(x) and info["num_calib"] == 10
  assert info["train_acc"] >= 0.9 and info["calib_acc"] >= 0.9, info
  t = info["temperature"]
  assert np.isfinite(t) and t > 0 and float(variables["params"]["temperature"]) == \
      pytest.approx(t)
  assert info["nll_after"] <= info["nll_before"] + 1e-12 and 0.0 <= info["ece_after"] <= 1.0
  model = comp.CompressibilityCNN(2, width=8, input_size=32, arch="resized")
  # The module resizes 64² inputs itself: predictions on the raw images match the fit.
  logits = jax.jit(comp.classifier_apply(model))(variables, x)
  acc = (np.asarray(logits).argmax(-1) == y).mean()
  assert acc >= 0.9
  again, _ = comp.fit_classifier(x, y, 2, seed=0, **kw)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_fit_classifier_rejects_bad_labels():
  x = _flat(4, 16)
  with pytest.raises(ValueError, match=r"\(4, 3, 16, 16\).*\(3,\)"):
    comp.fit_classifier(x, np.zeros(3, np.int32), 2, seed=0)
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    comp.fit_classifier(x, np.array([0, 1, 2, 0]), 2, seed=0)


def _official_param_count(width: int, num_classes: int) -> int:
  """Trainable parameters of the official ThreeLayerConvNet (CTRL compressibility_scorer.py):
  residual blocks 3→w (stride 1), w→2w, 2w→4w (stride 2), each conv3×3, conv3×3 and a conv1×1
  projection (no biases) with a BatchNorm (scale, bias) after each, then Linear(4w, classes)."""
  def block(cin, cout):
    return 9 * cin * cout + 9 * cout * cout + cin * cout + 3 * 2 * cout
  w = width
  return block(3, w) + block(w, 2 * w) + block(2 * w, 4 * w) + 4 * w * num_classes + num_classes


def test_official_cnn_has_the_official_layout():
  for width, classes in ((8, 3), (64, 4)):
    model = comp.CompressibilityCNN(classes, width=width, arch="official")
    params = jax.eval_shape(lambda: comp.init_variables(model, 0))["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert count == _official_param_count(width, classes) + 1  # + the temperature


def test_official_cnn_keeps_full_resolution():
  """The first block runs at the full 64² (the resized arch's at input_size / 2 = 16²), and a
  one-pixel checkerboard, which JPEG pays for and a 2× antialiased resize erases, moves the
  official logits but not the resized ones."""
  images = jnp.asarray(_noise(2, 64, seed=3, amplitude=0.5))
  checker = jnp.asarray((np.indices((64, 64)).sum(0) % 2 * 0.6 - 0.3).astype(np.float32))
  change = {}
  for arch, first_block_side in (("official", 64), ("resized", 16)):
    model = comp.CompressibilityCNN(3, width=8, input_size=32, arch=arch)
    variables = comp.init_variables(model, seed=0)
    apply = jax.jit(lambda v, x, model=model: model.apply(v, x, capture_intermediates=True))
    logits, state = apply(variables, images)
    first = state["intermediates"]["_ResidualBlock_0"]["__call__"][0]
    assert first.shape == (2, first_block_side, first_block_side, 8)
    change[arch] = float(jnp.abs(apply(variables, images + checker)[0] - logits).max())
    # Not invariant to the image: two different images give different logits.
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4
  assert change["official"] > 1e-2 and change["official"] > 100 * change["resized"], change


def test_clip_normalise_matches_the_official_input():
  x = jnp.asarray(np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32)).reshape(1, 1, 1, 5)
  out = np.asarray(comp.clip_normalise(jnp.broadcast_to(x, (1, 3, 1, 5))))[0, :, 0]
  for c in range(3):
    expected = (np.array([0.0, 0.0, 0.5, 1.0, 1.0]) - CLIP_MEAN[c]) / CLIP_STD[c]
    np.testing.assert_allclose(out[c], expected, rtol=1e-6)


def test_fit_official_cnn_on_tiny_data(tmp_path):
  """The :tiny SD configs' offline images (16², half gradients, half noise) with their real
  JPEG-size labels (median split): the full-resolution CNN learns them, is calibrated, and its
  reward form reproduces the fit on the raw images."""
  folder = stages.write_tiny_data(os.path.join(tmp_path, "tiny_data"), seed=0)
  x = comp.load_image_folder(folder, size=16)
  size_kb = comp.jpeg_size_kb(comp.to_uint8(x))
  y = stages.size_classes(size_kb, (float(np.median(size_kb)),))
  variables, info = comp.fit_classifier(x, y, 2, seed=0, steps=60, batch=16, lr=3e-3, width=8,
                                        arch="official")
  assert info["train_acc"] >= 0.9 and info["calib_acc"] >= 0.75, info
  assert np.isfinite(info["temperature"]) and info["nll_after"] <= info["nll_before"] + 1e-12
  model = comp.CompressibilityCNN(2, width=8, arch="official")
  logits = np.asarray(jax.jit(comp.classifier_apply(model))(variables, jnp.asarray(x)))
  assert (logits.argmax(-1) == y).mean() >= 0.85


def test_unknown_arch_is_refused():
  with pytest.raises(ValueError, match=r"arch='resize'.*'official', 'resized'"):
    comp.fit_classifier(_flat(4, 16), np.zeros(4, np.int32), 2, seed=0, arch="resize")


def test_load_image_folder_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  originals = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
  for i, name in enumerate(("b.png", "a.png", "c.PNG")):
    Image.fromarray(originals[i]).save(tmp_path / name)
  (tmp_path / "notes.txt").write_text("not an image")
  x = comp.load_image_folder(str(tmp_path), size=24)
  assert x.shape == (3, 3, 24, 24) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0
  np.testing.assert_array_equal(comp.to_uint8(x), originals[[1, 0, 2]])  # sorted by name
  assert comp.load_image_folder(str(tmp_path), size=8).shape == (3, 3, 8, 8)


def test_load_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no .*images"):
    comp.load_image_folder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="missing"):
    comp.load_image_folder(str(tmp_path / "missing"))
