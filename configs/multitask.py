"""CTRL on Stable Diffusion v1.5: aesthetic (2) × compressibility (2) jointly, official
settings (loss 0.1 · mean(NLL_aesthetic + 2 · NLL_compress) + 0.01 · KL).

  python -m ctrl_jax.launch.fit_classifier --config=configs/multitask.py --workdir=runs/m
  python -m ctrl_jax.launch.finetune --config=configs/multitask.py --workdir=runs/m
  python -m ctrl_jax.launch.finetune --config=configs/multitask.py:tiny --workdir=/tmp/m
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd_common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(variant: str = "official"):
  c = sd_common.base_config("multitask")
  c.reward_weights = (1.0, 2.0)  # (aesthetic, compress2): 2 · NLL_compress + NLL_aesthetic
  c.lr_lora = 3e-4              # docs/method.md §7
  c.lr_label_embedding = 1e-2   # docs/method.md §7
  c.trajectories_per_update = 512  # docs/method.md §7
  c.samples_per_epoch = 1024    # docs/method.md §7: 2 updates per epoch, 60 epochs
  c.eval.samples_per_class = 128  # docs/method.md §8: 128 per (y1, y2) cell
  c = sd_common.tiny(c) if variant == "tiny" else c
  if variant == "tiny":
    c.eval.samples_per_class = 1
  return c
