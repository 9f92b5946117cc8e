"""What every launcher shares: the --config / --workdir flags and a quiet absl main."""
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def run(stage: Callable[..., object]) -> None:
  """app.run of `stage(config, workdir)`, with orbax's per-operation INFO logs silenced."""

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    stage(_CONFIG.value, _WORKDIR.value)

  app.run(main)
