"""Export of a digits CTRL run: the UNet (merged, or pre-trained + `ctrl_lora.safetensors`), the
c-token table (`c_encoder.safetensors`, the digits model's text encoder), the DDIM scheduler and
`ctrl_labels.json` (the ink / edge bins of the label rule). Layout: `ctrl_jax.export`. `out` is a
local folder (diffusers-style files written by `ctrl_jax.models`); the workdir may be a URI."""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from ctrl_jax.models import diffusers_export
from ctrl_jax.models import weights
from ctrl_jax.problems import base
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.runtime import fs


def export(config: ml_collections.ConfigDict, workdir: str, out: str, problem: base.Problem,
           params: dict, step: int, lora_only: bool = False) -> dict[str, Any]:
  """Writes the digits run's fine-tuned `params` (update `step`) into the empty folder `out`."""
  model = problem.setup.model
  unet_params = problem.frozen["unet"]
  files = {}
  # lora_only: the pre-trained UNet (it exists nowhere else) + the un-merged CTRL weights
  files["unet"] = diffusers_export.export_unet(os.path.join(out, "unet"), model, unet_params,
                                               None if lora_only else params)
  if lora_only:
    files["lora"] = diffusers_export.export_lora(os.path.join(out, "ctrl_lora.safetensors"),
                                                 model, params)
  c_table = np.concatenate([np.asarray(problem.frozen["contexts"]),
                            np.asarray(problem.frozen["uncond_context"])[None]], axis=0)
  files["c_encoder"] = os.path.join(out, "c_encoder.safetensors")
  weights.write_safetensors(files["c_encoder"], {"c_tokens": c_table},
                            metadata={"format": "ctrl_jax.c_encoder.v1",
                                      "null_index": str(c_table.shape[0] - 1)})
  p = config.pretrain
  weights.write_json(os.path.join(out, "scheduler", "scheduler_config.json"),
                     diffusers_export.ddim_scheduler_config(
                         beta_schedule=p.beta_schedule, beta_start=p.beta_start,
                         beta_end=p.beta_end, eta=config.eta))
  rule = digits_data.LabelRule.from_dict(problem.info["classifier"]["label_rule"])
  names = [[f"{n}≤{rule.edges[i][0]:.4f}" if j == 0 else
            f"{n}>{rule.edges[i][j - 1]:.4f}" for j in range(k)]
           for i, (n, k) in enumerate(zip(rule.names, rule.classes))]
  info = diffusers_export.labels_info(
      rule.names, rule.classes, class_names=names, bin_edges=rule.edges,
      guidance_scale=config.guidance_scale, eta=config.eta,
      num_inference_steps=config.num_inference_steps, extra={
          # an absolute local path, or the URI (gs://…) as is
          "source": {"workdir": fs.orbax_path(workdir), "ctrl_step": step,
                     "config_variant": config.get("variant")},
          "lora_only": lora_only,
          "images": "x in [-1, 1], [B, 1, 8, 8]; image = clip((x + 1) / 2, 0, 1)",
          "c_encoder": "c_encoder.safetensors['c_tokens'][c] is the encoder_hidden_states "
                       "[1, 1, D] of digit c; row 10 is the null token for the unconditional "
                       "branch"})
  if lora_only:
    info["lora_format"] = diffusers_export.LORA_DOC
  weights.write_json(os.path.join(out, "ctrl_labels.json"), info)
  return {"out": out, "step": step, "files": files, "labels": info}


