"""Stable Diffusion components for CTRL: loading (Flax or PyTorch-safetensors folders, hub ids),
prompt encoding with the Flax CLIP text encoder, VAE decoding, SD1.5's UNet config, and a tiny
random SD folder (same format, same loading path) for tests and `:tiny` configs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from ctrl_jax.models import diffusers_export
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.models import weights

# What a hub download of Stable Diffusion fetches (`weights.resolve_folder`; fnmatch patterns as
# huggingface_hub matches them): exactly what `load_sd` opens, each component's config and
# float32 PyTorch safetensors (whole, or the shards its .index.json names) and the tokenizer's
# json + txt files; not the repository's .bin / .ckpt / .msgpack / .onnx / fp16 / non-EMA copies,
# single-file checkpoints, safety checker, feature extractor or scheduler (CTRL uses its own).
SD_FILES = ("unet/*.json", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model-?????-of-?????.safetensors",
            "vae/*.json", "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model-?????-of-?????.safetensors",
            "text_encoder/*.json", "text_encoder/model.safetensors",
            "text_encoder/model-?????-of-?????.safetensors",
            "tokenizer/*.json", "tokenizer/*.txt")


def sd15_unet_config() -> dict:
  """Stable Diffusion v1.5's UNet (860 M params), for benchmarks with random weights."""
  return dict(sample_size=64, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
              attention_head_dim=8, cross_attention_dim=768)


@dataclasses.dataclass
class SDComponents:
  """A loaded Stable Diffusion: Flax modules, float32 params, tokenizer, folder."""
  folder: str
  unet: Any
  unet_params: dict
  vae: Any
  vae_params: dict
  text_encoder: Any
  text_encoder_params: dict
  tokenizer: Any

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return (self.unet.in_channels, self.unet.sample_size, self.unet.sample_size)


def load_sd(path_or_hub_id: str, dtype: Any = jnp.float32) -> SDComponents:
  """Loads UNet, VAE, text encoder (Flax; `dtype` = activation dtype, params float32) and the
  tokenizer from a local diffusers folder or a hub id (network needed for the latter)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  folder = weights.resolve_folder(path_or_hub_id, SD_FILES)
  missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer")
             if not os.path.isdir(os.path.join(folder, s))]
  if missing:
    raise FileNotFoundError(
        f"pretrained_model={path_or_hub_id!r}: {folder!r} lacks {missing}; expected a diffusers "
        "Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/), e.g. "
        "`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "
        f"{' '.join(repr(p) for p in SD_FILES)} --local-dir DIR`.")
  unet, unet_params = weights.load_unet(folder, dtype=dtype)
  vae, vae_params = weights.load_vae(folder, dtype=dtype)
  te, te_params = weights.load_text_encoder(folder, dtype=dtype)
  tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  return SDComponents(folder, unet, unet_params, vae, vae_params, te, te_params, tok)


def encode_prompts(sd: SDComponents, prompts: Sequence[str], batch: int = 64) -> np.ndarray:
  """CLIP text-encoder hidden states of `prompts`: float32 [P, L, D] (L = tokenizer max length),
  computed once per prompt set."""
  ids = sd.tokenizer(list(prompts), padding="max_length", truncation=True,
                     max_length=sd.tokenizer.model_max_length, return_tensors="np").input_ids
  fn = jax.jit(lambda p, i: sd.text_encoder(i, params=p).last_hidden_state)
  out = [np.asarray(fn(sd.text_encoder_params, ids[s:s + batch]), np.float32)
         for s in range(0, len(ids), batch)]
  return np.concatenate(out)


def make_decode_fn(vae):
  """`decode(vae_params, latents [B, 4, h, w]) -> images [B, 3, 8h, 8w]` in [-1, 1] (clipped),
  latents in the UNet's scale (divided by the VAE's scaling factor before decoding)."""
  scale = float(vae.scaling_factor)

  def decode(vae_params, latents):
    x = vae.apply({"params": vae_params}, latents / scale, method=vae.decode).sample
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

  return decode


# ----------------------------------------------------------------------------- tiny random SD

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=32)
TINY_CLIP_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, projection_dim=16)


def write_tiny_tokenizer(folder: str, max_length: int = 16):
  """A character-level CLIP tokenizer built offline (no merges): vocab.json + merges.txt."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  chars = "abcdefghijklmnopqrstuvwxyz"
  tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                      model_max_length=max_length)
  tok.save_pretrained(folder)
  return tok


def write_tiny_sd(folder: str, seed: int = 0) -> str:
  """A tiny *random* SD1.5-shaped diffusers folder (latents 4×8×8 → images 3×16×16), written as
  PyTorch safetensors + json by our own exporter, so it is loaded by the real loading path.
  Idempotent: an existing complete folder is kept."""
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(folder, "model_index.json")):
    return folder
  key = jax.random.key(seed)
  unet = unet_lib.build_unet(unet_lib.tiny_unet_config(sample_size=8, in_channels=4,
                                                       cross_attention_dim=32))
  unet_params = unet_lib.init_unet_params(unet, jax.random.fold_in(key, 0))
  cfg = weights.flax_to_torch_config(unet, "UNet2DConditionModel")
  weights.save_torch_component(os.path.join(folder, "unet"), "unet", cfg,
                               jax.tree_util.tree_map(np.asarray, unet_params))
  vae = FlaxAutoencoderKL(**TINY_VAE)
  vae_params = unet_lib.jit_init(vae.init_weights)(jax.random.fold_in(key, 1))
  te = FlaxCLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT), seed=seed + 2)
  tok_dir = os.path.join(folder, "_tokenizer_src")
  write_tiny_tokenizer(tok_dir, TINY_CLIP_TEXT["max_position_embeddings"])
  diffusers_export.export_sd_components(
      folder, vae=vae, vae_params=vae_params, text_encoder=te, text_encoder_params=te.params,
      tokenizer_dir=tok_dir, scheduler_config=diffusers_export.ddim_scheduler_config(
          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tok_dir)
  return folder
