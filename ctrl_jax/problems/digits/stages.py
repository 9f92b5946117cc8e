"""The stages of the digits benchmark and the CTRL problem they feed.

Each stage keeps its outputs in the workdir and is skipped when they are already there:

  DIR/pretrain/final, DIR/pretrain/info.json      p(x | c): EMA params of the UNet + c table
  DIR/classifier/params, DIR/classifier/info.json  p̂(y | x) per task name, label rule, metrics
  DIR/finetune/ckpt/<step>, DIR/finetune.jsonl     CTRL (ctrl_jax.experiment.finetune)
  DIR/eval/                                        ctrl_jax.problems.digits.evaluation
  DIR/run_info/<stage>.json                        who ran each stage with what (config, commit,
                                                   versions, devices; runtime.stage.record_run)

`info.json` is written last, after the arrays are on disk: its presence marks a stage done. A
stage killed midway resumes from its own checkpoints (pre-training) or reruns (classifier, a
few seconds). DIR is a local folder or a URI (gs://…, `ctrl_jax.runtime.fs`).

Multi-process: every process runs a stage (the orbax saves are collective, and the classifier
fit is deterministic: `experiment.finetune` checks that all processes hold the same inputs);
process 0 alone removes stale outputs and writes info.json, and the others wait for it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctrl_jax.core import calibration
from ctrl_jax.core import rewards
from ctrl_jax.core import schedules
from ctrl_jax.core import train
from ctrl_jax.models import augmented
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems import base
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import stage


# Config fields added after runs were saved: a saved stage without one was made with its default.
_ADDED_FIELDS = {"use_digit": False}


def _check(name: str, value: Any, expected: str, ok: bool) -> None:
  if not ok:
    raise ValueError(f"config.{name}={value!r}: expected {expected}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """The digits fields of `config` (task, pre-training, classifier, evaluation), before any
  work; raises ValueError naming the first bad field."""
  _check("task", config.task, f"one of {digits_data.TASKS}", config.task in digits_data.TASKS)
  p, k, e = config.pretrain, config.classifier, config.eval
  _check("pretrain.beta_schedule", p.beta_schedule, f"one of {schedules.BETA_SCHEDULES}",
         p.beta_schedule in schedules.BETA_SCHEDULES)
  for name, value in (("pretrain.num_steps", p.num_steps), ("pretrain.batch_size", p.batch_size),
                      ("pretrain.log_every", p.log_every),
                      ("pretrain.checkpoint_every", p.checkpoint_every),
                      ("classifier.steps", k.steps), ("eval.samples_per_cell", e.samples_per_cell),
                      ("eval.batch_size", e.batch_size), ("eval.grid_samples", e.grid_samples)):
    _check(name, value, "an integer ≥ 1", isinstance(value, int) and value >= 1)
  _check("classifier.num_labels", k.num_labels,
         f"an integer in [2, {digits_data.NUM_TRAIN}] (pairs from the train split)",
         isinstance(k.num_labels, int) and 2 <= k.num_labels <= digits_data.NUM_TRAIN)
  _check("classifier.calib_fraction", k.calib_fraction, "a fraction in (0, 1)",
         0 < k.calib_fraction < 1)
  _check("eval.grid_samples", e.grid_samples, "≤ eval.samples_per_cell",
         e.grid_samples <= e.samples_per_cell)


# ----------------------------------------------------------------------------- pre-training


def pretrained_target(config: ml_collections.ConfigDict):
  """(unet module, abstract params) of the pre-trained model described by config.pretrain."""
  unet = unet_lib.build_unet(digits_model.unet_config(config.pretrain))
  abstract = jax.eval_shape(lambda: digits_model.init_params(
      jax.random.key(0), unet, config.pretrain.context_dim))
  return unet, abstract


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str,
                      on_running: Optional[Callable[[], None]] = None
                      ) -> tuple[Any, dict, dict]:
  """Pre-trains p(x | c) unless DIR/pretrain/info.json exists; returns (unet, params, info).
  `on_running`: see `loop.run` (not called when nothing is trained)."""
  stage_dir = fs.join(workdir, "pretrain")
  info_path = fs.join(stage_dir, "info.json")
  unet, abstract = pretrained_target(config)
  if fs.exists(info_path):
    info = stage.read_json(info_path)
    stage.check_same(info["config"], stage.config_dict(config.pretrain), info_path,
                     "config.pretrain", _ADDED_FIELDS)
    if multihost.is_main():
      print(f"[pretrain] reusing {stage_dir}", flush=True)
    return unet, checkpoint.load_tree(fs.join(stage_dir, "final"), abstract), info
  stage.record_run(workdir, "pretrain", config)
  t0 = time.time()
  splits = digits_data.load_splits()
  unet, params = digits_model.pretrain(config.pretrain, splits["x_train"], splits["c_train"],
                                       workdir, on_running)
  _save_tree_marked(fs.join(stage_dir, "final"), params)
  info = {"config": stage.config_dict(config.pretrain), "wall_time_s": time.time() - t0,
          "num_params": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(params)))}
  _write_info(info_path, info)
  if multihost.is_main():
    print(f"[pretrain] done in {info['wall_time_s']:.0f}s; {info['num_params']} params",
          flush=True)
  return unet, params, info


def _save_tree_marked(path: str, tree: Any) -> None:
  """Saves `tree` to the orbax folder `path`, replacing one left by a crash between the save
  and the stage's info.json. Every process calls it (orbax saves are collective); host (numpy)
  arrays, because orbax refuses process-local jax.Arrays in a multi-process save and writes
  numpy ones from process 0."""
  if multihost.is_main() and fs.exists(path):
    fs.remove(path)
  multihost.barrier(f"remove {path}")
  checkpoint.save_tree(path, tree if jax.process_count() == 1 else jax.device_get(tree))


def _write_info(info_path: str, info: dict) -> None:
  """Process 0 writes a stage's info.json (its done mark); every process waits for it."""
  if multihost.is_main():
    stage.write_json(info_path, info)
  multihost.barrier(f"write {info_path}")


# ----------------------------------------------------------------------------- classifiers


def classifier_modules(task: str, use_digit: bool = False) -> list:
  return [digits_data.classifier_for(name, use_digit) for name in digits_data.task_names(task)]


def classifier_target(config: ml_collections.ConfigDict) -> tuple[list, list]:
  """(modules, abstract params per module) of the reward classifiers config describes."""
  use_digit = bool(config.classifier.get("use_digit", False))
  modules = classifier_modules(config.task, use_digit)
  cond = (jnp.zeros((1,), jnp.int32),) if use_digit else ()
  abstract = [jax.eval_shape(lambda m=m: m.init(jax.random.key(0), jnp.zeros((1, 8, 8)), *cond))
              for m in modules]
  return modules, abstract


def ensure_classifiers(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[digits_data.LabelRule, list, list, dict]:
  """Fits p̂(y_t | x) for each task name unless DIR/classifier/info.json exists.

  The label rule's edges come from the whole train split (the task definition); the classifier
  sees only `num_labels` pairs drawn from it, and is reported on the held-out split. With
  config.classifier.use_digit it is p̂(y_t | x, c), fitted on the pairs' digits too (CTRL then
  passes the asked digit to the reward).
  Returns (rule, modules, params per task, info).
  """
  stage_dir = fs.join(workdir, "classifier")
  info_path = fs.join(stage_dir, "info.json")
  use_digit = bool(config.classifier.get("use_digit", False))
  modules, abstract = classifier_target(config)
  wanted = {**stage.config_dict(config.classifier), "task": config.task}
  if fs.exists(info_path):
    info = stage.read_json(info_path)
    stage.check_same(info["config"], wanted, info_path, "config.classifier", _ADDED_FIELDS)
    if multihost.is_main():
      print(f"[classifier] reusing {stage_dir}", flush=True)
    params = checkpoint.load_tree(fs.join(stage_dir, "params"), abstract)
    return digits_data.LabelRule.from_dict(info["label_rule"]), modules, params, info
  stage.record_run(workdir, "classifier", config)
  t0 = time.time()
  k = config.classifier
  splits = digits_data.load_splits()
  rule = digits_data.make_label_rule(config.task, splits["x_train"], splits["c_train"])
  idx = digits_data.label_pair_indices(len(splits["x_train"]), k.num_labels, k.label_seed)
  x, c = splits["x_train"][idx], splits["c_train"][idx]
  y = rule.labels(x, c)
  y_held = rule.labels(splits["x_heldout"], splits["c_heldout"])
  held_in = (jnp.asarray(splits["x_heldout"]),) + (
      (jnp.asarray(splits["c_heldout"]),) if use_digit else ())
  params, per_task = [], {}
  for t, (name, module) in enumerate(zip(rule.names, modules)):
    p, fit_info = digits_data.fit_classifier(
        x, y[:, t], module.num_classes, k.seed + t, steps=k.steps, lr=k.lr,
        calib_fraction=k.calib_fraction, neighbour_diffs=module.neighbour_diffs,
        cond=c if use_digit else None)
    probs = np.asarray(jax.nn.softmax(module.apply(p, *held_in)))
    fit_info.update(heldout_acc=float((probs.argmax(-1) == y_held[:, t]).mean()),
                    heldout_ece=calibration.expected_calibration_error(probs, y_held[:, t]))
    per_task[name] = fit_info
    params.append(p)
    if multihost.is_main():
      print(f"[classifier] {name}: held-out acc {fit_info['heldout_acc']:.3f} "
            f"ECE {fit_info['heldout_ece']:.3f} T={fit_info['temperature']:.3g}", flush=True)
  _save_tree_marked(fs.join(stage_dir, "params"), params)
  info = {"config": wanted, "label_rule": rule.to_dict(), "tasks": per_task,
          "wall_time_s": time.time() - t0}
  _write_info(info_path, info)
  return rule, modules, params, info


# ----------------------------------------------------------------------------- the CTRL problem


def label_space(task: str) -> rewards.LabelSpace:
  return rewards.LabelSpace(digits_data.task_names(task), digits_data.task_classes(task))


def build_setup(config: ml_collections.ConfigDict, unet, modules) -> train.CtrlSetup:
  ls = label_space(config.task)
  model = augmented.AugmentedUNet(unet, num_labels=ls.num_labels, lora_rank=config.lora_rank,
                                  **augmented.model_options(config))
  weights = tuple(config.get("reward_weights") or ()) or (1.0,) * len(modules)
  if len(weights) != len(modules):
    raise ValueError(f"config.reward_weights={tuple(weights)}: need one weight per task name "
                     f"{digits_data.task_names(config.task)}.")
  reward_fn = rewards.make_reward_fn([m.apply for m in modules], weights,
                                     takes_prompt=[m.num_conditions > 0 for m in modules],
                                     log_eps=float(config.get("reward_log_eps", rewards.LOG_EPS)))
  return train.CtrlSetup(
      model=model, label_space=ls, reward_fn=reward_fn,
      decode_fn=lambda _, x0: digits_model.to_images(x0), latent_shape=(1, 8, 8),
      timesteps=schedules.ddim_timesteps(1000, config.num_inference_steps),
      **train.setup_options(config))


def _assemble(config: ml_collections.ConfigDict, setup: train.CtrlSetup, pre: dict,
              cls_params: list) -> tuple[dict, dict]:
  """(frozen inputs, initial trainable params) from the pre-trained and classifier params; the
  one place both `build_problem` and `abstract_problem` make them (same structure, dtypes)."""
  ctx, null_ctx = digits_model.contexts(pre)
  frozen = {"unet": pre["unet"], "reward": list(cls_params), "decoder": None,
            "contexts": ctx, "uncond_context": null_ctx,
            "schedule": digits_model.make_schedule(config.pretrain)}
  params = train.init_trainable(setup, jax.random.key(config.seed), pre["unet"],
                                full_finetune=config.get("full_finetune", False))
  return frozen, params


def build_problem(config: ml_collections.ConfigDict, workdir: str,
                  setup: train.CtrlSetup | None = None,
                  on_running: Optional[Callable[[], None]] = None) -> base.Problem:
  """Runs the missing stages, then returns the CTRL problem on the pre-trained digits model.

  `setup` (from `abstract_problem(config).setup`) is used instead of building an equal one, so
  a train step jitted on it before the stages ran is the one that trains. `on_running()` is
  called once: when pre-training's first step has run, or at once if there is none to run.
  """
  called = []

  def once():
    if on_running is not None and not called:
      called.append(True)
      on_running()

  unet, pre, pre_info = ensure_pretrained(config, workdir, once)
  once()
  _, modules, cls_params, cls_info = ensure_classifiers(config, workdir)
  setup = setup or build_setup(config, unet, modules)
  frozen, params = _assemble(config, setup, pre, cls_params)
  return base.Problem(setup=setup, frozen=frozen, params=params,
                            num_prompts=digits_model.NUM_DIGITS,
                            info={"pretrain": pre_info, "classifier": cls_info})


def abstract_problem(config: ml_collections.ConfigDict) -> base.Problem:
  """The problem `build_problem` will return, from the config alone: the real setup, frozen
  inputs and params as `jax.ShapeDtypeStruct`s. No stage runs and nothing is read from disk,
  so the train step can be compiled while pre-training runs (`experiment.finetune`)."""
  unet, abstract_pre = pretrained_target(config)
  modules, abstract_cls = classifier_target(config)
  setup = build_setup(config, unet, modules)
  frozen, params = jax.eval_shape(lambda pre, cls: _assemble(config, setup, pre, cls),
                                  abstract_pre, abstract_cls)
  return base.Problem(setup=setup, frozen=frozen, params=params,
                            num_prompts=digits_model.NUM_DIGITS)
