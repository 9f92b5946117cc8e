"""Benchmark: peak memory of the SD evaluation as the number of images grows (CPU).

  python bench/eval_memory.py [--images 512,4096] [--batch_size 64]
      [--out bench/results/eval_memory.json]

A tiny multitask run (`configs/multitask.py:tiny`: random tiny SD, random CLIP and LAION
models, 1 prompt × 4 classes) is fitted and fine-tuned for one update in a fresh workdir; its
evaluation then runs once per requested size, each in its own process, with `samples_per_class`
= images / 4 (the images of one model; the pre-trained model is sampled as many times again).
The process reports its own peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`), after
its imports and at the end. The evaluation streams (sampled in chunks of --batch_size, scored,
written as PNG files and into the uint8 array file, dropped), so the peak should not grow with
the number of images; the budget checked is 4 GiB at 4096 images.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = report.REPO
CONFIG = os.path.join(REPO, "configs", "multitask.py:tiny")
LIMIT_GIB = 4.0


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def child(args) -> None:
  """In its own process: `setup` (classifier + 1 update) or `eval` (one evaluation)."""
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  config = report.load_config(CONFIG)
  config.num_updates = 1
  config.eval.run_after_finetune = False
  after_imports = _rss_gib()
  t0 = time.time()
  if args.child == "setup":
    experiment.finetune(config, args.workdir)
    print(json.dumps({"wall_s": time.time() - t0}))
    return
  config.eval.samples_per_class = args.n // 4
  config.eval.batch_size = args.batch_size
  metrics = experiment.evaluate(config, args.workdir)
  print(json.dumps({"rss_after_imports_gib": after_imports, "peak_rss_gib": _rss_gib(),
                    "wall_s": time.time() - t0, "eval_wall_time_s": metrics["eval_wall_time_s"],
                    "num_samples": metrics["finetuned"]["num_samples"],
                    "laion_score": {m: metrics[m]["laion_score"]
                                    for m in ("pretrained", "finetuned")}}))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", default="512,4096",
                  help="comma-separated numbers of images per model (multiples of 4)")
  ap.add_argument("--batch_size", type=int, default=64, help="config.eval.batch_size")
  ap.add_argument("--workdir", default="", help="default: a temporary folder")
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "eval_memory.json"))
  ap.add_argument("--child", choices=("setup", "eval"), help=argparse.SUPPRESS)
  ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args)
    return
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or os.path.join(tmp, "multitask")
    setup = report.run_child(__file__, "--child=setup", f"--workdir={workdir}")
    print(f"setup (classifiers + 1 update): {setup['wall_s']:.0f} s", flush=True)
    runs = []
    for n in (int(v) for v in args.images.split(",")):
      out = report.run_child(__file__, "--child=eval", f"--workdir={workdir}", f"--n={n}",
                 f"--batch_size={args.batch_size}")
      eval_dir = os.path.join(workdir, "eval")
      pngs = sum(len(files) for _, _, files in os.walk(os.path.join(eval_dir, "images")))
      out.update(images_per_model=n, images_sampled=2 * n, png_files=pngs,
                 npy_bytes=sum(os.path.getsize(os.path.join(eval_dir, f"images_{m}.npy"))
                               for m in ("finetuned", "pretrained")),
                 under_limit=out["peak_rss_gib"] < LIMIT_GIB)
      runs.append(out)
      print(f"{n} images per model: peak RSS {out['peak_rss_gib']:.2f} GiB, "
            f"{out['wall_s']:.0f} s", flush=True)
  report.print_table(
      ("images per model", "sampled", "PNG files", "peak RSS GiB", "RSS after imports GiB",
       "evaluation s", f"< {LIMIT_GIB:g} GiB"),
      [[str(r["images_per_model"]), str(r["images_sampled"]), str(r["png_files"]),
        f"{r['peak_rss_gib']:.2f}", f"{r['rss_after_imports_gib']:.2f}",
        f"{r['eval_wall_time_s']:.0f}", "yes" if r["under_limit"] else "NO"] for r in runs])
  report.write_json(args.out, {
      "command": "python bench/eval_memory.py " + " ".join(sys.argv[1:]),
      "config": "configs/multitask.py:tiny (1 update), eval.batch_size="
                f"{args.batch_size}, 1 CPU device", "limit_gib": LIMIT_GIB, "runs": runs})
  if not all(r["under_limit"] for r in runs):
    raise SystemExit(f"peak RSS above {LIMIT_GIB} GiB")


if __name__ == "__main__":
  main()
