"""Fits the calibrated reward classifier(s) p̂(y | x) of a config's task (its own stage).

  python -m ctrl_jax.launch.fit_classifier --config=configs/digits.py --workdir=runs/digits
  python -m ctrl_jax.launch.fit_classifier --config=configs/aesthetic.py --workdir=runs/aesthetic

Reuses DIR/classifier when it is complete (a different classifier config is refused).
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import experiment  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402
from ctrl_jax.problems import base  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help


def fit_classifier(config, workdir):
  experiment.validate_config(config)
  base.hook(config.problem, "fit_classifier")(config, workdir)


if __name__ == "__main__":
  common.run(fit_classifier)
