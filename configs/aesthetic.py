"""CTRL on Stable Diffusion v1.5: aesthetic class (LAION score ≥ 5.7), official settings.

  python -m ctrl_jax.launch.fit_classifier --config=configs/aesthetic.py --workdir=runs/aesthetic
  python -m ctrl_jax.launch.finetune --config=configs/aesthetic.py --workdir=runs/aesthetic
  python -m ctrl_jax.launch.finetune --config=configs/aesthetic.py:tiny --workdir=/tmp/a  # CPU
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd_common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(variant: str = "official"):
  c = sd_common.base_config("aesthetic")
  c.lr_lora = 1e-4              # docs/method.md §7
  c.lr_label_embedding = 5e-3   # docs/method.md §7
  c.trajectories_per_update = 512  # docs/method.md §7
  c.samples_per_epoch = 512     # docs/method.md §7: 1 update per epoch, 60 epochs
  return sd_common.tiny(c) if variant == "tiny" else c
