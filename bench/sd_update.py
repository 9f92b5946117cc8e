"""Benchmark: one CTRL training update at Stable Diffusion v1.5 scale (random weights).

  python bench/sd_update.py --peak_tflops 790          # one H200 (bf16 peak as measured)
  python bench/sd_update.py --per_device_batch 4 --steps 50 --truncation random
  python bench/sd_update.py --tiny                     # CPU dry run of the same code (~1 min)

What is timed is `train.make_train_step` — the real jitted update (loss through the DDIM
trajectory with CFG in both models, reward, KL, AdamW) — on a `sharding.make_mesh()` over every
local device, so the same command times 1 GPU, 8 GPUs or a single-host TPU VM. Models: the SD1.5
UNet (`sd15_unet_config()`, 860 M params, float32 params, `--dtype` activations) as policy
(+ LoRA rank 4 + label embedding) and frozen reference; unless `--no_vae`, the SD1.5 VAE decoder
(512² images) in the reward path; the reward classifier is `compressibility.CompressibilityCNN`
(4 classes, the compressibility task's classifier) on the decoded image. Text contexts are
random [P, 77, 768].

Micro-batch = `--per_device_batch` × #devices trajectories; an update accumulates
`--micro_batches` of them (the official 256 / 512 trajectories per update is that many
micro-batches; the estimate for it is printed).

Random truncation draws a new set of differentiated steps per update. To make repeats
comparable the state's step counter is reset to 0 before every call, so each repeat uses the
same step key (`--seed`): same x_T, same noise, same truncation mask. The number of
differentiated steps G of that key is reported (E[G] = N/2 under random truncation).

FLOPs. XLA's `cost_analysis()` of the compiled update is reported as is, but it counts the body
of every while loop once (the 50-step trajectory scan and the micro-batch scan; checked on
jax 0.10.2: a 10-step scan reports the FLOPs of 1 step), so it is a lower bound. TFLOP/s uses
the *model FLOPs* instead, built from loop-free per-call counts (cost analysis of the lowered
UNet forward / forward+backward, reward forward+backward at this batch):
  model = M · [N·f_pol + N·f_ref + G·b_pol + G·b_ref + r]
with f = forward, b = backward (fb − f) of a model call with gradient, r = decode+classifier
forward+backward, M micro-batches (b_ref = 0 without reference_grad). Hardware FLOPs add the
remat recompute, G·(f_pol + f_ref), for `--remat nothing_saveable` (other policies recompute
less; not modelled), and the reward forward again under `--reward_remat nothing_saveable`.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.core import rewards
from ctrl_jax.core import schedules
from ctrl_jax.core import train
from ctrl_jax.models import attention
from ctrl_jax.models import augmented
from ctrl_jax.models import sd as sd_lib
from ctrl_jax.models import unet as unet_lib
from ctrl_jax.problems.sd import compressibility
from ctrl_jax.runtime import sharding as shd

import report  # bench/report.py: this script's folder is on sys.path

# SD1.5's VAE (AutoencoderKL of stable-diffusion-v1-5/vae/config.json).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
NUM_CLASSES = 4        # the compressibility task's 4 JPEG-size classes
CONTEXT_LENGTH = 77    # CLIP tokenizer max length
NUM_PROMPTS = 45       # the 45 "simple animals" prompts


def _flops(cost) -> float | None:
  """The "flops" entry of a cost analysis: a dict (jax ≥ 0.4.3x), a list of one dict per
  computation (older jax), or None where the backend gives none."""
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    vals = [c.get("flops") for c in cost if c]
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None
  v = cost.get("flops")
  return None if v is None else float(v)


def _lowered_flops(fn, *args) -> float | None:
  return _flops(jax.jit(fn).lower(*args).cost_analysis())


def _peak_memory() -> tuple[int | None, int | None]:
  """(peak_bytes_in_use, bytes_limit) of local device 0, or None where not reported (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def _count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def build(args, abstract: bool = False):
  """(setup, frozen, trainable params, shapes info) for the benchmark's problem. With
  `abstract`, every parameter is a `jax.ShapeDtypeStruct` (nothing is initialised: for
  `lower(...).compile()` and its memory plan only)."""
  dtype = DTYPES[args.dtype]
  key = jax.random.key(args.seed)
  init = jax.eval_shape if abstract else (lambda f, *a: jax.block_until_ready(f(*a)))
  if args.tiny:
    unet_cfg = unet_lib.tiny_unet_config(sample_size=8, in_channels=4, cross_attention_dim=32)
    vae_cfg, cls_width = sd_lib.TINY_VAE, 8
  else:
    unet_cfg = sd_lib.sd15_unet_config()
    vae_cfg, cls_width = SD15_VAE, 64
  unet = unet_lib.build_unet(unet_cfg, dtype=dtype)
  t0 = time.perf_counter()
  unet_params = init(lambda k: unet_lib.init_unet_params(unet, k), jax.random.fold_in(key, 0))
  init_s = {"unet": time.perf_counter() - t0}
  latent_shape = (unet.in_channels, unet.sample_size, unet.sample_size)

  if args.no_vae:
    decoder_params, image_shape = None, latent_shape
    decode_fn = lambda _, x0: x0.astype(jnp.float32)  # the classifier reads the latents
  else:
    from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
    vae = FlaxAutoencoderKL(**vae_cfg, dtype=dtype)
    t0 = time.perf_counter()
    decoder_params = init(lambda k: dict(jax.jit(vae.init_weights)(k)), jax.random.fold_in(key, 1))
    init_s["vae"] = time.perf_counter() - t0
    decode_fn = sd_lib.make_decode_fn(vae)
    up = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    image_shape = (3, latent_shape[1] * up, latent_shape[2] * up)

  classifier = compressibility.CompressibilityCNN(NUM_CLASSES, width=cls_width, arch="official")
  cls_vars = init(lambda k: classifier.init(k, jnp.zeros((1, 3, 16, 16), jnp.float32)),
                  jax.random.fold_in(key, 2))
  label_space = rewards.LabelSpace(("compress4",), (NUM_CLASSES,))
  model = augmented.AugmentedUNet(
      unet, num_labels=label_space.num_labels, lora_rank=4, attention=args.attention,
      reference_dtype=DTYPES[args.reference_dtype] if args.reference_dtype else None,
      remat_layers=args.remat_layers)
  setup = train.CtrlSetup(
      model=model, label_space=label_space,
      reward_fn=rewards.make_reward_fn([compressibility.classifier_apply(classifier)], (1.0,)),
      decode_fn=decode_fn, latent_shape=latent_shape,
      timesteps=schedules.ddim_timesteps(1000, args.steps), use_cfg=True,
      kl_convention="official", truncation=args.truncation, truncation_k=args.truncation_k,
      remat_policy=None if args.remat == "none" else args.remat, reference_grad=True,
      reward_remat_policy=None if args.reward_remat == "none" else args.reward_remat,
      reward_micro_batch=args.reward_micro_batch)
  d = unet_cfg["cross_attention_dim"]
  frozen = {
      "unet": unet_params, "reward": [cls_vars], "decoder": decoder_params,
      "contexts": init(lambda k: jax.random.normal(k, (NUM_PROMPTS, CONTEXT_LENGTH, d)),
                       jax.random.fold_in(key, 3)),
      "uncond_context": init(lambda k: jax.random.normal(k, (CONTEXT_LENGTH, d)),
                             jax.random.fold_in(key, 4)),
      "schedule": schedules.make_schedule(),
      # Official SD settings (§4): γ 0.1, KL weight 0.01, CFG 7.5, η 1.
      "hparams": train.make_hparams(gamma=0.1, kl_weight=0.01, guidance_scale=7.5, eta=1.0)}
  params = init(lambda k, u: train.init_trainable(setup, k, u), jax.random.fold_in(key, 5),
                unet_params)
  info = dict(unet_params=_count(unet_params), trainable_params=_count(params),
              decoder_params=None if decoder_params is None else _count(decoder_params),
              classifier_params=_count(cls_vars), latent_shape=list(latent_shape),
              image_shape=list(image_shape), init_seconds=init_s)
  return setup, frozen, params, info


def add_model_flags(ap: argparse.ArgumentParser) -> None:
  """The flags that choose the update's implementation (shared with bench/sd_memory.py)."""
  ap.add_argument("--per_device_batch", type=int, default=4,
                  help="trajectories per device per micro-batch (official: 4 per GPU)")
  ap.add_argument("--truncation", default="random", choices=train.TRUNCATIONS)
  ap.add_argument("--truncation_k", type=int, default=1, help="K for --truncation last_k")
  ap.add_argument("--remat", default="nothing_saveable",
                  choices=("nothing_saveable", "dots_with_no_batch_dims_saveable",
                           "everything_saveable", "none"),
                  help="jax.checkpoint policy per UNet call")
  ap.add_argument("--no_remat_layers", dest="remat_layers", action="store_false",
                  help="no per-layer remat inside a UNet call (ctrl_jax/models/remat.py)")
  ap.add_argument("--reward_remat", default="nothing_saveable",
                  choices=("nothing_saveable", "none"),
                  help="jax.checkpoint policy of the reward path (VAE decode + classifier)")
  ap.add_argument("--reward_micro_batch", type=int, default=1,
                  help="images per device decoded together under the reward remat (0 = all)")
  ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                  help="activation dtype of the policy UNet and the VAE (params stay float32)")
  ap.add_argument("--reference_dtype", default="float32", choices=sorted(DTYPES) + [""],
                  help="activation dtype of the reference UNet (official: float32)")
  ap.add_argument("--no_vae", action="store_true",
                  help="no VAE decoder: the classifier reads the latents")
  ap.add_argument("--seed", type=int, default=0, help="init and the (fixed) step key")
  ap.add_argument("--tiny", action="store_true",
                  help="CPU dry run: tiny UNet + tiny VAE, batch 1, float32")


def per_call_flops(setup, frozen, params, batch) -> dict:
  """Loop-free FLOP counts (lowered cost analysis, nothing compiled) of the pieces of one
  micro-batch: policy / reference ε (CFG: 2b rows) forward and forward+backward, and the reward
  (decode + classifier) forward+backward. Frozen trees are arguments, not constants."""
  mb = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), batch)
  b = mb["prompt"].shape[0]
  x = jax.ShapeDtypeStruct((b,) + tuple(setup.latent_shape), jnp.float32)
  t = jnp.asarray(int(setup.timesteps[len(setup.timesteps) // 2]), jnp.int32)

  def eps(fz, mbatch):
    labels = setup.label_space.encode(mbatch["y"])
    return train.eps_functions(setup, fz, mbatch["prompt"], labels)

  def pol_f(p, fz, mbatch, x):
    return eps(fz, mbatch)[0](p, x, t)

  def pol_fb(p, fz, mbatch, x):
    return jax.grad(lambda p, x: jnp.sum(pol_f(p, fz, mbatch, x).astype(jnp.float32)),
                    argnums=(0, 1))(p, x)

  def ref_f(fz, mbatch, x):
    return eps(fz, mbatch)[1](fz["unet"], x, t)

  def ref_fb(fz, mbatch, x):
    return jax.grad(lambda x: jnp.sum(ref_f(fz, mbatch, x).astype(jnp.float32)))(x)

  def reward_fb(fz, mbatch, x):
    def r(x):
      return jnp.mean(setup.reward_fn(fz["reward"], setup.decode_fn(fz.get("decoder"), x),
                                      mbatch["y"], mbatch["prompt"])[0])
    return jax.value_and_grad(r)(x)

  def reward_f(fz, mbatch, x):
    return setup.reward_fn(fz["reward"], setup.decode_fn(fz.get("decoder"), x), mbatch["y"],
                           mbatch["prompt"])[0]

  out = dict(reward_fwd=_lowered_flops(reward_f, frozen, mb, x),policy_fwd=_lowered_flops(pol_f, params, frozen, mb, x),
             policy_fwd_bwd=_lowered_flops(pol_fb, params, frozen, mb, x),
             reference_fwd=_lowered_flops(ref_f, frozen, mb, x),
             reference_fwd_bwd=_lowered_flops(ref_fb, frozen, mb, x),
             reward_fwd_bwd=_lowered_flops(reward_fb, frozen, mb, x))
  return out


def model_flops(calls: dict, setup, num_micro: int, grad_steps: float) -> tuple:
  """(model FLOPs, hardware FLOPs incl. remat recompute) of one update; None if unknown."""
  if any(v is None for v in calls.values()):
    return None, None
  n, g = len(setup.timesteps), grad_steps
  b_pol = calls["policy_fwd_bwd"] - calls["policy_fwd"]
  b_ref = (calls["reference_fwd_bwd"] - calls["reference_fwd"]) if setup.reference_grad else 0.0
  per_micro = (n * (calls["policy_fwd"] + calls["reference_fwd"]) + g * (b_pol + b_ref)
               + calls["reward_fwd_bwd"])
  recompute = 0.0
  if setup.remat_policy == "nothing_saveable":
    recompute = g * (calls["policy_fwd"] + (calls["reference_fwd"] if setup.reference_grad
                                            else 0.0))
  if setup.reward_remat_policy == "nothing_saveable":
    recompute += calls["reward_fwd"]
  return num_micro * per_micro, num_micro * (per_micro + recompute)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_flags(ap)
  ap.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS,
                  help="UNet attention implementation (ctrl_jax/models/attention.py)")
  ap.add_argument("--micro_batches", type=int, default=1,
                  help="micro-batches accumulated per timed update")
  ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--peak_tflops", type=float, default=None,
                  help="peak TFLOP/s of ONE device, for the fraction of peak (H200 bf16: 989 "
                       "dense)")
  ap.add_argument("--official_trajectories", type=int, default=512,
                  help="trajectories per update to extrapolate to (official: 256 or 512)")
  ap.add_argument("--out", default=None,
                  help="JSON path (default bench/results/sd_update[_tiny].json)")
  args = ap.parse_args()
  if args.tiny:
    args.steps, args.per_device_batch, args.dtype, args.reference_dtype = 3, 1, "float32", ""
  out_path = args.out or f"bench/results/sd_update{'_tiny' if args.tiny else ''}.json"

  mesh = shd.make_mesh()
  n_dev = mesh.size
  micro = args.per_device_batch * n_dev
  num_micro = args.micro_batches
  t_build = time.perf_counter()
  setup, frozen, params, info = build(args)
  build_s = time.perf_counter() - t_build

  optimizer = train.make_optimizer(lr_lora=1e-3, lr_label_embedding=1e-2)
  repl = shd.replicated(mesh)
  state = train.create_train_state(params, optimizer, mesh)
  frozen = jax.device_put(frozen, repl)
  requests = {"prompt": np.arange(micro * num_micro, dtype=np.int32) % NUM_PROMPTS,
              "y": (np.arange(micro * num_micro, dtype=np.int32) % NUM_CLASSES)[:, None]}
  batch = jax.tree_util.tree_map(lambda v: v.reshape((num_micro, micro) + v.shape[1:]),
                                 requests)
  batch = jax.device_put(batch, shd.data_sharded(mesh, batch_axis=1))
  key = jax.device_put(jax.random.key(args.seed), repl)
  step_fn = train.make_train_step(setup, optimizer, mesh)

  compiled, lower_s, compile_s = report.lower_and_compile(step_fn, state, batch, key, frozen)
  xla_flops = _flops(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  temp_bytes = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None

  def reset_step(s):
    # Same step key every call: same x_T, noise and truncation mask (comparable repeats).
    return {**s, "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}

  t0 = time.perf_counter()
  state, metrics = compiled(reset_step(state), batch, key, frozen)
  jax.block_until_ready((state, metrics))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    state = reset_step(state)
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, key, frozen)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  peak_bytes, limit_bytes = _peak_memory()

  calls = per_call_flops(setup, frozen, params, batch)
  grad_steps = metrics["grad_steps"]  # mean over the micro-batches of this key
  m_flops, hw_flops = model_flops(calls, setup, num_micro, grad_steps)
  tflops = None if m_flops is None else m_flops / seconds / 1e12
  hw_tflops = None if hw_flops is None else hw_flops / seconds / 1e12
  frac = (None if tflops is None or not args.peak_tflops
          else tflops / n_dev / args.peak_tflops)
  traj = micro * num_micro
  official_micro = -(-args.official_trajectories // micro)
  result = dict(
      device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
      num_devices=n_dev, num_processes=jax.process_count(), host=platform.node(),
      jax=jax.__version__, tiny=args.tiny,
      settings=dict(per_device_batch=args.per_device_batch, micro_batch=micro,
                    micro_batches=num_micro, trajectories_per_update=traj, steps=args.steps,
                    cfg=True, guidance_scale=7.5, eta=1.0, truncation=args.truncation,
                    truncation_k=args.truncation_k if args.truncation == "last_k" else None,
                    remat=args.remat, remat_layers=args.remat_layers,
                    reward_remat=args.reward_remat,
                    reward_micro_batch=args.reward_micro_batch, attention=args.attention,
                    reference_dtype=args.reference_dtype or args.dtype,
                    reference_grad=True, dtype=args.dtype,
                    params_dtype="float32", kl_convention="official", lora_rank=4,
                    vae=not args.no_vae,
                    reward_classifier=f"CompressibilityCNN(official, {NUM_CLASSES} classes, "
                                      f"random init) on the {'latents' if args.no_vae else 'decoded image'}",
                    contexts=f"random [{NUM_PROMPTS}, {CONTEXT_LENGTH}, "
                             f"{frozen['contexts'].shape[-1]}]",
                    seed=args.seed, step_key="fixed: step counter reset to 0 before every call",
                    repeats=args.repeats),
      model=info, build_seconds=build_s, lower_seconds=lower_s, compile_seconds=compile_s,
      first_call_seconds=first_s, seconds_per_update=seconds, seconds_all=times,
      seconds_per_trajectory=seconds / traj, images_per_second=traj / seconds,
      est_seconds_per_official_update=dict(
          trajectories=args.official_trajectories, micro_batches=official_micro,
          seconds=seconds / num_micro * official_micro),
      grad_steps=grad_steps, expected_grad_steps=(
          args.steps / 2 if args.truncation == "random" else
          args.truncation_k if args.truncation == "last_k" else args.steps),
      peak_bytes_in_use=peak_bytes, bytes_limit=limit_bytes, xla_temp_bytes=temp_bytes,
      xla_cost_analysis_flops=xla_flops, per_call_flops=calls, model_flops=m_flops,
      hardware_flops=hw_flops, model_tflops_per_s=tflops, hardware_tflops_per_s=hw_tflops,
      peak_tflops_per_device=args.peak_tflops, fraction_of_peak=frac,
      metrics=metrics)

  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
  fmt = lambda v, f: "n/a" if v is None else format(v, f)
  print(f"CTRL update, {'TINY ' if args.tiny else ''}UNet {info['unet_params'] / 1e6:.1f} M "
        f"params (trainable {info['trainable_params'] / 1e6:.2f} M), "
        f"VAE {'off' if args.no_vae else fmt(info['decoder_params'] / 1e6, '.1f') + ' M'}, "
        f"{jax.default_backend()} {result['device']} x{n_dev}, jax {jax.__version__}")
  print(f"micro-batch {micro} ({args.per_device_batch}/device) x {num_micro}, {args.steps} DDIM "
        f"steps, CFG, truncation {args.truncation}, remat {args.remat}, {args.dtype} "
        f"activations, seed {args.seed} (same step key every repeat)")
  rows = [
      ("compile (lower + compile)", f"{lower_s:.1f} + {compile_s:.1f} s"),
      ("first call", f"{first_s:.2f} s"),
      (f"s / update (median of {args.repeats})", f"{seconds:.3f} s"),
      ("s / trajectory", f"{seconds / traj:.3f} s"),
      ("images / s (trajectories trained on)", f"{traj / seconds:.2f}"),
      (f"est. s / {args.official_trajectories}-trajectory update",
       f"{result['est_seconds_per_official_update']['seconds']:.1f} s "
       f"({official_micro} micro-batches)"),
      ("differentiated steps G", f"{grad_steps:.1f} of {args.steps} "
                                 f"(E = {result['expected_grad_steps']:g})"),
      ("peak memory (device 0)", f"{gib(peak_bytes)} of {gib(limit_bytes)}"),
      ("XLA temp buffers", gib(temp_bytes)),
      ("XLA cost_analysis FLOPs (loops once)", fmt(xla_flops, ".3e")),
      ("model FLOPs / update", fmt(m_flops, ".3e")),
      ("  + remat recompute", fmt(hw_flops, ".3e")),
      ("model TFLOP/s (all devices)", fmt(tflops, ".2f")),
      ("hardware TFLOP/s (all devices)", fmt(hw_tflops, ".2f")),
      ("fraction of peak (model FLOPs)", "n/a (no --peak_tflops)" if frac is None
       else f"{frac:.1%} of {args.peak_tflops:g}/device"),
      ("loss / reward / kl", f"{metrics['loss']:.4g} / {metrics['reward']:.4g} / "
                             f"{metrics['kl']:.4g}"),
  ]
  width = max(len(r[0]) for r in rows)
  print("-" * (width + 30))
  for name, value in rows:
    print(f"{name:{width}s}  {value}")
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  main()
