"""CTRL on Stable Diffusion v1.5: 4 JPEG-compressibility classes (≤60/≤85/≤110/>110 kB),
official settings.

  python -m ctrl_jax.launch.fit_classifier --config=configs/compressibility.py --workdir=runs/c
  python -m ctrl_jax.launch.finetune --config=configs/compressibility.py --workdir=runs/c
  python -m ctrl_jax.launch.finetune --config=configs/compressibility.py:tiny --workdir=/tmp/c
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd_common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(variant: str = "official"):
  c = sd_common.base_config("compressibility")
  c.lr_lora = 1e-3              # docs/method.md §7
  c.lr_label_embedding = 1e-2   # docs/method.md §7
  c.trajectories_per_update = 256  # docs/method.md §7
  c.samples_per_epoch = 512     # docs/method.md §7: 2 updates per epoch, 60 epochs
  return sd_common.tiny(c) if variant == "tiny" else c
