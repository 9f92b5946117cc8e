"""Pre-trains the base model p(x | c) of a benchmark (stage 1).

  python -m ctrl_jax.launch.pretrain --config=configs/digits.py --workdir=runs/digits

Reuses DIR/pretrain when it is complete; rerunning after an interruption resumes.
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import experiment  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402
from ctrl_jax.problems import base  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help


def pretrain(config, workdir):
  experiment.validate_config(config)
  base.hook(config.problem, "pretrain")(config, workdir)


if __name__ == "__main__":
  common.run(pretrain)
