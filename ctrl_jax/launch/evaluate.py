"""Evaluates a CTRL run: samples every (c, y) cell from the fine-tuned and the pre-trained
model, judges them, writes DIR/eval/ (samples.npz, metrics.json, summary.md, PNG figures).

  python -m ctrl_jax.launch.evaluate --config=configs/digits.py --workdir=runs/digits
"""
from ctrl_jax import experiment
from ctrl_jax.launch import common

if __name__ == "__main__":
  common.run(experiment.evaluate)
