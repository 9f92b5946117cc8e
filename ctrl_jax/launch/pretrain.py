"""Pre-trains the base model p(x | c) of a benchmark (stage 1).

  python -m ctrl_jax.launch.pretrain --config=configs/digits.py --workdir=runs/digits

Reuses DIR/pretrain when it is complete; rerunning after an interruption resumes.
"""
from ctrl_jax import digits_pipeline
from ctrl_jax.launch import common

if __name__ == "__main__":
  common.run(digits_pipeline.ensure_pretrained)
