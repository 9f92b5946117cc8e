"""Writing CTRL weights as PyTorch diffusers files (safetensors + json, no pickle): the merged
UNet with the label table as `class_embedding`, the un-merged LoRA file, the DDIM scheduler
config, the label description and the other Stable Diffusion components.

The layout of an export folder is documented in `ctrl_jax.export`.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
import numpy as np

from ctrl_jax.models import augmented as augmented_lib
from ctrl_jax.models import convert
from ctrl_jax.models import weights


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


LORA_FORMAT = "ctrl_jax.lora.v1"
LORA_DOC = """ctrl_lora.safetensors (format "ctrl_jax.lora.v1"), all float32:
  class_embedding.weight        [K+1, D_time]  label table (row K = NULL = zeros); load it into
                                UNet2DConditionModel(num_class_embeds=K+1).class_embedding
  <module>.lora_down.weight     [r, d_in]      for every LoRA'd nn.Linear <module> (PyTorch name,
  <module>.lora_up.weight       [d_out, r]     e.g. down_blocks.0.attentions.0.transformer_blocks
                                               .0.attn1.to_q)
  metadata: format, lora_scale (string float), num_labels K, null_label K.
Merge: <module>.weight += lora_scale * lora_up.weight @ lora_down.weight."""


def lora_tensors(model: augmented_lib.AugmentedUNet, ctrl_params: dict) -> dict[str, np.ndarray]:
  """The CTRL params as PyTorch-named tensors (`LORA_DOC`)."""
  out = {"class_embedding.weight": np.asarray(ctrl_params["label_embedding"], np.float32)}

  def walk(node, path):
    if "down" in node and "up" in node:
      name = convert.torch_module_name(path, "unet")
      out[f"{name}.lora_down.weight"] = np.asarray(node["down"], np.float32).T
      out[f"{name}.lora_up.weight"] = np.asarray(node["up"], np.float32).T
      return
    for child, sub in node.items():
      walk(sub, path + (child,))

  walk(ctrl_params.get("lora", {}), ())
  return out


def check_null_row(ctrl_params: dict, null_label: int) -> None:
  row = np.asarray(ctrl_params["label_embedding"])[null_label]
  if np.any(row != 0):
    raise ValueError(f"the NULL row {null_label} of the label table is not zero (max |.| = "
                     f"{np.abs(row).max():.3g}): the unconditional CFG branch would not be the "
                     "pre-trained model's. Was the NULL row trained?")


def export_unet(out_dir: str, model: augmented_lib.AugmentedUNet, unet_params: dict,
                ctrl_params: Optional[dict]) -> str:
  """Writes `out_dir` = a PyTorch UNet folder. With `ctrl_params`, the LoRA is merged and the
  label table becomes `class_embedding` (`num_class_embeds = K + 1`); without, it is the plain
  pre-trained UNet. Returns the weights path."""
  extra, config_extra = {}, {}
  params = unet_params
  if ctrl_params is not None:
    check_null_row(ctrl_params, model.null_label)
    params = model.merge_lora(unet_params, ctrl_params)
    extra["class_embedding.weight"] = np.asarray(ctrl_params["label_embedding"], np.float32)
    config_extra["num_class_embeds"] = model.num_labels + 1
  config = weights.flax_to_torch_config(model.unet, "UNet2DConditionModel", config_extra)
  return weights.save_torch_component(out_dir, "unet", config, _np(params), extra)


def export_lora(path: str, model: augmented_lib.AugmentedUNet, ctrl_params: dict) -> str:
  check_null_row(ctrl_params, model.null_label)
  weights.write_safetensors(path, lora_tensors(model, ctrl_params), metadata={
      "format": LORA_FORMAT, "lora_scale": repr(float(model.lora_scale)),
      "num_labels": str(model.num_labels), "null_label": str(model.null_label)})
  return path


def ddim_scheduler_config(*, beta_schedule: str, beta_start: float, beta_end: float,
                          num_train_timesteps: int = 1000, steps_offset: int = 1,
                          set_alpha_to_one: bool = False, eta: float = 1.0) -> dict:
  """`DDIMScheduler` config.json equal to our `schedules.make_schedule` + `ddim_timesteps`
  (ε-prediction, "leading" spacing, no clipping). η is not a scheduler field: it is recorded
  under "_ctrl_eta" (diffusers ignores "_" keys silently) and in ctrl_labels.json."""
  import diffusers  # pylint: disable=g-import-not-at-top
  return {"_class_name": "DDIMScheduler", "_diffusers_version": diffusers.__version__,
          "num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
          "beta_start": beta_start, "beta_end": beta_end, "trained_betas": None,
          "clip_sample": False, "set_alpha_to_one": set_alpha_to_one,
          "steps_offset": steps_offset, "prediction_type": "epsilon",
          "timestep_spacing": "leading", "thresholding": False,
          "rescale_betas_zero_snr": False, "_ctrl_eta": eta}


def labels_info(task_names, task_classes, *, class_names=None, bin_edges=None,
                guidance_scale: float, eta: float, num_inference_steps: int,
                extra: Optional[dict] = None) -> dict:
  k = int(np.prod(task_classes))
  tasks = []
  for i, (name, n) in enumerate(zip(task_names, task_classes)):
    t = {"name": name, "num_classes": int(n),
         "class_names": list(class_names[i]) if class_names else [str(j) for j in range(n)]}
    if bin_edges is not None:
      t["bin_edges"] = [float(e) for e in bin_edges[i]]
    tasks.append(t)
  return {
      "tasks": tasks, "num_labels": k, "null_label": k, "num_class_embeds": k + 1,
      "label_encoding": ("class_labels = y[0]" if len(tasks) == 1 else
                         "row-major: class_labels = (…(y[0] * K_1 + y[1]) * K_2 + …) with K_i "
                         "= tasks[i].num_classes"),
      "unconditional_branch": f"class_labels = {k} (NULL) with the unconditional context",
      "guidance_scale": float(guidance_scale), "eta": float(eta),
      "num_inference_steps": int(num_inference_steps), **(extra or {})}


def export_sd_components(out: str, *, vae=None, vae_params=None, text_encoder=None,
                         text_encoder_params=None, tokenizer_dir: Optional[str] = None,
                         scheduler_config: Optional[dict] = None) -> dict[str, str]:
  """The non-UNet parts of a Stable Diffusion export: OUT/vae, OUT/text_encoder,
  OUT/tokenizer, OUT/scheduler and OUT/model_index.json (loadable by diffusers'
  `StableDiffusionPipeline.from_pretrained(OUT)`; no safety checker)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  files = {}
  if vae is not None:
    files["vae"] = weights.save_torch_component(
        os.path.join(out, "vae"), "vae", weights.flax_to_torch_config(vae, "AutoencoderKL"),
        _np(vae_params))
  if text_encoder is not None:
    files["text_encoder"] = weights.save_text_encoder(os.path.join(out, "text_encoder"),
                                                      text_encoder, _np(text_encoder_params))
  if tokenizer_dir is not None:
    shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    files["tokenizer"] = os.path.join(out, "tokenizer")
  if scheduler_config is not None:
    files["scheduler"] = os.path.join(out, "scheduler", "scheduler_config.json")
    weights.write_json(files["scheduler"], scheduler_config)
  weights.write_json(os.path.join(out, "model_index.json"), {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
      "safety_checker": [None, None], "feature_extractor": [None, None],
      "requires_safety_checker": False, "image_encoder": [None, None]})
  return files
