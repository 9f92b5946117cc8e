"""Bad inputs against the launchers: exit status, the message, and whether a traceback or a lost
file showed. Prints a markdown table and writes bench/results/bad_inputs.json.

  python bench/bad_inputs.py [--out bench/results/bad_inputs.json]

Each case runs the real launcher in a subprocess (as a user would), in a scratch folder. Two
finished runs are made first (the smoke config, 2 updates; the digits :quick config, for the
export cases): about 5 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = f"--config={REPO}/configs/smoke.py"
QUICK = f"--config={REPO}/configs/digits.py:quick"
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def launch(module: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"ctrl_jax.launch.{module}", *args], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: str) -> dict[str, float]:
  """Every file under `folder` with its modification time (to spot lost or changed files)."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      if name != ".lock":
        out[os.path.relpath(path, folder)] = os.path.getmtime(path)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "bad_inputs.json"))
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix="ctrl_jax_bad_inputs_")
  smoke_run = os.path.join(scratch, "smoke")
  quick_run = os.path.join(scratch, "quick")
  print("[bad_inputs] making a finished smoke run and a finished digits :quick run", flush=True)
  for module, cfg, wd, extra in (("finetune", SMOKE, smoke_run, ["--config.num_updates=2"]),
                                 ("finetune", QUICK, quick_run, [])):
    done = launch(module, cfg, f"--workdir={wd}", *extra)
    if done.returncode:
      raise SystemExit(f"set-up run failed: {done.stderr[-2000:]}")
  export_dir = os.path.join(scratch, "export")
  os.makedirs(export_dir)
  with open(os.path.join(export_dir, "my_notes.txt"), "w") as f:
    f.write("a user's file")
  a_file = os.path.join(scratch, "a_file")
  with open(a_file, "w") as f:
    f.write("not a folder")
  empty = os.path.join(scratch, "empty")
  fresh = lambda name: os.path.join(scratch, "fresh", name)  # noqa: E731

  cases = [
      ("η out of range", "finetune", [SMOKE, f"--workdir={fresh('a')}", "--config.eta=3.0"]),
      ("negative guidance scale", "finetune",
       [SMOKE, f"--workdir={fresh('b')}", "--config.guidance_scale=-7.5"]),
      ("remat_policy typo", "finetune",
       [SMOKE, f"--workdir={fresh('c')}", "--config.remat_policy=nothing_savable"]),
      ("log_every=0", "finetune", [SMOKE, f"--workdir={fresh('d')}", "--config.log_every=0"]),
      ("num_updates=0", "finetune", [SMOKE, f"--workdir={fresh('e')}", "--config.num_updates=0"]),
      ("a number that is not one", "finetune",
       [SMOKE, f"--workdir={fresh('f')}", "--config.lr_lora=abc"]),
      ("a field the config lacks", "finetune",
       [SMOKE, f"--workdir={fresh('g')}", "--config.learning_rate=1e-3"]),
      ("a config file that does not exist", "finetune",
       [f"--config={REPO}/configs/nope.py", f"--workdir={fresh('h')}"]),
      ("an unknown config variant", "finetune",
       [f"--config={REPO}/configs/digits.py:tiny", f"--workdir={fresh('i')}"]),
      ("eval.method typo (digits)", "finetune",
       [QUICK, f"--workdir={fresh('j')}", "--config.eval.method=dpss"]),
      ("micro_batch of 0", "finetune",
       [SMOKE, f"--workdir={fresh('k')}", "--config.micro_batch=0"]),
      ("reference_grad_from outside the run", "finetune",
       [SMOKE, f"--workdir={fresh('l')}", "--config.reference_grad_from=10"]),
      ("workdir is a file", "finetune", [SMOKE, f"--workdir={a_file}"]),
      ("workdir inside a file", "finetune", [SMOKE, f"--workdir={a_file}/run"]),
      ("finished run, another lr_lora", "finetune",
       [SMOKE, f"--workdir={smoke_run}", "--config.num_updates=2", "--config.lr_lora=5e-3"]),
      ("finished run, another kl_convention", "finetune",
       [SMOKE, f"--workdir={smoke_run}", "--config.num_updates=2",
        "--config.kl_convention=exact"]),
      ("finished run, another lora_rank", "finetune",
       [SMOKE, f"--workdir={smoke_run}", "--config.num_updates=2", "--config.lora_rank=8"]),
      ("learning rate 1e30 (every update non-finite)", "finetune",
       [SMOKE, f"--workdir={fresh('m')}", "--config.lr_lora=1e30",
        "--config.lr_label_embedding=1e30", "--config.max_consecutive_skips=2"]),
      ("export of an empty workdir", "export", [QUICK, f"--workdir={empty}",
                                                f"--out={fresh('n')}"]),
      ("export into a folder with the user's files", "export",
       [QUICK, f"--workdir={quick_run}", f"--out={export_dir}"]),
      ("export --out is a file", "export", [QUICK, f"--workdir={quick_run}", f"--out={a_file}"]),
      ("export of a problem without export", "export",
       [SMOKE, f"--workdir={smoke_run}", "--config.num_updates=2", f"--out={fresh('o')}"]),
      ("evaluate an empty workdir", "evaluate", [QUICK, f"--workdir={empty}"]),
      ("fit_classifier of a problem without one", "fit_classifier",
       [SMOKE, f"--workdir={fresh('p')}"]),
      ("compare on a non-digits config", "compare", [SMOKE, f"--workdir={fresh('q')}"]),
      ("SD: LAION weights missing", "fit_classifier",
       [f"--config={REPO}/configs/aesthetic.py", f"--workdir={fresh('r')}",
        f"--config.pretrained_model={scratch}", "--config.classifier.laion_weights=/nope.pth"]),
      ("SD: model folder missing", "fit_classifier",
       [f"--config={REPO}/configs/compressibility.py", f"--workdir={fresh('s')}",
        "--config.pretrained_model=/data/sd15"]),
      ("SD: image folder missing", "fit_classifier",
       [f"--config={REPO}/configs/compressibility.py:tiny", f"--workdir={fresh('t')}",
        "--config.classifier.compress_data=/data/images"]),
      ("unexpected positional argument", "finetune", [SMOKE, f"--workdir={fresh('u')}", "extra"]),
  ]
  before_export = snapshot(export_dir)
  before_runs = {d: snapshot(d) for d in (smoke_run, quick_run)}
  rows = []
  for name, module, argv in cases:
    t0 = time.time()
    out = launch(module, *argv)
    lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
    rows.append({"case": name, "command": f"{module} " + " ".join(a.replace(scratch, "…")
                                                                  for a in argv),
                 "exit": out.returncode, "message": (lines[-1] if lines else "").replace(
                     scratch, "…"), "stderr_lines": len(lines),
                 "traceback": "Traceback" in out.stderr, "seconds": round(time.time() - t0, 1)})
    print(f"[bad_inputs] {name}: exit {out.returncode}  {rows[-1]['message'][:150]}", flush=True)
  after_export = snapshot(export_dir)
  untouched = {"export folder": after_export == before_export,
               **{os.path.basename(d): {k: v for k, v in snapshot(d).items()
                                        if k in before_runs[d]} == before_runs[d]
                  for d in before_runs}}
  table = ["| case | exit | message (stderr) | traceback |", "|---|---|---|---|"]
  for r in rows:
    table.append(f"| {r['case']} | {r['exit']} | {r['message'].replace('|', '/')} | "
                 f"{'yes' if r['traceback'] else 'no'} |")
  print("\n".join(table))
  print(f"files that existed before, unchanged after every case: {untouched}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"cases": rows, "untouched": untouched}, f, indent=2)


if __name__ == "__main__":
  main()
