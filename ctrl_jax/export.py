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

The workdir may be a URI (gs://…, `ctrl_jax.runtime.fs`); OUT is a local folder (or file://),
written by process 0 of a multi-process run.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from ctrl_jax import experiment
from ctrl_jax.problems import base
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost


def _publish(tmp: str, out: str, overwrite: bool) -> None:
  """Moves the finished export in `tmp` to `out`. An existing `out` keeps every file an export
  does not write; with `overwrite`, only the entries the export wrote are replaced."""
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return
  for name in sorted(os.listdir(tmp)):
    dest = os.path.join(out, name)
    if os.path.isdir(dest) and not os.path.islink(dest):
      shutil.rmtree(dest)
    elif os.path.lexists(dest):
      os.remove(dest)
    os.replace(os.path.join(tmp, name), dest)
  os.rmdir(tmp)


def export(config: ml_collections.ConfigDict, workdir: str, out: str,
           lora_only: bool = False, overwrite: bool = False) -> dict[str, Any] | None:
  """Exports the latest CTRL checkpoint of `workdir` to `out` through the problem's hook.

  The export is written to a temporary sibling folder and moved into place when complete. A
  non-empty `out` is refused unless `overwrite`; then only what an export writes is replaced
  (other files in `out` are kept). `out` must be local (diffusers-style files written by
  libraries that need a real folder): copy it to a bucket afterwards. Returns the hook's result
  (paths in `out`); None on the processes other than 0 of a multi-process run (they only
  restore the checkpoint with it).
  """
  experiment.validate_config(config)
  local_out = fs.local_path(out)
  if local_out is None:
    raise ValueError(f"--out={out!r}: the export folder must be local (copy it to the bucket "
                     "afterwards, e.g. `gcloud storage cp -r`).")
  out = local_out
  if os.path.isfile(out):
    raise FileExistsError(f"--out={out!r} is a file; give a folder.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"--out={out!r} is not empty; pass --overwrite to replace the files an "
                          "export writes there (other files are kept), or choose another --out.")
  hooks = base.get(config.problem)
  write = base.hook(config.problem, "export")
  for stage in hooks.required_stages:
    if not fs.exists(fs.join(workdir, stage, "info.json")):
      raise FileNotFoundError(f"{workdir!r} has no finished {stage} stage; run "
                              "`python -m ctrl_jax.launch.finetune` with this --workdir first.")
  problem = hooks.build(config, workdir)
  params, step = experiment.load_finetuned(config, workdir, problem)
  if "unet" in params:
    raise NotImplementedError("export of full fine-tuning (params['unet']) is not supported; "
                              "CTRL here trains LoRA + label embedding.")
  # Process 0 writes while the others wait (a failure there is raised on every process).
  return multihost.main_first("export", lambda: _write(config, workdir, out, problem, params, step,
                                                      write, lora_only, overwrite))


def _write(config, workdir, out, problem, params, step, write, lora_only, overwrite):
  """The hook's export into a temporary sibling of `out`, then moved into place."""
  tmp = f"{os.path.abspath(out).rstrip(os.sep)}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    result = write(config, workdir, tmp, problem, params, step, lora_only)
    _publish(tmp, out, overwrite)
    print(f"[export] CTRL step {step} → {out} "
          f"({'LoRA only' if lora_only else 'merged UNet'})", flush=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return _relocate(result, tmp, out)


def _relocate(tree: Any, tmp: str, out: str) -> Any:
  """The hook's result with paths under `tmp` pointing into `out`."""
  if isinstance(tree, dict):
    return {k: _relocate(v, tmp, out) for k, v in tree.items()}
  if isinstance(tree, str) and tree.startswith(tmp):
    return out + tree[len(tmp):]
  return tree
