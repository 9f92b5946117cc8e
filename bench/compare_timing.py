"""Benchmark: sampling cost of every method of the comparison, side by side in one process.

  python bench/compare_timing.py --config=configs/digits.py:ink --workdir=DIR \
      [--batch 300] [--repeats 3] [--out bench/results/compare_timing.json]

DIR is a finished comparison (`python -m ctrl_jax.launch.compare`): each method is rebuilt
exactly as the comparison ran it (its trained parts reused, its tuned weight read from
DIR/compare/results.json). For each method: compile time of the sampler, then the median of
--repeats timed calls of one batch of --batch requests (after a warm-up call), reported as
seconds per 100 samples and as a ratio to unguided sampling. The comparison's own
"s / 100 samples" column is measured in its (long) run and is exposed to whatever else the
machine did meanwhile; this one runs every method back to back.
"""
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import report  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  ap = report.workdir_parser("compare_timing")
  ap.add_argument("--batch", type=int, default=300)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  from ctrl_jax.baselines import compare  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from ctrl_jax.problems.digits import stages as digits_stages
  config = report.load_config(args.config)
  results_path = os.path.join(args.workdir, "compare", "results.json")
  if not os.path.exists(results_path):
    raise SystemExit(f"{results_path} not found: run `python -m ctrl_jax.launch.compare "
                     f"--config={args.config} --workdir={args.workdir}` first.")
  with open(results_path) as f:
    done = json.load(f)["methods"]
  problem = digits_stages.build_problem(config, args.workdir)
  bench = compare.Bench(config, problem, os.path.join(args.workdir, "compare"),
                        results_file="results.json")
  n = args.batch
  reps = -(-n // len(bench.c_eval))
  c = jnp.asarray(np.tile(bench.c_eval, reps)[:n])
  y = jnp.asarray(np.tile(bench.y_eval, (reps, 1))[:n])
  rows = {}
  for method in [m for m in compare.ALL_METHODS if m in done]:
    fn, info = compare.make_method(method, config, args.workdir, bench, problem)
    w = float(done[method].get("weight", 0.0))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(c, y, jax.random.key(0), w))  # compile + warm-up
    first = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(c, y, jax.random.key(r + 1), w))
      times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    rows[method] = {"s_per_100_samples": 100 * t / n, "first_call_s": first, "weight": w,
                    "unet_evals_per_sample": info["unet_evals_per_sample"]}
    print(f"[bench] {method}: {100 * t / n:.2f} s / 100 samples (first call {first:.1f} s)",
          flush=True)
  base = rows["pretrained"]["s_per_100_samples"]
  print("\n| method | UNet evals / sample | s / 100 samples | × unguided | first call s (compile) |")
  print("|---|---|---|---|---|")
  for method, r in rows.items():
    r["ratio_to_unguided"] = r["s_per_100_samples"] / base
    print(f"| {method} | {r['unet_evals_per_sample']} | {r['s_per_100_samples']:.2f} | "
          f"{r['ratio_to_unguided']:.2f} | {r['first_call_s']:.1f} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": args.config, "task": config.task, "batch": n, "repeats": args.repeats,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "jax": jax.__version__, "devices": str(jax.devices())},
               "methods": rows}, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
