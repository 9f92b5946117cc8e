"""The digits benchmark: CTRL end to end on scikit-learn's handwritten digits, on a laptop CPU.

  python -m ctrl_jax.launch.finetune --config=configs/digits.py --workdir=runs/digits
  python -m ctrl_jax.launch.finetune --config=configs/digits.py:multitask --workdir=runs/multi
  python -m ctrl_jax.launch.finetune --config=configs/digits.py:quick --workdir=/tmp/quick

The finetune launcher runs the missing earlier stages (pre-training p(x | c), fitting the reward
classifier) and evaluation; the stage launchers (`ctrl_jax.launch.pretrain`, `.fit_classifier`,
`.evaluate`) run one stage each. Every stage reuses what is already in --workdir and resumes
from its last checkpoint. Variants: "ink" (default), "multitask", "posterior" (the exact path KL
at γ = 100: nearer the posterior p(x | c, y), lower accuracy), "quick" (CI-sized).
"""
import ml_collections


def get_config(variant: str = "ink") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.problem = "digits"          # which problem (ctrl_jax.problems.base registry)
  c.variant = variant           # recorded in the outputs
  c.task = "ink"                # "ink" (ink3), "multitask" (ink2 × edge2), or "inkc" (ink above
                                #   the median of the image's own digit: y depends on c; studies)
  c.seed = 0                    # CTRL seed (requests, noise, LoRA init)

  # Stage 1: the pre-trained p(x | c) (ctrl_jax.problems.digits.model).
  p = c.pretrain = ml_collections.ConfigDict()
  p.seed = 0                    # init and batch order
  p.block_out_channels = (32, 64)  # UNet widths per level (8×8 → 4×4)
  p.layers_per_block = 1        # resnet (+ attention) layers per level
  p.attention_head_dim = 8      # channels per attention head
  p.context_dim = 32            # width of the c token (cross-attention dim)
  p.beta_schedule = "linear"    # DDPM noise schedule over 1000 steps (pixel space)
  p.beta_start = 1e-4           # β_1
  p.beta_end = 0.02             # β_T
  p.p_uncond = 0.1              # label dropout: P(c → null token), for CFG
  p.batch_size = 64             # images per step (divisible by #devices)
  p.num_steps = 600             # optimiser steps
  p.lr = 2e-3                   # AdamW peak lr (linear warm-up, cosine decay to lr/10)
  p.warmup_steps = 50           # warm-up steps
  p.weight_decay = 0.0          # AdamW weight decay
  p.ema_decay = 0.995           # max EMA decay (warm-up (1+n)/(10+n)); the EMA is what is kept
  p.log_every = 50              # scalars every n steps
  p.checkpoint_every = 200      # orbax checkpoint every n steps

  # Stage 2: the reward classifier p̂(y | x), per task name
  # (ctrl_jax.problems.digits.data.fit_classifier).
  k = c.classifier = ml_collections.ConfigDict()
  k.num_labels = 300            # offline (x, y) pairs drawn from the train split (no c)
  k.label_seed = 0              # which pairs
  k.seed = 0                    # init, calibration split
  k.steps = 1000                # Adam steps (full batch)
  k.lr = 1e-2                   # Adam lr
  k.calib_fraction = 0.2        # pairs held back for temperature calibration
  k.use_digit = False           # p̂(y | x, c): the classifier also sees the digit (CTRL passes the
                                #   asked one); only the "dependent" study sets it

  # Stage 3: CTRL (ctrl_jax.experiment.finetune).
  c.num_inference_steps = 10    # DDIM steps per trajectory (training and evaluation)
  c.eta = 1.0                   # DDIM η (> 0: the path KL needs noise)
  c.guidance_scale = 2.0        # CFG scale in both models (c and y jointly vs null)
  c.use_cfg = True              # classifier-free guidance on/off
  c.kl_convention = "official"  # "official" (mean over dims) or "exact" (path KL)
  c.gamma = 1.0                 # reward weight (γ)
  c.reward_weights = ()         # per task name weight of log p̂ in the reward (() = all 1)
  c.reward_log_eps = 1e-6       # reward log(p̂ + eps) (official); 0 = log p̂ from log-softmax
                                #   (keeps a gradient on samples firmly in another class)
  c.kl_weight = 0.03            # KL weight (0.01: ink3 0.979 but digit acc −3.9 points, grey
                                #   backgrounds; 0.1: digit acc kept but ink3 0.899)
  c.truncation = "random"       # "none" | "random" (CTRL) | "last_k"
  c.truncation_k = 2            # K for "last_k"
  c.remat_policy = "nothing_saveable"  # jax.checkpoint policy per UNet call ("" = off); on
                                #   CPU it is faster, not only smaller: 1.28 vs 1.80 s/update
                                #   (fewer fresh pages to fault in; bench/host_alloc.py)
  c.attention = "naive"         # UNet attention (8×8 latents: 64 tokens; models/attention.py)
  c.reference_grad = True       # differentiate through the reference model's input too: the
                                #   exact KL gradient (the official code does) ...
  c.reference_grad_from = 80    # ... from this update on (0 = every update; needs reference_grad).
                                #   Earlier updates take ε_pre as a constant: a biased KL
                                #   gradient, 1.4× cheaper per update. Biased throughout, the
                                #   digits decay once the reward saturates; the switch keeps them
                                #   (docs/results/digits_ink.md)
  c.lora_rank = 4               # LoRA rank on attention q/k/v/out (0 = label embedding only)
  c.full_finetune = False       # also train a copy of the whole UNet (lr_unet); the reference
                                #   model stays the frozen pre-trained UNet
  c.lr_unet = 1e-4              # AdamW lr of the UNet copy (full_finetune only)
  c.lr_lora = 4.5e-3            # AdamW lr of LoRA (peak)
  c.lr_label_embedding = 1.5e-2  # AdamW lr of the label table (peak)
  c.lr_schedule = "cosine"      # "constant" (official) or "cosine" (each lr decays to
  c.lr_final_fraction = 0.1     #   lr_final_fraction × it over num_updates). A constant lr is
                                #   seed-sensitive here: its last iterate is noisy
                                #   (docs/results/digits_ink.md)
  c.lr_warmup_steps = 15        # linear lr warm-up over the first n updates, then the schedule.
                                #   Full-size early Adam steps can drive the images into the
                                #   [0, 1] clip, where the reward has no gradient
  c.weight_decay = 0.0          # AdamW decoupled weight decay
  c.grad_clip_norm = 5.0        # global-norm clip
  c.micro_batch = 16            # trajectories per micro-batch (divisible by #devices)
  c.num_micro_batches = 1       # micro-batches accumulated per update
  c.num_updates = 160           # optimiser updates (15 warm-up + 145 cosine)
  c.background_compile = True   # compile the CTRL train step on a second thread while
                                #   pre-training runs (from shapes; bench/quick_wall.py)
  c.log_every = 5               # scalars every n updates
  c.tb_image_every = 16         # TensorBoard image "samples/grid" every n updates (0 = off): one
                                #   sample per (digit, class) cell, fixed noise (eval.seed), from
                                #   the current params; also before the first update and after
                                #   the last (10 % of the run: watch y being learnt or hacked)
  c.checkpoint_every = 20       # orbax checkpoint every n updates
  c.max_checkpoints = 2         # checkpoints kept
  c.max_consecutive_skips = 5   # stop after this many non-finite updates in a row (none applied)

  # Stage 4: evaluation (ctrl_jax.problems.digits.evaluation).
  e = c.eval = ml_collections.ConfigDict()
  e.run_after_finetune = True   # the finetune launcher evaluates when training ends
  e.samples_per_cell = 50       # samples per (digit c, class y) cell, fixed seeds
  e.seed = 1234                 # x_T / noise seed (the same for fine-tuned and pre-trained)
  e.batch_size = 500            # samples per sampling call
  e.grid_samples = 4            # samples per cell in the PNG grids
  e.method = "ctrl"             # "ctrl", or a baseline of ctrl_jax.baselines.compare ("dps", …):
                                #   sampled on the pre-trained model into DIR/eval_<method>/
  e.weight = -1.0               # the baseline's guidance weight (< 0: the one the comparison
                                #   tuned, from DIR/compare/results.json)
  # Posterior fidelity (ctrl_jax.problems.digits.posterior): per (c, y) cell, the kernel MMD²
  # of the samples to an exact reference of p(x | c, y) drawn from the pre-trained model by
  # rejection (true label rule), and to the p̂(y | x)^γ-weighted reference, against the noise
  # floor of an independent reference sample of the same size. Also scored by the comparison.
  q = e.posterior = ml_collections.ConfigDict()
  q.reference_per_cell = 150    # accepted draws per cell in the hard reference (0 = off)
  q.floor_per_cell = 50         # further accepted draws per cell: the floor's independent
                                #   sample (≥ the samples per cell of anything scored)
  q.weighted_pool = 500         # draws of p_pre(x | c) per digit in each γ-weighted pool (two
                                #   disjoint pools: the reference and the floor's resampling)
  q.gammas = (1.0,)             # γ of the weighted references (1 = the posterior with p̂)
  q.seed = 2024                 # the reference draws' seed (cached in DIR/eval/)
  q.round_size = 2000           # draws per sampling round (a multiple of eval.batch_size),
                                #   spread over the digits with a cell still short
  q.max_rounds = 30             # stop after this many rounds (short cells are named; a cell
                                #   with < 10 reference draws gets no statistic)

  # Baselines comparison (ctrl_jax.baselines.compare; python -m ctrl_jax.launch.compare).
  m = c.compare = ml_collections.ConfigDict()
  m.methods = ("pretrained", "ctrl", "dps", "dps_nojac", "classifier_guidance",
               "cfg_triplets", "mpgd", "smc", "svdd")  # methods to run
  m.samples_per_cell = 20       # final evaluation: samples per (digit, label) cell
  m.tune_samples_per_cell = 4   # weight tuning set: samples per cell (another seed)
  m.seed = 4321                 # x_T / noise seed of the final evaluation
  m.batch_size = 300            # requests per sampling call
  m.digit_drop_limit = 0.03     # tuning: keep digit accuracy ≥ pre-trained − this
  m.grids = ml_collections.ConfigDict({  # guidance weight grids (svdd: temperature; cfg: scale)
      "dps": (0.1, 0.3, 1.0, 3.0), "dps_nojac": (0.01, 0.03, 0.1, 0.3),
      "classifier_guidance": (1.0, 3.0, 10.0), "mpgd": (0.1, 0.3, 1.0, 3.0),
      "smc": (0.3, 1.0, 3.0), "svdd": (0.1, 0.3, 1.0), "cfg_triplets": (2.0, 4.0)})
  m.smc_particles = 4           # TDS particles per sample (K)
  m.smc_sweep = (4, 16, 64)     # SMC at these K, weight smc_sweep_weight (no tuning): its
  m.smc_sweep_weight = 1.0      #   target is p_γ with γ = the weight, so with many particles it
  m.smc_sweep_proposal = "ddim"  #   should reach the γ-weighted reference's floor. Proposal
                                #   "ddim" (bootstrap: forwards only) or "twisted" (TDS, as
                                #   `smc`: a UNet backward per particle and step); () = off
  m.svdd_candidates = 4         # SVDD candidates per step (M)
  m.noisy_classifier_steps = 2000  # classifier guidance: Adam steps of p(y | x_t, t)
  # ctrl_jax.baselines.studies (python -m ctrl_jax.launch.study)
  s = c.studies = ml_collections.ConfigDict()
  s.num_labels = (50, 100, 300, 1000)  # "labels": CTRL vs CFG on triplets per label budget
  s.gammas = (0.3, 1.0, 3.0)    # "gamma": reward weights γ (kl_weight fixed)
  s.lora_ranks = (1, 4, 16)     # "lora": LoRA ranks …
  s.full_finetune = True        #   … and full fine-tuning of the UNet (lr_unet, no LoRA)
  s.full_finetune_updates = 0   #   its number of updates (0 = num_updates; an update costs more)
  s.full_finetune_lr = 1e-5     #   its AdamW lr of the UNet copy (lr_unet; 1e-4 broke the digits
                                #   within 5 updates)
                                # "dependent": task inkc, reward p̂(y | x) vs p̂(y | x, c)
  s.dependent_reference_grad = True  # … with the exact KL gradient in every update (it sets
                                #   reference_grad_from = 0): with the biased one (False) both
                                #   inkc runs diverged once the reward saturated
  exact = "kl_convention=exact,gamma={:.1f},kl_weight=1.0,reference_grad_from=0,reward_log_eps=0.0"
  s.posterior_variants = (      # "posterior": CTRL settings scored for accuracy and posterior
      "seed=1", "seed=2",       #   fidelity, each "field=value[,field=value]" (DIR's run is
      "kl_weight=0.06",         #   the default point): the official convention's KL weight,
      exact.format(10.0), exact.format(30.0), exact.format(100.0),  # the exact path KL at
      exact.format(100.0) + ",num_updates=320")  #   γ = 10 … 100 (the "posterior" variant)
  s.posterior_gammas = (1.0, 3.0, 10.0, 100.0, 2133.0)  # … and the exact targets p_γ drawn
                                #   beside them (2133 = the default's γ·64/kl_weight)
  b = c.baselines = ml_collections.ConfigDict()
  b.cfg = ml_collections.ConfigDict()  # CFG-on-triplets overrides of
                                #   ctrl_jax.baselines.cfg_triplets.default_cfg_config()
                                #   (1000 steps, …)

  if variant == "ink":
    pass
  elif variant == "multitask":
    c.task = "multitask"
    c.reward_weights = (1.0, 2.0)  # edge2 counts double (as the official multi-task loss weights
                                   #   its harder task): joint acc 0.850 vs 0.805 with (1, 1)
    c.reference_grad_from = 0      # the exact KL gradient in every update (no time budget here)
    c.num_updates = 300            # the `ink` recipe otherwise (cosine, warm-up 15, remat);
                                   #   results: docs/results/digits_multitask.md
    c.tb_image_every = 30
    q.max_rounds = 10              # cells the pre-trained model almost never makes (a "1"
                                   #   with much ink and sharp edges) stay short
  elif variant == "posterior":  # the exact path KL at γ = 100 with the log-softmax reward and
    c.kl_convention = "exact"   #   the exact KL gradient in every update: samples much nearer
    c.gamma = 100.0             #   the posterior p(x | c, y), lower ink3 accuracy
    c.kl_weight = 1.0           #   (docs/results/posterior_fidelity.md)
    c.reward_log_eps = 0.0
    c.reference_grad_from = 0
  elif variant == "quick":      # CI-sized: same code path, tiny budgets
    p.block_out_channels = (64,)  # one level (attention in the mid block only): the same
                                  #   FLOPs per step as (32, 64) but half the layers to compile
    p.batch_size = 32
    p.num_steps = 300
    p.checkpoint_every = 300
    c.truncation = "none"       # 6 steps: gradient through all (ink3 0.475 vs 0.408 random)
    k.steps = 300
    c.num_inference_steps = 6
    c.lr_label_embedding = 3e-2  # a few updates must move y: big steps (costs digit accuracy)
    c.lr_lora = 3e-3
    c.lr_schedule = "constant"
    c.lr_warmup_steps = 0       # 16 updates: no room for a warm-up
    c.remat_policy = ""         # as measured (bench/quick_wall.py)
    c.reference_grad = False    # as measured (the biased KL gradient; 16 updates)
    c.reference_grad_from = 0
    c.num_updates = 16
    c.log_every = 4
    c.checkpoint_every = 8
    c.tb_image_every = 8
    e.samples_per_cell = 8
    e.batch_size = 240
    e.grid_samples = 2
    m.samples_per_cell = 2
    m.tune_samples_per_cell = 1
    m.batch_size = 60
    m.grids = ml_collections.ConfigDict({
        "dps": (1.0,), "dps_nojac": (0.1,), "classifier_guidance": (3.0,), "mpgd": (1.0,),
        "smc": (1.0,), "svdd": (0.3,), "cfg_triplets": (2.0,)})
    m.noisy_classifier_steps = 100
    m.smc_sweep = ()            # off (tests/test_posterior.py runs it on its own)
    q.reference_per_cell = 20
    q.floor_per_cell = 10       # ≥ the samples per cell the quick tests score
    q.weighted_pool = 60
    q.round_size = 480
    q.max_rounds = 12
    b.cfg.steps = 30
    b.cfg.checkpoint_every = 30
    s.num_labels = (50, 300)
    s.gammas = (1.0, 3.0)
    s.lora_ranks = (4,)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/digits.py; expected "
                     "'ink', 'multitask', 'posterior' or 'quick'.")
  return c
