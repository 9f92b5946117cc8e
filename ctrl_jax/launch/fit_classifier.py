"""Fits the calibrated reward classifier(s) p̂(y | x) of a benchmark (stage 2).

  python -m ctrl_jax.launch.fit_classifier --config=configs/digits.py --workdir=runs/digits

Reuses DIR/classifier when it is complete.
"""
from ctrl_jax import digits_pipeline
from ctrl_jax.launch import common

if __name__ == "__main__":
  common.run(digits_pipeline.ensure_classifiers)
