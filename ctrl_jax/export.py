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
                     `export_sd_components`).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from ctrl_jax.models import augmented as augmented_lib
from ctrl_jax.models import convert
from ctrl_jax.models import weights

LORA_FORMAT = "ctrl_jax.lora.v1"
LORA_DOC = """ctrl_lora.safetensors (format "ctrl_jax.lora.v1"), all float32:
  class_embedding.weight        [K+1, D_time]  label table (row K = NULL = zeros); load it into
                                UNet2DConditionModel(num_class_embeds=K+1).class_embedding
  <module>.lora_down.weight     [r, d_in]      for every LoRA'd nn.Linear <module> (PyTorch name,
  <module>.lora_up.weight       [d_out, r]     e.g. down_blocks.0.attentions.0.transformer_blocks
                                               .0.attn1.to_q)
  metadata: format, lora_scale (string float), num_labels K, null_label K.
Merge: <module>.weight += lora_scale * lora_up.weight @ lora_down.weight."""


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


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


def _fresh(out: str) -> None:
  if os.path.exists(out) and os.listdir(out):
    if not os.path.exists(os.path.join(out, "ctrl_labels.json")):
      raise FileExistsError(f"--out={out!r} exists, is not empty and is not an earlier export; "
                            "refusing to overwrite it.")
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)


def export_digits(config: ml_collections.ConfigDict, workdir: str, out: str,
                  lora_only: bool = False) -> dict[str, Any]:
  """Exports the digits run in `workdir` (its latest CTRL checkpoint) to `out`."""
  from ctrl_jax import digits  # pylint: disable=g-import-not-at-top
  from ctrl_jax import digits_pipeline  # pylint: disable=g-import-not-at-top
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  for stage in ("pretrain", "classifier"):
    if not os.path.exists(os.path.join(workdir, stage, "info.json")):
      raise FileNotFoundError(f"{workdir!r} has no finished {stage} stage; run "
                              "`python -m ctrl_jax.launch.finetune` with this --workdir first.")
  problem = digits_pipeline.build_problem(config, workdir)
  params, step = experiment.load_finetuned(config, workdir, problem)
  model = problem.setup.model
  if "unet" in params:
    raise NotImplementedError("export of full fine-tuning (params['unet']) is not supported; "
                              "CTRL here trains LoRA + label embedding.")
  _fresh(out)
  unet_params = problem.frozen["unet"]
  files = {}
  if lora_only:
    files["unet"] = export_unet(os.path.join(out, "unet"), model, unet_params, None)
    files["lora"] = export_lora(os.path.join(out, "ctrl_lora.safetensors"), model, params)
  else:
    files["unet"] = export_unet(os.path.join(out, "unet"), model, unet_params, params)
  c_table = np.concatenate([np.asarray(problem.frozen["contexts"]),
                            np.asarray(problem.frozen["uncond_context"])[None]], axis=0)
  files["c_encoder"] = os.path.join(out, "c_encoder.safetensors")
  weights.write_safetensors(files["c_encoder"], {"c_tokens": c_table},
                            metadata={"format": "ctrl_jax.c_encoder.v1",
                                      "null_index": str(c_table.shape[0] - 1)})
  p = config.pretrain
  weights.write_json(os.path.join(out, "scheduler", "scheduler_config.json"),
                     ddim_scheduler_config(beta_schedule=p.beta_schedule,
                                           beta_start=p.beta_start, beta_end=p.beta_end,
                                           eta=config.eta))
  rule = digits.LabelRule.from_dict(problem.info["classifier"]["label_rule"])
  names = [[f"{n}≤{rule.edges[i][0]:.4f}" if j == 0 else
            f"{n}>{rule.edges[i][j - 1]:.4f}" for j in range(k)]
           for i, (n, k) in enumerate(zip(rule.names, rule.classes))]
  info = labels_info(rule.names, rule.classes, class_names=names, bin_edges=rule.edges,
                     guidance_scale=config.guidance_scale, eta=config.eta,
                     num_inference_steps=config.num_inference_steps, extra={
                         "source": {"workdir": os.path.abspath(workdir), "ctrl_step": step,
                                    "config_variant": config.get("variant")},
                         "lora_only": lora_only,
                         "images": "x in [-1, 1], [B, 1, 8, 8]; image = clip((x + 1) / 2, 0, 1)",
                         "c_encoder": "c_encoder.safetensors['c_tokens'][c] is the "
                                      "encoder_hidden_states [1, 1, D] of digit c; row 10 is the "
                                      "null token for the unconditional branch"})
  if lora_only:
    info["lora_format"] = LORA_DOC
  weights.write_json(os.path.join(out, "ctrl_labels.json"), info)
  print(f"[export] CTRL step {step} → {out} ({'LoRA only' if lora_only else 'merged UNet'})",
        flush=True)
  return {"out": out, "step": step, "files": files, "labels": info}


def export_sd(config: ml_collections.ConfigDict, workdir: str, out: str,
              lora_only: bool = False) -> dict[str, Any]:
  """Exports an SD CTRL run: a full diffusers folder (unet with label table + merged LoRA, vae,
  text_encoder, tokenizer, DDIM scheduler, model_index.json) or, with `lora_only`, only
  ctrl_lora.safetensors + scheduler + ctrl_labels.json (the base SD is the user's)."""
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  from ctrl_jax import sd_pipeline  # pylint: disable=g-import-not-at-top
  problem = sd_pipeline.build_problem(config, workdir)
  params, step = experiment.load_finetuned(config, workdir, problem)
  model, sd = problem.setup.model, problem.info["sd"]
  _fresh(out)
  files = {}
  sched = ddim_scheduler_config(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, eta=config.eta)
  if lora_only:
    files["lora"] = export_lora(os.path.join(out, "ctrl_lora.safetensors"), model, params)
    weights.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), sched)
  else:
    files["unet"] = export_unet(os.path.join(out, "unet"), model, sd.unet_params, params)
    files.update(export_sd_components(
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
  info = labels_info(ls.task_names, ls.task_classes, class_names=class_names, bin_edges=edges,
                     guidance_scale=config.guidance_scale, eta=config.eta,
                     num_inference_steps=config.num_inference_steps, extra={
                         "source": {"workdir": os.path.abspath(workdir), "ctrl_step": step,
                                    "pretrained_model": config.pretrained_model},
                         "lora_only": lora_only})
  if lora_only:
    info["lora_format"] = LORA_DOC
  weights.write_json(os.path.join(out, "ctrl_labels.json"), info)
  print(f"[export] CTRL step {step} → {out}", flush=True)
  return {"out": out, "step": step, "files": files, "labels": info}


def export(config: ml_collections.ConfigDict, workdir: str, out: str,
           lora_only: bool = False) -> dict[str, Any]:
  if config.problem == "digits":
    return export_digits(config, workdir, out, lora_only)
  if config.problem == "sd":
    return export_sd(config, workdir, out, lora_only)
  raise ValueError(f"config.problem={config.problem!r} cannot be exported; supported: 'digits', "
                   "'sd'.")


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
