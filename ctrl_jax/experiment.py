"""The CTRL fine-tuning loop: build the problem, resume from the last checkpoint, train, log.

`finetune(config, workdir)` is what `python -m ctrl_jax.launch.finetune` runs; everything it
does per step is the pure, jitted `train.make_train_step`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ctrl_jax import checkpoint
from ctrl_jax import progress
from ctrl_jax import rewards
from ctrl_jax import sharding as shd
from ctrl_jax import train


@dataclasses.dataclass
class Problem:
  """A CTRL problem ready to train.

  Attributes:
    setup: static description (model, reward, trajectory options).
    frozen: frozen inputs of the train step except "hparams" (UNet, reward, decoder params,
      contexts [P, L, D], uncond_context [L, D], schedule).
    params: initial trainable parameters.
    num_prompts: P, the number of conditions c to draw from.
  """
  setup: train.CtrlSetup
  frozen: dict
  params: dict
  num_prompts: int


def _build_tiny(config: ml_collections.ConfigDict, workdir: str) -> Problem:
  del workdir
  from ctrl_jax import tiny_problem  # pylint: disable=g-import-not-at-top
  setup, frozen, params = tiny_problem.build(
      jax.random.key(config.seed), batch_latent=tuple(config.latent_shape),
      num_steps=config.num_inference_steps, task_classes=tuple(config.task_classes),
      use_cfg=config.use_cfg, truncation=config.truncation, truncation_k=config.truncation_k,
      lora_rank=config.lora_rank, remat_policy=config.remat_policy or None,
      reference_grad=config.reference_grad, kl_convention=config.kl_convention,
      num_prompts=config.num_prompts)
  frozen.pop("hparams")
  return Problem(setup=setup, frozen=frozen, params=params, num_prompts=config.num_prompts)


PROBLEM_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, str], Problem]] = {
    "tiny": _build_tiny,
}


def register_problem(name: str, builder: Callable[[ml_collections.ConfigDict, str], Problem]):
  PROBLEM_BUILDERS[name] = builder


def build_problem(config: ml_collections.ConfigDict, workdir: str) -> Problem:
  if config.problem not in PROBLEM_BUILDERS:
    raise ValueError(f"config.problem={config.problem!r}; expected one of "
                     f"{sorted(PROBLEM_BUILDERS)}.")
  return PROBLEM_BUILDERS[config.problem](config, workdir)


def sample_requests(seed: int, step: int, label_space: rewards.LabelSpace, num_prompts: int,
                    num_micro: int, micro_batch: int) -> dict:
  """The (c, y) requests of update `step`: a function of (seed, step) only, so a resumed run
  sees the same batches. c uniform over prompts, y uniform over each task's classes."""
  rng = np.random.default_rng([seed, step])
  n = num_micro * micro_batch
  y = rewards.sample_labels(rng, label_space, n)
  prompt = rng.integers(0, num_prompts, size=n).astype(np.int32)
  return {"prompt": prompt.reshape(num_micro, micro_batch),
          "y": y.reshape(num_micro, micro_batch, -1)}


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  for field in ("num_updates", "micro_batch", "num_micro_batches"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field}={config[field]} must be ≥ 1.")
  shd.check_divisible(config.micro_batch, mesh, "config.micro_batch")
  if config.eta <= 0 and config.kl_weight > 0:
    raise ValueError(f"config.eta={config.eta}: the path KL needs η > 0 (at η = 0 the chain is "
                     "deterministic and the KL is undefined); set eta > 0 or kl_weight = 0.")


def finetune(config: ml_collections.ConfigDict, workdir: str,
             problem: Problem | None = None) -> dict[str, Any]:
  """Runs (or resumes) CTRL fine-tuning; returns the final params and run info.

  Writes `workdir/ckpt/<step>` (orbax; state = {"step", "params", "opt"}),
  `workdir/finetune.jsonl` and TensorBoard events in `workdir/tb/finetune`.
  """
  t_start = time.time()
  mesh = shd.make_mesh()
  validate_config(config, mesh)
  problem = problem or build_problem(config, workdir)
  setup = problem.setup
  hparams = train.make_hparams(gamma=config.gamma, kl_weight=config.kl_weight,
                               guidance_scale=config.guidance_scale, eta=config.eta)
  frozen = jax.device_put({**problem.frozen, "hparams": hparams}, shd.replicated(mesh))
  optimizer = train.make_optimizer(
      lr_lora=config.lr_lora, lr_label_embedding=config.lr_label_embedding,
      lr_unet=config.get("lr_unet", 0.0), weight_decay=config.weight_decay,
      grad_clip_norm=config.grad_clip_norm)
  state = train.create_train_state(problem.params, optimizer, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"),
                                 max_to_keep=config.get("max_checkpoints", 3))
  writer = progress.ScalarWriter(workdir, "finetune")
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    state = ckpt.restore(state)
    writer.truncate_after(start)
    print(f"[finetune] resumed from {ckpt.directory}/{start}", flush=True)
  step_fn = train.make_train_step(setup, optimizer, mesh)
  key = jax.random.key(config.seed)
  bar = progress.Progress("finetune", config.num_updates, start)
  for step in range(start, config.num_updates):
    batch = sample_requests(config.seed, step, setup.label_space, problem.num_prompts,
                            config.num_micro_batches, config.micro_batch)
    state, metrics = step_fn(state, batch, key, frozen)
    done = step + 1
    if done % config.log_every == 0 or done == config.num_updates or step == start:
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(host["loss"]):
        ckpt.close()
        raise FloatingPointError(f"loss is {host['loss']} at update {done}; last good "
                                 f"checkpoint: {ckpt.latest_step()} in {ckpt.directory}.")
      writer.write(done, host)
      bar.update(done, {k: host[k] for k in ("loss", "reward", "kl") if k in host})
    if done % config.checkpoint_every == 0 or done == config.num_updates:
      ckpt.save(done, state)
  ckpt.close()
  writer.close()
  return {"params": state["params"], "state": state, "history": writer.read(),
          "wall_time_s": time.time() - t_start, "start_step": start}
