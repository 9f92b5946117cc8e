"""Benchmark: huge pages for XLA:CPU's buffers (ctrl_jax.runtime.hugepages) and remat, per
training step
of the digits config, variants side by side.

  python bench/host_alloc.py --workdir=DIR [--config=configs/digits.py:ink] [--repeats 2] \
      [--steps 8] [--out bench/results/host_alloc.json]

DIR holds the pre-trained model and the classifier of that config (missing stages are trained
first). Each variant runs in its own process (glibc reads its tunables at start-up), variants
take turns (A B C D A B C D …) so that a drift in the machine's speed hits all alike. Per
process: one pre-training step and one CTRL update are compiled and warmed up, then --steps of
each are timed; reported per variant: the median seconds per step, and per step the kernel
(system) time and the minor page faults of the process (getrusage).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import report  # noqa: E402  pylint: disable=g-import-not-at-top

VARIANTS = {  # name: (environment, config overrides)
    "4 KiB pages, no remat": ({"CTRL_JAX_HUGEPAGES": "0"}, {"remat_policy": ""}),
    "huge pages, no remat": ({}, {"remat_policy": ""}),
    "4 KiB pages, remat": ({"CTRL_JAX_HUGEPAGES": "0"}, {"remat_policy": "nothing_saveable"}),
    "huge pages, remat": ({}, {"remat_policy": "nothing_saveable"}),
}


def _timed(fn, steps):
  """Median seconds, and system seconds and minor faults per call, over `steps` calls."""
  times = []
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for i in range(steps):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return {"s": statistics.median(times), "sys_s": (r1.ru_stime - r0.ru_stime) / steps,
          "faults": (r1.ru_minflt - r0.ru_minflt) / steps}


def child(config_spec, workdir, overrides, steps):
  """Runs in the variant's process; prints one JSON line."""
  from ctrl_jax.runtime import hugepages  # pylint: disable=g-import-not-at-top
  hugepages.reexec_with_hugepages()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import data as digits_data  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import model as digits_model  # pylint: disable=g-import-not-at-top
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import rewards  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax.runtime import sharding as shd  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  config = report.load_config(config_spec)
  with config.unlocked():
    config.update(overrides)
  mesh = shd.make_mesh()
  out = {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}

  # Pre-training step (as digits_model.pretrain builds it).
  p = config.pretrain
  unet = unet_lib.build_unet(digits_model.unet_config(p))
  optimizer = optax.adamw(1e-3)
  params = digits_model.init_params(jax.random.key(0), unet, p.context_dim)
  state = jax.device_put({"step": np.zeros((), np.int32), "params": params,
                          "ema": jax.tree_util.tree_map(np.array, params),
                          "opt": optimizer.init(params),
                          "key": jax.random.key_data(jax.random.key(1))}, shd.replicated(mesh))
  step_fn = digits_model.make_pretrain_step(unet, digits_model.make_schedule(p), optimizer, mesh,
                                            p.p_uncond, p.ema_decay)
  splits = digits_data.load_splits()
  batch = jax.device_put(
      {"x": np.asarray(digits_model.to_model_space(splits["x_train"][:p.batch_size])),
       "c": splits["c_train"][:p.batch_size]}, shd.data_sharded(mesh))
  state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  holder = [state]

  def pretrain_step(_):
    holder[0], metrics = step_fn(holder[0], batch)
    jax.block_until_ready(metrics)
  out["pretrain"] = _timed(pretrain_step, steps)

  # CTRL update (as experiment.finetune builds it).
  problem = experiment.build_problem(config, workdir)
  frozen = jax.device_put({**problem.frozen, "hparams": train.hparams_from_config(config)},
                          shd.replicated(mesh))
  optimizer = experiment.make_optimizer(config)
  step_fn = train.make_train_step(problem.setup, optimizer, mesh)
  micro, num_micro = experiment.batch_arithmetic(config, mesh)
  batch = jax.device_put(
      rewards.sample_requests(config.seed, 0, problem.setup.label_space, problem.num_prompts,
                                 num_micro, micro), shd.data_sharded(mesh, batch_axis=1))
  key = jax.random.key(config.seed)
  holder = [train.create_train_state(problem.params, optimizer, mesh)]
  t0 = time.perf_counter()
  compiled = step_fn.lower(holder[0], batch, key, frozen).compile()
  out["ctrl_compile_s"] = time.perf_counter() - t0
  holder[0], _ = compiled(holder[0], batch, key, frozen)
  jax.block_until_ready(holder[0])

  def ctrl_update(i):
    holder[0], metrics = compiled(holder[0], batch, jax.random.fold_in(key, i), frozen)
    jax.block_until_ready(metrics)
  out["ctrl"] = _timed(ctrl_update, steps)
  print("RESULT " + json.dumps(out), flush=True)


def main():
  ap = report.workdir_parser("host_alloc")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.config, args.workdir, json.loads(args.child), args.steps)
    return
  if args.repeats < 1 or args.steps < 1:
    raise SystemExit(f"--repeats={args.repeats}, --steps={args.steps}: expected ≥ 1.")
  # pylint: disable-next=g-import-not-at-top
  from ctrl_jax.problems.digits import stages as digits_stages
  # trains what is missing
  digits_stages.build_problem(report.load_config(args.config), args.workdir)
  runs = {name: [] for name in VARIANTS}
  base_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                               "CTRL_JAX_HUGEPAGES")}
  for rep in range(args.repeats):
    for name, (env, overrides) in VARIANTS.items():
      cmd = [sys.executable, os.path.abspath(__file__), f"--config={args.config}",
             f"--workdir={args.workdir}", f"--steps={args.steps}",
             f"--child={json.dumps(overrides)}"]
      proc = subprocess.run(cmd, cwd=REPO, env={**base_env, **env, "CTRL_JAX_COMPILE_CACHE": "off"},
                            capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      result = json.loads(lines[-1][len("RESULT "):])
      runs[name].append(result)
      print(f"[bench] {rep + 1}/{args.repeats} {name}: pretrain {result['pretrain']['s']:.3f} s, "
            f"CTRL {result['ctrl']['s']:.3f} s", flush=True)
  rows = []
  for name, results in runs.items():
    row = {"variant": name, "GLIBC_TUNABLES": results[0]["GLIBC_TUNABLES"],
           "ctrl_compile_s": statistics.median(r["ctrl_compile_s"] for r in results)}
    for stage in ("pretrain", "ctrl"):
      for field in ("s", "sys_s", "faults"):
        row[f"{stage}_{field}"] = statistics.median(r[stage][field] for r in results)
      row[f"{stage}_runs_s"] = [r[stage]["s"] for r in results]
    rows.append(row)
  first = rows[0]
  for row in rows:
    row["pretrain_ratio"] = row["pretrain_s"] / first["pretrain_s"]
    row["ctrl_ratio"] = row["ctrl_s"] / first["ctrl_s"]
  report.print_table(
      ("variant", "pre-train s/step", "×", "sys s", "faults", "CTRL s/update", "×", "sys s",
       "faults", "CTRL compile s"),
      [[r["variant"], f"{r['pretrain_s']:.3f}", f"{r['pretrain_ratio']:.2f}",
        f"{r['pretrain_sys_s']:.3f}", f"{r['pretrain_faults']:.0f}", f"{r['ctrl_s']:.3f}",
        f"{r['ctrl_ratio']:.2f}", f"{r['ctrl_sys_s']:.3f}", f"{r['ctrl_faults']:.0f}",
        f"{r['ctrl_compile_s']:.1f}"] for r in rows])
  report.write_json(args.out, {"config": args.config, "repeats": args.repeats,
                               "steps": args.steps, "rows": rows})


if __name__ == "__main__":
  main()
