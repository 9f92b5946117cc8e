"""Tests of ctrl_jax.models.aesthetic: parity of the LAION MLP and the CLIP vision tower with
PyTorch (the references), the differentiable image path, the classifier head and the errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.models import aesthetic
from ctrl_jax.models import weights
from ctrl_jax.problems.sd import aesthetic as aesthetic_head

torch = pytest.importorskip("torch")


def _official_torch_mlp(input_dim: int = 768):
  """The exact nn.Sequential of the LAION predictor, with random (non-default) weights."""
  nn = torch.nn
  torch.manual_seed(0)
  mlp = nn.Sequential(nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                      nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                      nn.Linear(16, 1))
  with torch.no_grad():
    for p in mlp.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return mlp.eval()


class _Holder(torch.nn.Module):
  """Gives state-dict keys "layers.N.*" as the official MLP module (`self.layers`)."""

  def __init__(self, layers):
    super().__init__()
    self.layers = layers


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A tiny random PyTorch CLIPVisionModelWithProjection saved as safetensors, loaded back."""
  transformers = pytest.importorskip("transformers")
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, image_size=32, patch_size=8,
                                      projection_dim=16)
  torch.manual_seed(1)
  model = transformers.CLIPVisionModelWithProjection(cfg).eval()
  with torch.no_grad():  # layer norms are 1 / 0 at init: perturb everything
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp("clip"))
  model.save_pretrained(folder, safe_serialization=True)
  clip_model, clip_params = aesthetic.load_clip_vision(folder)
  return model, clip_model, clip_params


def test_laion_mlp_parity_pth_and_safetensors(tmp_path):
  mlp = _official_torch_mlp()
  state = _Holder(mlp).state_dict()
  assert sorted(state) == sorted(f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7)
                                 for w in ("weight", "bias"))
  pth = str(tmp_path / "x.pth")
  torch.save(state, pth)
  st = str(tmp_path / "x.safetensors")
  weights.write_safetensors(st, {k: v.numpy() for k, v in state.items()})
  x = np.random.default_rng(0).normal(size=(5, 768)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  with torch.no_grad():
    want = mlp(torch.from_numpy(x)).numpy()
  for path in (pth, st):
    params = aesthetic.load_laion_mlp_params(path)
    got = np.asarray(aesthetic.LaionMLP().apply({"params": params}, jnp.asarray(x)))
    assert got.shape == (5, 1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_laion_pth_converts_to_a_safetensors_copy_read_without_torch(tmp_path, capsys):
  """`python -m ctrl_jax.launch.convert_laion IN.pth OUT.safetensors` (its main) writes the
  copy, and a bad state dict fails in one line, exit 1, nothing written; a process where torch
  cannot be imported loads the copy to the same params as the `.pth`."""
  from ctrl_jax.launch import convert_laion  # pylint: disable=g-import-not-at-top
  state = _Holder(_official_torch_mlp()).state_dict()
  pth, out = str(tmp_path / "laion.pth"), str(tmp_path / "laion.safetensors")
  torch.save(state, pth)
  assert convert_laion.main(["convert_laion", pth, out]) == 0 and os.path.exists(out)
  code = ("import sys, numpy as np; sys.modules['torch'] = None\n"
          "from ctrl_jax.models import aesthetic\n"
          f"p = aesthetic.load_laion_mlp_params({out!r})\n"
          f"np.savez({str(tmp_path / 'p.npz')!r}, "
          "**{k + '/' + l: np.asarray(v) for k, d in p.items() for l, v in d.items()})")
  no_torch = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
  assert no_torch.returncode == 0, no_torch.stderr[-2000:]
  want = aesthetic.load_laion_mlp_params(pth)
  with np.load(tmp_path / "p.npz") as got:
    for k, d in want.items():
      for leaf, v in d.items():
        np.testing.assert_array_equal(got[f"{k}/{leaf}"], np.asarray(v))

  bad = dict(state)
  bad["extra.weight"] = bad.pop("layers.7.weight")
  torch.save(bad, str(tmp_path / "bad.pth"))
  capsys.readouterr()
  assert convert_laion.main(["convert_laion", str(tmp_path / "bad.pth"),
                             str(tmp_path / "bad.safetensors")]) == 1
  assert not os.path.exists(tmp_path / "bad.safetensors")
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "missing keys ['layers.7.weight']" in lines[0], lines
  assert convert_laion.main(["convert_laion", pth]) == 2


def test_laion_mlp_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    aesthetic.load_laion_mlp_params(str(tmp_path / "nope.pth"))
  state = {k: v.numpy() for k, v in _Holder(_official_torch_mlp(8)).state_dict().items()}
  state["extra.weight"] = state.pop("layers.7.weight")
  path = str(tmp_path / "bad.safetensors")
  weights.write_safetensors(path, state)
  with pytest.raises(ValueError, match=r"layers\.7\.weight.*extra\.weight"):
    aesthetic.load_laion_mlp_params(path)


def test_clip_vision_parity(tiny_clip):
  model, clip_model, clip_params = tiny_clip
  pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
  got = np.asarray(clip_model.apply({"params": clip_params}, jnp.asarray(pixels)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # The whole image path: [-1, 1] images at the model's size → CLIP normalisation → unit norm.
  images = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
  mean = np.asarray(aesthetic.CLIP_MEAN, np.float32)[:, None, None]
  std = np.asarray(aesthetic.CLIP_STD, np.float32)[:, None, None]
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(((images + 1) / 2 - mean) / std)).image_embeds
  ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
  emb = np.asarray(aesthetic.image_embedding(clip_model, clip_params, jnp.asarray(images)))
  np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=0)


def test_full_clip_model_folder(tmp_path):
  """A full CLIPModel folder (as openai/clip-vit-large-patch14 ships): text tower ignored,
  top-level projection_dim used."""
  transformers = pytest.importorskip("transformers")
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, image_size=16, patch_size=8)
  text = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=1, num_attention_heads=4,
              vocab_size=50, max_position_embeddings=8)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
  torch.manual_seed(2)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  clip_model, clip_params = aesthetic.load_clip_vision(str(tmp_path))
  pixels = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
  got = np.asarray(clip_model.apply({"params": clip_params}, jnp.asarray(pixels)))
  assert got.shape == (2, 12)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_clip_vision_errors(tmp_path, tiny_clip):
  with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
    aesthetic.load_clip_vision(str(tmp_path / "missing"))
  # Unused and missing tensors are named.
  model = tiny_clip[0]
  folder = tmp_path / "bad"
  model.config.save_pretrained(str(folder))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  sd["vision_model.extra.weight"] = sd.pop("visual_projection.weight")
  weights.write_safetensors(str(folder / "model.safetensors"), sd)
  with pytest.raises(ValueError, match=r"visual_projection\.weight.*vision_model\.extra"):
    aesthetic.load_clip_vision(str(folder))


def test_image_embedding_unit_norm_and_differentiable(tiny_clip):
  _, clip_model, clip_params = tiny_clip
  # 48×40 (not square, not the model size): exercises crop + resize.
  images = jnp.asarray(np.random.default_rng(2).uniform(-0.9, 0.9, size=(2, 3, 48, 40)),
                       jnp.float32)
  mlp_params = aesthetic.LaionMLP().init(jax.random.key(0), jnp.zeros((1, 16)))["params"]

  @jax.jit
  def embed_score_grad(x):
    emb = aesthetic.image_embedding(clip_model, clip_params, x)
    score = aesthetic.laion_score(clip_model, clip_params, mlp_params, x)
    grad = jax.grad(lambda x: aesthetic.laion_score(clip_model, clip_params, mlp_params,
                                                    x).sum())(x)
    return emb, score, grad

  emb, score, grad = embed_score_grad(images)
  assert emb.shape == (2, 16) and score.shape == (2,)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)
  assert grad.shape == images.shape
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
  labels = aesthetic.aesthetic_labels(jnp.asarray([5.69, 5.7, 6.0]))
  assert labels.dtype == jnp.int32 and labels.tolist() == [0, 1, 1]


def test_fit_head_and_classifier(tiny_clip):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(400, 16)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  labels = (emb @ rng.normal(size=16) > 0).astype(np.int32)
  kwargs = dict(epochs=15, batch=64)
  params, info = aesthetic_head.fit_head(emb, labels, seed=3, **kwargs)
  assert info["train_acc"] >= 0.9, info
  assert np.isfinite(info["temperature"]) and info["temperature"] > 0
  assert info["nll_after"] <= info["nll_before"] + 1e-12
  assert info["num_train"] + info["num_calib"] == 400
  params2, _ = aesthetic_head.fit_head(emb, labels, seed=3, **kwargs)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)

  _, clip_model, clip_params = tiny_clip
  apply = aesthetic.classifier_apply(clip_model)
  images = jnp.zeros((2, 3, 32, 32))
  logits = apply({"clip": clip_params, "head": params}, images)
  assert logits.shape == (2, 2) and np.isfinite(np.asarray(logits)).all()
  # The temperature divides the logits.
  doubled = apply({"clip": clip_params, "head": {**params, "temperature":
                                                 2 * params["temperature"]}}, images)
  np.testing.assert_allclose(np.asarray(doubled), np.asarray(logits) / 2, rtol=1e-5)


def test_load_embeddings_npz(tmp_path):
  path = str(tmp_path / "emb.npz")
  np.savez(path, embeddings=np.full((4, 3), 2.0, np.float32), scores=np.arange(4.0))
  emb, scores = aesthetic_head.load_embeddings_npz(path)
  assert emb.shape == (4, 3) and scores.shape == (4,) and scores.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    aesthetic_head.load_embeddings_npz(str(tmp_path / "nope.npz"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, emb=np.ones((4, 3)), scores=np.ones(4))
  with pytest.raises(ValueError, match=r"bad\.npz.*'embeddings'"):
    aesthetic_head.load_embeddings_npz(bad)
  shape = str(tmp_path / "shape.npz")
  np.savez(shape, embeddings=np.ones((4, 3)), scores=np.ones(5))
  with pytest.raises(ValueError, match=r"shape\.npz"):
    aesthetic_head.load_embeddings_npz(shape)
