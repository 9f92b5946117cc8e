"""Evaluates a CTRL run: samples every (c, y) cell from the fine-tuned and the pre-trained
model, judges them, writes DIR/eval/ (samples.npz, metrics.json, summary.md, PNG figures).

  python -m ctrl_jax.launch.evaluate --config=configs/digits.py --workdir=runs/digits
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctrl_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  experiment.evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
