"""A tiny random CTRL problem (random UNet, linear-probe reward) for tests, benchmarks and the
smoke job. Nothing here is pre-trained: it exercises the exact code paths of a real run."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ctrl_jax.core import rewards
from ctrl_jax.core import schedules
from ctrl_jax.core import train
from ctrl_jax.models import augmented
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems import base


def micro_unet_config(sample_size: int = 8, in_channels: int = 4) -> dict:
  """The smallest SD-shaped UNet (one cross-attention down/up block + the mid block): cheap to
  compile, for unit tests. 64 channels, not 32: diffusers' Flax UNet hard-codes 32 GroupNorm
  groups, and with one channel per group the norm after the time-embedding add erases the
  per-channel time (and label) embedding entirely."""
  return dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
              down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
              block_out_channels=(64,), layers_per_block=1, attention_head_dim=8,
              cross_attention_dim=16)


class ChannelMeanProbe(nn.Module):
  """logits = Dense(mean over H, W of each channel): a smooth, easy-to-steer classifier."""
  num_classes: int

  @nn.compact
  def __call__(self, x):  # x: [B, C, H, W]
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(2, 3)))


def build(key: jax.Array, *, batch_latent: tuple[int, int, int] = (4, 16, 16),
          num_steps: int = 10, task_classes: tuple[int, ...] = (2,), use_cfg: bool = True,
          truncation: str = "random", truncation_k: int = 2, lora_rank: int = 4,
          remat_policy: Optional[str] = "nothing_saveable", reference_grad: bool = True,
          reference_grad_from: int = 0, mask_per_device: bool = True,
          kl_convention: str = "official", num_prompts: int = 3, context_len: int = 2,
          unet_config: Optional[dict] = None) -> tuple[train.CtrlSetup, dict, dict]:
  """Returns (setup, frozen, trainable params) of a tiny random problem."""
  c, h, _ = batch_latent
  cfg = unet_config or unet_lib.tiny_unet_config(sample_size=h, in_channels=c)
  unet = unet_lib.build_unet(cfg)
  k_unet, k_ctrl, k_cls, k_ctx = jax.random.split(key, 4)
  unet_params = unet_lib.init_unet_params(unet, k_unet)
  label_space = rewards.LabelSpace(tuple(f"task{i}" for i in range(len(task_classes))),
                                   tuple(task_classes))
  model = augmented.AugmentedUNet(unet, num_labels=label_space.num_labels, lora_rank=lora_rank)
  probes = [ChannelMeanProbe(k) for k in task_classes]
  probe_params = [p.init(jax.random.fold_in(k_cls, i), jnp.zeros((1,) + batch_latent))
                  for i, p in enumerate(probes)]
  reward_fn = rewards.make_reward_fn([p.apply for p in probes], [1.0] * len(probes))
  sched = schedules.make_schedule()
  setup = train.CtrlSetup(
      model=model, label_space=label_space, reward_fn=reward_fn,
      decode_fn=lambda _, x: x, latent_shape=tuple(batch_latent),
      timesteps=schedules.ddim_timesteps(1000, num_steps), use_cfg=use_cfg,
      kl_convention=kl_convention, truncation=truncation, truncation_k=truncation_k,
      remat_policy=remat_policy, reference_grad=reference_grad,
      reference_grad_from=reference_grad_from, mask_per_device=mask_per_device)
  d_ctx = cfg["cross_attention_dim"]
  contexts = jax.random.normal(k_ctx, (num_prompts, context_len, d_ctx))
  frozen = {"unet": unet_params, "reward": probe_params, "decoder": None,
            "contexts": contexts, "uncond_context": jnp.zeros((context_len, d_ctx)),
            "schedule": sched,
            "hparams": train.make_hparams(gamma=1.0, kl_weight=0.01, guidance_scale=2.0,
                                          eta=1.0)}
  params = train.init_trainable(setup, k_ctrl, unet_params)
  return setup, frozen, params


def make_batch(seed: int, step: int, setup: train.CtrlSetup, num_prompts: int,
               num_micro: int, micro_batch: int) -> dict:
  """A deterministic batch of (prompt, y) requests for `step` (the loop's own sampler)."""
  return rewards.sample_requests(seed, step, setup.label_space, num_prompts, num_micro,
                                 micro_batch)


def build_problem(config: ml_collections.ConfigDict, workdir: str) -> base.Problem:
  """The tiny problem of a config (configs/smoke.py): nothing is read from or written to
  `workdir` before CTRL."""
  del workdir
  setup, frozen, params = build(
      jax.random.key(config.seed), batch_latent=tuple(config.latent_shape),
      num_steps=config.num_inference_steps, task_classes=tuple(config.task_classes),
      use_cfg=config.use_cfg, truncation=config.truncation, truncation_k=config.truncation_k,
      lora_rank=config.lora_rank, remat_policy=config.remat_policy or None,
      reference_grad=config.reference_grad, kl_convention=config.kl_convention,
      num_prompts=config.num_prompts,
      reference_grad_from=config.get("reference_grad_from", 0),
      mask_per_device=config.get("truncation_mask_per_device", True))
  frozen.pop("hparams")
  return base.Problem(setup=setup, frozen=frozen, params=params, num_prompts=config.num_prompts)


HOOKS = base.ProblemHooks(build=build_problem)
