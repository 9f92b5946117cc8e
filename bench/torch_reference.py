"""Benchmark and reference: one CTRL update in plain PyTorch, against ctrl_jax's, side by side.

  python bench/torch_reference.py                          # both problems, ~12 min on 2 cores
  python bench/torch_reference.py --only digits --updates 5
  python bench/torch_reference.py --only sd --no_compile   # skip the torch.compile row
  python bench/torch_reference.py --only digits --unrolled digits --no_compile

What this file holds:
  * `torch_lib()`: an independent PyTorch implementation of one CTRL update, written from
    docs/method.md §4, §5, §7 (it shares no code with ctrl_jax and imports no JAX): diffusers'
    PyTorch `UNet2DConditionModel(num_class_embeds=K+1)` with explicit LoRA modules on
    to_q/to_k/to_v/to_out.0 of every attn1/attn2, the DDIM step written from its formulas (the
    test checks it against diffusers' `DDIMScheduler.step`), CFG in both models, random
    truncation as an explicit per-step mask, torch.utils.checkpoint per UNet call, both KL
    conventions, the reward log(p̂(y | x0) + 1e-6), micro-batch gradient accumulation, the NULL
    label row's gradient masked, optax-style global-norm clipping and AdamW with one learning
    rate per group. GEGLU uses the tanh-approximate GELU, as diffusers' Flax UNet does.
  * The JAX side's helpers (imported lazily): `export_spec` turns a ctrl_jax problem into plain
    numpy arrays in PyTorch names (through ctrl_jax's own mapping, `convert.to_torch_state_dict`
    and `diffusers_export.lora_tensors`), and `jax_draws` reproduces the x_T, per-step noise and
    truncation masks `train.make_train_step` draws from its key, so both sides run on the same
    random numbers. tests/test_torch_reference.py uses both for the parity test.
  * The speed benchmark: one update of (a) the digits `ink` step (configs/digits.py, random
    weights: 16 trajectories, 10 DDIM steps, CFG, random truncation, remat) and (b) an
    SD-shaped UNet (block_out (128, 128), 32×32×4 latents, 77-token contexts of width 64,
    20 steps, one micro-batch of 2), each path in its own subprocess (peak RSS is per path):
    ctrl_jax's jitted `train.make_train_step` ("jax"), PyTorch eager with checkpointing
    ("torch"), and PyTorch with `torch.compile` on both UNet call sites ("torch_compile", cold
    inductor cache; a failure or a run past --compile_timeout (default 2 min, warm-up and
    timed updates) is reported with how far it got, not fatal).
    --phases (default: both problems) adds a per-phase profile on both sides: the loss alone
    (forward trajectory + reward), backward (PyTorch: loss.backward(); JAX: the update's time
    minus forward and optimiser), the optimiser, and one CFG call of each UNet, forward and
    forward + backward. --unrolled adds an experimental JAX
    row with every `lax.scan` fully unrolled.

Every timed update uses the same draws (the JAX state's step counter is reset to 0 before each
call, as bench/sd_update.py does; PyTorch gets those draws), so both sides differentiate the
same steps. Both run with the exact KL gradient (reference_grad=True in every update; the ink
config switches it on at update 80). The first update of each path is its warm-up (for JAX:
lower + compile, then the first call); both sides' metrics of that first update and the
updated trainable tensors are compared as a sanity check. PyTorch uses the learning rates JAX
uses at update 0 (constant; ink's JAX optimiser has a warm-up + cosine schedule).

Workers run with the environment of the project's launchers (glibc huge pages for malloc where
they help, `ctrl_jax.runtime.hugepages`; --no_hugepages turns that off), torch with 2 threads,
diffusers' Flax import switched off (USE_FLAX=0) so the PyTorch worker loads no JAX. Before
each worker the bench waits (≤ --max_wait) for an idle machine, and it records the CPU the rest
of the machine used while the worker ran ("others' CPU"): PyTorch's OpenMP threads slow down
many-fold when another process takes a core, so a row with others' CPU > 0 is not a clean
measurement.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROBLEMS = ("digits", "sd")
PATHS = ("jax", "jax_unrolled", "torch", "torch_compile")
LOG_EPS = 1e-6  # the official code's log(p + 1e-6)


# =============================================================================== PyTorch side


@functools.lru_cache(maxsize=None)
def torch_lib() -> types.SimpleNamespace:
  """The PyTorch reference (built on first use: its classes need torch, the JAX worker must not
  import it)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from diffusers.models.activations import GEGLU  # pylint: disable=g-import-not-at-top
  from torch.utils import checkpoint as torch_checkpoint  # pylint: disable=g-import-not-at-top

  class LoRALinear(torch.nn.Module):
    """`base(x) + scale · up(down(x))` around a frozen nn.Linear; `up` starts at zero."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float):
      super().__init__()
      self.base = base
      self.down = torch.nn.Linear(base.in_features, rank, bias=False)
      self.up = torch.nn.Linear(rank, base.out_features, bias=False)
      torch.nn.init.zeros_(self.up.weight)
      self.scale = scale

    def forward(self, x):
      return self.base(x) + self.scale * self.up(self.down(x))

  def lora_module_names(unet) -> list[str]:
    """to_q, to_k, to_v, to_out.0 of every self- (attn1) and cross-attention (attn2) layer."""
    names = []
    for name, _ in unet.named_modules():
      if name.endswith((".attn1", ".attn2")):
        names += [f"{name}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
    return names

  def add_lora(unet, rank: int, scale: float) -> dict:
    loras = {}
    for name in lora_module_names(unet):
      parent_name, child = name.rsplit(".", 1)
      parent = unet.get_submodule(parent_name)
      lora = LoRALinear(getattr(parent, child), rank, scale)
      setattr(parent, child, lora)  # for to_out (a ModuleList) child "0" replaces item 0
      loras[name] = lora
    return loras

  def tanh_geglu(unet) -> int:
    """Switches every GEGLU to the tanh-approximate GELU (what diffusers' Flax GEGLU uses:
    flax.linen.gelu defaults to approximate=True; its PyTorch GEGLU uses the exact erf GELU)."""
    n = 0
    for m in unet.modules():
      if isinstance(m, GEGLU):
        m.gelu = lambda gate: F.gelu(gate, approximate="tanh")
        n += 1
    return n

  def alphas_cumprod(schedule: dict) -> np.ndarray:
    """ᾱ_t from the β schedule, accumulated in float64, as float32 (ctrl_jax does the same;
    diffusers' DDIMScheduler accumulates in float32, which moves the last step's σ_t)."""
    t, b0, b1 = schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    if schedule["beta_schedule"] == "linear":
      betas = np.linspace(b0, b1, t, dtype=np.float64)
    elif schedule["beta_schedule"] == "scaled_linear":
      betas = np.linspace(b0**0.5, b1**0.5, t, dtype=np.float64) ** 2
    else:
      raise ValueError(f"beta_schedule {schedule['beta_schedule']!r} not supported here.")
    return np.cumprod(1.0 - betas).astype(np.float32)

  def ddim_scheduler(schedule: dict, num_steps: int):
    s = DDIMScheduler(num_train_timesteps=schedule["num_train_timesteps"],
                      beta_schedule=schedule["beta_schedule"], beta_start=schedule["beta_start"],
                      beta_end=schedule["beta_end"], set_alpha_to_one=schedule["set_alpha_to_one"],
                      steps_offset=schedule["steps_offset"], clip_sample=False,
                      prediction_type="epsilon", timestep_spacing="leading")
    s.set_timesteps(num_steps)
    return s

  def ddim_mean_std(x, eps, a_t, a_prev, eta):
    """μ and σ of the DDIM transition (docs/method.md §4), all float32:
    x̂0 = (x − √(1−ᾱ_t) ε)/√ᾱ_t; σ = η √((1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev));
    μ = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε."""
    x0 = (x - torch.sqrt(1.0 - a_t) * eps) / torch.sqrt(a_t)
    std = eta * torch.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1.0 - a_prev - std**2, min=0.0)) * eps
    return mean, std

  def channel_mean_probe(c, images):
    return F.linear(images.mean(dim=(2, 3)), c["w"][0], c["b"][0])

  def pixel_pool(c, images):
    x = images.float()
    feats = [x]
    if c["neighbour_diffs"]:
      feats.append(F.pad((x[..., :, 1:] - x[..., :, :-1]) ** 2, (0, 1)))
      feats.append(F.pad((x[..., 1:, :] - x[..., :-1, :]) ** 2, (0, 0, 0, 1)))
    h = torch.stack(feats, dim=-1)
    for w, b in zip(c["w"][:-1], c["b"][:-1]):
      h = F.gelu(F.linear(h, w, b), approximate="tanh")  # flax.linen.gelu's default
    return F.linear(h.mean(dim=(-3, -2)), c["w"][-1], c["b"][-1]) / c["temperature"]

  classifier_kinds = {"channel_mean_probe": channel_mean_probe, "pixel_pool": pixel_pool}

  def decode(kind, x0):
    if kind == "identity":
      return x0
    if kind == "digits":  # model space [-1, 1] [B, 1, 8, 8] → images [0, 1] [B, 8, 8]
      return torch.clamp((x0[:, 0] + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"decode {kind!r}")

  class TorchCtrl:
    """One CTRL problem in PyTorch: the fine-tuned and the reference UNet, the reward, the
    optimiser, and `update(batch, draws)`.

    Trainable tensors (`self.trainable`) are named as `diffusers_export.lora_tensors` names
    them: "class_embedding.weight" [K+1, D_time] and "<module>.lora_down.weight" [r, d_in],
    "<module>.lora_up.weight" [d_out, r].
    """

    def __init__(self, spec: dict, *, geglu: str = "tanh", checkpoint: bool = True,
                 compile_unets: bool = False):
      cfg = dict(spec["unet_config"])
      k = int(spec["num_labels"])
      state = {n: torch.from_numpy(np.array(v, np.float32)) for n, v in spec["unet_state"].items()}
      ctrl = {n: torch.from_numpy(np.array(v, np.float32)) for n, v in spec["ctrl"].items()}
      self.reference = UNet2DConditionModel(**cfg).eval()
      self.reference.load_state_dict(state, strict=True)
      self.policy = UNet2DConditionModel(**cfg, num_class_embeds=k + 1).eval()
      self.policy.load_state_dict({**state, "class_embedding.weight": ctrl["class_embedding.weight"]},
                                  strict=True)
      for p in (*self.reference.parameters(), *self.policy.parameters()):
        p.requires_grad_(False)
      downs = {n[:-len(".lora_down.weight")]: v for n, v in ctrl.items()
               if n.endswith(".lora_down.weight")}
      rank = next(iter(downs.values())).shape[0]
      loras = add_lora(self.policy, rank, float(spec["lora_scale"]))
      if set(loras) != set(downs):
        raise ValueError(f"LoRA layers differ: PyTorch has {sorted(set(loras) - set(downs))[:3]}"
                         f" not in the spec; the spec has {sorted(set(downs) - set(loras))[:3]}.")
      self.trainable = {"class_embedding.weight": self.policy.class_embedding.weight}
      with torch.no_grad():
        for name, mod in loras.items():
          mod.down.weight.copy_(ctrl[f"{name}.lora_down.weight"])
          mod.up.weight.copy_(ctrl[f"{name}.lora_up.weight"])
          self.trainable[f"{name}.lora_down.weight"] = mod.down.weight
          self.trainable[f"{name}.lora_up.weight"] = mod.up.weight
      for p in self.trainable.values():
        p.requires_grad_(True)
      self.num_geglu = 0
      if geglu == "tanh":
        self.num_geglu = tanh_geglu(self.policy) + tanh_geglu(self.reference)
      elif geglu != "exact":
        raise ValueError(f"geglu={geglu!r}; expected 'tanh' or 'exact'.")
      def policy_call(x, t, ctx, labels):
        return self.policy(x, t, encoder_hidden_states=ctx, class_labels=labels)[0]

      def reference_call(x, t, ctx):
        return self.reference(x, t, encoder_hidden_states=ctx)[0]

      self.policy_fn, self.reference_fn = policy_call, reference_call
      if compile_unets:
        # One compiled function per call site (each has its own guard cache: grad mode on/off,
        # input requiring grad or not); compiling the two modules directly shares one cache of
        # UNet2DConditionModel.forward between their different keyword sets, which exceeds
        # dynamo's recompile limit and recompiles in every update.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)  # pylint: disable=protected-access
        self.policy_fn = torch.compile(policy_call)
        self.reference_fn = torch.compile(reference_call)

      self.spec = spec
      self.num_labels = k
      self.task_classes = tuple(int(c) for c in spec["task_classes"])
      self.reward_weights = tuple(float(w) for w in spec["reward_weights"])
      self.classifiers = []
      for c in spec["classifiers"]:
        t = {"kind": c["kind"], "w": [torch.from_numpy(np.array(w, np.float32)) for w in c["w"]],
             "b": [torch.from_numpy(np.array(b, np.float32)) for b in c["b"]],
             "neighbour_diffs": bool(c.get("neighbour_diffs", False)),
             "temperature": torch.tensor(float(c.get("temperature", 1.0)), dtype=torch.float32)}
        self.classifiers.append(t)
      self.decode = spec["decode"]
      self.contexts = torch.from_numpy(np.array(spec["contexts"], np.float32))
      self.uncond_context = torch.from_numpy(np.array(spec["uncond_context"], np.float32))
      sched = spec["schedule"]
      self.alphas_cumprod = torch.from_numpy(alphas_cumprod(sched))
      self.final_alpha_cumprod = (torch.tensor(1.0) if sched["set_alpha_to_one"]
                                  else self.alphas_cumprod[0].clone())
      n = int(spec["num_inference_steps"])
      self.timesteps = [int(t) for t in ddim_scheduler(sched, n).timesteps]
      self.step_ratio = sched["num_train_timesteps"] // n
      hp = spec["hparams"]
      f32 = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
      self.gamma, self.kl_weight = f32(hp["gamma"]), f32(hp["kl_weight"])
      self.guidance_scale, self.eta = f32(hp["guidance_scale"]), f32(hp["eta"])
      self.kl_convention = spec["kl_convention"]
      self.use_cfg = bool(spec["use_cfg"])
      self.reference_grad = bool(spec["reference_grad"])
      self.checkpoint = checkpoint
      self.num_dims = int(np.prod(spec["latent_shape"]))
      o = spec["optimizer"]
      self.grad_clip_norm = float(o["grad_clip_norm"])
      lora_params = [p for n, p in self.trainable.items() if n != "class_embedding.weight"]
      self.optimizer = torch.optim.AdamW(
          [{"params": lora_params, "lr": o["lr_lora"]},
           {"params": [self.trainable["class_embedding.weight"]], "lr": o["lr_label_embedding"]}],
          betas=(o["b1"], o["b2"]), eps=o["eps"], weight_decay=o["weight_decay"], foreach=False)

    # ------------------------------------------------------------------------- the model calls

    def encode_labels(self, y):
      out = torch.zeros(y.shape[:-1], dtype=torch.long)
      for i, k in enumerate(self.task_classes):
        out = out * k + y[..., i].long()
      return out

    def eps_functions(self, prompt, labels):
      ctx = self.contexts[prompt]
      w = self.guidance_scale
      if self.use_cfg:
        ctx2 = torch.cat([self.uncond_context.expand_as(ctx), ctx], dim=0)
        labels2 = torch.cat([torch.full_like(labels, self.num_labels), labels], dim=0)

      def policy_eps(x, t):
        if not self.use_cfg:
          return self.policy_fn(x, t, ctx, labels)
        e_unc, e_c = self.policy_fn(torch.cat([x, x]), t, ctx2, labels2).chunk(2)
        return e_unc + w * (e_c - e_unc)

      def reference_eps(x, t):
        if not self.use_cfg:
          return self.reference_fn(x, t, ctx)
        e_unc, e_c = self.reference_fn(torch.cat([x, x]), t, ctx2).chunk(2)
        return e_unc + w * (e_c - e_unc)

      return policy_eps, reference_eps

    def _call(self, fn, x, t):
      if self.checkpoint:
        return torch_checkpoint.checkpoint(fn, x, t, use_reentrant=False)
      return fn(x, t)

    def trajectory(self, prompt, labels, x_T, noise, mask):
      """x0 [b, ...] and per-step KL [N, b] (summed over latent dims) of one micro-batch.

      mask[i] False: step i's ε's (both models) are constants; x itself keeps its gradient
      (it enters μ_new, μ_pre linearly). mask[i] True: gradient through the fine-tuned ε and,
      with reference_grad, through the reference ε's input x_t too (else ε_pre is a constant).
      """
      policy_eps, reference_eps = self.eps_functions(prompt, labels)
      x, kls = x_T, []
      for i, t in enumerate(self.timesteps):
        tt = torch.tensor(t, dtype=torch.long)
        t_prev = t - self.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if mask[i]:
          e_new = self._call(policy_eps, x, tt)
          if self.reference_grad:
            e_ref = self._call(reference_eps, x, tt)
          else:
            with torch.no_grad():
              e_ref = reference_eps(x.detach(), tt)
        else:
          with torch.no_grad():
            e_new = policy_eps(x.detach(), tt)
            e_ref = reference_eps(x.detach(), tt)
        mean_new, std = ddim_mean_std(x, e_new, a_t, a_prev, self.eta)
        mean_ref, _ = ddim_mean_std(x, e_ref, a_t, a_prev, self.eta)
        inv_two_var = torch.where(std > 0, 0.5 / torch.where(std > 0, std, 1.0) ** 2, 0.0)
        kls.append(((mean_new - mean_ref) ** 2 * inv_two_var).flatten(1).sum(1))
        x = mean_new + std * noise[i]
      return x, torch.stack(kls)

    def reward(self, x0, y):
      images = decode(self.decode, x0)
      total = 0.0
      probs_all = []
      for task, (c, w) in enumerate(zip(self.classifiers, self.reward_weights)):
        probs = torch.softmax(classifier_kinds[c["kind"]](c, images).float(), dim=-1)
        p_y = probs.gather(1, y[:, task:task + 1].long())[:, 0]
        total = total + w * torch.log(p_y + LOG_EPS)
        probs_all.append(probs)
      return total, probs_all

    def loss(self, prompt, y, x_T, noise, mask):
      """−γ · mean(reward) + kl_weight · KL of one micro-batch, and its metrics (floats)."""
      prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
      y = torch.as_tensor(np.asarray(y), dtype=torch.long)
      x0, kl_steps = self.trajectory(prompt, self.encode_labels(y),
                                     torch.as_tensor(np.asarray(x_T, np.float32)),
                                     torch.as_tensor(np.asarray(noise, np.float32)),
                                     [bool(m) for m in np.asarray(mask)])
      reward, _ = self.reward(x0, y)
      kl_exact = kl_steps.sum(0).mean()
      if self.kl_convention == "official":
        kl = kl_exact / self.num_dims
      elif self.kl_convention == "exact":
        kl = kl_exact
      else:
        raise ValueError(f"kl_convention {self.kl_convention!r}")
      loss = -self.gamma * reward.mean() + self.kl_weight * kl
      metrics = {"loss": loss.item(), "reward": reward.mean().item(), "kl": kl.item(),
                 "kl_exact": kl_exact.item(), "grad_steps": float(np.sum(np.asarray(mask)))}
      return loss, metrics

    # ------------------------------------------------------------------------- the update

    def accumulate(self, batch: dict, draws: dict) -> tuple[dict, dict]:
      """Gradients averaged over the micro-batches (`.grad` of every trainable tensor; the NULL
      row not yet masked) and the averaged metrics, plus forward / backward seconds."""
      for p in self.trainable.values():
        p.grad = None
      num_micro = len(batch["prompt"])
      sums, t_fwd, t_bwd = {}, 0.0, 0.0
      for m in range(num_micro):
        t0 = time.perf_counter()
        loss, metrics = self.loss(batch["prompt"][m], batch["y"][m], draws["x_T"][m],
                                  draws["noise"][m], draws["mask"][m])
        t1 = time.perf_counter()
        loss.backward()
        t_bwd += time.perf_counter() - t1
        t_fwd += t1 - t0
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
      with torch.no_grad():
        for p in self.trainable.values():
          p.grad.div_(num_micro)
      return ({k: v / num_micro for k, v in sums.items()},
              {"forward_s": t_fwd, "backward_s": t_bwd})

    def gradients(self) -> dict:
      return {n: p.grad.detach().numpy().copy() for n, p in self.trainable.items()}

    def optimizer_step(self) -> dict:
      """NULL-row mask, global-norm clip (optax's: g / ‖g‖ · c when ‖g‖ ≥ c), AdamW."""
      with torch.no_grad():
        self.trainable["class_embedding.weight"].grad[-1] = 0.0
        grads = [p.grad for p in self.trainable.values()]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        clipped = bool(norm >= self.grad_clip_norm)
        if clipped:
          for g in grads:
            g.div_(norm).mul_(self.grad_clip_norm)
      self.optimizer.step()
      return {"grad_norm": float(norm), "clipped": clipped}

    def update(self, batch: dict, draws: dict) -> dict:
      metrics, phases = self.accumulate(batch, draws)
      t0 = time.perf_counter()
      metrics.update(self.optimizer_step())
      phases["optimizer_s"] = time.perf_counter() - t0
      return {**metrics, "phases": phases}

    def params(self) -> dict:
      return {n: p.detach().numpy().copy() for n, p in self.trainable.items()}

    def time_calls(self, batch: dict, x: np.ndarray, probe: np.ndarray, t: int,
                   repeats: int) -> dict:
      """Median seconds of one CFG call of each model on micro-batch 0 at timestep t: forward
      (no graph), and forward + backward of sum(ε · probe) w.r.t. x (and, for the fine-tuned
      model, the trainable tensors) — what a differentiated step costs under checkpointing."""
      prompt = torch.as_tensor(np.asarray(batch["prompt"][0]), dtype=torch.long)
      labels = self.encode_labels(torch.as_tensor(np.asarray(batch["y"][0]), dtype=torch.long))
      policy_eps, reference_eps = self.eps_functions(prompt, labels)
      tt = torch.tensor(t, dtype=torch.long)
      probe_t = torch.from_numpy(probe)

      def fwd(fn):
        with torch.no_grad():
          fn(torch.from_numpy(x), tt)

      def fwd_bwd(fn):
        xx = torch.from_numpy(x).requires_grad_(True)
        (fn(xx, tt) * probe_t).sum().backward()

      out = {}
      for name, fn in (("policy", policy_eps), ("reference", reference_eps)):
        for kind, run in (("forward", fwd), ("forward_backward", fwd_bwd)):
          run(fn)  # warm-up
          ts = []
          for _ in range(repeats):
            t0 = time.perf_counter()
            run(fn)
            ts.append(time.perf_counter() - t0)
          out[f"{name}_{kind}_s"] = statistics.median(ts)
      for p in self.trainable.values():
        p.grad = None
      return out

  return types.SimpleNamespace(
      torch=torch, LoRALinear=LoRALinear, TorchCtrl=TorchCtrl, add_lora=add_lora,
      lora_module_names=lora_module_names, ddim_mean_std=ddim_mean_std,
      alphas_cumprod=alphas_cumprod, ddim_scheduler=ddim_scheduler, tanh_geglu=tanh_geglu)


# =============================================================================== JAX side


def export_spec(setup, frozen: dict, params: dict, *, classifiers: list, decode: str,
                schedule: dict, optimizer: dict) -> dict:
  """A ctrl_jax problem as plain numpy arrays in PyTorch names (what `TorchCtrl` reads).

  Args:
    setup, frozen, params: the ctrl_jax problem (`train.CtrlSetup`, frozen tree with
      "hparams", trainable tree).
    classifiers: per task, {"kind": "channel_mean_probe" | "pixel_pool", "params": Flax
      variables, "neighbour_diffs": bool} (the reward classifiers the setup's reward_fn applies).
    decode: "identity" (classifiers read the latents) or "digits" (digits_model.to_images).
    schedule: the β schedule as diffusers names it (beta_schedule, beta_start, beta_end,
      num_train_timesteps, set_alpha_to_one, steps_offset).
    optimizer: lr_lora, lr_label_embedding, weight_decay, b1, b2, eps, grad_clip_norm.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import convert  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import diffusers_export  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import weights  # pylint: disable=g-import-not-at-top

  model = setup.model
  cfg = weights.flax_to_torch_config(model.unet, "UNet2DConditionModel")
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
         if not k.startswith("_")}
  cls_out = []
  for c in classifiers:
    p = c["params"]["params"]
    dense = [p[f"Dense_{i}"] for i in range(sum(k.startswith("Dense_") for k in p))]
    cls_out.append({"kind": c["kind"], "neighbour_diffs": bool(c.get("neighbour_diffs", False)),
                    "w": [np.asarray(d["kernel"], np.float32).T.copy() for d in dense],
                    "b": [np.asarray(d["bias"], np.float32) for d in dense],
                    "temperature": float(np.asarray(p.get("temperature", 1.0)))})
  hp = jax.device_get(frozen["hparams"])
  return {
      "unet_config": cfg,
      "unet_state": convert.to_torch_state_dict(jax.device_get(frozen["unet"]), "unet"),
      "ctrl": diffusers_export.lora_tensors(model, jax.device_get(params)),
      "lora_scale": float(model.lora_scale), "num_labels": int(model.num_labels),
      "task_classes": list(setup.label_space.task_classes),
      "reward_weights": [float(w) for w in classifiers_weights(classifiers)],
      "classifiers": cls_out, "decode": decode,
      "contexts": np.asarray(frozen["contexts"], np.float32),
      "uncond_context": np.asarray(frozen["uncond_context"], np.float32),
      "schedule": dict(schedule), "num_inference_steps": int(len(setup.timesteps)),
      "latent_shape": tuple(int(v) for v in setup.latent_shape),
      "hparams": {k: float(v) for k, v in hp.items()},
      "kl_convention": setup.kl_convention, "use_cfg": bool(setup.use_cfg),
      "reference_grad": bool(setup.reference_grad), "optimizer": dict(optimizer)}


def classifiers_weights(classifiers: list) -> list:
  return [float(c.get("weight", 1.0)) for c in classifiers]


def jax_draws(setup, key, step: int, batch: dict) -> dict:
  """The x_T [M, b, C, H, W], per-step noise [M, N, b, C, H, W] and gradient masks [M, N] that
  `train.make_train_step` draws at update `step` (its key mapping: step key fold_in(key, step),
  micro-batch key fold_in(step key, m), split in 3 for x_T, noise (step i: fold_in(·, i)) and
  the truncation mask)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import sampling  # pylint: disable=g-import-not-at-top

  num_micro, b = np.asarray(batch["prompt"]).shape
  n = len(setup.timesteps)
  shape = (b,) + tuple(setup.latent_shape)
  step_key = jax.random.fold_in(key, step)
  x_T, noise, mask = [], [], []
  for m in range(num_micro):
    k_x, k_noise, k_mask = jax.random.split(jax.random.fold_in(step_key, m), 3)
    x_T.append(np.asarray(jax.random.normal(k_x, shape, jnp.float32)))
    noise.append(np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k_noise, i), shape,
                                                        jnp.float32)) for i in range(n)]))
    if setup.truncation == "random":
      mask.append(np.asarray(sampling.random_truncation_mask(k_mask, n)))
    elif setup.truncation == "last_k":
      mask.append(np.arange(n) >= n - setup.truncation_k)
    else:
      mask.append(np.ones(n, bool))
  return {"x_T": np.stack(x_T), "noise": np.stack(noise), "mask": np.stack(mask)}


def perturb_ctrl(params: dict, seed: int, null_label: int, lora_scale: float = 0.05,
                 table_scale: float = 0.1) -> dict:
  """Trainable params with nonzero LoRA up-projections and label table (NULL row zero), so
  every trainable tensor has a nonzero gradient (with up = 0, a down matrix has none)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(params["lora"])
  rng = np.random.default_rng(seed)
  lora = jax.tree_util.tree_unflatten(treedef, [
      np.asarray(v, np.float32) + lora_scale * rng.standard_normal(v.shape).astype(np.float32)
      for v in leaves])
  table = table_scale * rng.standard_normal(params["label_embedding"].shape).astype(np.float32)
  table[null_label] = 0.0
  return {**params, "lora": lora, "label_embedding": table}


# ------------------------------------------------------------------------ benchmark problems


def digits_problem(seed: int = 0) -> dict:
  """The digits `ink` CTRL step on random weights (configs/digits.py)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import rewards  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import data as digits_data  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import model as digits_model  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import stages  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import report  # pylint: disable=g-import-not-at-top

  config = report.load_config(os.path.join(REPO, "configs", "digits.py") + ":ink")
  unet = unet_lib.build_unet(digits_model.unet_config(config.pretrain))
  modules = stages.classifier_modules(config.task)
  # The exact KL gradient in every update (ink switches it on at update 80).
  setup = dataclasses.replace(stages.build_setup(config, unet, modules), reference_grad_from=0)
  key = jax.random.key(seed)
  pre = digits_model.init_params(jax.random.fold_in(key, 0), unet, config.pretrain.context_dim)
  cls_params = [m.init(jax.random.fold_in(key, 1 + i), jnp.zeros((1, 8, 8)))
                for i, m in enumerate(modules)]
  ctx, null_ctx = digits_model.contexts(pre)
  frozen = {"unet": pre["unet"], "reward": cls_params, "decoder": None, "contexts": ctx,
            "uncond_context": null_ctx, "schedule": digits_model.make_schedule(config.pretrain),
            "hparams": train.hparams_from_config(config)}
  params = train.init_trainable(setup, jax.random.key(config.seed), pre["unet"])
  params = perturb_ctrl(params, seed, setup.model.null_label)
  opt_kwargs = dict(lr_lora=config.lr_lora, lr_label_embedding=config.lr_label_embedding,
                    weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm,
                    lr_schedule=config.lr_schedule, num_updates=config.num_updates,
                    lr_final_fraction=config.lr_final_fraction,
                    lr_warmup_steps=config.lr_warmup_steps)
  warm = max(int(config.lr_warmup_steps), 1)  # lr of update 0: lr · 1 / warm-up
  p = config.pretrain
  return dict(
      setup=setup, frozen=frozen, params=params, opt_kwargs=opt_kwargs,
      batch=rewards.sample_requests(config.seed, 0, setup.label_space, digits_model.NUM_DIGITS,
                                    config.num_micro_batches, config.micro_batch),
      key_seed=config.seed,
      classifiers=[{"kind": "pixel_pool", "params": cp, "neighbour_diffs": m.neighbour_diffs}
                   for m, cp in zip(modules, cls_params)],
      decode="digits",
      schedule=dict(beta_schedule=p.beta_schedule, beta_start=p.beta_start, beta_end=p.beta_end,
                    num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1),
      torch_optimizer=dict(lr_lora=config.lr_lora / warm,
                           lr_label_embedding=config.lr_label_embedding / warm,
                           weight_decay=config.weight_decay, b1=0.9, b2=0.999, eps=1e-8,
                           grad_clip_norm=config.grad_clip_norm),
      describe=(f"digits ink: UNet {tuple(p.block_out_channels)} on 8×8×1, "
                f"{config.micro_batch}×{config.num_micro_batches} trajectories, "
                f"{config.num_inference_steps} DDIM steps, CFG {config.guidance_scale}, random "
                f"truncation, remat, exact KL gradient, PixelPool ink3 reward"))


SD_UNET = dict(sample_size=32, in_channels=4, block_out_channels=(128, 128),
               cross_attention_dim=64, attention_head_dim=8, layers_per_block=1)


def sd_problem(seed: int = 0, micro_batch: int = 2, num_micro: int = 1, steps: int = 20) -> dict:
  """An SD-shaped CTRL step on random weights: 2-level UNet (CrossAttnDownBlock2D, DownBlock2D;
  128 channels), 32×32×4 latents, 45 prompts × 77 tokens of width 64, official SD hparams
  (γ 0.1, KL weight 0.01, CFG 7.5, η 1, official KL), a 4-class linear probe on the latents'
  channel means as the reward."""
  import jax  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems import tiny  # pylint: disable=g-import-not-at-top

  setup, frozen, params = tiny.build(
      jax.random.key(seed), batch_latent=(4, 32, 32), num_steps=steps, task_classes=(4,),
      num_prompts=45, context_len=77, unet_config=unet_lib.tiny_unet_config(**SD_UNET))
  frozen["hparams"] = train.make_hparams(gamma=0.1, kl_weight=0.01, guidance_scale=7.5, eta=1.0)
  params = perturb_ctrl(params, seed, setup.model.null_label)
  opt = dict(lr_lora=1e-3, lr_label_embedding=1e-2, weight_decay=0.1, grad_clip_norm=5.0)
  return dict(
      setup=setup, frozen=frozen, params=params, opt_kwargs=opt,
      batch=tiny.make_batch(seed, 0, setup, 45, num_micro, micro_batch), key_seed=seed,
      classifiers=[{"kind": "channel_mean_probe", "params": p} for p in frozen["reward"]],
      decode="identity",
      schedule=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1),
      torch_optimizer=dict(opt, b1=0.9, b2=0.999, eps=1e-8),
      describe=(f"SD-shaped: UNet (128, 128) on 32×32×4, {micro_batch}×{num_micro} trajectories, "
                f"{steps} DDIM steps, CFG 7.5, random truncation, remat, exact KL gradient, "
                "linear-probe reward"))


def build_problem(name: str, seed: int = 0) -> dict:
  return {"digits": digits_problem, "sd": sd_problem}[name](seed)


# =============================================================================== workers


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _named(model, tree) -> dict:
  from ctrl_jax.models import diffusers_export  # pylint: disable=g-import-not-at-top
  return diffusers_export.lora_tensors(model, tree)


def unroll_every_scan() -> None:
  """Makes every `jax.lax.scan` traced from now on fully unrolled (the "jax_unrolled" row: the
  trajectory's scans in `sampling.ctrl_trajectory`, and the train step's one-iteration
  micro-batch scan). An experiment, not a ctrl_jax option: on XLA:CPU the backward pass of a
  rolled scan over UNet calls runs markedly slower than the same steps unrolled."""
  import jax  # pylint: disable=g-import-not-at-top
  rolled = jax.lax.scan

  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
    del unroll
    return rolled(f, init, xs, length=length, reverse=reverse, unroll=True, **kwargs)

  jax.lax.scan = scan


def worker_jax(problem: str, updates: int, spec_path: str, phases: bool,
               unrolled: bool = False, structure: bool = False) -> tuple[dict, dict]:
  """Builds the problem, writes the PyTorch spec + draws to `spec_path`, then times
  `train.make_train_step` (lower, compile, first call, `updates` more calls)."""
  t_start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  if unrolled:
    unroll_every_scan()
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax.runtime import sharding as shd  # pylint: disable=g-import-not-at-top

  prob = build_problem(problem)
  setup, frozen, params = prob["setup"], prob["frozen"], prob["params"]
  key = jax.random.key(prob["key_seed"])
  batch = {k: np.asarray(v) for k, v in prob["batch"].items()}
  draws = jax_draws(setup, key, 0, batch)
  if not unrolled:
    spec = export_spec(setup, frozen, params, classifiers=prob["classifiers"],
                       decode=prob["decode"], schedule=prob["schedule"],
                       optimizer=prob["torch_optimizer"])
    with open(spec_path, "wb") as f:
      pickle.dump({"spec": spec, "batch": batch, "draws": draws,
                   "describe": prob["describe"]}, f)
  build_s = time.perf_counter() - t_start

  mesh = shd.make_mesh(jax.devices()[:1])
  opt = train.make_optimizer(**prob["opt_kwargs"])
  state = train.create_train_state(params, opt, mesh)
  step_fn = train.make_train_step(setup, opt, mesh)
  import report  # pylint: disable=g-import-not-at-top
  compiled, lower_s, compile_s = report.lower_and_compile(step_fn, state, batch, key, frozen)

  def reset(s):  # same step key every call: same x_T, noise and truncation masks
    return {**s, "step": jnp.zeros((), jnp.int32)}

  t0 = time.perf_counter()
  state, metrics = compiled(reset(state), batch, key, frozen)
  jax.block_until_ready((state, metrics))
  first_s = time.perf_counter() - t0
  first_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  first_params = {k: np.asarray(v) for k, v in _named(setup.model,
                                                     jax.device_get(state["params"])).items()}
  times = []
  for _ in range(updates):
    state = reset(state)
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, key, frozen)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  out = dict(path="jax_unrolled" if unrolled else "jax", build_s=build_s, lower_s=lower_s, compile_s=compile_s,
             warmup_s=lower_s + compile_s + first_s, first_call_s=first_s, times_s=times,
             median_s=statistics.median(times), metrics=first_metrics,
             grad_steps=float(np.sum(draws["mask"])) / len(draws["mask"]),
             jax=jax.__version__, threads=None)
  if phases and not unrolled:
    out["phases"] = jax_phases(setup, frozen, params, opt, batch, key, min(updates, 3),
                               out["median_s"])
  if structure and not unrolled:
    out["structure"] = jax_structure(setup, frozen, params, batch, key, min(updates, 3))
  out["peak_rss_mib"] = _rss_mib()
  return out, first_params


def jax_phases(setup, frozen, params, opt, batch, key, repeats, update_s) -> dict:
  """Seconds of the phases of one update: the loss of every micro-batch alone (forward
  trajectory + reward, no gradient; jitted on its own with the same micro-batch keys), the
  optimiser update alone, and backward = the train step's time − those two; plus one CFG call
  of each UNet (`jax_calls`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top

  num_micro = batch["prompt"].shape[0]
  step_key = jax.random.fold_in(key, 0)

  def forward(p, fz):
    return sum(train.loss_fn(p, fz, {k: v[m] for k, v in batch.items()},
                             jax.random.fold_in(step_key, m), setup)[0]
               for m in range(num_micro))

  def opt_step(p, o, g):
    u, o = opt.update(g, o, p)
    return jax.tree_util.tree_map(lambda a, b: a + b, p, u), o

  def timed(fn, *args):
    import report  # pylint: disable=g-import-not-at-top
    return report.median_seconds(jax.jit(fn), *args, repeats=repeats), None, None

  f_s, _, _ = timed(forward, params, frozen)
  o_s, _, _ = timed(opt_step, params, opt.init(params), params)
  out = {"forward_s": f_s, "backward_s": update_s - f_s - o_s, "optimizer_s": o_s}
  out.update(jax_calls(setup, frozen, params, batch, repeats, timed))
  return out


def jax_structure(setup, frozen, params, batch, key, repeats) -> dict:
  """Where the trajectory's backward goes: the loss alone and its gradient for micro-batch 0,
  jitted on their own, under random truncation (a `lax.cond` per step) and under last-G
  truncation with the same number G of differentiated steps (no cond: a gradient-free scan,
  then a differentiated one), first with every `lax.scan` rolled, then fully unrolled."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top

  mb = {k: v[0] for k, v in batch.items()}
  k0 = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
  g = int(np.sum(jax_draws(setup, key, 0, batch)["mask"][0]))
  variants = {"random": {}, f"last_{g}": dict(truncation="last_k", truncation_k=g)}
  out = {}
  for unrolled in (False, True):
    if unrolled:
      unroll_every_scan()
    for name, kw in variants.items():
      st = dataclasses.replace(setup, **kw)
      loss = lambda p, fz, st=st: train.loss_fn(p, fz, mb, k0, st)[0]  # noqa: E731
      row = {}
      for fname, fn in (("forward", loss), ("gradient", jax.grad(loss))):
        fn = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, frozen))
        row[f"{fname}_first_call_s"] = time.perf_counter() - t0
        ts = []
        for _ in range(repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(params, frozen))
          ts.append(time.perf_counter() - t0)
        row[f"{fname}_s"] = statistics.median(ts)
      row["backward_s"] = row["gradient_s"] - row["forward_s"]
      row["backward_per_grad_step_s"] = row["backward_s"] / g
      out[f"{name}, {'unrolled' if unrolled else 'rolled'}"] = row
  return out


def jax_calls(setup, frozen, params, batch, repeats, timed) -> dict:
  """JAX side of `TorchCtrl.time_calls`: one CFG call of each model, forward and forward +
  gradient of sum(ε · probe) w.r.t. x (and the trainable tree, for the fine-tuned model)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top

  x, probe, t = per_call_arrays(setup, batch)
  mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
  pol, ref = train.eps_functions(setup, frozen, mb["prompt"], setup.label_space.encode(mb["y"]))
  fns = {
      "policy_forward": (lambda p, u, x: pol(p, x, t), params),
      "policy_forward_backward": (jax.grad(lambda p, u, x: jnp.sum(pol(p, x, t) * probe),
                                           argnums=(0, 2)), params),
      "reference_forward": (lambda p, u, x: ref(u, x, t), params),
      "reference_forward_backward": (jax.grad(lambda p, u, x: jnp.sum(ref(u, x, t) * probe),
                                              argnums=2), params)}
  return {f"{name}_s": timed(fn, p, frozen["unet"], jnp.asarray(x))[0]
          for name, (fn, p) in fns.items()}


def per_call_arrays(setup_or_spec, batch) -> tuple[np.ndarray, np.ndarray, int]:
  """x and probe [b, C, H, W] (fixed seed) and the middle DDIM timestep, for per-call timings."""
  if isinstance(setup_or_spec, dict):
    shape, n = tuple(setup_or_spec["latent_shape"]), int(setup_or_spec["num_inference_steps"])
  else:
    shape, n = tuple(setup_or_spec.latent_shape), len(setup_or_spec.timesteps)
  b = np.asarray(batch["prompt"]).shape[1]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b,) + shape).astype(np.float32)
  probe = rng.standard_normal((b,) + shape).astype(np.float32)
  ratio = 1000 // n
  t = int((n - 1 - n // 2) * ratio + 1)  # timesteps[n // 2] of the leading spacing, offset 1
  return x, probe, t


def worker_torch(problem: str, updates: int, spec_path: str, compile_unets: bool,
                 phases: bool = False, progress_path: Optional[str] = None
                 ) -> tuple[dict, dict]:
  t_start = time.perf_counter()
  lib = torch_lib()
  torch = lib.torch
  torch.set_num_threads(2)
  with open(spec_path, "rb") as f:
    data = pickle.load(f)
  model = lib.TorchCtrl(data["spec"], compile_unets=compile_unets)
  build_s = time.perf_counter() - t_start
  progress = {"build_s": build_s}

  def note(**kw):  # what the parent reports if this worker runs past its time limit
    progress.update(kw)
    if progress_path:
      with open(progress_path, "w") as f:
        json.dump(progress, f)

  note(stage="warm-up")
  t0 = time.perf_counter()
  first = model.update(data["batch"], data["draws"])
  first_s = time.perf_counter() - t0
  first_params = model.params()
  times, phase_log = [], []
  note(stage="timed updates", warmup_s=first_s, times_s=times)
  for _ in range(updates):
    t0 = time.perf_counter()
    m = model.update(data["batch"], data["draws"])
    times.append(time.perf_counter() - t0)
    phase_log.append(m["phases"])
    note(times_s=times)
  med = {k: statistics.median(p[k] for p in phase_log) for k in phase_log[0]}
  out = dict(path="torch_compile" if compile_unets else "torch", build_s=build_s,
             warmup_s=first_s, first_call_s=first_s, compile_s=None, times_s=times,
             median_s=statistics.median(times),
             metrics={k: v for k, v in first.items() if k != "phases"},
             grad_steps=float(np.mean([np.sum(m) for m in data["draws"]["mask"]])),
             phases=med, torch=torch.__version__, threads=torch.get_num_threads())
  if phases:
    x, probe, t = per_call_arrays(data["spec"], data["batch"])
    out["phases"].update(model.time_calls(data["batch"], x, probe, t, max(updates, 3)))
  out["peak_rss_mib"] = _rss_mib()
  return out, first_params


# =============================================================================== main


def _worker_env(hugepages: bool) -> dict:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
  if hugepages:
    sys.path.insert(0, REPO)
    from ctrl_jax.runtime import hugepages as hp  # pylint: disable=g-import-not-at-top
    new = hp.hugepage_environment(env, platform.libc_ver(), hp.thp_mode())
    env = new or env
  return env


def _problem_list(text: str) -> tuple[str, ...]:
  names = tuple(n for n in text.split(",") if n)
  bad = [n for n in names if n not in PROBLEMS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown problem(s) {bad}; expected some of {PROBLEMS}.")
  return names


def _cpu_busy_s() -> float:
  """CPU-seconds the whole machine has been busy since boot (/proc/stat, all cores)."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
  return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(max_wait_s: float, threshold: float = 0.15) -> tuple[float, float]:
  """Waits (≤ max_wait_s) until the machine is idle: less than `threshold` of all cores busy
  over 3 s. Both paths run 2 threads on 2 cores, and PyTorch's OpenMP threads in particular
  slow down many-fold when a core is taken. Returns (busy fraction at start, seconds waited)."""
  t0 = time.perf_counter()
  while True:
    b0 = _cpu_busy_s()
    time.sleep(3.0)
    busy = (_cpu_busy_s() - b0) / 3.0 / os.cpu_count()
    waited = time.perf_counter() - t0
    if busy < threshold or waited >= max_wait_s:
      return busy, waited


def _run_worker(path: str, problem: str, args, tmp: str, env: dict,
                timeout: Optional[float]) -> dict:
  result_path = os.path.join(tmp, f"{problem}_{path}.pkl")
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", path, "--only", problem,
         "--updates", str(args.updates), "--_spec", os.path.join(tmp, f"{problem}_spec.pkl"),
         "--_result", result_path]
  if problem in args.phases and path in ("jax", "torch"):
    cmd.append("--_phases")
  if problem in args.structure and path == "jax":
    cmd.append("--_structure")
  if path.startswith("torch"):  # diffusers then imports no Flax (hence no JAX) into PyTorch's
    env = dict(env, USE_FLAX="0")
  if path == "torch_compile":  # a fresh inductor cache: the warm-up is a cold compile
    env = dict(env, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, f"inductor_{problem}"))
  busy_at_start, waited = _wait_quiet(args.max_wait)
  load_before = os.getloadavg()
  cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  machine0 = _cpu_busy_s()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    err = {"path": path, "error": f"timed out after {timeout:.0f} s"}
    if os.path.exists(result_path + ".progress"):
      with open(result_path + ".progress") as f:
        err["progress"] = json.load(f)
      done = err["progress"].get("times_s", [])
      err["error"] += (f" (warm-up {err['progress']['warmup_s']:.0f} s, then {len(done)} of "
                       f"{args.updates} timed updates"
                       + (f", median {statistics.median(done):.2f} s)" if done else ")")
                       if "warmup_s" in err["progress"] else " in its warm-up (compile)")
    return err
  wall = time.perf_counter() - t0
  cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
  # CPU the rest of the machine used meanwhile, as a fraction of the worker's wall time × cores.
  others = max(_cpu_busy_s() - machine0 - cpu_s, 0.0) / wall / os.cpu_count()
  if proc.returncode != 0 or not os.path.exists(result_path):
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"path": path, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
  with open(result_path, "rb") as f:
    out, first_params = pickle.load(f)
  out["process_wall_s"] = wall
  out["process_cpu_s"] = cpu_s
  out["loadavg_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
  out["machine"] = {"busy_fraction_at_start": busy_at_start, "waited_for_idle_s": waited,
                    "others_cpu_fraction_during": others}
  out["first_params"] = first_params
  return out


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _agreement(ref: dict, other: dict, optimizer: dict) -> dict:
  """`other`'s first update against `ref`'s (JAX): relative differences of loss, reward, KL;
  of the updated trainable tensors, the max relative difference (to each tensor's max |p|),
  and the max difference in units of the tensor's learning rate (AdamW's first step moves an
  element by ≈ lr · g / (|g| + ε), i.e. ±lr where |g| ≫ ε = 1e-8: an element whose |g| is
  within float32 noise of 0 can move differently on the two sides)."""
  out = {k: abs(other["metrics"][k] - ref["metrics"][k]) / max(abs(ref["metrics"][k]), 1e-30)
         for k in ("loss", "reward", "kl") if k in other["metrics"]}
  pa, pb = ref["first_params"], other["first_params"]
  out["params_after_first_update"] = max(_rel(pa[k], pb[k]) for k in pa)
  lr = {k: optimizer["lr_label_embedding" if k.startswith("class_embedding") else "lr_lora"]
        for k in pa}
  diff = {k: np.abs(np.asarray(pa[k], np.float64) - pb[k]) / lr[k] for k in pa}
  out["params_max_diff_in_lr"] = float(max(d.max() for d in diff.values()))
  out["elements_over_1pct_lr"] = int(sum((d > 0.01).sum() for d in diff.values()))
  out["elements"] = int(sum(d.size for d in diff.values()))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", choices=PROBLEMS, default=None, help="one problem (default: both)")
  ap.add_argument("--updates", type=int, default=3, help="timed updates after the warm-up")
  ap.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
  ap.add_argument("--unrolled", type=_problem_list, default="",
                  help="comma-separated problems that get the experimental JAX row with every "
                       "scan unrolled (compiles ~4× longer)")
  ap.add_argument("--compile_timeout", type=float, default=120.0,
                  help="seconds (warm-up and timed updates) before the torch.compile worker "
                       "counts as failed")
  ap.add_argument("--phases", type=_problem_list, default="digits,sd",
                  help="comma-separated problems profiled per phase on both sides: forward, "
                       "backward, optimiser, and one UNet call forward / forward+backward "
                       "('' = none)")
  ap.add_argument("--structure", type=_problem_list, default="",
                  help="comma-separated problems whose JAX trajectory backward is timed under "
                       "random vs last-G truncation, scans rolled vs unrolled (~5 min for "
                       "digits)")
  ap.add_argument("--max_wait", type=float, default=600.0,
                  help="seconds to wait for an idle machine before each worker")
  ap.add_argument("--no_hugepages", action="store_true",
                  help="workers without glibc.malloc.hugetlb=1")
  ap.add_argument("--out", default=os.path.join("bench", "results", "torch_reference.json"))
  ap.add_argument("--_worker", choices=PATHS, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_phases", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--_structure", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args._worker:  # pylint: disable=protected-access
    if args._worker in ("jax", "jax_unrolled"):  # pylint: disable=protected-access
      res = worker_jax(args.only, args.updates, args._spec, args._phases,  # pylint: disable=protected-access
                       unrolled=args._worker == "jax_unrolled",  # pylint: disable=protected-access
                       structure=args._structure)  # pylint: disable=protected-access
    else:
      res = worker_torch(args.only, args.updates, args._spec,  # pylint: disable=protected-access
                         compile_unets=args._worker == "torch_compile",  # pylint: disable=protected-access
                         phases=args._phases,  # pylint: disable=protected-access
                         progress_path=args._result + ".progress")  # pylint: disable=protected-access
    with open(args._result, "wb") as f:  # pylint: disable=protected-access
      pickle.dump(res, f)
    return

  if args.updates < 1:
    raise SystemExit("--updates must be ≥ 1.")
  sys.path.insert(0, HERE)
  import report  # pylint: disable=g-import-not-at-top
  env = _worker_env(not args.no_hugepages)
  problems = [args.only] if args.only else list(PROBLEMS)
  base_paths = ["torch"] + ([] if args.no_compile else ["torch_compile"])
  results = {}
  t_all = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for problem in problems:
      rows = {}
      describe = None
      paths = ["jax"] + (["jax_unrolled"] if problem in args.unrolled else []) + base_paths
      for path in paths:
        print(f"[{problem}] {path} ...", flush=True)
        rows[path] = _run_worker(path, problem, args, tmp, env,
                                 args.compile_timeout if path == "torch_compile" else None)
        if "error" in rows[path]:
          print(f"[{problem}] {path}: {rows[path]['error']}", flush=True)
          if path == "jax":
            raise SystemExit(f"the JAX worker failed: {rows[path]['error']}")
        else:
          print(f"[{problem}] {path}: {rows[path]['median_s']:.3f} s / update, warm-up "
                f"{rows[path]['warmup_s']:.1f} s, peak RSS {rows[path]['peak_rss_mib']:.0f} MiB",
                flush=True)
        if path == "jax":
          with open(os.path.join(tmp, f"{problem}_spec.pkl"), "rb") as f:
            spec_data = pickle.load(f)
          describe, optimizer = spec_data["describe"], spec_data["spec"]["optimizer"]
      jax_row = rows["jax"]
      for path, row in rows.items():
        if "error" not in row:
          row["ratio_jax_over_this"] = jax_row["median_s"] / row["median_s"]
          if path != "jax":
            row["agreement_with_jax"] = _agreement(jax_row, row, optimizer)
      for row in rows.values():
        row.pop("first_params", None)
      results[problem] = {"describe": describe, "paths": rows}

  head = ("problem", "path", "s / update (median)", "JAX / this", "warm-up s (compile)",
          "peak RSS MiB", "G (grad steps)", "first update vs JAX: loss Δ, params Δ / lr",
          "others' CPU")
  table = []
  for problem, res in results.items():
    for path, row in res["paths"].items():
      if "error" in row:
        table.append([problem, path, "failed: " + row["error"][:80], "", "", "", "", "", ""])
        continue
      comp = (f"{row['warmup_s']:.1f} ({row['lower_s'] + row['compile_s']:.1f})"
              if path.startswith("jax") else f"{row['warmup_s']:.1f}")
      agree = row.get("agreement_with_jax")
      agree_s = ("—" if agree is None else
                 f"{agree['loss']:.1e}, {agree['params_max_diff_in_lr']:.2g} "
                 f"({agree['elements_over_1pct_lr']} of {agree['elements']} > 0.01)")
      table.append([problem, path, f"{row['median_s']:.3f}",
                    f"{row['ratio_jax_over_this']:.2f}", comp, f"{row['peak_rss_mib']:.0f}",
                    f"{row['grad_steps']:.1f}", agree_s,
                    f"{row['machine']['others_cpu_fraction_during']:.0%}"])
  report.print_table(head, table)
  for problem, res in results.items():
    print(f"{problem}: {res['describe']}")
    for path, row in res["paths"].items():
      if "phases" in row:
        print(f"  {path} phases: " + ", ".join(
            f"{k} {v:.3f}" for k, v in row["phases"].items() if isinstance(v, float)))
      for name, st in row.get("structure", {}).items():
        print(f"  {path} {name}: forward {st['forward_s']:.3f} s, gradient "
              f"{st['gradient_s']:.3f} s, backward per differentiated step "
              f"{st['backward_per_grad_step_s']:.3f} s (first gradient call "
              f"{st['gradient_first_call_s']:.0f} s)")
  payload = {"command": "python bench/torch_reference.py " + " ".join(sys.argv[1:]),
             "updates": args.updates, "phases": list(args.phases),
             "unrolled": list(args.unrolled), "structure": list(args.structure),
             "compile_timeout_s": args.compile_timeout,
             "hugepages_env": env.get("GLIBC_TUNABLES", ""),
             "wall_s": time.perf_counter() - t_all, "problems": results}
  report.write_json(args.out, payload)


if __name__ == "__main__":
  main()
