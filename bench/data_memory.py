"""Benchmark: peak memory of prepare_data + classifier fitting as the dataset grows (CPU).

  python bench/data_memory.py [--images 64,1024] [--image_size 256] [--folder_too]
      [--out bench/results/data_memory.json]

For each size, a folder of that many generated images (JPEG and PNG, 160–400 px a side, RGB /
RGBA / L) is prepared (`ctrl_jax.launch.prepare_data`'s function, `configs/multitask.py:tiny`
with classifier.image_size = --image_size: tiny random CLIP + LAION MLP, JPEG sizes and uint8
images at image_size²) and both classifiers are fitted from the shards, in a fresh process that
reports its own peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`). Shards hold 64
source images, so the peak should not grow with the number of images: the check is the largest
peak within 1.3× the smallest. --folder_too also fits from the image folder directly
(classifier.aesthetic_data / compress_data), which holds every image as float32, for contrast.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  pylint: disable=g-import-not-at-top

from ctrl_jax.runtime import stage  # noqa: E402

REPO = os.path.abspath(report.REPO)
CONFIG = os.path.join(REPO, "configs", "multitask.py:tiny")
RATIO = 1.3


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def write_images(folder: str, n: int, seed: int = 0) -> None:
  """n images, 160–400 px a side, smooth to noisy; modes RGB / RGBA / L in turn; JPEG except
  RGBA (PNG)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    w, h = (int(v) for v in rng.integers(160, 400, 2))
    amount = (i % 16) / 15
    smooth = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 4))
    pixels = (1 - amount) * smooth + amount * rng.uniform(0, 255, (h, w, 4))
    mode = ("RGB", "RGBA", "L")[i % 3]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA").convert(mode)
    image.save(os.path.join(folder, f"{i:05d}.{'png' if mode == 'RGBA' else 'jpg'}"),
               quality=90)


def child(args) -> None:
  """In its own process: prepare (mode "prepared") and fit both classifiers."""
  from ctrl_jax.problems.sd import stages  # pylint: disable=g-import-not-at-top
  config = report.load_config(CONFIG)
  k = config.classifier
  k.image_size = args.image_size
  k.prepare.shard_size, k.prepare.batch, k.prepare.workers = 64, 16, 2
  k.cnn_steps, k.cnn_batch, k.head_epochs = 20, 16, 5
  after_imports = _rss_mib()
  t0 = time.time()
  count = None
  if args.child == "prepared":
    manifest = stages.prepare_data(config, args.dataset, images=[args.images])
    count = manifest["count"]
    k.data = args.dataset
  else:
    k.aesthetic_data = k.compress_data = args.images
  prepare_s = time.time() - t0
  _, _, info, _ = stages.ensure_classifiers(config, args.workdir)
  print(json.dumps({"rss_after_imports_mib": after_imports, "peak_rss_mib": _rss_mib(),
                    "prepare_s": prepare_s, "wall_s": time.time() - t0, "prepared_images": count,
                    "fitted_images": info["tasks"]["compress2"]["num_train"]
                                     + info["tasks"]["compress2"]["num_calib"]}))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", default="64,1024", help="comma-separated numbers of images")
  ap.add_argument("--image_size", type=int, default=256, help="config.classifier.image_size")
  ap.add_argument("--folder_too", action="store_true",
                  help="also fit from the image folder (every image in memory)")
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "data_memory.json"))
  ap.add_argument("--child", choices=("prepared", "folder"), help=argparse.SUPPRESS)
  ap.add_argument("--dataset", default="", help=argparse.SUPPRESS)
  ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  ap.add_argument("--images_dir", dest="images_dir", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    args.images = args.images_dir
    child(args)
    return
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in (int(v) for v in args.images.split(",")):
      folder = os.path.join(tmp, f"images_{n}")
      write_images(folder, n)
      for mode in ("prepared", "folder") if args.folder_too else ("prepared",):
        out = report.run_child(__file__, f"--child={mode}", f"--images_dir={folder}",
                   f"--dataset={os.path.join(tmp, f'dataset_{n}')}",
                   f"--workdir={os.path.join(tmp, f'run_{mode}_{n}')}",
                   f"--image_size={args.image_size}")
        out.update(images=n, mode=mode)
        runs.append(out)
        print(f"{mode}, {n} images: peak RSS {out['peak_rss_mib']:.0f} MiB, "
              f"{out['wall_s']:.0f} s", flush=True)
  prepared = [r for r in runs if r["mode"] == "prepared"]
  ratio = max(r["peak_rss_mib"] for r in prepared) / min(r["peak_rss_mib"] for r in prepared)
  report.print_table(
      ("data", "images", "peak RSS MiB", "RSS after imports MiB", "prepare s", "total s"),
      [[r["mode"], str(r["images"]), f"{r['peak_rss_mib']:.0f}",
        f"{r['rss_after_imports_mib']:.0f}", f"{r['prepare_s']:.0f}", f"{r['wall_s']:.0f}"]
       for r in runs])
  print(f"prepared data: peak RSS largest / smallest = {ratio:.3f} (limit {RATIO})")
  report.write_json(args.out, {
      "command": "python bench/data_memory.py " + " ".join(sys.argv[1:]),
      "commit": stage.git_commit(REPO)["commit"],
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(),
      "config": f"configs/multitask.py:tiny, classifier.image_size={args.image_size}, "
                "prepare.shard_size=64, prepare.batch=16, cnn_steps=20, head_epochs=5, "
                "1 CPU device", "ratio_limit": RATIO, "peak_rss_ratio": ratio,
      "within_limit": ratio <= RATIO, "runs": runs})
  if ratio > RATIO:
    raise SystemExit(f"peak RSS grows {ratio:.2f}× with the data (limit {RATIO}×)")


if __name__ == "__main__":
  main()
