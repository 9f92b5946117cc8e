"""CLIP score with our loader against PyTorch transformers' CLIPModel (tiny random model)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import transformers  # noqa: E402

from ctrl_jax.models import clip_score  # noqa: E402
from ctrl_jax.models import sd as sd_lib  # noqa: E402


def test_clip_score_matches_pytorch_clip(tmp_path):
  small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  cfg = transformers.CLIPConfig(text_config=dict(small, vocab_size=64, max_position_embeddings=16),
                                vision_config=dict(small, image_size=32, patch_size=8),
                                projection_dim=16)
  model = transformers.CLIPModel(cfg).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  model.save_pretrained(str(tmp_path / "clip"), safe_serialization=True)
  tok = sd_lib.write_tiny_tokenizer(str(tmp_path / "tok"), 16)
  scorer = clip_score.ClipScorer(str(tmp_path / "clip"))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
  prompts = ["cat", "dog", "cat"]
  ours = scorer.cosine(images, prompts, tokenizer=tok)
  ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
  mean = torch.tensor(clip_score.aesthetic.CLIP_MEAN)[:, None, None]
  std = torch.tensor(clip_score.aesthetic.CLIP_STD)[:, None, None]
  pixels = ((torch.from_numpy(images) + 1) / 2 - mean) / std
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)
  img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
  txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
  ref = (img * txt).sum(-1).numpy()
  print(f"\nCLIP cosine ours {ours} vs PyTorch {ref}")
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  np.testing.assert_allclose(scorer.score(images, prompts, tokenizer=tok),
                             100 * np.maximum(ref, 0), atol=1e-2)
