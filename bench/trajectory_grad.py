"""Benchmark: cost of the CTRL trajectory gradient against its parts.

  python bench/trajectory_grad.py [--batch 8] [--steps 10] [--repeats 3] [--out bench/results/trajectory_grad.json]

Tiny SD-shaped UNet (block_out (32, 64), ~0.8 M params), latents [B, 4, 16, 16], no CFG.
For each variant: wall time of one jitted gradient of the CTRL loss (median of --repeats after a
warm-up), compile time, XLA temp memory, and the ratio to the ideal cost built from measured
parts: every model call costs one forward (t_f); a call that carries gradient additionally
costs a forward+backward (t_fb: the remat recompute + backward). With both models on the
gradient path: ideal = Σ_models (N · t_f + G · t_fb), G = steps with gradient.
"""
import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

from ctrl_jax.core import sampling
from ctrl_jax.core import schedules
from ctrl_jax.models import augmented
from ctrl_jax.models import unet as unet_lib

import report  # bench/report.py: this script's folder is on sys.path


def _time(fn, args, repeats):
  compiled, _, compile_s = report.lower_and_compile(jax.jit(fn), *args)
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  return report.median_seconds(compiled, *args, repeats=repeats), compile_s, temp


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--last_k", type=int, default=2)
  ap.add_argument("--out", default="bench/results/trajectory_grad.json")
  args = ap.parse_args()

  cfg = unet_lib.tiny_unet_config(sample_size=16, in_channels=4)
  unet = unet_lib.build_unet(cfg)
  unet_params = unet_lib.init_unet_params(unet, jax.random.key(0))
  model = augmented.AugmentedUNet(unet, num_labels=2, lora_rank=4)
  ctrl = model.init_ctrl_params(jax.random.key(1), unet_params)
  ctrl = jax.tree_util.tree_map(lambda a: a + 0.01, ctrl)  # policy ≠ reference
  b, n = args.batch, args.steps
  x = jax.random.normal(jax.random.key(2), (b, 4, 16, 16))
  ctx = jax.random.normal(jax.random.key(3), (b, 2, cfg["cross_attention_dim"]))
  labels = jnp.arange(b) % 2
  sched = schedules.make_schedule()
  ts = jnp.asarray(schedules.ddim_timesteps(1000, n))
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(unet_params))

  def policy(p, xx, t):
    return model.apply(unet_params, p, xx, t, ctx, labels)

  def reference(rp, xx, t):
    return model.apply_pretrained(rp, xx, t, ctx)

  probe = jax.random.normal(jax.random.key(4), x.shape)
  fwd = lambda p, xx: policy(p, xx, 501)
  fwd_bwd = jax.grad(lambda p, xx: jnp.sum(policy(p, xx, 501) * probe), argnums=(0, 1))
  t_f, c_f, _ = _time(fwd, (ctrl, x), args.repeats)
  t_fb, c_fb, _ = _time(fwd_bwd, (ctrl, x), args.repeats)

  def traj_grad(remat, grad_mask=None, n0=0, ref_grad=True):
    def loss(p, key):
      tr = sampling.ctrl_trajectory(policy, reference, p, unet_params, sched, ts, x, key,
                                    jnp.float32(1.0), grad_mask=grad_mask,
                                    num_no_grad_steps=n0, remat_policy=remat,
                                    reference_grad=ref_grad)
      return jnp.mean(tr.x0**2) + jnp.mean(jnp.sum(tr.kl, 0)) / tr.x0[0].size
    return jax.grad(loss)

  mask = sampling.random_truncation_mask(jax.random.key(5), n)
  g_random = int(mask.sum())
  variants = [
      ("full, remat, ref grad", traj_grad("nothing_saveable"), n, 2),
      ("full, no remat, ref grad", traj_grad(None), n, 2),
      ("full, remat, ref const", traj_grad("nothing_saveable", ref_grad=False), n, 1),
      (f"random trunc (G={g_random}), remat", traj_grad("nothing_saveable", grad_mask=mask),
       g_random, 2),
      (f"last-{args.last_k}, remat", traj_grad("nothing_saveable", n0=n - args.last_k),
       args.last_k, 2),
  ]
  rows = []
  for name, fn, g, models_on_grad_path in variants:
    t, c, temp = _time(fn, (ctrl, jax.random.key(6)), args.repeats)
    # Both models run N forwards; the models on the gradient path add G fwd+bwd each.
    ideal = 2 * n * t_f + models_on_grad_path * g * t_fb
    rows.append(dict(variant=name, grad_steps=g, seconds=t, ideal_seconds=ideal,
                     ratio=t / ideal, compile_seconds=c,
                     xla_temp_mib=None if temp is None else temp / 2**20))
  result = dict(
      device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
      host=platform.node(), jax=jax.__version__, batch=b, steps=n, latent=[4, 16, 16],
      unet_params=n_params, unet_forward_s=t_f, unet_fwd_bwd_s=t_fb,
      unet_compile_s={"forward": c_f, "fwd_bwd": c_fb}, variants=rows)
  print(f"tiny UNet {n_params/1e6:.2f} M params, batch {b}, {n} DDIM steps, "
        f"{jax.default_backend()} ({jax.device_count()} device(s))")
  print(f"UNet forward {t_f*1e3:.1f} ms, forward+backward {t_fb*1e3:.1f} ms")
  hdr = f"{'variant':34s} {'G':>3s} {'time s':>8s} {'ideal s':>8s} {'ratio':>6s} " \
        f"{'compile s':>9s} {'temp MiB':>9s}"
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    temp = "n/a" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.0f}"
    print(f"{r['variant']:34s} {r['grad_steps']:3d} {r['seconds']:8.3f} "
          f"{r['ideal_seconds']:8.3f} {r['ratio']:6.2f} {r['compile_seconds']:9.1f} "
          f"{temp:>9s}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
