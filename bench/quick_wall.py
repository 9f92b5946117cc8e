"""Benchmark: wall time of the `:quick` digits run end to end, variants interleaved.

  python bench/quick_wall.py [--repeats 2] [--out bench/results/quick_wall.json]

Each run is the README's command, `python -m ctrl_jax.launch.finetune
--config=configs/digits.py:quick --workdir=<fresh>` plus the variant's environment and config
overrides, in its own process with the persistent compilation cache off (every run compiles everything, as on a fresh
machine). Variants take turns (A B C A B C …) so that a change in the machine's speed during
the benchmark hits all of them alike. Reported per variant: median and all wall times, the
stage times from DIR/eval/metrics.json, the process's kernel time and minor page faults
(getrusage of the child), the first pre-training step (compilation included) and
the first CTRL update, and the run's ink3 accuracies (a speed change must not change results).
"""
import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {  # name: (environment, config overrides)
    "4 KiB pages": ({"CTRL_JAX_HUGEPAGES": "0"}, []),
    "huge pages (the default)": ({}, []),
}


def run_once(env_overrides: dict, overrides: list[str], workdir: str) -> dict:
  env = {**{k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                             "CTRL_JAX_HUGEPAGES")},
         **env_overrides, "CTRL_JAX_COMPILE_CACHE": "off"}
  cmd = [sys.executable, "-m", "ctrl_jax.launch.finetune", "--config=configs/digits.py:quick",
         f"--workdir={workdir}", *overrides]
  t0 = time.time()
  usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.time() - t0
  usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  first = lambda stage: float(re.search(  # noqa: E731
      rf"\[{stage}\] 1/\d+ .*first step incl\. compile: ([\d.]+)s", proc.stdout).group(1))
  return {"wall_s": wall, "stages_s": metrics["wall_time_s"],
          "sys_s": usage1.ru_stime - usage0.ru_stime,
          "minor_faults": usage1.ru_minflt - usage0.ru_minflt,
          "first_pretrain_step_s": first("pretrain"), "first_update_s": first("finetune"),
          "ink3_acc": {m: metrics[m]["tasks"]["ink3"]["accuracy"]
                       for m in ("pretrained", "finetuned")}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "quick_wall.json"))
  args = ap.parse_args()
  runs = {name: [] for name in VARIANTS}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      for i, (name, (env, overrides)) in enumerate(VARIANTS.items()):
        out = run_once(env, overrides, os.path.join(tmp, f"r{r}_v{i}"))
        runs[name].append(out)
        print(f"[{r + 1}/{args.repeats}] {name}: {out['wall_s']:.1f} s "
              f"(stages {', '.join(f'{k} {v:.0f}' for k, v in out['stages_s'].items())})",
              flush=True)
  base = statistics.median(o["wall_s"] for o in runs[next(iter(VARIANTS))])
  print("\n| variant | median wall s | runs | kernel (sys) s | minor page faults | "
        "first pre-training step s | first CTRL update s | ink3 acc (pre → CTRL) | × first |")
  print("|---|---|---|---|---|---|---|---|---|")
  summary = {}
  for name, outs in runs.items():
    med = statistics.median(o["wall_s"] for o in outs)
    summary[name] = {"median_wall_s": med, "runs": outs, "ratio_to_first": med / base}
    acc = outs[0]["ink3_acc"]
    walls = ", ".join(f"{o['wall_s']:.0f}" for o in outs)
    print(f"| {name} | {med:.1f} | {walls} | "
          f"{statistics.median(o['sys_s'] for o in outs):.0f} | "
          f"{statistics.median(o['minor_faults'] for o in outs) / 1e6:.2f} M | "
          f"{statistics.median(o['first_pretrain_step_s'] for o in outs):.1f} | "
          f"{statistics.median(o['first_update_s'] for o in outs):.1f} | "
          f"{acc['pretrained']:.3f} → {acc['finetuned']:.3f} | {med / base:.2f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "repeats": args.repeats, "variants": summary}, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
