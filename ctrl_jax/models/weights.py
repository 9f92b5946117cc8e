"""Reading and writing diffusers-format folders: Flax msgpack or PyTorch safetensors in, PyTorch
safetensors + json out. No pickle anywhere and no torch needed.

A component folder (`unet/`, `vae/`, `text_encoder/`) holds `config.json` and the weights as
  * `diffusion_flax_model.msgpack` / `flax_model.msgpack` (Flax), or
  * `diffusion_pytorch_model.safetensors` / `model.safetensors` (PyTorch), possibly sharded with
    an `.index.json`, possibly with a `.fp16` variant. Those are mapped to our Flax models by
    `convert.from_torch_state_dict` (every tensor accounted for).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from ctrl_jax.models import convert
from ctrl_jax.runtime import stage
from diffusers import FlaxAutoencoderKL
from diffusers import FlaxUNet2DConditionModel

# Per component: (Flax weights file, PyTorch safetensors file).
WEIGHT_FILES = {
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("flax_model.msgpack", "model.safetensors"),
}

# What a hub download fetches (`resolve_folder`'s huggingface_hub allow_patterns, fnmatch against
# the repository's paths): only the files the loaders open, in the one weight format they read
# first (PyTorch safetensors, whole or sharded), never the .bin / .msgpack / .h5 / .onnx / fp16
# copies of the same weights. A CLIP folder (`openai/clip-vit-large-patch14`: aesthetic.py's
# vision tower, clip_score.py's two towers and slow CLIPTokenizer):
CLIP_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
              "model-?????-of-?????.safetensors", "vocab.json", "merges.txt",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# PyTorch-only UNet / VAE config fields and the value diffusers' Flax models implicitly use: a
# PyTorch config with another value describes a model the Flax classes cannot represent.
_FLAX_IMPLICIT = {
    "unet": dict(center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1,
                 act_fn="silu", norm_num_groups=32, norm_eps=1e-5, encoder_hid_dim=None,
                 encoder_hid_dim_type=None, dual_cross_attention=False, class_embed_type=None,
                 num_class_embeds=None, resnet_time_scale_shift="default",
                 resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
                 time_embedding_type="positional", time_embedding_dim=None,
                 time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
                 conv_in_kernel=3, conv_out_kernel=3, attention_type="default",
                 class_embeddings_concat=False, mid_block_only_cross_attention=None,
                 cross_attention_norm=None, reverse_transformer_layers_per_block=None),
    "vae": dict(shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                use_post_quant_conv=True, mid_block_add_attention=True),
}
_FLAX_ONLY_FIELDS = ("dtype", "parent", "name", "use_memory_efficient_attention",
                     "split_head_dim")


def read_json(path: str) -> Any:
  return stage.read_json(path)


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON with sorted keys (diffusers' config files)."""
  stage.write_json(path, obj, sort_keys=True)


def write_safetensors(path: str, tensors: dict[str, Any],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """float32 numpy arrays → a safetensors file (written to a temp name, then renamed)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
  tmp = path + ".tmp"
  save_file(arrays, tmp, metadata=metadata)
  os.replace(tmp, path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file, or all shards named by a `*.safetensors.index.json`, as float32 numpy
  (bf16 / fp16 files included)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if path.endswith(".index.json"):
    index = read_json(path)
    shards = sorted(set(index["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return out
  out = {}
  # framework="flax" reads bf16 too (numpy has no bfloat16); arrays are converted to float32.
  try:
    with safe_open(path, framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key), np.float32)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (safetensors' own error types)
    raise ValueError(f"{path!r} is not a readable safetensors file ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}).") from e
  return out


def find_torch_weights(folder: str, component: str) -> Optional[str]:
  """The PyTorch safetensors file (or shard index) of a component folder, or None."""
  base = WEIGHT_FILES[component][1]
  stem = base[:-len(".safetensors")]
  for name in (base, f"{base}.index.json", f"{stem}.fp16.safetensors",
               f"{stem}.safetensors.index.fp16.json", f"{stem}.fp16.safetensors.index.json"):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def _flax_kwargs(module_cls, config: dict, component: str, source: str) -> dict:
  fields = {f.name for f in dataclasses.fields(module_cls)} - set(_FLAX_ONLY_FIELDS)
  for key, implicit in _FLAX_IMPLICIT.get(component, {}).items():
    if key in config and config[key] != implicit and not (
        isinstance(implicit, float) and config[key] == implicit):
      raise ValueError(f"{source}: {key}={config[key]!r} is not supported by diffusers' Flax "
                       f"{module_cls.__name__} (it implies {key}={implicit!r}).")
  kwargs = {k: v for k, v in config.items() if k in fields}
  for k, v in kwargs.items():
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  return kwargs


def flax_to_torch_config(module, class_name: str, extra: Optional[dict] = None) -> dict:
  """diffusers config.json of the PyTorch class equivalent to a Flax module."""
  import diffusers  # pylint: disable=g-import-not-at-top
  cfg = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
         if f.name not in _FLAX_ONLY_FIELDS}
  cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
  cfg.update(extra or {})
  return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **cfg}


def resolve_folder(path_or_hub_id: str, allow_patterns: Sequence[str] = CLIP_FILES) -> str:
  """A local folder as is; otherwise a hub id, downloaded (needs network; cached by
  huggingface_hub, so once per machine) with only the files matching `allow_patterns`
  (`CLIP_FILES` by default, `sd.SD_FILES` for Stable Diffusion).

  Raises FileNotFoundError saying what to download and where to put it when offline.
  """
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_hub_id) or path_or_hub_id.startswith("."):
    raise FileNotFoundError(f"pretrained model folder {path_or_hub_id!r} does not exist (and "
                            "it is not a hub id of the form 'owner/name').")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(path_or_hub_id, allow_patterns=list(allow_patterns))
  except Exception as e:  # pylint: disable=broad-except  (offline, unknown repo, no auth, ...)
    include = " ".join(shlex.quote(p) for p in allow_patterns)
    raise FileNotFoundError(
        f"could not fetch {path_or_hub_id!r} from the Hugging Face hub ({type(e).__name__}: "
        f"{e}). On a machine with network run `huggingface-cli download {path_or_hub_id} "
        f"--include {include} --local-dir <DIR>`, copy <DIR> here and pass its path instead "
        "of the hub id.") from e


def _component_folder(path: str, subfolder: Optional[str], component: str) -> str:
  folder = os.path.join(path, subfolder) if subfolder else path
  if not os.path.exists(os.path.join(folder, "config.json")):
    raise FileNotFoundError(
        f"{component}: {folder!r} has no config.json; expected a diffusers {component} folder "
        f"(config.json + {WEIGHT_FILES[component][1]} or {WEIGHT_FILES[component][0]}).")
  return folder


def _load_diffusers_component(module_cls, component: str, path: str, subfolder: Optional[str],
                              dtype: Any) -> tuple[Any, dict]:
  folder = _component_folder(path, subfolder, component)
  config = read_json(os.path.join(folder, "config.json"))
  module = module_cls(**_flax_kwargs(module_cls, config, component, folder), dtype=dtype)
  flax_file = os.path.join(folder, WEIGHT_FILES[component][0])
  torch_file = find_torch_weights(folder, component)
  if torch_file is not None:
    abstract = jax.eval_shape(module.init_weights, jax.random.key(0))
    params = convert.from_torch_state_dict(read_safetensors(torch_file), abstract, component,
                                           source=torch_file)
  elif os.path.exists(flax_file):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    with open(flax_file, "rb") as f:
      params = serialization.msgpack_restore(f.read())
  else:
    raise FileNotFoundError(f"{component}: {folder!r} has neither {WEIGHT_FILES[component][1]} "
                            f"nor {WEIGHT_FILES[component][0]}.")
  return module, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), dict(params))


def load_unet(path: str, subfolder: Optional[str] = "unet", dtype: Any = jnp.float32
              ) -> tuple[FlaxUNet2DConditionModel, dict]:
  """Flax UNet (module, float32 params) from a diffusers folder with Flax or PyTorch weights."""
  return _load_diffusers_component(FlaxUNet2DConditionModel, "unet", path, subfolder, dtype)


def load_vae(path: str, subfolder: Optional[str] = "vae", dtype: Any = jnp.float32
             ) -> tuple[FlaxAutoencoderKL, dict]:
  """Flax VAE (module, float32 params) from a diffusers folder with Flax or PyTorch weights."""
  return _load_diffusers_component(FlaxAutoencoderKL, "vae", path, subfolder, dtype)


def load_text_encoder(path: str, subfolder: Optional[str] = "text_encoder",
                      dtype: Any = jnp.float32):
  """transformers' FlaxCLIPTextModel (model, float32 params) from a folder with
  `model.safetensors` (PyTorch) or `flax_model.msgpack`; never transformers' `from_pt`."""
  from transformers import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  folder = _component_folder(path, subfolder, "text_encoder")
  config = CLIPTextConfig.from_pretrained(folder)
  model = FlaxCLIPTextModel(config, dtype=dtype, _do_init=False)
  torch_file = find_torch_weights(folder, "text_encoder")
  if torch_file is not None:
    abstract = jax.eval_shape(
        lambda k: model.init_weights(k, (1, config.max_position_embeddings)),
        jax.random.key(0))
    params = convert.from_torch_state_dict(read_safetensors(torch_file), abstract,
                                           "text_encoder", source=torch_file)
  else:
    model, params = FlaxCLIPTextModel.from_pretrained(folder, dtype=dtype, _do_init=False)
  return model, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), dict(params))


def save_torch_component(folder: str, component: str, config: dict, flax_params: dict,
                         extra_tensors: Optional[dict[str, np.ndarray]] = None) -> str:
  """Writes `folder/config.json` + the PyTorch safetensors of a component; returns the path."""
  tensors = convert.to_torch_state_dict(flax_params, component)
  for k, v in (extra_tensors or {}).items():
    if k in tensors:
      raise ValueError(f"extra tensor {k!r} would overwrite a converted parameter.")
    tensors[k] = v
  path = os.path.join(folder, WEIGHT_FILES[component][1])
  write_safetensors(path, tensors, metadata={"format": "pt"})
  write_json(os.path.join(folder, "config.json"), config)
  return path


def save_text_encoder(folder: str, model, flax_params: dict) -> str:
  """Writes a transformers `CLIPTextModel` folder (config.json + model.safetensors)."""
  config = model.config.to_dict()
  config["architectures"] = ["CLIPTextModel"]
  return save_torch_component(folder, "text_encoder", config, flax_params)
