"""CTRL vs the baselines on the digits benchmark (ctrl_jax.baselines.compare): results.json,
results.md and one image grid per method in DIR/compare/. Runs the missing stages first.

  python -m ctrl_jax.launch.compare --config=configs/digits.py:ink --workdir=runs/digits
  python -m ctrl_jax.launch.compare --config=configs/digits.py:multitask --workdir=runs/multi

Methods already in DIR/compare/results.json are kept (rerun = resume).
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax.baselines import compare  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help

if __name__ == "__main__":
  common.run(compare.run)
