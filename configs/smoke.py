"""Smoke job: CTRL on a tiny *random* UNet with a linear-probe reward (no pre-training).

It runs the exact code path of a real run (augmented model, CFG in both models, random
truncation, KL, sharded step, orbax checkpoints) in about a minute on a laptop CPU.

  python -m ctrl_jax.launch.finetune --config=configs/smoke.py --workdir=runs/smoke
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.problem = "tiny"            # which problem (ctrl_jax.problems.base registry)
  c.seed = 0                    # seeds model init, requests, noise: same seed ⇒ same run
  c.latent_shape = (4, 8, 8)    # (C, H, W) of the latents
  c.task_classes = (2,)         # classes per task (one task: a 2-class linear probe)
  c.num_prompts = 3             # number of random conditions c
  # Sampler.
  c.num_inference_steps = 6     # DDIM steps per trajectory
  c.eta = 1.0                   # DDIM η (> 0: the path KL needs noise)
  c.guidance_scale = 2.0        # CFG scale inside both models
  c.use_cfg = True              # classifier-free guidance on/off
  # Objective (loss = −gamma·mean(reward) + kl_weight·KL).
  c.kl_convention = "official"  # "official" (mean over dims) or "exact" (path KL)
  c.gamma = 1.0                 # reward weight
  c.kl_weight = 0.01            # KL weight
  # Back-prop through the trajectory.
  c.truncation = "random"       # "none" | "random" (CTRL) | "last_k"
  c.truncation_k = 2            # K for "last_k"
  c.remat_policy = "nothing_saveable"  # jax.checkpoint policy per model call ("" = off)
  c.truncation_mask_per_device = True  # each device draws its own truncation mask (False =
                                #   one per micro-batch)
  c.fsdp = 1                    # devices per 'fsdp' group: frozen weights split over them
                                #   (1 = replicated; > 1 needs truncation_mask_per_device=False)
  c.frozen_dtype = ""           # storage dtype of the frozen weights ("" = float32, "bfloat16")
  c.reference_grad = True       # also differentiate through the reference model's input
  c.reference_grad_from = 0     # ... from this update on (0 = every update)
  # Model and optimiser.
  c.lora_rank = 4               # LoRA rank on attention q/k/v/out (0 = embedding only)
  c.lr_lora = 1e-3              # AdamW lr of LoRA
  c.lr_label_embedding = 1e-2   # AdamW lr of the label table
  c.weight_decay = 0.1          # AdamW decoupled weight decay
  c.grad_clip_norm = 5.0        # global-norm clip
  c.micro_batch = 4             # trajectories per micro-batch (divisible by #devices)
  c.num_micro_batches = 2       # micro-batches accumulated per update
  c.num_updates = 10            # optimiser updates
  c.log_every = 2               # log scalars every n updates
  c.tb_image_every = 0          # TensorBoard preview images every n updates (0 = off; the tiny
                                #   problem has none: its "images" are random latents)
  c.checkpoint_every = 5        # orbax checkpoint every n updates
  c.max_checkpoints = 3         # checkpoints kept
  c.max_consecutive_skips = 5   # stop after this many non-finite updates in a row (none applied)
  return c
