"""The CTRL train step: loss through the DDIM trajectory, optimiser, jitted sharded update.

State is a plain dict {"step": int32 [], "params": trainable tree, "opt": optax state}. Only
trainable parameters (label embedding, LoRA; the UNet too for full fine-tuning) are in it, so
frozen weights get neither gradients nor optimiser state; the frozen UNet, classifiers,
decoder, prompt contexts, schedule and per-run scalars (γ, guidance scale, η) are passed in a
separate `frozen` tree that is never donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ctrl_jax.core import objective
from ctrl_jax.core import rewards
from ctrl_jax.core import sampling
from ctrl_jax.models.augmented import AugmentedUNet
from ctrl_jax.runtime import sharding as shd

TRUNCATIONS = ("none", "random", "last_k")
PARAM_GROUPS = ("lora", "label_embedding", "unet")


@dataclasses.dataclass(frozen=True)
class CtrlSetup:
  """Static (non-traced) description of a CTRL fine-tuning problem.

  Attributes:
    model: the augmented UNet.
    label_space: the task(s) and their class counts.
    reward_fn: `(reward_params, images, y [B, T], prompt [B]) -> (reward [B], aux)`
      (rewards.make_reward_fn; prompt = the condition index, used by p̂(y | x, c) rewards).
    decode_fn: `(decoder_params, x0 [B, C, H, W]) -> images` fed to the classifiers.
    latent_shape: (C, H, W).
    timesteps: int [N] DDIM timesteps, noisiest first.
    use_cfg: classifier-free guidance in both models (conditional (c, y) vs ("", NULL)).
    kl_convention: "official" or "exact" (objective.path_kl).
    truncation: "none" (gradient through every step), "random" (CTRL's random truncated
      back-prop) or "last_k" (gradient only through the final `truncation_k` steps).
    remat_policy: jax.checkpoint policy around each model call, or None.
    reference_grad: back-propagate through the reference model's input too.
    reference_grad_from: with reference_grad, the first update (0-based) that does: updates
      before it take ε_pre as a constant (the cheaper, biased KL gradient), in the same
      compiled step (a traced switch on the update number). 0 = every update.
    mask_per_device: under random truncation on a data mesh of D > 1 devices, every device
      draws its own truncation mask for its share of the micro-batch (the trajectory runs in
      `shard_map`), as the official code does per GPU; False: one mask per micro-batch.
    reward_remat_policy: jax.checkpoint policy around the reward path (decode + classifiers),
      or None.
    reward_micro_batch: with reward_remat_policy, images per device decoded together: the
      micro-batch's rewards run in sequence over groups of this many per device, each group
      rematerialised, so the backward holds one group's decoder activations. 0 = all at once.
  """
  model: AugmentedUNet
  label_space: rewards.LabelSpace
  reward_fn: Callable[..., Any]
  decode_fn: Callable[[Any, jnp.ndarray], jnp.ndarray]
  latent_shape: tuple[int, int, int]
  timesteps: np.ndarray
  use_cfg: bool = True
  kl_convention: str = "official"
  truncation: str = "random"
  truncation_k: int = 1
  remat_policy: Optional[str] = "nothing_saveable"
  reference_grad: bool = True
  reference_grad_from: int = 0
  mask_per_device: bool = True
  reward_remat_policy: Optional[str] = None
  reward_micro_batch: int = 0

  def __post_init__(self):
    if self.reward_remat_policy is not None and (
        self.reward_remat_policy not in sampling.REMAT_POLICIES):
      raise ValueError(f"reward_remat_policy={self.reward_remat_policy!r}; expected None or one "
                       f"of {sorted(sampling.REMAT_POLICIES)}.")
    if self.reward_micro_batch < 0:
      raise ValueError(f"reward_micro_batch={self.reward_micro_batch} must be ≥ 0.")
    if self.truncation not in TRUNCATIONS:
      raise ValueError(f"truncation={self.truncation!r}; expected one of {TRUNCATIONS}.")
    if self.kl_convention not in objective.KL_CONVENTIONS:
      raise ValueError(f"kl_convention={self.kl_convention!r}; expected one of "
                       f"{objective.KL_CONVENTIONS}.")
    n = len(self.timesteps)
    if self.truncation == "last_k" and not 1 <= self.truncation_k <= n:
      raise ValueError(f"truncation_k={self.truncation_k} must be in [1, {n}] (num steps).")
    if self.reference_grad_from < 0 or (self.reference_grad_from and not self.reference_grad):
      raise ValueError(f"reference_grad_from={self.reference_grad_from}: expected 0, or ≥ 1 "
                       "together with reference_grad=True.")
    if self.model.num_labels != self.label_space.num_labels:
      raise ValueError(f"model has {self.model.num_labels} labels, label space "
                       f"{self.label_space.num_labels}.")

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.latent_shape))


def make_hparams(gamma: float, kl_weight: float, guidance_scale: float, eta: float) -> dict:
  """Per-run scalars as float32 arrays: changing them never recompiles the step."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in
          dict(gamma=gamma, kl_weight=kl_weight, guidance_scale=guidance_scale,
               eta=eta).items()}


def hparams_from_config(config) -> dict:
  """`make_hparams` from a run config's gamma, kl_weight, guidance_scale and eta."""
  return make_hparams(gamma=config.gamma, kl_weight=config.kl_weight,
                      guidance_scale=config.guidance_scale, eta=config.eta)


def setup_options(config) -> dict:
  """The `CtrlSetup` keyword arguments a run config sets (every problem's builder uses them)."""
  return dict(
      use_cfg=config.use_cfg, kl_convention=config.kl_convention, truncation=config.truncation,
      truncation_k=config.truncation_k, remat_policy=config.remat_policy or None,
      reference_grad=config.reference_grad,
      reference_grad_from=config.get("reference_grad_from", 0),
      mask_per_device=config.get("truncation_mask_per_device", True),
      reward_remat_policy=config.get("reward_remat_policy", "") or None,
      reward_micro_batch=config.get("reward_micro_batch", 0))


def eps_functions(setup: CtrlSetup, frozen: dict, prompt: jnp.ndarray, labels: jnp.ndarray):
  """(policy_eps, reference_eps) closures for one micro-batch, CFG included.

  Args:
    prompt: int [b] index into frozen["contexts"] [P, L, D].
    labels: int [b] combined label index.
  """
  return _eps_closures(setup, frozen["contexts"][prompt], labels, frozen.get("uncond_context"),
                       frozen["hparams"]["guidance_scale"], frozen["unet"])


def _eps_closures(setup: CtrlSetup, ctx: jnp.ndarray, labels: jnp.ndarray,
                  uncond: Optional[jnp.ndarray], scale: jnp.ndarray, unet_ref: Any):
  """`eps_functions` from the micro-batch's contexts [b, L, D] themselves. The guided ε
  (ε_∅ + w (ε_c − ε_∅)) is combined in float32 whatever the activation dtype."""
  model = setup.model
  if setup.use_cfg:
    unc = jnp.broadcast_to(uncond[None], ctx.shape)
    ctx2 = jnp.concatenate([unc, ctx], axis=0)
    labels2 = jnp.concatenate([jnp.full_like(labels, model.null_label), labels], axis=0)

  def guided(e):
    e_unc, e_c = jnp.split(e.astype(jnp.float32), 2, axis=0)
    return sampling.classifier_free_guidance(e_unc, e_c, scale)

  def policy_eps(params, x, t):
    unet = params.get("unet", unet_ref)
    if not setup.use_cfg:
      return model.apply(unet, params, x, t, ctx, labels)
    return guided(model.apply(unet, params, jnp.concatenate([x, x], axis=0), t, ctx2, labels2))

  def reference_eps(ref_unet, x, t):
    if not setup.use_cfg:
      return model.apply_pretrained(ref_unet, x, t, ctx)
    return guided(model.apply_pretrained(ref_unet, jnp.concatenate([x, x], axis=0), t, ctx2))

  return policy_eps, reference_eps


def _data_devices(mesh: Optional[Mesh]) -> int:
  return 1 if mesh is None else shd.batch_shards(mesh)


def _trajectory(setup: CtrlSetup, params: dict, frozen: dict, micro_batch: dict, labels,
                x_T: jnp.ndarray, k_noise: jax.Array, k_mask: jax.Array,
                ref_mask: Optional[jnp.ndarray], mesh: Optional[Mesh]) -> sampling.Trajectory:
  """The side-by-side trajectory of one micro-batch. Under random truncation with
  `mask_per_device` on D > 1 data devices it runs in `shard_map`, each device with its own
  truncation mask (`sampling.device_truncation_mask`), the same x_T and per-step noise as the
  global draw; `grad_mask` is then [D, N]."""
  hp = frozen["hparams"]
  n = len(setup.timesteps)
  common = dict(remat_policy=setup.remat_policy, reference_grad=setup.reference_grad,
                reference_grad_mask=ref_mask)
  timesteps = jnp.asarray(setup.timesteps)
  ctx = frozen["contexts"][micro_batch["prompt"]]
  num_dev = _data_devices(mesh)
  if not (setup.truncation == "random" and setup.mask_per_device and num_dev > 1):
    grad_mask, n0 = None, 0
    if setup.truncation == "random":
      grad_mask = sampling.random_truncation_mask(k_mask, n)
    elif setup.truncation == "last_k":
      n0 = n - setup.truncation_k
    policy_eps, reference_eps = _eps_closures(setup, ctx, labels, frozen.get("uncond_context"),
                                              hp["guidance_scale"], frozen["unet"])
    return sampling.ctrl_trajectory(
        policy_eps, reference_eps, params, frozen["unet"], frozen["schedule"], timesteps, x_T,
        k_noise, hp["eta"], grad_mask=grad_mask, num_no_grad_steps=n0, **common)

  if shd.fsdp_size(mesh) > 1:
    # shard_map would gather every FSDP-split frozen weight on every device before the loop.
    raise ValueError("per-device truncation masks (truncation_mask_per_device) need an "
                     "'fsdp' axis of size 1; set truncation_mask_per_device=False with fsdp > 1.")
  noise = sampling.step_noise(k_noise, n, x_T.shape, x_T.dtype)
  shared = {"unet": frozen["unet"], "schedule": frozen["schedule"], "hparams": hp,
            "uncond": frozen.get("uncond_context")}
  ref_flag = jnp.asarray(True) if ref_mask is None else jnp.asarray(ref_mask)
  axes = tuple(a for a in shd.BATCH if a in mesh.shape)

  def local(params, shared, x_T, noise, ctx, labels, k_mask, ref_flag):
    # Mark the replicated trainable params device-varying here, once: the transpose of that
    # cast is the psum of their gradient over devices, and it must run outside the per-step
    # `lax.cond`, whose branch differs between devices (a collective inside it deadlocks).
    params = jax.lax.pcast(params, axes, to="varying")
    device = jax.lax.axis_index(axes)
    mask = sampling.device_truncation_mask(k_mask, n, device)
    policy_eps, reference_eps = _eps_closures(setup, ctx, labels, shared["uncond"],
                                              shared["hparams"]["guidance_scale"],
                                              shared["unet"])
    traj = sampling.ctrl_trajectory(
        policy_eps, reference_eps, params, shared["unet"], shared["schedule"], timesteps, x_T,
        k_mask, shared["hparams"]["eta"], grad_mask=mask, noise=noise,  # noise given: key unused
        **dict(common, reference_grad_mask=None if ref_mask is None else ref_flag))
    return traj.x0, traj.kl, traj.grad_mask[None]

  spec = shd.batch_spec(mesh)
  data, rep = P(spec), P()
  x0, kl, grad_mask = jax.shard_map(
      local, mesh=mesh,
      in_specs=(rep, rep, data, P(None, spec), data, data, rep, rep),
      out_specs=(data, P(None, spec), data))(
          params, shared, x_T, noise, ctx, labels, k_mask, ref_flag)
  return sampling.Trajectory(x0=x0, kl=kl, grad_mask=grad_mask)


def _reward(setup: CtrlSetup, frozen: dict, x0: jnp.ndarray, y: jnp.ndarray,
            prompt: jnp.ndarray, num_dev: int):
  """(reward [b], aux) of the final latents: decode, then the classifiers; with
  `reward_remat_policy`, rematerialised in groups of `reward_micro_batch` images per device.
  Group g holds the samples i with i % S == g (S groups), i.e. the same number on every device
  of a contiguous data sharding, so no sample changes device."""
  def reward_of(decoder, reward_params, x0, y, prompt):
    images = setup.decode_fn(decoder, x0)
    return setup.reward_fn(reward_params, images, y, prompt)

  if setup.reward_remat_policy is None:
    return reward_of(frozen.get("decoder"), frozen["reward"], x0, y, prompt)
  fn = jax.checkpoint(reward_of, policy=sampling.REMAT_POLICIES[setup.reward_remat_policy],
                      prevent_cse=False)
  b = x0.shape[0]
  per_dev = b // num_dev
  groups = per_dev // setup.reward_micro_batch if setup.reward_micro_batch else 1
  if groups <= 1 or per_dev % setup.reward_micro_batch:
    return fn(frozen.get("decoder"), frozen["reward"], x0, y, prompt)

  def split(v):  # [b, ...] → [S, b / S, ...], group g = samples g, g + S, …
    return jnp.moveaxis(v.reshape((b // groups, groups) + v.shape[1:]), 1, 0)

  def merge(v):  # [S, b / S, ...] → [b, ...]
    return jnp.moveaxis(v, 0, 1).reshape((b,) + v.shape[2:])

  out = jax.lax.map(lambda a: fn(frozen.get("decoder"), frozen["reward"], *a),
                    (split(x0), split(y), split(prompt)))
  return jax.tree_util.tree_map(merge, out)


def loss_fn(params: dict, frozen: dict, micro_batch: dict, key: jax.Array, setup: CtrlSetup,
            mesh: Optional[Mesh] = None, step: Optional[jnp.ndarray] = None
            ) -> tuple[jnp.ndarray, dict]:
  """CTRL loss of one micro-batch: −γ · mean(reward) + kl_weight · KL.

  Args:
    params: trainable tree. frozen: see module docstring.
    micro_batch: {"prompt": int [b], "y": int [b, T]}.
    key: PRNG key of this micro-batch (x_T, per-step noise, truncation mask).
    step: int [] the update number (only `setup.reference_grad_from` reads it; required then).
  """
  hp = frozen["hparams"]
  k_x, k_noise, k_mask = jax.random.split(key, 3)
  b = micro_batch["prompt"].shape[0]
  x_T = jax.random.normal(k_x, (b,) + tuple(setup.latent_shape), jnp.float32)
  if mesh is not None and mesh.devices.size > 1:
    x_T = jax.lax.with_sharding_constraint(x_T, shd.data_sharded(mesh))
  labels = setup.label_space.encode(micro_batch["y"])
  ref_mask = None
  if setup.reference_grad and setup.reference_grad_from:
    if step is None:
      raise ValueError("setup.reference_grad_from needs the update number: pass step=.")
    ref_mask = jnp.asarray(step) >= setup.reference_grad_from
  traj = _trajectory(setup, params, frozen, micro_batch, labels, x_T, k_noise, k_mask,
                     ref_mask, mesh)
  reward, aux = _reward(setup, frozen, traj.x0, micro_batch["y"], micro_batch["prompt"],
                        _data_devices(mesh))
  kl = objective.path_kl(traj.kl, setup.num_dims, setup.kl_convention)
  loss = objective.ctrl_loss(reward, kl, hp["gamma"], hp["kl_weight"])
  metrics = {"loss": loss, "reward": jnp.mean(reward), "kl": kl,
             "kl_exact": jnp.mean(jnp.sum(traj.kl, axis=0)),
             # differentiated steps per device (mean over devices of per-device masks)
             "grad_steps": jnp.sum(traj.grad_mask.astype(jnp.float32)) / (
                 traj.grad_mask.shape[0] if traj.grad_mask.ndim == 2 else 1)}
  if setup.reference_grad_from:
    metrics["exact_kl_grad"] = ref_mask.astype(jnp.float32)
  for name, probs, y in zip(setup.label_space.task_names, aux["probs"],
                            jnp.moveaxis(micro_batch["y"], -1, 0)):
    metrics[f"classifier_acc/{name}"] = jnp.mean(
        (jnp.argmax(probs, axis=-1) == y).astype(jnp.float32))
  return loss, metrics


# ----------------------------------------------------------------------------- optimiser


def param_groups(params: dict) -> dict:
  """Optimiser group of every leaf: its top-level key ("lora", "label_embedding", "unet")."""
  unknown = set(params) - set(PARAM_GROUPS)
  if unknown:
    raise ValueError(f"trainable params have unknown groups {sorted(unknown)}; expected a "
                     f"subset of {PARAM_GROUPS}.")
  return {k: jax.tree_util.tree_map(lambda _, k=k: k, v) for k, v in params.items()}


def mask_null_label_gradient() -> optax.GradientTransformation:
  """Zeroes the gradient of the NULL row (the last) of the label table: it stays exactly 0."""

  def update(updates, state, params=None):
    del params
    if "label_embedding" in updates:
      updates = dict(updates)
      updates["label_embedding"] = updates["label_embedding"].at[-1].set(0.0)
    return updates, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lr_schedule_fn(lr: float, lr_schedule: str = "constant", num_updates: int = 0,
                   lr_final_fraction: float = 1.0, lr_warmup_steps: int = 0):
  """One group's learning rate: a float (constant, no warm-up) or an optax schedule
  (update count n → lr). What `make_optimizer` gives each group's AdamW and
  `learning_rates` evaluates."""
  warmup = int(lr_warmup_steps)
  if warmup < 0 or (lr_schedule == "cosine" and warmup >= num_updates):
    raise ValueError(f"lr_warmup_steps={lr_warmup_steps}: expected ≥ 0 (and < num_updates="
                     f"{num_updates} with a cosine schedule).")
  if lr_schedule == "constant":
    # A plain float without a warm-up: the optimiser state (and so old checkpoints) keeps the
    # structure it had before schedules existed (no schedule count).
    main = lr if not warmup else optax.constant_schedule(lr)
  elif lr_schedule == "cosine":
    if num_updates < 1 or not 0.0 <= lr_final_fraction <= 1.0:
      raise ValueError(f"lr_schedule='cosine' needs num_updates ≥ 1 (got {num_updates}) and "
                       f"0 ≤ lr_final_fraction ≤ 1 (got {lr_final_fraction}).")
    main = optax.cosine_decay_schedule(lr, num_updates - warmup, lr_final_fraction)
  else:
    raise ValueError(f"lr_schedule={lr_schedule!r}; expected 'constant' or 'cosine'.")
  if not warmup:
    return main
  return optax.join_schedules([lambda n: lr * (n + 1) / warmup, main], [warmup])


def learning_rates(update: int, lr_lora: float, lr_label_embedding: float, lr_unet: float = 0.0,
                   lr_schedule: str = "constant", num_updates: int = 0,
                   lr_final_fraction: float = 1.0, lr_warmup_steps: int = 0,
                   **unused) -> dict[str, float]:
  """{group: lr} that `make_optimizer` (same arguments) applies at update `update` (0-based:
  the optimiser's count, which equals the train step's while no update was skipped). Pure and
  host-side: for logging (`lr/<group>` scalars)."""
  del unused  # the optimiser's other arguments (weight decay, clip, …)
  out = {}
  for group, lr in (("lora", lr_lora), ("label_embedding", lr_label_embedding),
                    ("unet", lr_unet)):
    fn = lr_schedule_fn(lr, lr_schedule, num_updates, lr_final_fraction, lr_warmup_steps)
    out[group] = float(fn(update)) if callable(fn) else float(fn)
  return out


def make_optimizer(lr_lora: float, lr_label_embedding: float, lr_unet: float = 0.0,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip_norm: float = 5.0, lr_schedule: str = "constant",
                   num_updates: int = 0, lr_final_fraction: float = 1.0,
                   lr_warmup_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with one learning rate per parameter group, global-norm clipping (official settings:
  docs/method.md §7).

  lr_schedule: "constant" (official), or "cosine": every group's lr decays from its value to
  `lr_final_fraction` × it over the updates after the warm-up (a less noisy last iterate).
  lr_warmup_steps: the first n updates use lr · (k + 1) / n at update k (0 = none): Adam's
  first steps are full-sized whatever the gradient's scale. `learning_rates` gives the lr of
  every group at an update.
  """

  def adamw(lr):
    return optax.adamw(lr_schedule_fn(lr, lr_schedule, num_updates, lr_final_fraction,
                                      lr_warmup_steps),
                       b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  return optax.chain(
      mask_null_label_gradient(),
      optax.clip_by_global_norm(grad_clip_norm),
      optax.multi_transform({"lora": adamw(lr_lora),
                             "label_embedding": adamw(lr_label_embedding),
                             "unet": adamw(lr_unet)}, param_groups))


def init_trainable(setup: CtrlSetup, key: jax.Array, unet_params: dict,
                   full_finetune: bool = False) -> dict:
  """Trainable tree: the model's ctrl params, plus a copy of the UNet for full fine-tuning."""
  params = setup.model.init_ctrl_params(key, unet_params)
  if full_finetune:
    params["unet"] = jax.tree_util.tree_map(jnp.copy, unet_params)
  return params


def create_train_state(params: dict, optimizer: optax.GradientTransformation,
                       mesh: Optional[Mesh] = None, sharding: Any = None) -> dict:
  """{"step": 0, "params", "opt"}, placed on the mesh when given: with `sharding` (a tree of
  shardings, e.g. `state_sharding`), else replicated.

  `params` is copied: the train step donates its state, and the caller's arrays must survive.
  """
  params = jax.tree_util.tree_map(jnp.array, params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": optimizer.init(params)}
  if mesh is not None:
    state = shd.put(state, shd.replicated(mesh) if sharding is None else sharding)
  return state


def state_sharding(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                   min_elements: int = shd.FSDP_MIN_ELEMENTS) -> Any:
  """Shardings of the train state of `params` (arrays or ShapeDtypeStructs): FSDP over the
  mesh's 'fsdp' axis (`sharding.fsdp_sharding`: a full fine-tune's UNet copy and its Adam
  moments are split like the frozen UNet; LoRA and the label table are small and replicated),
  all replicated when that axis has size 1."""
  shapes = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
  return shd.fsdp_sharding(shapes, mesh, min_elements)


def all_finite(tree: Any) -> jnp.ndarray:
  """True iff every floating-point leaf of `tree` is finite everywhere (a bool [] array)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(setup: CtrlSetup, optimizer: optax.GradientTransformation, mesh: Mesh,
                    wrap: Callable[[Callable], Callable] = lambda f: f,
                    state_shardings: Any = None, frozen_shardings: Any = None
                    ) -> Callable[[dict, dict, jax.Array, dict], tuple[dict, dict]]:
  """The jitted `train_step(state, batch, key, frozen) -> (state, metrics)`.

  `state_shardings` / `frozen_shardings`: trees of shardings of the state and the frozen inputs
  (default: replicated), e.g. `state_sharding(...)` and `sharding.fsdp_sharding(frozen, mesh)`
  on a mesh with an 'fsdp' axis; the new state keeps the state's shardings.

  batch: {"prompt": int [M, b], "y": int [M, b, T]}: M micro-batches of b trajectories, the b
  axis sharded over the mesh's data axis. Gradients are averaged over the M micro-batches
  (accumulated in a scan, so memory is that of one micro-batch). The step's key is
  `fold_in(key, state["step"])`, micro-batch m's `fold_in(step_key, m)`: a resumed run
  draws the same noise as an uninterrupted one. `state` is donated. `wrap` decorates the
  Python step before jit (tests pass `chex.assert_max_traces(n=1)`).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, key, frozen):
    step_key = jax.random.fold_in(key, state["step"])
    num_micro = batch["prompt"].shape[0]

    def micro(carry, inp):
      grads_acc, metrics_acc = carry
      m, mb = inp
      (_, metrics), grads = grad_fn(state["params"], frozen, mb,
                                    jax.random.fold_in(step_key, m), setup, mesh, state["step"])
      grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
      metrics_acc = jax.tree_util.tree_map(jnp.add, metrics_acc, metrics)
      return (grads_acc, metrics_acc), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    metric_shapes = jax.eval_shape(
        lambda: loss_fn(state["params"], frozen, jax.tree_util.tree_map(lambda v: v[0], batch),
                        step_key, setup, mesh, state["step"])[1])
    metrics0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(micro, (zeros, metrics0),
                                       (jnp.arange(num_micro), batch))
    grads = jax.tree_util.tree_map(lambda g: g / num_micro, grads)
    metrics = jax.tree_util.tree_map(lambda v: v / num_micro, metrics)
    metrics["grad_norm"] = optax.tree.norm(mask_null_label_gradient().update(grads, None)[0])
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Finite or skip: an update whose loss, gradient or result is not finite leaves params and
    # optimiser state as they were (the step counter still advances, so the next update draws
    # fresh noise); the loop stops after too many in a row (runtime.loop).
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & all_finite(params))
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                 "opt": keep(opt, state["opt"])}
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  repl = shd.replicated(mesh)
  batch_sharding = shd.data_sharded(mesh, batch_axis=1)
  state_s = repl if state_shardings is None else state_shardings
  frozen_s = repl if frozen_shardings is None else frozen_shardings
  return shd.jit(wrap(train_step), mesh, in_shardings=(state_s, batch_sharding, repl, frozen_s),
                 out_shardings=(state_s, repl), donate_argnums=(0,))
