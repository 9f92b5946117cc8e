"""Fits the calibrated reward classifier(s) p̂(y | x) of a benchmark (stage 2).

  python -m ctrl_jax.launch.fit_classifier --config=configs/digits.py --workdir=runs/digits

Reuses DIR/classifier when it is complete.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctrl_jax import digits_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  digits_pipeline.ensure_classifiers(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
