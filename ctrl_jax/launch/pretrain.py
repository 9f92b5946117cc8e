"""Pre-trains the base model p(x | c) of a benchmark (stage 1).

  python -m ctrl_jax.launch.pretrain --config=configs/digits.py --workdir=runs/digits

Reuses DIR/pretrain when it is complete; rerunning after an interruption resumes.
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from ctrl_jax.launch import common  # noqa: E402
from ctrl_jax.problems import base  # noqa: E402

if __name__ == "__main__":
  common.run(lambda config, workdir: base.hook(config.problem, "pretrain")(config, workdir))
