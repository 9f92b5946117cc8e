"""The shared Stable Diffusion CTRL config (official settings: docs/method.md).

Not a run config itself: configs/aesthetic.py, compressibility.py and multitask.py build on it.
"""
import ml_collections

# The 45 "simple animals" training prompts and the 8 evaluation prompts.
ANIMALS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep",
           "deer", "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard",
           "beetle", "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse",
           "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey",
           "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo")
EVAL_PROMPTS = ("cat", "dog", "horse", "monkey", "rabbit", "butterfly", "peacock", "panda")


def base_config(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.problem = "sd"              # which problem (ctrl_jax.problems.base registry)
  c.task = task                 # "aesthetic" | "compressibility" | "multitask"
  c.variant = "official"        # recorded in outputs
  c.seed = 0                    # LoRA init, requests, noise
  c.pretrained_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local diffusers folder
                                #   (Flax or PyTorch safetensors) or hub id; "tiny" = random tiny SD
  c.activation_dtype = "bfloat16"  # UNet / VAE / CLIP activations; params stay float32
  c.reference_dtype = "float32"  # activations of the frozen KL reference UNet (official: fp32;
                                #   "" = activation_dtype). CFG, DDIM, KL, LoRA delta and label
                                #   embedding are computed in float32 whatever the dtypes
  c.attention = "auto"          # UNet attention: "auto" (cuDNN flash on GPU where it applies,
                                #   else memory-efficient chunked for long sequences), "chunked",
                                #   "xla", "cudnn", "naive" (ctrl_jax/models/attention.py)
  c.prompts = ANIMALS           # training prompts c (encoded once by the CLIP text encoder)

  # Sampler (§4): DDIM 50, η 1, CFG 7.5 inside both models.
  c.num_inference_steps = 50    # DDIM steps (t = 981, 961, …, 1)
  c.eta = 1.0                   # DDIM η
  c.guidance_scale = 7.5        # CFG scale, fine-tuned and reference model
  c.use_cfg = True              # classifier-free guidance on/off

  # Objective (§4): official loss 0.1 · mean NLL + 0.01 · KL (KL mean over latent dims).
  c.kl_convention = "official"  # "official" (mean over dims, as the code) or "exact" (path KL)
  c.gamma = 0.1                 # weight of log p̂(y | x0)
  c.kl_weight = 0.01            # weight of the KL
  c.reward_weights = ()         # per task name weight of log p̂ (() = all 1)
  c.truncation = "random"       # CTRL's random truncated back-prop
  c.truncation_k = 1            # K for truncation "last_k"
  c.remat_policy = "nothing_saveable"  # jax.checkpoint per UNet call
  c.remat_layers = False        # ... and per resnet / transformer layer inside it: −0.9 GiB
                                #   for +15 % FLOPs at SD1.5 size (docs/results/sd_scale.md)
  c.reward_remat_policy = "nothing_saveable"  # jax.checkpoint around VAE decode + classifier
                                #   ("" = off)
  c.reward_micro_batch = 1      # ... images per device decoded together (0 = all at once)
  c.truncation_mask_per_device = True  # each device draws its own truncation mask (official:
                                #   one per GPU step); False = one per micro-batch
  c.fsdp = 1                    # devices per 'fsdp' group: the frozen UNet, VAE and reward
                                #   models (and a full fine-tune's UNet + Adam state) are split
                                #   over them, the batch over all devices (1 = replicated; > 1
                                #   needs truncation_mask_per_device = False)
  c.frozen_dtype = ""           # storage dtype of those frozen weights ("" = as loaded,
                                #   float32; "bfloat16" halves them)
  c.reference_grad = True       # differentiate through the reference model's input (official)
  c.reference_grad_from = 0     # ... from this update on (0 = every update, official)

  # Model and optimiser (§7): AdamW β 0.9/0.999, wd 0.1, clip 5, no schedule.
  c.lora_rank = 4               # LoRA rank on attention q/k/v/out
  c.lr_lora = 1e-4              # per task below
  c.lr_label_embedding = 5e-3   # per task below
  c.weight_decay = 0.1          # AdamW decoupled weight decay
  c.grad_clip_norm = 5.0        # global-norm clip
  c.micro_batch_per_device = 4  # trajectories per device per micro-batch (4 per GPU, official)
  c.micro_batch = 0             # 0 = micro_batch_per_device × #devices
  c.trajectories_per_update = 512  # micro-batches accumulated to this many per update
  c.num_micro_batches = 0       # 0 = trajectories_per_update / micro_batch
  c.num_epochs = 60             # official epochs (§7): samples_per_epoch trajectories each
  c.samples_per_epoch = 512     # trajectories per epoch (the official total_samples_per_epoch;
                                #   per task below; 0 = no epochs)
  c.num_updates = 0             # 0 = num_epochs × samples_per_epoch / trajectories_per_update
                                #   (derived by ctrl_jax.experiment.fill_epoch_counts); > 0 sets it
  c.log_every = 1               # scalars every n updates
  c.tb_image_every = 6          # TensorBoard image "samples/grid" every n updates (0 = off): one
                                #   sample per (eval prompt, class) for the first 4 eval prompts,
                                #   fixed noise (eval.seed), from the current params; also
                                #   before the first update and after the last. 10 % of the
                                #   60-update aesthetic run (cost: 16 images, no gradient)
  c.checkpoint_every = 0        # orbax checkpoint every n updates (0 = once per epoch, as the
                                #   official save_freq; finetune/info.json maps steps to epochs)
  c.max_checkpoints = 100       # keep all (official num_checkpoint_limit): the best epoch is
                                #   chosen afterwards (§7)
  c.max_consecutive_skips = 5   # stop after this many non-finite updates in a row (none applied)

  # Stage: reward classifiers p̂(y | x) (§6); `python -m ctrl_jax.launch.fit_classifier`.
  k = c.classifier = ml_collections.ConfigDict()
  k.clip_model = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14 folder (PyTorch safetensors
                                #   or Flax) or hub id: the aesthetic ground truth's tower
  k.laion_weights = "sac+logos+ava1-l14-linearMSE.pth"  # LAION aesthetic MLP (.pth read with
                                #   weights_only=True, or a .safetensors copy)
  k.aesthetic_threshold = 5.7   # class 1 iff LAION score ≥ this (< 0: median of the data)
  k.data = ""                   # a dataset folder (local or URI) made by `python -m
                                #   ctrl_jax.launch.prepare_data`: CLIP embeddings + LAION
                                #   scores, JPEG sizes + images, read shard by shard; when set,
                                #   used instead of aesthetic_data / compress_data
  k.aesthetic_data = ""         # .npz {embeddings [N, 768], scores [N]} or a folder of images
  k.compress_data = ""          # folder of images (JPEG-size labels computed at image_size²)
  p = k.prepare = ml_collections.ConfigDict()  # prepare_data only (not part of the fit)
  p.shard_size = 256            # source images per shard (512² uint8: 192 MiB per shard)
  p.batch = 32                  # images per CLIP call (fixed: one compilation)
  p.workers = 8                 # image-decoding threads
  k.image_size = 512            # offline images are resized to this (the 512² JPEG convention)
  k.jpeg_quality = 95           # PIL quality of the JPEG-size ground truth
  k.compress4_edges_kb = (60.0, 85.0, 110.0)  # class 3 ≤ 60 < 2 ≤ 85 < 1 ≤ 110 < 0
  k.compress2_edges_kb = (70.0,)  # class 1 iff ≤ 70 kB   (() = quantiles of the data)
  k.calib_fraction = 0.2        # held back for temperature scaling
  k.head_epochs = 100           # aesthetic head: Adam epochs
  k.head_batch = 256            # aesthetic head: batch
  k.head_lr = 1e-3              # aesthetic head: Adam lr
  k.cnn_steps = 2000            # compressibility CNN: Adam steps
  k.cnn_batch = 64              # compressibility CNN: batch
  k.cnn_lr = 1e-3               # compressibility CNN: Adam lr
  k.cnn_arch = "official"       # compressibility CNN: "official" (full resolution, stride-1
                                #   first block, as train_reward_cnn.py) | "resized" (images
                                #   resized to cnn_input_size first); docs/results/compress_cnn.md
  k.cnn_width = 64              # compressibility CNN: channels of the first block (64 = official)
  k.cnn_input_size = 128        # compressibility CNN: "resized" resizes images to this first

  # Evaluation (§8): ground truths on the 8 eval prompts.
  e = c.eval = ml_collections.ConfigDict()
  e.run_after_finetune = True   # the finetune launcher evaluates when training ends
  e.prompts = EVAL_PROMPTS      # evaluation prompts
  e.samples_per_class = 32      # per (prompt, class) (multitask: per (prompt, cell): 128)
  e.seed = 1234                 # x_T / noise seed (shared by fine-tuned and pre-trained)
  e.batch_size = 16             # samples per sampling call
  e.grid_samples = 2            # samples per (prompt, class) in the PNG grid
  e.clip_model = "openai/clip-vit-large-patch14"  # full CLIP (both towers) for the CLIP score
                                #   of prompt vs image ("" = skip)
  e.laion_score = True          # LAION aesthetic score of every image, whatever the task (the
                                #   compressibility task then needs classifier.clip_model and
                                #   classifier.laion_weights too)
  e.score_batch = 32            # images per CLIP / LAION scoring call (fixed: one compilation)
  e.save_png = True             # every image as a PNG file:
                                #   eval/images/<model>/<NN>_<prompt>/<class>_<i>.png
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same code on tiny random components (CPU tests): random SD, random CLIP tower and
  LAION MLP, synthetic offline images, data-quantile class edges."""
  c.variant = "tiny"
  c.pretrained_model = "tiny"
  c.activation_dtype = "float32"
  c.prompts = ("cat", "dog", "fox")
  c.num_inference_steps = 3
  c.remat_policy = ""           # compiles faster on CPU (remat itself: tests/test_train.py)
  c.reward_remat_policy = ""    # as remat_policy
  c.micro_batch_per_device = 1
  c.micro_batch = 0
  c.trajectories_per_update = 0
  c.num_micro_batches = 1
  c.samples_per_epoch = 0       # no epochs: the tiny batch depends on the device count
  c.num_updates = 4
  c.checkpoint_every = 2
  c.tb_image_every = 2
  c.max_checkpoints = 3
  k = c.classifier
  k.clip_model = "tiny"
  k.laion_weights = "tiny"
  k.aesthetic_threshold = -1.0
  k.image_size = 16
  k.compress4_edges_kb = ()
  k.compress2_edges_kb = ()
  k.head_epochs = 20
  k.head_batch = 32
  k.cnn_steps = 30
  k.cnn_batch = 16
  k.cnn_width = 8
  k.cnn_input_size = 16
  k.prepare.shard_size = 8
  k.prepare.batch = 4
  k.prepare.workers = 2
  e = c.eval
  e.prompts = ("cat",)
  e.samples_per_class = 2
  e.batch_size = 8
  e.grid_samples = 1
  e.clip_model = "tiny"
  e.score_batch = 8
  return c
