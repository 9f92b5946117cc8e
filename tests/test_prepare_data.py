"""prepare_data on a folder of real-format images (PNG and JPEG of mixed sizes, RGB / RGBA / L,
one corrupt file): counts, shard contents against a direct computation, resume after a kill,
the launcher; then the SD classifiers fitted from the shards, CTRL and the evaluation, on the
tiny random models of the `:tiny` configs."""
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ctrl_jax import experiment
from ctrl_jax.models import aesthetic
from ctrl_jax.problems import base
from ctrl_jax.problems.sd import data
from ctrl_jax.problems.sd import stages
from ctrl_jax.runtime import fs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import multitask as multitask_config  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_IMAGES = 30  # readable ones, plus one corrupt file


def write_images(folder: str, n: int = NUM_IMAGES, seed: int = 0) -> dict[str, str]:
  """n images of random sizes (12–47 px a side), modes RGB / RGBA / L in turn, PNG or JPEG (RGBA
  always PNG), a few in a subfolder; smooth to noisy so JPEG sizes spread; plus `corrupt.jpg`
  (a JPEG cut short) and a non-image file. Returns {relative path: mode} of the images."""
  rng = np.random.default_rng(seed)
  out = {}
  for i in range(n):
    w, h = (int(v) for v in rng.integers(12, 48, 2))
    amount = i / (n - 1)
    smooth = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 4))
    pixels = (1 - amount) * np.broadcast_to(smooth, (h, w, 4)) + amount * rng.uniform(
        0, 255, (h, w, 4))
    mode = ("RGB", "RGBA", "L")[i % 3]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA").convert(mode)
    ext = "png" if mode == "RGBA" or i % 2 else "jpg"
    rel = os.path.join("sub" if i % 5 == 0 else "", f"{i:03d}.{ext}")
    os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
    image.save(os.path.join(folder, rel))
    out[rel] = mode
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
  with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) // 3])
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image\n")
  return out


def _config():
  c = multitask_config.get_config("tiny")
  c.classifier.prepare.shard_size = 8  # 31 files: shards of 8, 8, 8, 7
  c.classifier.prepare.batch = 4       # the last shard: 6 readable, CLIP on 4 + 2 padded to 4
  return c


def _shards(out: str, manifest: dict) -> list[dict]:
  return [fs.load_npz(os.path.join(out, s["name"])) for s in manifest["shards"]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare")
  folder = str(root / "images")
  modes = write_images(folder)
  out = str(root / "dataset")
  manifest = stages.prepare_data(_config(), out, images=[folder])
  return folder, modes, out, manifest


def test_manifest_counts_and_shards_match_a_direct_computation(prepared):
  folder, modes, out, manifest = prepared
  c = _config()
  sources = data.list_sources([folder])
  assert len(sources) == NUM_IMAGES + 1 and not any(s.endswith(".txt") for s in sources)
  assert manifest["complete"] and manifest["num_files"] == NUM_IMAGES + 1
  assert (manifest["count"], manifest["skipped"]) == (NUM_IMAGES, 1)
  assert [s["file"] for s in manifest["skipped_files"]] == [os.path.join(folder, "corrupt.jpg")]
  assert [s["count"] + s["skipped"] for s in manifest["shards"]] == [8, 8, 8, 7]
  assert manifest["fields"] == ["embeddings", "laion_score", "jpeg_kb", "images"]
  assert manifest["models"]["laion_files"] and manifest["models"]["clip_files"]
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["count"] == NUM_IMAGES

  shards = _shards(out, manifest)
  cols = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
  corrupt = sources.index(os.path.join(folder, "corrupt.jpg"))
  np.testing.assert_array_equal(cols["index"], [i for i in range(len(sources)) if i != corrupt])
  size = c.classifier.image_size
  assert cols["images"].shape == (NUM_IMAGES, size, size, 3) and cols["images"].dtype == np.uint8
  assert cols["embeddings"].shape == (NUM_IMAGES, 16)
  np.testing.assert_allclose(np.linalg.norm(cols["embeddings"], axis=-1), 1.0, rtol=1e-5)

  # One image of each mode, recomputed here: PIL RGB, centre square crop, bicubic resize;
  # JPEG size at the config's quality; LAION score by models.aesthetic on float images.
  picks = [next(i for i, s in enumerate(sources) if modes.get(os.path.relpath(s, folder)) == m)
           for m in ("RGB", "RGBA", "L")]
  expected = []
  for i in picks:
    with Image.open(sources[i]) as image:
      image = image.convert("RGB")
      w, h = image.size
      side = min(w, h)
      box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
      expected.append(np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box)))
  rows = [int(np.flatnonzero(cols["index"] == i)[0]) for i in picks]
  np.testing.assert_array_equal(cols["images"][rows], np.stack(expected))
  for row, image in zip(rows, expected):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=c.classifier.jpeg_quality)
    assert cols["jpeg_kb"][row] == buf.tell() / 1000
  clip_folder, mlp_path = stages.tiny_aesthetic_models(out, c.seed)
  clip_model, clip_params = aesthetic.load_clip_vision(clip_folder)
  mlp = aesthetic.load_laion_mlp_params(mlp_path)
  floats = jnp.asarray(np.stack(expected).transpose(0, 3, 1, 2) / 127.5 - 1.0, jnp.float32)
  np.testing.assert_allclose(cols["laion_score"][rows],
                             aesthetic.laion_score(clip_model, clip_params, mlp, floats),
                             rtol=1e-5, atol=1e-5)
  assert np.ptp(cols["jpeg_kb"]) > 0 and np.ptp(cols["laion_score"]) > 0


def test_a_killed_run_resumes_to_the_same_shards(prepared, tmp_path):
  folder, _, out, manifest = prepared
  c = _config()
  again = str(tmp_path / "dataset")
  first = stages.prepare_data(c, again, images=[folder], stop_after=2)
  assert not first["complete"] and [s["name"] for s in first["shards"]] == [
      data.shard_name(0), data.shard_name(1)]
  with pytest.raises(ValueError, match="incomplete"):
    data.read_manifest(again)
  # killed after writing shard 2 but before the manifest listed it, and inside shard 3's write
  with open(os.path.join(again, data.shard_name(2)), "wb") as f:
    f.write(b"stale")
  with open(os.path.join(again, data.shard_name(3) + ".tmp1234"), "wb") as f:
    f.write(b"half")
  resumed = stages.prepare_data(c, again, images=[folder])
  for key in ("complete", "count", "skipped", "skipped_files", "shards", "models"):
    assert resumed[key] == manifest[key], key
  assert sorted(os.listdir(again)) == sorted(os.listdir(out))
  for a, b in zip(_shards(again, resumed), _shards(out, manifest)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  c.classifier.image_size = 24
  with pytest.raises(ValueError, match=r"other images or settings \(image_size: there 16 vs "
                     r"now 24\)"):
    stages.prepare_data(c, again, images=[folder])


def test_a_dataset_folder_may_be_a_uri(prepared):
  folder, _, out, manifest = prepared
  remote = "memory://ctrl_jax_test_prepare/dataset"
  written = stages.prepare_data(_config(), remote, images=[folder])
  assert written["shards"] == manifest["shards"] and fs.exists(fs.join(remote, "manifest.json"))
  local = data.read_columns(out, manifest, ("index", "embeddings", "jpeg_kb"))
  for k, v in data.read_columns(remote, data.read_manifest(remote), tuple(local)).items():
    np.testing.assert_array_equal(v, local[k])
  fs.remove(remote)


def test_classifiers_ctrl_and_evaluation_from_the_prepared_data(prepared, tmp_path):
  _, _, out, manifest = prepared
  c = _config()
  c.classifier.data = out
  workdir = str(tmp_path / "run")
  _, _, info, _ = base.get("sd").fit_classifier(c, workdir)
  cols = data.read_columns(out, manifest, ("laion_score", "jpeg_kb"))
  assert info["data"]["count"] == NUM_IMAGES
  assert info["aesthetic_threshold"] == float(np.median(cols["laion_score"]))  # threshold -1
  assert info["edges_kb"]["compress2"] == [float(np.quantile(cols["jpeg_kb"], 0.5))]
  for name in ("aesthetic", "compress2"):
    fit = info["tasks"][name]
    assert fit["num_train"] + fit["num_calib"] == NUM_IMAGES and np.isfinite(fit["temperature"])

  c.num_updates = 2
  c.tb_image_every = 0     # no preview and no CLIP score: fewer compilations, same stages
  c.eval.clip_model = ""
  out_ft = experiment.finetune(c, workdir)
  losses = [h["loss"] for h in out_ft["history"]]
  assert len(losses) == 2 and np.isfinite(losses).all()
  metrics = experiment.evaluate(c, workdir, out_ft["params"])
  for model in ("finetuned", "pretrained"):
    assert set(metrics[model]["tasks"]) == {"aesthetic", "compress2"}
    assert np.isfinite(metrics[model]["laion_score"])
  assert os.path.exists(os.path.join(workdir, "eval", "metrics.json"))

  # A dataset scored with other weights than the config's (the tiny models of seed 1) is refused.
  other = _config()
  other.seed = 1
  other.classifier.data = out
  with pytest.raises(ValueError, match="scored with other clip weights"):
    base.get("sd").fit_classifier(other, str(tmp_path / "other"))


def test_launcher_prepares_and_bad_arguments_fail_in_one_line(prepared, tmp_path):
  folder, _, out, manifest = prepared
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "ctrl_jax.launch.prepare_data",
         f"--config={REPO}/configs/multitask.py:tiny", "--config.classifier.prepare.shard_size=8",
         "--config.classifier.prepare.batch=4"]
  dataset = str(tmp_path / "cli")
  run = subprocess.run(cmd + [f"--images={folder}", f"--out={dataset}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"[prepare_data] {NUM_IMAGES} images in 4 shards (1 unreadable skipped)" in run.stdout
  assert "[prepare_data] 4/4" in run.stdout and "ETA" in run.stdout  # progress per shard
  with open(os.path.join(dataset, "manifest.json")) as f:
    assert json.load(f)["shards"] == manifest["shards"]
  # Bad arguments: one line naming the flag (common.run prints the error as it is raised).
  with pytest.raises(FileNotFoundError, match=r"^--images='/no/such/folder' is not a folder\.$"):
    stages.prepare_data(_config(), str(tmp_path / "bad"), images=["/no/such/folder"])
  with pytest.raises(ValueError, match=r"^no images: give --images"):
    stages.prepare_data(_config(), str(tmp_path / "bad"))
