"""CTRL fine-tuning (and, for benchmarks, the missing earlier stages and the evaluation).

  python -m ctrl_jax.launch.finetune --config=configs/digits.py --workdir=runs/digits
  python -m ctrl_jax.launch.finetune --config=configs/smoke.py --workdir=runs/smoke

Rerunning the same command resumes from the last checkpoint in --workdir.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctrl_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  config = _CONFIG.value
  out = experiment.finetune(config, _WORKDIR.value)
  print(f"[finetune] done in {out['wall_time_s']:.1f}s; outputs in {_WORKDIR.value}", flush=True)
  if config.get("eval") and config.eval.get("run_after_finetune"):
    experiment.evaluate(config, _WORKDIR.value, out["params"])


if __name__ == "__main__":
  app.run(main)
