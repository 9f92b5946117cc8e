"""Prepares the SD classifiers' offline data: image files → a sharded dataset folder.

  python -m ctrl_jax.launch.prepare_data --config=configs/aesthetic.py --images=/data/ava \
      --out=/data/ava_prepared --config.classifier.clip_model=/data/clip-vit-large-patch14 \
      --config.classifier.laion_weights=/data/sac+logos+ava1-l14-linearMSE.pth
  python -m ctrl_jax.launch.fit_classifier --config=configs/aesthetic.py --workdir=runs/aesthetic \
      --config.classifier.data=/data/ava_prepared ...

The task of --config decides what is computed (CLIP embeddings + LAION scores for aesthetic,
JPEG sizes + resized images for compressibility, both for multitask), with its classifier
fields (clip_model, laion_weights, image_size, jpeg_quality, prepare.*). Rerunning the same
command resumes after the last complete shard; unreadable images are skipped and counted
(--out/manifest.json). --out is another name of --workdir: the folder is checked and locked as a
run's workdir is.
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import experiment  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402
from ctrl_jax.problems.sd import stages  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help

_IMAGES = flags.DEFINE_list(
    "images", [], "Folder(s) of images (comma-separated; local or URIs), searched recursively "
    "for .png/.jpg/.jpeg/.webp/.bmp files, in sorted order.")
_LIST = flags.DEFINE_string(
    "list", "", "A text file of image paths or URIs, one per line (relative to the file's "
    "folder); prepared after --images.")
flags.DEFINE_alias("out", "workdir")


def prepare_data(config, out):
  if config.get("problem") != "sd":
    raise ValueError(f"config.problem={config.get('problem')!r}: prepare_data is for the SD "
                     "configs (configs/aesthetic.py, compressibility.py, multitask.py).")
  experiment.validate_config(config)
  stages.prepare_data(config, out, images=_IMAGES.value, list_file=_LIST.value)


if __name__ == "__main__":
  common.run(prepare_data)
