"""Supervised baseline of the digits benchmark: classifier-free guidance trained on triplets.

The pre-trained p(x | c) gets the same new control as CTRL (`AugmentedUNet`: zero-init label
table added to the time embedding + LoRA on the frozen UNet), but fitted by the plain
denoising ε-MSE on labelled triplets (x, c, y) instead of by RL against a classifier:

  * the labelled budget is CTRL's classifier budget — the same `num_labels` train images
    `digits_data.sample_label_pairs(x_train, rule, num_labels, label_seed)` draws, with their y —
    plus what CTRL never sees: the digit class c of those images;
  * label dropout: y → NULL with prob `p_uncond`, and c → the null token with prob
    `p_uncond_c` (independently, as in pre-training), so the unconditional branch
    ("", NULL) stays a trained model;
  * sampling is CTRL's: ε_∅ + w (ε_{c,y} − ε_∅) with ε_∅ = ε(x, t, "", NULL), i.e.
    `generate.make_sampler(setup)` with the returned params, so evaluation is shared.

Stage outputs (resumable, reused when done; `_n{num_labels}` when a budget is passed):
  DIR/cfg_triplets/ckpt/<step>, DIR/cfg_triplets.jsonl   training (ctrl_jax.runtime.loop)
  DIR/cfg_triplets/config.json                           the config the checkpoints belong to
  DIR/cfg_triplets/params, DIR/cfg_triplets/info.json    final ctrl params; done marker
"""
from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ctrl_jax.core import schedules
from ctrl_jax.core import train
from ctrl_jax.models.augmented import AugmentedUNet
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.problems.digits import stages as digits_stages
from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import loop
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import sharding as shd
from ctrl_jax.runtime import stage

STAGE = "cfg_triplets"


def default_cfg_config() -> ml_collections.ConfigDict:
  """Defaults of `config.baselines.cfg` (fields given there override these)."""
  c = ml_collections.ConfigDict()
  c.steps = 1000                # optimiser steps (ink, w = 2, 300 labels, 300 samples: ink3
                                #   acc 0.73 with these lrs; 0.55 at 400 steps, lr_lora 1e-3;
                                #   pre-trained 0.31, CTRL 0.977)
  c.batch = 64                  # triplets per step, drawn with replacement (divisible by #devices)
  c.lr_lora = 3e-3              # AdamW lr of LoRA (CTRL's)
  c.lr_label_embedding = 1e-2   # AdamW lr of the label table, NULL row masked (CTRL's)
  c.weight_decay = 0.0          # AdamW decoupled weight decay
  c.grad_clip_norm = 5.0        # global-norm clip
  c.p_uncond = 0.1              # label dropout: P(y → NULL)
  c.p_uncond_c = 0.1            # P(c → null token), independent of the y dropout
  c.seed = 0                    # LoRA init, batch order, noise / t / dropout draws
  c.log_every = 50              # scalars every n steps
  c.checkpoint_every = 250      # orbax checkpoint every n steps
  c.max_checkpoints = 2         # checkpoints kept
  return c


def cfg_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`default_cfg_config()` overridden by `config.baselines.cfg` where the config has it.

  An unknown field in `config.baselines.cfg` is an error (a typo would otherwise be ignored).
  """
  out = default_cfg_config()
  baselines = config.get("baselines", None)
  given = baselines.get("cfg", None) if baselines is not None else None
  if given is not None:
    given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
    unknown = sorted(set(given) - set(out))
    if unknown:
      raise ValueError(f"config.baselines.cfg has unknown fields {unknown}; expected a subset "
                       f"of {sorted(out)}.")
    out.update(given)
  return out


def stage_name(num_labels: Optional[int] = None) -> str:
  """"cfg_triplets", or "cfg_triplets_n{num_labels}" for an explicit label budget."""
  return STAGE if num_labels is None else f"{STAGE}_n{int(num_labels)}"


# ----------------------------------------------------------------------------- data


def sample_label_indices(num_train: int, num_labels: int, seed: int) -> np.ndarray:
  """Indices into x_train of the pairs `digits_data.sample_label_pairs(x_train, rule, num_labels,
  seed)` draws (the same rng call, reproduced here: that function returns only (x, y))."""
  return np.random.default_rng(seed).choice(num_train, size=num_labels, replace=False)


def labelled_triplets(x_train: np.ndarray, c_train: np.ndarray, rule: digits_data.LabelRule,
                      num_labels: int, seed: int) -> dict:
  """CTRL's labelled pairs plus their digit class: {"x" [n, 8, 8] in [0, 1], "c" int32 [n],
  "y" int32 [n, T], "index" [n] into the train split}."""
  idx = sample_label_indices(len(x_train), num_labels, seed)
  x, y = digits_data.sample_label_pairs(x_train, rule, num_labels, seed)
  if not np.array_equal(np.asarray(x_train)[idx], x):
    raise AssertionError("sample_label_indices no longer reproduces "
                         "digits_data.sample_label_pairs' "
                         "selection; keep the two rng calls identical.")
  return {"x": x, "c": np.asarray(c_train, np.int32)[idx], "y": np.asarray(y, np.int32),
          "index": idx}


# ----------------------------------------------------------------------------- loss and step


def triplet_denoising_loss(ctrl_params: dict, model: AugmentedUNet, frozen: dict,
                           batch: dict, key: jax.Array) -> jnp.ndarray:
  """ε-prediction MSE of the augmented model at uniform t ∈ [0, T) on triplets.

  Args:
    ctrl_params: trainable tree (label table, LoRA).
    frozen: {"unet": UNet params, "c_table": [11, 1, D] (row 10 = null token),
      "schedule", "p_uncond": f32 [] (y → NULL), "p_uncond_c": f32 [] (c → null token)}.
    batch: {"x": [B, 1, 8, 8] in [-1, 1], "c": int [B], "label": int [B] combined label}.
  """
  k_t, k_eps, k_drop_y, k_drop_c = jax.random.split(key, 4)
  x0 = batch["x"]
  b = x0.shape[0]
  schedule = frozen["schedule"]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  abar = schedule.alphas_cumprod[t][:, None, None, None]
  x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
  label = jnp.where(jax.random.uniform(k_drop_y, (b,)) < frozen["p_uncond"], model.null_label,
                    batch["label"])
  c = jnp.where(jax.random.uniform(k_drop_c, (b,)) < frozen["p_uncond_c"],
                digits_model.NUM_DIGITS, batch["c"])
  pred = model.apply(frozen["unet"], ctrl_params, x_t, t, frozen["c_table"][c], label)
  return jnp.mean((pred - eps) ** 2)


def make_triplet_step(model: AugmentedUNet, optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted `step(state, batch, key, frozen) -> (state, metrics)`.

  state = train.create_train_state(...) ({"step", "params", "opt"}, donated); the step key is
  fold_in(key, state["step"]) inside jit, so a resumed run draws what an uninterrupted one does.
  """

  def step(state, batch, key, frozen):
    step_key = jax.random.fold_in(key, state["step"])
    loss, grads = jax.value_and_grad(triplet_denoising_loss)(state["params"], model, frozen,
                                                             batch, step_key)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss,
               "grad_norm": optax.tree.norm(train.mask_null_label_gradient().update(
                   grads, None)[0])}
    return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

  repl = shd.replicated(mesh)
  return shd.jit(step, mesh, in_shardings=(repl, shd.data_sharded(mesh), repl, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """CTRL's optimiser (param groups, NULL row masked) with the baseline's learning rates."""
  return train.make_optimizer(lr_lora=cfg.lr_lora, lr_label_embedding=cfg.lr_label_embedding,
                              weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm)


def make_frozen(pre: dict, schedule: schedules.Schedule, cfg: ml_collections.ConfigDict) -> dict:
  """The frozen inputs of the step, from the pre-trained params {"unet", "c_table"}."""
  return {"unet": pre["unet"], "c_table": pre["c_table"], "schedule": schedule,
          "p_uncond": jnp.asarray(cfg.p_uncond, jnp.float32),
          "p_uncond_c": jnp.asarray(cfg.p_uncond_c, jnp.float32)}


# ----------------------------------------------------------------------------- the stage


def train_cfg_triplets(config: ml_collections.ConfigDict, workdir: str,
                       num_labels: Optional[int] = None, mesh: Optional[Mesh] = None
                       ) -> tuple[dict, dict]:
  """Trains (or resumes, or reuses) the CFG-on-triplets baseline; returns (ctrl_params, info).

  config: the digits config (configs/digits.py); its pre-trained stage is reused or run
  (`digits_stages.ensure_pretrained`), the label rule is the task's (the one the classifier
  stage uses), and the labelled budget is `num_labels` (default config.classifier.num_labels)
  pairs drawn with config.classifier.label_seed. Hyper-parameters: `cfg_config(config)`.
  The params (host arrays) plug into `generate.make_sampler(problem.setup)` as CTRL's do.
  mesh: default all devices (`sharding.make_mesh()`).
  """
  cfg = cfg_config(config)
  n = int(config.classifier.num_labels if num_labels is None else num_labels)
  name = stage_name(num_labels)
  stage_dir = fs.join(workdir, name)
  info_path = fs.join(stage_dir, "info.json")
  config_path = fs.join(stage_dir, "config.json")
  wanted = {**cfg.to_dict(), "task": config.task, "lora_rank": int(config.lora_rank),
            "num_labels": n, "label_seed": int(config.classifier.label_seed)}

  unet, pre, _ = digits_stages.ensure_pretrained(config, workdir)
  label_space = digits_stages.label_space(config.task)
  model = AugmentedUNet(unet, num_labels=label_space.num_labels, lora_rank=config.lora_rank)
  init_params = model.init_ctrl_params(jax.random.key(cfg.seed), pre["unet"])

  if fs.exists(info_path):
    info = stage.read_json(info_path)
    stage.check_same(info["config"], wanted, info_path)
    if multihost.is_main():
      print(f"[{name}] reusing {stage_dir}", flush=True)
    params = checkpoint.load_tree(fs.join(stage_dir, "params"),
                                  jax.eval_shape(lambda: init_params))
    return jax.device_get(params), info
  # Checkpoints of a killed run must belong to this config before they are resumed.
  if fs.exists(config_path):
    stage.check_same(stage.read_json(config_path), wanted, config_path)
  elif multihost.is_main():
    stage.write_json(config_path, wanted)

  t0 = time.time()
  mesh = shd.make_mesh() if mesh is None else mesh
  shd.check_divisible(cfg.batch, mesh, "config.baselines.cfg.batch")
  splits = digits_data.load_splits()
  rule = digits_data.make_label_rule(config.task, splits["x_train"])
  data = labelled_triplets(splits["x_train"], splits["c_train"], rule, n,
                           config.classifier.label_seed)
  x_model = np.asarray(digits_model.to_model_space(data["x"].astype(np.float32)))
  label = np.asarray(label_space.encode(jnp.asarray(data["y"])), np.int32)
  c = data["c"]

  optimizer = make_optimizer(cfg)
  state = train.create_train_state(init_params, optimizer, mesh)
  frozen = jax.device_put(make_frozen(pre, digits_model.make_schedule(config.pretrain), cfg),
                          shd.replicated(mesh))
  step_fn = make_triplet_step(model, optimizer, mesh)
  key = jax.random.key(cfg.seed + 1)  # the LoRA init uses key(seed)
  batch_sharding = shd.data_sharded(mesh)

  def batch_fn(step):
    idx = np.random.default_rng([cfg.seed, step]).integers(0, n, cfg.batch)
    return jax.device_put({"x": x_model[idx], "c": c[idx], "label": label[idx]},
                          batch_sharding)

  state, history, start = loop.run(
      name, workdir, state, lambda s, b: step_fn(s, b, key, frozen), batch_fn, cfg.steps,
      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
      max_checkpoints=cfg.max_checkpoints)
  params = jax.device_get(state["params"])
  path = fs.join(stage_dir, "params")
  # A crash between the save and the marker: rewrite it. Every process saves (orbax saves are
  # collective; process 0 writes the numpy arrays).
  if multihost.is_main() and fs.exists(path):
    fs.remove(path)
  multihost.barrier(f"remove {path}")
  checkpoint.save_tree(path, params)
  counts = np.bincount(label, minlength=label_space.num_labels)
  info = {"config": wanted, "wall_time_s": time.time() - t0, "start_step": start,
          "final_loss": history[-1]["loss"] if history else None,
          "label_counts": counts.tolist(),
          "digit_counts": np.bincount(c, minlength=digits_model.NUM_DIGITS).tolist()}
  if multihost.is_main():
    stage.write_json(info_path, info)
    print(f"[{name}] done in {info['wall_time_s']:.0f}s on {n} triplets", flush=True)
  multihost.barrier(f"write {info_path}")
  return params, info
