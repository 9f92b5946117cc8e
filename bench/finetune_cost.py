"""Benchmark: cost of one CTRL update per trainable set (LoRA ranks, full fine-tuning), or per
KL gradient (--kl_grad), side by side in one process.

  python bench/finetune_cost.py --config=configs/digits.py:ink --workdir=DIR \
      [--ranks 1,4,16] [--full] [--updates 5] [--out bench/results/finetune_cost.json]
  python bench/finetune_cost.py --kl_grad --workdir=DIR   # → bench/results/kl_grad_cost.json

--kl_grad times the config's trainable set with the biased KL gradient (reference_grad=False),
the exact one (True), and the step that switches at update `reference_grad_from` (the `ink`
default: 80) timed before and after the switch (its state's update counter set to 0 or to
reference_grad_from).

DIR holds the pre-trained model and the classifier (any run of that config; missing stages are
trained first). For each variant the same train step as `ctrl_jax.experiment.finetune` is
built; reported: compile time, the median of --updates timed updates (after one warm-up
update; the same requests every time), XLA's cost-analysis FLOPs per update, XLA's memory plan
(peak estimate), and the ratio of seconds and of FLOPs to the first variant. The study's
"s / update" column (`ctrl_jax.baselines.studies`, `--study=lora`) is measured during long runs,
exposed to whatever else the machine did; this one runs the variants back to back.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import report  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  ap = report.workdir_parser("finetune_cost")
  ap.add_argument("--ranks", default="1,4,16")
  ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--updates", type=int, default=5)
  ap.add_argument("--kl_grad", action="store_true",
                  help="variants over the KL gradient instead of the trainable set")
  args = ap.parse_args()
  if args.kl_grad and args.out == ap.get_default("out"):
    args.out = os.path.join(os.path.dirname(args.out), "kl_grad_cost.json")
  if args.updates < 1:
    raise SystemExit(f"--updates={args.updates}: expected ≥ 1.")

  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import rewards  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax.runtime import sharding as shd  # pylint: disable=g-import-not-at-top
  base = report.load_config(args.config)
  # (name, config overrides, update counter to start from)
  if args.kl_grad:
    k = int(base.get("reference_grad_from", 0)) or 80
    variants = [("biased", {"reference_grad": False, "reference_grad_from": 0}, 0),
                ("exact", {"reference_grad": True, "reference_grad_from": 0}, 0),
                (f"switched at {k}, update < {k}",
                 {"reference_grad": True, "reference_grad_from": k}, 0),
                (f"switched at {k}, update ≥ {k}",
                 {"reference_grad": True, "reference_grad_from": k}, k)]
  else:
    variants = [(f"rank {r}", {"lora_rank": int(r), "full_finetune": False}, 0)
                for r in args.ranks.split(",") if r]
    if args.full:
      variants.append(("full", {"lora_rank": 0, "full_finetune": True}, 0))
  mesh = shd.make_mesh()
  rows = []
  for name, overrides, start in variants:
    config = copy.deepcopy(base)
    with config.unlocked():
      config.update(overrides)
    problem = experiment.build_problem(config, args.workdir)
    frozen = jax.device_put({**problem.frozen, "hparams": train.hparams_from_config(config)},
                            shd.replicated(mesh))
    optimizer = experiment.make_optimizer(config)
    state = train.create_train_state(problem.params, optimizer, mesh)
    state["step"] = jax.device_put(np.int32(start), shd.replicated(mesh))
    step_fn = train.make_train_step(problem.setup, optimizer, mesh)
    micro, num_micro = experiment.batch_arithmetic(config, mesh)
    batch = jax.device_put(
        rewards.sample_requests(config.seed, 0, problem.setup.label_space,
                                   problem.num_prompts, num_micro, micro),
        shd.data_sharded(mesh, batch_axis=1))
    key = jax.random.key(config.seed)
    t0 = time.time()
    compiled = step_fn.lower(state, batch, key, frozen).compile()
    compile_s = time.time() - t0
    plan = experiment.step_memory(step_fn, state, batch, key, frozen)  # a cache hit
    state, _ = compiled(state, batch, key, frozen)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(args.updates):
      t0 = time.time()
      state, metrics = compiled(state, batch, key, frozen)
      jax.block_until_ready(metrics)
      times.append(time.time() - t0)
    row = {"variant": name, "trainable_params": int(sum(
               np.size(v) for v in jax.tree_util.tree_leaves(problem.params))),
           "compile_s": compile_s, "seconds_per_update": statistics.median(times),
           "gflops_per_update": plan["flops"] / 1e9,
           "peak_memory_mib": plan["peak_estimate"] / 2**20}
    rows.append(row)
    print(f"[bench] {name}: {row['seconds_per_update']:.2f} s/update, "
          f"{row['gflops_per_update']:.2f} GFLOP, {row['peak_memory_mib']:.0f} MiB", flush=True)
  first = rows[0]
  for row in rows:
    row["time_ratio"] = row["seconds_per_update"] / first["seconds_per_update"]
    row["flops_ratio"] = row["gflops_per_update"] / max(first["gflops_per_update"], 1e-12)
  report.print_table(
      ("variant", "trainable params", "compile s", "s / update", "GFLOP / update",
       "memory MiB (XLA plan)", "time ×", "FLOPs ×"),
      [[r["variant"], str(r["trainable_params"]), f"{r['compile_s']:.1f}",
        f"{r['seconds_per_update']:.2f}", f"{r['gflops_per_update']:.2f}",
        f"{r['peak_memory_mib']:.0f}", f"{r['time_ratio']:.2f}", f"{r['flops_ratio']:.2f}"]
       for r in rows])
  report.write_json(args.out, {"config": args.config, "updates": args.updates, "rows": rows,
                               "devices": [str(d) for d in jax.devices()], "jax": jax.__version__})


if __name__ == "__main__":
  main()
