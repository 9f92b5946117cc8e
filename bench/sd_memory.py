"""Benchmark: XLA's memory plan and the FLOPs of one CTRL update at Stable Diffusion v1.5 size,
compiled on this machine (no weights, no accelerator, nothing runs).

  python bench/sd_memory.py                               # the default table (≤ 20 min, 2 cores)
  python bench/sd_memory.py --steps 50 --attention chunked,naive
  python bench/sd_memory.py --steps 10,25,50 --attention chunked --out /tmp/m.json
  python bench/sd_memory.py --devices 8 --fsdp 1,8 --frozen_dtype float32,bfloat16 \
      --per_device_batch 1 --steps 50 --out bench/results/sd_memory_v5e8.json   # v5e-8 plan

--devices N compiles for N (fake CPU) devices on a ('data', 'fsdp') mesh, one row per --fsdp
size × --frozen_dtype: XLA's SPMD partitioner splits the program, and memory_analysis() is one
device's share (what a 16 GiB v5e chip must hold). On N > 1 devices every row draws one
truncation mask per micro-batch (truncation_mask_per_device=False, required by fsdp > 1), so
the rows differ only in how the weights are placed.

Every row builds the real SD1.5-size augmented train step of `bench/sd_update.py` with abstract
parameters (`jax.ShapeDtypeStruct`: the 860 M-parameter UNet as policy + LoRA rank 4 + label
embedding and as the frozen float32-activation reference, the SD1.5 VAE decoder to 512² and the
official compressibility CNN in the reward, CFG 7.5 in both models, random truncation, remat per
UNet call and per decoded image), then `jax.jit(train_step).lower(abstract args).compile()` for
one device, and reads `compiled.memory_analysis()`: argument bytes (params, frozen weights,
optimiser state, batch), output bytes, temp bytes (every intermediate XLA allocates), aliased
bytes (donated state reused for the output). Total = argument + output + temp − alias: what the
one device must hold at the peak of the update, as XLA:CPU plans it (a GPU's plan differs in
fusion and scheduling, not in what must be live).

Attention. "chunked" is the memory-efficient implementation SD configs use wherever cuDNN flash
attention does not apply (on CPU, it is what "auto" picks); "naive" materialises the full
[2b·heads, 4096, 4096] scores; "xla" is `jax.nn.dot_product_attention`'s XLA path. cuDNN
cannot be compiled without a GPU: `bench/sd_update.py` measures it on one.

FLOPs per update are model FLOPs from loop-free per-call counts (`sd_update.per_call_flops`):
N forward calls of each model (CFG rows), E[G] = N/2 backward calls under random truncation, the
reward forward + backward, plus the remat recompute (hardware FLOPs). XLA's own
`cost_analysis()` of the whole update counts every loop body once and is reported as is.
"""
import argparse
import dataclasses
import os
import platform
import sys
import time


def _devices_flag(argv) -> int:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
  return 1


if _devices_flag(sys.argv) > 1:  # before jax initialises its CPU backend
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_devices_flag(sys.argv)}").strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import ml_collections  # noqa: E402  pylint: disable=g-import-not-at-top

from ctrl_jax import experiment  # noqa: E402  pylint: disable=g-import-not-at-top
from ctrl_jax.core import train  # noqa: E402  pylint: disable=g-import-not-at-top
from ctrl_jax.models import attention  # noqa: E402  pylint: disable=g-import-not-at-top
from ctrl_jax.runtime import background_compile  # noqa: E402  pylint: disable=g-import-not-at-top
from ctrl_jax.runtime import stage  # noqa: E402  pylint: disable=g-import-not-at-top
from ctrl_jax.runtime import sharding as shd  # noqa: E402  pylint: disable=g-import-not-at-top

import report  # bench/report.py: this script's folder is on sys.path
import sd_update

GIB = 2**30


def plan(args, steps: int, impl: str, remat_layers: bool, devices: int = 1, fsdp: int = 1,
         frozen_dtype: str = "") -> dict:
  """Lower and compile one update (micro-batch `per_device_batch` per device, on `devices`
  devices with an 'fsdp' axis of size `fsdp`, frozen weights stored in `frozen_dtype`); one
  device's memory plan and the FLOPs."""
  args = argparse.Namespace(**{**vars(args), "remat_layers": remat_layers}, steps=steps,
                            attention=impl)
  t0 = time.perf_counter()
  setup, frozen, params, info = sd_update.build(args, abstract=True)
  mesh = shd.make_mesh(jax.devices()[:devices], fsdp=fsdp)
  if devices > 1:
    setup = dataclasses.replace(setup, mask_per_device=False)
  optimizer = train.make_optimizer(lr_lora=1e-3, lr_label_embedding=1e-2)
  state_s = train.state_sharding(params, optimizer, mesh)
  state = jax.eval_shape(lambda p: train.create_train_state(p, optimizer), params)
  frozen, frozen_s = experiment.place_frozen(
      frozen, ml_collections.ConfigDict({"frozen_dtype": frozen_dtype}), mesh)
  repl = shd.replicated(mesh)
  micro = args.per_device_batch * devices
  batch = {"prompt": jax.ShapeDtypeStruct((1, micro), jnp.int32),
           "y": jax.ShapeDtypeStruct((1, micro, 1), jnp.int32)}
  if devices > 1:
    state = background_compile.abstract_like(state, state_s)
    batch = background_compile.abstract_like(batch, shd.data_sharded(mesh, batch_axis=1))
  step_fn = train.make_train_step(setup, optimizer, mesh, state_shardings=state_s,
                                  frozen_shardings=frozen_s)
  key = jax.random.key(0)
  compiled, lower_s, compile_s = report.lower_and_compile(
      step_fn, state, batch, background_compile.abstract_like(key, repl) if devices > 1 else key,
      frozen)
  mem = compiled.memory_analysis()
  row = dict(steps=steps, attention=impl, remat_layers=remat_layers,
             per_device_batch=args.per_device_batch, devices=devices, fsdp=fsdp,
             frozen_dtype=frozen_dtype or "float32",
             argument_bytes=int(mem.argument_size_in_bytes),
             output_bytes=int(mem.output_size_in_bytes),
             temp_bytes=int(mem.temp_size_in_bytes),
             alias_bytes=int(mem.alias_size_in_bytes),
             generated_code_bytes=int(mem.generated_code_size_in_bytes),
             lower_seconds=lower_s, compile_seconds=compile_s)
  row["total_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                        - row["alias_bytes"])
  row["xla_cost_analysis_flops"] = sd_update._flops(compiled.cost_analysis())  # pylint: disable=protected-access
  if args.flops:
    calls = sd_update.per_call_flops(setup, frozen, params, batch)
    expected_g = steps / 2 if args.truncation == "random" else (
        args.truncation_k if args.truncation == "last_k" else steps)
    m, hw = sd_update.model_flops(calls, setup, 1, expected_g)
    row.update(per_call_flops=calls, expected_grad_steps=expected_g, model_flops=m,
               hardware_flops=hw)
  row["model"] = info
  row["wall_seconds"] = time.perf_counter() - t0
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sd_update.add_model_flags(ap)
  ap.add_argument("--steps", default="10,25,50",
                  help="comma-separated DDIM step counts, compiled with the first --attention")
  ap.add_argument("--attention", default="chunked,naive",
                  help="comma-separated implementations; the first is compiled at every "
                       "--steps, the others at the largest")
  ap.add_argument("--no_both_layer_remats", dest="both_layer_remats", action="store_false",
                  help="skip the row at the largest --steps with per-layer remat flipped")
  ap.add_argument("--no_flops", dest="flops", action="store_false",
                  help="skip the per-call FLOP counts (lowering only, ~1 min per row)")
  ap.add_argument("--devices", type=int, default=1,
                  help="compile for this many (fake CPU) devices; > 1: the mesh rows only")
  ap.add_argument("--fsdp", default="1",
                  help="comma-separated 'fsdp' axis sizes (divisors of --devices)")
  ap.add_argument("--frozen_dtype", default="float32",
                  help="comma-separated storage dtypes of the frozen weights")
  ap.add_argument("--out", default=os.path.join("bench", "results", "sd_memory.json"))
  args = ap.parse_args()
  fsdps = [int(f) for f in args.fsdp.split(",") if f]
  frozen_dtypes = [d for d in args.frozen_dtype.split(",") if d]
  for d in frozen_dtypes:
    if d not in sd_update.DTYPES:
      ap.error(f"--frozen_dtype {d!r}: expected one of {sorted(sd_update.DTYPES)}")
  if jax.device_count() < args.devices:
    ap.error(f"--devices {args.devices}: only {jax.device_count()} devices")
  impls = [a for a in args.attention.split(",") if a]
  for a in impls:
    attention.check(a)
  steps = sorted(int(s) for s in args.steps.split(",") if s)
  layers = args.remat_layers
  mesh_rows = args.devices > 1 or len(fsdps) > 1 or frozen_dtypes != ["float32"]
  if mesh_rows:  # one row per (fsdp, frozen dtype) at the largest --steps
    cases = [(steps[-1], impls[0], layers, args.devices, f, d)
             for f in fsdps for d in frozen_dtypes]
  else:
    cases = ([(n, impls[0], layers, 1, 1, "float32") for n in steps]
             + [(steps[-1], a, layers, 1, 1, "float32") for a in impls[1:]]
             + ([(steps[-1], impls[0], not layers, 1, 1, "float32")]
                if args.both_layer_remats else []))
  base = {k: v for k, v in vars(args).items()
          if k not in ("steps", "attention", "out", "remat_layers", "both_layer_remats",
                       "devices", "fsdp", "frozen_dtype")}

  print(f"SD1.5-size CTRL update, memory plan compiled on {platform.processor() or 'cpu'} "
        f"({os.cpu_count()} cores), jax {jax.__version__}: micro-batch {args.per_device_batch} "
        f"per device on {args.devices} device(s), CFG, {args.dtype} policy / {args.reference_dtype or args.dtype} "
        f"reference, remat {args.remat}, reward remat {args.reward_remat} "
        f"({args.reward_micro_batch} image(s) per group), truncation {args.truncation}")
  rows = []
  for n, impl, rl, devices, f, fdt in cases:
    row = plan(argparse.Namespace(**base), n, impl, rl, devices, f,
               "" if fdt == "float32" else fdt)
    rows.append(row)
    report.write_json(args.out + ".partial", dict(command="python bench/sd_memory.py "
                                                  + " ".join(sys.argv[1:]), rows=rows))
    print(f"  {impl:8s} layer remat {'on ' if rl else 'off'} {n:3d} steps, {devices} dev, fsdp "
          f"{f}, frozen {fdt}: total {row['total_bytes'] / GIB:6.2f} GiB (args "
          f"{row['argument_bytes'] / GIB:.2f}, temp {row['temp_bytes'] / GIB:.2f}, out "
          f"{row['output_bytes'] / GIB:.2f}, alias {row['alias_bytes'] / GIB:.2f})"
          + (f", model {row['model_flops'] / 1e15:.2f} PFLOP, +remat "
             f"{row['hardware_flops'] / 1e15:.2f}" if row.get("model_flops") else "")
          + f"  [lower {row['lower_seconds']:.0f} s, compile {row['compile_seconds']:.0f} s]",
          flush=True)

  def find(n, impl):
    return next((r for r in rows if r["steps"] == n and r["attention"] == impl
                 and r["remat_layers"] == layers), None)

  first = impls[0]
  if mesh_rows:
    checks = {f"total_gib_fsdp{r['fsdp']}_{r['frozen_dtype']}": r["total_bytes"] / GIB
              for r in rows}
  else:
    lo, hi = find(steps[0], first), find(steps[-1], first)
    checks = {"temp_ratio_last_over_first_steps": hi["temp_bytes"] / lo["temp_bytes"],
              "total_at_last_steps_gib": hi["total_bytes"] / GIB}
  print("-" * 120)
  print(f"{'attention':10s} {'layers':>6s} {'steps':>5s} {'dev':>4s} {'fsdp':>4s} {'frozen':>8s} "
        f"{'args GiB':>9s} {'temp GiB':>9s} {'total GiB':>10s} "
        f"{'model PFLOP':>12s} {'hw PFLOP':>9s}")
  for r in rows:
    m = r.get("model_flops")
    h = r.get("hardware_flops")
    print(f"{r['attention']:10s} {'remat' if r['remat_layers'] else '-':>6s} {r['steps']:5d} "
          f"{r['devices']:4d} {r['fsdp']:4d} {r['frozen_dtype']:>8s} "
          f"{r['argument_bytes'] / GIB:9.2f} "
          f"{r['temp_bytes'] / GIB:9.2f} {r['total_bytes'] / GIB:10.2f} "
          f"{'n/a' if m is None else f'{m / 1e15:.3f}':>12s} "
          f"{'n/a' if h is None else f'{h / 1e15:.3f}':>9s}")
  if not mesh_rows:
    print(f"temp at {steps[-1]} steps / temp at {steps[0]} steps ({first}): "
          f"{checks['temp_ratio_last_over_first_steps']:.3f}")
  commit = stage.git_commit()["commit"]
  payload = dict(command="python bench/sd_memory.py " + " ".join(sys.argv[1:]),
                 commit=commit, date=time.strftime("%Y-%m-%d"), host=platform.node(),
                 cpu=platform.processor(), cores=os.cpu_count(), jax=jax.__version__,
                 backend=jax.default_backend(),
                 settings={k: v for k, v in base.items()}, devices=args.devices,
                 rows=rows, checks=checks)
  report.write_json(args.out, payload)
  if os.path.exists(args.out + ".partial"):
    os.remove(args.out + ".partial")


if __name__ == "__main__":
  main()
