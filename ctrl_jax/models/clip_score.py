"""CLIP score of prompt vs image: 100 · max(cos(image embedding, text embedding), 0), with a
full CLIP model (both towers + projections; e.g. `openai/clip-vit-large-patch14`) loaded from a
PyTorch safetensors folder (our own mapping) or a FlaxCLIPModel msgpack folder."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.models import aesthetic
from ctrl_jax.models import convert
from ctrl_jax.models import weights


class ClipScorer:
  """Both CLIP towers, ready to score (images [B, 3, H, W] in [-1, 1], prompts)."""

  def __init__(self, folder: str):
    from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
    from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
    folder = weights.resolve_folder(folder, weights.CLIP_FILES)
    config = CLIPConfig.from_pretrained(folder)
    self.vision, self.vision_params = aesthetic.load_clip_vision(folder)
    self.text = FlaxCLIPTextModel(config.text_config, _do_init=False)
    abstract = jax.eval_shape(lambda k: self.text.init_weights(
        k, (1, config.text_config.max_position_embeddings)), jax.random.key(0))
    torch_file = weights.find_torch_weights(folder, "text_encoder")
    if torch_file is not None:
      sd = weights.read_safetensors(torch_file)
      if "text_projection.weight" not in sd:
        raise ValueError(f"{torch_file}: no text_projection.weight; a full CLIPModel is needed "
                         "for the CLIP score.")
      self.projection = np.asarray(sd["text_projection.weight"]).T
      text_sd = {k: v for k, v in sd.items() if k.startswith("text_model.")}
      self.text_params = convert.from_torch_state_dict(text_sd, abstract, "text_encoder",
                                                       source=torch_file)
    else:
      from flax import serialization  # pylint: disable=g-import-not-at-top
      with open(os.path.join(folder, "flax_model.msgpack"), "rb") as f:
        tree = serialization.msgpack_restore(f.read())
      self.text_params = {"text_model": tree["text_model"]}
      self.projection = np.asarray(tree["text_projection"]["kernel"])
    tok_dir = folder if os.path.exists(os.path.join(folder, "vocab.json")) else None
    self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if tok_dir else None
    self.max_length = config.text_config.max_position_embeddings

  def text_embedding(self, prompts: Sequence[str], tokenizer: Any = None) -> np.ndarray:
    tok = tokenizer or self.tokenizer
    if tok is None:
      raise ValueError("the CLIP folder has no tokenizer files; pass tokenizer=.")
    ids = tok(list(prompts), padding="max_length", truncation=True,
              max_length=min(self.max_length, tok.model_max_length), return_tensors="np").input_ids
    pooled = self.text(ids, params=self.text_params).pooler_output
    emb = np.asarray(pooled, np.float32) @ self.projection
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def score(self, images, prompts: Sequence[str], tokenizer: Any = None,
            batch: int = 32) -> np.ndarray:
    """CLIP score [N] of images [N, 3, H, W] in [-1, 1] vs their prompts [N]."""
    return 100.0 * np.maximum(self.cosine(images, prompts, tokenizer, batch), 0.0)

  def cosine(self, images, prompts: Sequence[str], tokenizer: Any = None,
             batch: int = 32) -> np.ndarray:
    """cos(image embedding, text embedding) [N]."""
    unique = sorted(set(prompts))
    text = dict(zip(unique, self.text_embedding(unique, tokenizer)))
    fn = jax.jit(lambda p, x: aesthetic.image_embedding(self.vision, p, x))
    img = np.concatenate([np.asarray(fn(self.vision_params, jnp.asarray(images[s:s + batch])))
                          for s in range(0, len(images), batch)])
    return np.sum(img * np.stack([text[p] for p in prompts]), axis=-1)
