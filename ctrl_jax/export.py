"""Export of a CTRL run to a standard PyTorch diffusers folder (safetensors + json, no pickle).

`export(config, workdir, out, lora_only)` is what `python -m ctrl_jax.launch.export` runs.

OUT/unet/            `UNet2DConditionModel` with `num_class_embeds = K + 1`; `class_embedding`
                     holds the learned label table (row K = NULL = zeros) and the LoRA is merged
                     into the attention weights. With `lora_only`, OUT/unet/ is the *pre-trained*
                     UNet (digits only: it exists nowhere else) and the CTRL weights go to
OUT/ctrl_lora.safetensors  (see `LORA_FORMAT`; applied by `models.torch_client.apply_ctrl_lora`).
OUT/scheduler/       `DDIMScheduler` config of the schedule CTRL was trained with.
OUT/ctrl_labels.json tasks, class names / bin edges, the label encoding, the NULL index, and
                     the guidance scale, η and number of steps used in training.
OUT/c_encoder.safetensors  (digits) "c_tokens" float32 [11, 1, D]: row c is the
                     `encoder_hidden_states` of digit c, row 10 the null (unconditional) token.
OUT/vae, text_encoder, tokenizer, model_index.json  (Stable Diffusion runs; see
                     `ctrl_jax.models.diffusers_export.export_sd_components`).
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from ctrl_jax import experiment
from ctrl_jax.problems import base


def _fresh(out: str) -> None:
  if os.path.exists(out) and os.listdir(out):
    if not os.path.exists(os.path.join(out, "ctrl_labels.json")):
      raise FileExistsError(f"--out={out!r} exists, is not empty and is not an earlier export; "
                            "refusing to overwrite it.")
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)


def export(config: ml_collections.ConfigDict, workdir: str, out: str,
           lora_only: bool = False) -> dict[str, Any]:
  """Exports the latest CTRL checkpoint of `workdir` to `out` through the problem's hook."""
  hooks = base.get(config.problem)
  write = base.hook(config.problem, "export")
  for stage in hooks.required_stages:
    if not os.path.exists(os.path.join(workdir, stage, "info.json")):
      raise FileNotFoundError(f"{workdir!r} has no finished {stage} stage; run "
                              "`python -m ctrl_jax.launch.finetune` with this --workdir first.")
  problem = hooks.build(config, workdir)
  params, step = experiment.load_finetuned(config, workdir, problem)
  if "unet" in params:
    raise NotImplementedError("export of full fine-tuning (params['unet']) is not supported; "
                              "CTRL here trains LoRA + label embedding.")
  _fresh(out)
  return write(config, workdir, out, problem, params, step, lora_only)
