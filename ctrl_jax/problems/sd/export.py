"""Export of a Stable Diffusion CTRL run: a full diffusers folder (UNet with the label table and
the LoRA merged, VAE, text encoder, tokenizer, DDIM scheduler, model_index.json) or, with
`lora_only`, `ctrl_lora.safetensors` + scheduler + `ctrl_labels.json` (the base SD is the
user's). Layout: `ctrl_jax.export`."""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from ctrl_jax.models import diffusers_export
from ctrl_jax.models import weights
from ctrl_jax.problems import base
from ctrl_jax.runtime import fs


def export(config: ml_collections.ConfigDict, workdir: str, out: str, problem: base.Problem,
           params: dict, step: int, lora_only: bool = False) -> dict[str, Any]:
  """Writes the SD run's fine-tuned `params` (update `step`) into the empty folder `out`."""
  model, sd = problem.setup.model, problem.info["sd"]
  files = {}
  sched = diffusers_export.ddim_scheduler_config(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, eta=config.eta)
  if lora_only:
    files["lora"] = diffusers_export.export_lora(os.path.join(out, "ctrl_lora.safetensors"),
                                                 model, params)
    weights.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), sched)
  else:
    files["unet"] = diffusers_export.export_unet(os.path.join(out, "unet"), model,
                                                 sd.unet_params, params)
    files.update(diffusers_export.export_sd_components(
        out, vae=sd.vae, vae_params=sd.vae_params, text_encoder=sd.text_encoder,
        text_encoder_params=sd.text_encoder_params,
        tokenizer_dir=os.path.join(sd.folder, "tokenizer"), scheduler_config=sched))
  ls = problem.setup.label_space
  cls_info = problem.info["classifier"]
  class_names, edges = [], []
  for name, k in zip(ls.task_names, ls.task_classes):
    if name == "aesthetic":
      thr = cls_info["aesthetic_threshold"]
      class_names.append([f"LAION score < {thr:g}", f"LAION score ≥ {thr:g}"])
      edges.append([thr])
    else:
      e = cls_info["edges_kb"][name]
      class_names.append([f"JPEG > {e[-1 - j]:g} kB" if j == 0 else
                          f"JPEG ≤ {e[k - 1 - j]:g} kB" for j in range(k)])
      edges.append(e)
  info = diffusers_export.labels_info(
      ls.task_names, ls.task_classes, class_names=class_names, bin_edges=edges,
      guidance_scale=config.guidance_scale, eta=config.eta,
      num_inference_steps=config.num_inference_steps, extra={
          "source": {"workdir": fs.orbax_path(workdir), "ctrl_step": step,
                     "pretrained_model": config.pretrained_model},
          "lora_only": lora_only})
  if lora_only:
    info["lora_format"] = diffusers_export.LORA_DOC
  weights.write_json(os.path.join(out, "ctrl_labels.json"), info)
  return {"out": out, "step": step, "files": files, "labels": info}


