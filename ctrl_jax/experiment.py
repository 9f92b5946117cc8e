"""The CTRL fine-tuning loop: build the problem, resume from the last checkpoint, train, log.

`finetune(config, workdir)` is what `python -m ctrl_jax.launch.finetune` runs; everything it
does per step is the pure, jitted `train.make_train_step`.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctrl_jax.core import objective
from ctrl_jax.core import rewards
from ctrl_jax.core import sampling
from ctrl_jax.core import train
from ctrl_jax.models import attention
from ctrl_jax.models import augmented
from ctrl_jax.problems import base
from ctrl_jax.runtime import background_compile
from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import loop
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import sharding as shd
from ctrl_jax.runtime import stage


def build_problem(config: ml_collections.ConfigDict, workdir: str) -> base.Problem:
  """The problem `config.problem` names, its missing earlier stages run."""
  return base.get(config.problem).build(config, workdir)


def batch_arithmetic(config: ml_collections.ConfigDict, mesh) -> tuple[int, int]:
  """(micro_batch, num_micro_batches) of an update.

  micro_batch = config.micro_batch, or (when 0) micro_batch_per_device × #devices;
  num_micro_batches = config.num_micro_batches, or (when 0) trajectories_per_update /
  micro_batch — so the official "trajectories per update" holds on any number of devices.
  """
  micro = int(config.micro_batch)
  if micro == 0:
    micro = int(config.get("micro_batch_per_device", 0)) * mesh.size
  num = int(config.num_micro_batches)
  if num == 0:
    total = int(config.get("trajectories_per_update", 0))
    if micro < 1 or total % micro:
      raise ValueError(f"config.trajectories_per_update={total} is not a positive multiple of "
                       f"the micro-batch {micro} ({mesh.size} devices).")
    num = total // micro
  return micro, num


def updates_per_epoch(config: ml_collections.ConfigDict, mesh) -> int:
  """Updates in one official epoch (docs/method.md §7): `samples_per_epoch` trajectories,
  trained on in updates of micro_batch × num_micro_batches (= trajectories_per_update); 0 when
  the config has no `samples_per_epoch` (no epochs: `num_updates` counts updates)."""
  samples = config.get("samples_per_epoch", 0)
  if not samples:
    return 0
  micro, num = batch_arithmetic(config, mesh)
  if micro * num < 1 or samples % (micro * num):
    raise ValueError(f"config.samples_per_epoch={samples} is not a multiple of the {micro * num} "
                     f"trajectories per update (trajectories_per_update).")
  return samples // (micro * num)


def fill_epoch_counts(config: ml_collections.ConfigDict, mesh) -> None:
  """Derives, in place, `num_updates` = 0 → num_epochs × updates per epoch and
  `checkpoint_every` = 0 → one checkpoint per epoch (the official save_freq), when the config
  has `samples_per_epoch`; so `--config.num_epochs=8` sets the run's length. Explicit (> 0)
  values are kept. `validate_config` calls it first, before anything reads either field."""
  if (not config.get("samples_per_epoch", 0)
      or (config.get("num_updates") != 0 and config.get("checkpoint_every") != 0)):
    return
  per_epoch = updates_per_epoch(config, mesh)
  if config.num_updates == 0:
    config.num_updates = int(config.num_epochs) * per_epoch
  if config.checkpoint_every == 0:
    config.checkpoint_every = per_epoch


def epoch_metadata(config: ml_collections.ConfigDict, mesh, steps: list[int]) -> dict:
  """{"epochs": the mapping rule, "checkpoints": [{"step", "epoch"}]} of a run's saved
  `steps` (epoch = step / updates_per_epoch; fractional for a checkpoint saved mid-epoch, e.g.
  on preemption); {} without epochs. What lets a user pick "epoch 47" → update 94."""
  per_epoch = updates_per_epoch(config, mesh)
  if not per_epoch:
    return {}
  micro, num = batch_arithmetic(config, mesh)

  def epoch(step: int) -> int | float:
    return step // per_epoch if step % per_epoch == 0 else step / per_epoch

  return {"epochs": {"samples_per_epoch": int(config.samples_per_epoch),
                     "trajectories_per_update": micro * num,
                     "updates_per_epoch": per_epoch,
                     "num_epochs": epoch(int(config.num_updates)),
                     "rule": "checkpoint step = epoch × updates_per_epoch"},
          "checkpoints": [{"step": s, "epoch": epoch(s)} for s in steps]}


def _field(config: ml_collections.ConfigDict, name: str, expected: str,
           ok: Callable[[Any], bool], default: Any = None) -> None:
  value = config.get(name, default)
  try:
    good = ok(value)
  except (TypeError, ValueError):
    good = False
  if not good:
    raise ValueError(f"config.{name}={value!r}: expected {expected}.")


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def validate_config(config: ml_collections.ConfigDict, mesh=None) -> None:
  """Every CTRL field of `config` (types, ranges, choices) and the problem's own fields, before
  any work; raises ValueError naming the first bad field, its value and what is expected.
  `mesh` (default: all devices) fixes the batch arithmetic. Fills the derived `num_updates` and
  `checkpoint_every` first (`fill_epoch_counts`, in place)."""
  _field(config, "problem", f"one of {base.names()}", lambda v: v in base.names())
  _field(config, "seed", "an integer ≥ 0", lambda v: _count(v) and v >= 0)
  _field(config, "num_epochs", "an integer ≥ 1", lambda v: _count(v) and v >= 1, 1)
  _field(config, "samples_per_epoch", "an integer ≥ 0 (0: no epochs)",
         lambda v: _count(v) and v >= 0, 0)
  n = jax.device_count()
  _field(config, "fsdp", f"a positive divisor of the device count ({n}): the size of the mesh's "
         "'fsdp' axis (1 = every parameter replicated)",
         lambda v: _count(v) and v >= 1 and n % v == 0, 1)
  _field(config, "frozen_dtype", f"'' (as loaded) or one of {sorted(augmented.DTYPES)}",
         lambda v: v in ("", None) or v in augmented.DTYPES, "")
  mesh = mesh or make_mesh(config)
  fill_epoch_counts(config, mesh)
  _field(config, "num_updates", "an integer ≥ 1 (or 0 = num_epochs × updates per epoch, with "
         "samples_per_epoch set)", lambda v: _count(v) and v >= 1)
  _field(config, "num_inference_steps", "an integer ≥ 1", lambda v: _count(v) and v >= 1)
  _field(config, "eta", "a DDIM η in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1)
  _field(config, "guidance_scale", "a CFG scale ≥ 0", lambda v: _finite(v) and v >= 0)
  _field(config, "gamma", "a reward weight γ ≥ 0", lambda v: _finite(v) and v >= 0)
  _field(config, "kl_weight", "a KL weight ≥ 0", lambda v: _finite(v) and v >= 0)
  _field(config, "kl_convention", f"one of {objective.KL_CONVENTIONS}",
         lambda v: v in objective.KL_CONVENTIONS)
  _field(config, "truncation", f"one of {train.TRUNCATIONS}", lambda v: v in train.TRUNCATIONS)
  _field(config, "truncation_k", "an integer in [1, num_inference_steps]",
         lambda v: _count(v) and 1 <= v <= config.num_inference_steps, 1)
  for name in ("remat_policy", "reward_remat_policy"):
    _field(config, name, f"'' (off) or one of {sorted(sampling.REMAT_POLICIES)}",
           lambda v: v in ("", None) or v in sampling.REMAT_POLICIES, "")
  _field(config, "reward_micro_batch", "an integer ≥ 0 (0 = all images at once)",
         lambda v: _count(v) and v >= 0, 0)
  for name, default in (("truncation_mask_per_device", True), ("remat_layers", False)):
    _field(config, name, "True or False", lambda v: isinstance(v, bool), default)
  _field(config, "attention", f"one of {attention.IMPLEMENTATIONS}",
         lambda v: v in attention.IMPLEMENTATIONS, "naive")
  _field(config, "reference_dtype", f"'' or one of {sorted(augmented.DTYPES)}",
         lambda v: v in ("", None) or v in augmented.DTYPES, "")
  _field(config, "lora_rank", "an integer ≥ 0", lambda v: _count(v) and v >= 0)
  for name in ("lr_lora", "lr_label_embedding", "lr_unet", "weight_decay"):
    _field(config, name, "a number ≥ 0", lambda v: _finite(v) and v >= 0, 0.0)
  _field(config, "grad_clip_norm", "a number > 0", lambda v: _finite(v) and v > 0)
  _field(config, "lr_schedule", "'constant' or 'cosine'", lambda v: v in ("constant", "cosine"),
         "constant")
  _field(config, "lr_final_fraction", "a number in [0, 1]",
         lambda v: _finite(v) and 0 <= v <= 1, 1.0)
  _field(config, "lr_warmup_steps", "an integer in [0, num_updates)",
         lambda v: _count(v) and 0 <= v < config.num_updates, 0)
  _field(config, "log_every", "an integer ≥ 1", lambda v: _count(v) and v >= 1)
  _field(config, "tb_image_every", "an integer ≥ 0 (0 = no preview images)",
         lambda v: _count(v) and v >= 0, 0)
  _field(config, "checkpoint_every", "an integer ≥ 1 (or 0 = once per epoch, with "
         "samples_per_epoch set)", lambda v: _count(v) and v >= 1)
  _field(config, "max_checkpoints", "an integer ≥ 1", lambda v: _count(v) and v >= 1, 3)
  _field(config, "max_consecutive_skips", "an integer ≥ 1", lambda v: _count(v) and v >= 1,
         loop.MAX_CONSECUTIVE_SKIPS)
  micro, num = batch_arithmetic(config, mesh)
  for field, value in (("micro_batch", micro), ("num_micro_batches", num)):
    if value < 1:
      raise ValueError(f"config.{field}={value} must be ≥ 1.")
  shd.check_divisible(micro, mesh, "config.micro_batch")
  updates_per_epoch(config, mesh)  # samples_per_epoch a multiple of the update's trajectories
  if (shd.fsdp_size(mesh) > 1 and config.truncation == "random"
      and config.get("truncation_mask_per_device", True)):
    raise ValueError(f"config.fsdp={shd.fsdp_size(mesh)} needs "
                     "config.truncation_mask_per_device=False (one truncation mask per "
                     "micro-batch): per-device masks run the trajectory in shard_map, which "
                     "would gather every FSDP-split weight on every device.")
  start = int(config.get("reference_grad_from", 0))
  if start and not (config.reference_grad and 0 < start < int(config.num_updates)):
    raise ValueError(f"config.reference_grad_from={start}: expected 0 (every update), or an "
                     f"update in [1, num_updates={config.num_updates}) together with "
                     f"config.reference_grad=True (now {config.reference_grad}).")
  if config.eta <= 0 and config.kl_weight > 0:
    raise ValueError(f"config.eta={config.eta}: the path KL needs η > 0 (at η = 0 the chain is "
                     "deterministic and the KL is undefined); set eta > 0 or kl_weight = 0.")
  hooks = base.get(config.problem)
  if hooks.validate is not None:
    hooks.validate(config)


# Fields a resumed run may change: they steer logging, checkpoint cadence and what runs after
# training, not what is trained. Any other difference from the saved config is refused.
RESUME_SAFE_FIELDS = ("log_every", "tb_image_every", "attention", "fsdp", "checkpoint_every",
                      "max_checkpoints", "background_compile",
                      "max_consecutive_skips", "variant", "eval", "compare", "studies")


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the run's config as DIR/finetune/config.json, or (when DIR already holds CTRL
  checkpoints) compares it with the saved one: a field that changes shapes or meaning is refused
  with both values, a difference in `RESUME_SAFE_FIELDS` only warned about. `num_updates` (and
  `num_epochs`) may change when the learning rates do not depend on it (constant schedule, no
  warm-up)."""
  path = fs.join(workdir, "finetune", "config.json")
  now = stage.config_dict(config)
  if fs.exists(path) and checkpoint.latest_step(
      fs.join(workdir, "finetune", "ckpt")) is not None:
    saved = stage.read_json(path)
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    diff = {k: (flat_saved.get(k, "(absent)"), flat_now.get(k, "(absent)"))
            for k in sorted(set(flat_saved) | set(flat_now))
            if flat_saved.get(k) != flat_now.get(k)}
    schedule_free = (now.get("lr_schedule", "constant") == "constant"
                     and not now.get("lr_warmup_steps", 0))
    safe = {k: v for k, v in diff.items()
            if k.split(".")[0] in RESUME_SAFE_FIELDS
            or (k in ("num_updates", "num_epochs") and schedule_free)}
    refused = {k: v for k, v in diff.items() if k not in safe}
    if refused:
      raise ValueError(
          f"{workdir!r} holds a CTRL run made with another config ("
          + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in refused.items())
          + "); use a fresh --workdir, or the saved values to resume.")
    if safe and multihost.is_main():
      print("[finetune] warning: resuming with changed " + ", ".join(
          f"{k} ({a!r} → {b!r})" for k, (a, b) in safe.items()), file=sys.stderr, flush=True)
  if multihost.is_main():
    stage.write_json(path, now)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def make_mesh(config: ml_collections.ConfigDict):
  """The run's mesh over every device: ('data', 'fsdp') with config.fsdp (default 1)."""
  return shd.make_mesh(fsdp=int(config.get("fsdp", 1)))


# Frozen subtrees stored in config.frozen_dtype (the large weights: UNet, VAE decoder,
# reward models); prompt contexts, the schedule and the per-run scalars keep float32.
FROZEN_WEIGHTS = ("unet", "decoder", "reward")


def frozen_storage(frozen: dict, config: ml_collections.ConfigDict) -> dict:
  """`frozen` with its weights (`FROZEN_WEIGHTS`) cast to config.frozen_dtype ('' = as
  loaded). Storage only: each model computes in its own activation dtype (the reference UNet in
  float32 with `reference_dtype` float32), from the rounded weights."""
  name = config.get("frozen_dtype", "") or ""
  if not name:
    return frozen
  dtype = augmented.DTYPES[name]

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return {k: (jax.tree_util.tree_map(cast, v) if k in FROZEN_WEIGHTS and v is not None else v)
          for k, v in frozen.items()}


def place_frozen(frozen: dict, config: ml_collections.ConfigDict, mesh) -> tuple[dict, Any]:
  """(frozen inputs stored as configured, placed on `mesh`; their shardings): the weights in
  config.frozen_dtype, split over the mesh's 'fsdp' axis (`sharding.fsdp_sharding`; replicated
  when fsdp = 1). `frozen` may be ShapeDtypeStructs (the background compile's shapes): then the
  result is ShapeDtypeStructs carrying the shardings."""
  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(frozen))
  stored = (jax.eval_shape(lambda f: frozen_storage(f, config), frozen) if abstract
            else frozen_storage(frozen, config))
  shardings = shd.fsdp_sharding(stored, mesh)
  if abstract:
    return background_compile.abstract_like(stored, shardings), shardings
  return shd.put(stored, shardings), shardings


def optimizer_args(config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments of `train.make_optimizer` (and `train.learning_rates`) in `config`."""
  return dict(
      lr_lora=config.lr_lora, lr_label_embedding=config.lr_label_embedding,
      lr_unet=config.get("lr_unet", 0.0), weight_decay=config.weight_decay,
      grad_clip_norm=config.grad_clip_norm, lr_schedule=config.get("lr_schedule", "constant"),
      num_updates=config.num_updates, lr_final_fraction=config.get("lr_final_fraction", 1.0),
      lr_warmup_steps=config.get("lr_warmup_steps", 0))


def make_optimizer(config: ml_collections.ConfigDict):
  return train.make_optimizer(**optimizer_args(config))


def learning_rate_scalars(config: ml_collections.ConfigDict, params: dict
                          ) -> Callable[[int], dict]:
  """`scalars(step)`: {"lr/<group>": lr} of update `step` for the trained groups of `params`
  (lora, label_embedding, unet), logged with the update's metrics."""
  args = optimizer_args(config)
  return lambda step: {f"lr/{group}": lr
                       for group, lr in train.learning_rates(step, **args).items()
                       if group in params}


def preview_images(config: ml_collections.ConfigDict, problem: base.Problem, frozen: dict,
                   mesh) -> Callable[[dict], dict] | None:
  """`images(state) -> {"samples/grid": uint8 [H, W, 3]}`, the problem's preview grid
  (`ProblemHooks.preview`) sampled from state["params"]; None when config.tb_image_every is 0
  or the problem has none."""
  hook = base.get(config.problem).preview
  if not config.get("tb_image_every", 0) or hook is None:
    return None
  render = hook(config, problem).renderer(problem.setup, frozen, mesh)
  return lambda state: {"samples/grid": render(state["params"])}


def load_finetuned(config: ml_collections.ConfigDict, workdir: str, problem: base.Problem,
                   step: int | None = None) -> tuple[dict, int]:
  """(trainable params, update number) of the latest CTRL checkpoint in `workdir`, or of update
  `step` (an epoch's: DIR/finetune/info.json "checkpoints", e.g. multitask epoch 47 → 94)."""
  ckpt = checkpoint.Checkpointer(fs.join(workdir, "finetune", "ckpt"))
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no CTRL checkpoint in {ckpt.directory}; run "
                              "`python -m ctrl_jax.launch.finetune` with this --workdir first.")
    step = ckpt.latest_step() if step is None else step
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f"no CTRL checkpoint of update {step} in {ckpt.directory}; kept: "
                              f"{ckpt.all_steps()}.")
    target = train.create_train_state(problem.params, make_optimizer(config))
    state = ckpt.restore(target, step)
    return state["params"], step
  finally:
    ckpt.close()


def abstract_batch(label_space: rewards.LabelSpace, num_micro: int, micro: int,
                   sharding) -> dict:
  """ShapeDtypeStructs of `rewards.sample_requests(...)` placed with `sharding` (shapes and dtypes
  taken from a real, cheap, host-side batch, so they cannot drift from it)."""
  example = rewards.sample_requests(0, 0, label_space, 1, num_micro, micro)
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), example)


def _abstract_state(abstract_params: dict, optimizer, sharding) -> dict:
  """ShapeDtypeStructs of `train.create_train_state(params, optimizer, mesh)`."""
  return background_compile.abstract_like(
      jax.eval_shape(lambda p: train.create_train_state(p, optimizer), abstract_params), sharding)


def step_memory(step_fn, *args) -> dict[str, float]:
  """XLA's memory plan of the compiled train step (bytes; per device): arguments (params,
  optimiser state, frozen inputs), outputs, and temporaries (activations kept for the
  backward pass, gradients); plus "flops", XLA's cost-analysis count of floating-point
  operations per update (a device-independent cost, next to the measured seconds). A
  compilation-cache hit when the step already ran."""
  compiled = step_fn.lower(*args).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
          "temp": int(m.temp_size_in_bytes),
          "peak_estimate": int(m.argument_size_in_bytes + m.output_size_in_bytes
                               + m.temp_size_in_bytes - m.alias_size_in_bytes),
          "flops": float(cost.get("flops", 0.0))}


def finetune(config: ml_collections.ConfigDict, workdir: str,
             problem: base.Problem | None = None, measure_memory: bool = False) -> dict[str, Any]:
  """Runs (or resumes) CTRL fine-tuning; returns the final params and run info.

  Writes `workdir/finetune/ckpt/<step>` (orbax; state = {"step", "params", "opt"}),
  `workdir/finetune.jsonl` and TensorBoard events in `workdir/tb/finetune` (see `loop.run`),
  and `workdir/finetune/info.json` at the end: wall time of this invocation's training,
  steady-state seconds per update, trainable parameter count, (measure_memory) XLA's memory
  plan of the train step (`step_memory`), and for configs with epochs the epoch of every kept
  checkpoint (`epoch_metadata`).
  """
  validate_config(config)
  mesh = make_mesh(config)
  check_resume_config(config, workdir)
  optimizer = make_optimizer(config)
  micro, num_micro = batch_arithmetic(config, mesh)
  per_epoch = updates_per_epoch(config, mesh)
  if per_epoch and multihost.is_main():
    print(f"[finetune] {config.num_updates} updates of {micro * num_micro} trajectories = "
          f"{config.num_updates / per_epoch:g} epochs of {config.samples_per_epoch} "
          f"(epoch e ends at update e × {per_epoch})", flush=True)
  repl = shd.replicated(mesh)
  batch_sharding = shd.data_sharded(mesh, batch_axis=1)
  key = shd.put(jax.random.key(config.seed), repl)
  background = None
  finished = checkpoint.latest_step(
      fs.join(workdir, "finetune", "ckpt")) == config.num_updates
  if not finished:
    stage.record_run(workdir, "finetune", config)
  hooks = None if problem is not None else base.get(config.problem)
  if (hooks is not None and hooks.abstract is not None and not finished
      and config.get("background_compile", True)):
    # Compile the train step from shapes while the earlier stages (pre-training, classifier)
    # run; the builder then uses the same setup, so the first update reuses the executable.
    # Started once pre-training's own step has compiled, not to slow that compilation down.
    abstract = hooks.abstract(config)
    state_s = train.state_sharding(abstract.params, optimizer, mesh)
    abstract_frozen, frozen_s = place_frozen(
        {**abstract.frozen, "hparams": train.hparams_from_config(config)}, config, mesh)
    step_fn = train.make_train_step(abstract.setup, optimizer, mesh, state_shardings=state_s,
                                    frozen_shardings=frozen_s)
    started = []

    def start_compiling():
      started.append(background_compile.BackgroundCompile(
          step_fn, _abstract_state(abstract.params, optimizer, state_s),
          abstract_batch(abstract.setup.label_space, num_micro, micro, batch_sharding),
          background_compile.abstract_like(key, repl), abstract_frozen,
          name="train_step"))

    problem = hooks.build(config, workdir, setup=abstract.setup, on_running=start_compiling)
    if not started:
      start_compiling()
    background = started[0]
  else:
    problem = problem or hooks.build(config, workdir)
    state_s = train.state_sharding(problem.params, optimizer, mesh)
    step_fn = None  # made below, once the frozen inputs' shardings are known
  t_start = time.time()
  setup = problem.setup
  # Every process built its own copy of the problem: they must agree before they are treated as
  # one replicated value.
  multihost.check_same((problem.params, problem.frozen), "the problem's params and frozen inputs")
  frozen, frozen_s = place_frozen(
      {**problem.frozen, "hparams": train.hparams_from_config(config)}, config, mesh)
  if step_fn is None:
    step_fn = train.make_train_step(setup, optimizer, mesh, state_shardings=state_s,
                                    frozen_shardings=frozen_s)
  state = train.create_train_state(problem.params, optimizer, mesh, sharding=state_s)
  if background is not None and not background.done():
    print("[finetune] waiting for the train step's background compilation", flush=True)
  if background is not None and background.wait().error:
    print(f"[finetune] background compilation failed; compiling now:\n{background.error}",
          flush=True)

  def batch_fn(step):
    # Placed explicitly: a multi-process jit refuses numpy inputs with non-trivial shardings
    # (every process computes the same global requests from (seed, step)).
    return shd.put(rewards.sample_requests(config.seed, step, setup.label_space,
                                           problem.num_prompts, num_micro, micro),
                   batch_sharding)

  multihost.compile_together(step_fn, state, batch_fn(0), key, frozen, name="train step")
  calls = []  # host time after each call: the first includes compilation
  first_call_compiles = []

  def timed_step(s, b):
    if calls:
      out = step_fn(s, b, key, frozen)
    else:
      with background_compile.count_compiles("train_step") as n:
        out = step_fn(s, b, key, frozen)
      first_call_compiles.append(n[0])
    calls.append(time.time())
    return out

  state, history, start = loop.run(
      "finetune", workdir, state, timed_step, batch_fn,
      config.num_updates, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      max_checkpoints=config.get("max_checkpoints", 3), shown=("loss", "reward", "kl"),
      max_consecutive_skips=config.get("max_consecutive_skips", loop.MAX_CONSECUTIVE_SKIPS),
      step_scalars=learning_rate_scalars(config, problem.params),
      images_fn=preview_images(config, problem, frozen, mesh),
      images_every=config.get("tb_image_every", 0))
  t_end = time.time()
  info = {"wall_time_s": t_end - t_start, "start_step": start,
          "num_updates": config.num_updates,
          # steady-state seconds per update (first update, which compiles, excluded)
          "seconds_per_update": ((t_end - calls[0]) / (len(calls) - 1)
                                 if len(calls) > 1 else None),
          "trainable_params": int(sum(np.size(v) for v in
                                      jax.tree_util.tree_leaves(problem.params))),
          # the train step compiled on a background thread during the earlier stages (s), and
          # whether the first update had to compile it again (it should not)
          "background_compile_s": background.seconds if background else None,
          "first_update_compiled": (bool(first_call_compiles[0]) if first_call_compiles
                                    else None)}
  if measure_memory:
    info["step_memory_bytes"] = step_memory(step_fn, state, batch_fn(0), key, frozen)
  info_path = fs.join(workdir, "finetune", "info.json")
  if start == config.num_updates and fs.exists(info_path):
    # Nothing trained: keep the training run's timings, add what this call measured.
    kept = fs.read_json(info_path)
    info = {**info, **kept, **{k: info[k] for k in ("trainable_params", "step_memory_bytes")
                               if k in info}}
  info.update(epoch_metadata(config, mesh, checkpoint.all_steps(
      fs.join(workdir, "finetune", "ckpt"))))
  if multihost.is_main():
    fs.write_json(info_path, info)
  multihost.barrier("finetune/info.json")  # the stage is done (its info.json) for every process
  return {"params": state["params"], "state": state, "history": history,
          "wall_time_s": info["wall_time_s"], "start_step": start}


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: dict | None = None) -> dict:
  """Runs the problem's evaluation of the CTRL run in `workdir` (its latest checkpoint unless
  `params` is given): DIR/eval/."""
  hooks = base.get(config.problem)
  run_evaluation = base.hook(config.problem, "evaluate")
  for name in hooks.required_stages:
    if params is None and not fs.exists(fs.join(workdir, name, "info.json")):
      raise FileNotFoundError(f"{workdir!r} has no finished {name} stage; run "
                              "`python -m ctrl_jax.launch.finetune` with this --workdir first.")
  stage.record_run(workdir, "eval", config)
  problem = hooks.build(config, workdir)
  if params is None:
    params, step = load_finetuned(config, workdir, problem)
    if multihost.is_main():
      print(f"[eval] fine-tuned params from update {step}", flush=True)
  return run_evaluation(config, workdir, problem, params)
