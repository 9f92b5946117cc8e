"""Sample efficiency and the paper's open questions on the digits benchmark
(ctrl_jax.baselines.studies): results.json, results.md, a plot and one image grid per variant in DIR/studies/<study>/.

  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=runs/digits --study=labels
  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=runs/digits --study=gamma
  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=runs/digits --study=lora
  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=runs/digits --study=dependent
  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=runs/digits --study=posterior

Variants already in results.json are kept, and each variant's training resumes (rerun = resume).
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax.baselines import studies  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help

_STUDY = flags.DEFINE_enum("study", None, list(studies.STUDIES), "Which study to run.")
flags.mark_flag_as_required("study")

if __name__ == "__main__":
  common.run(lambda config, workdir: studies.run(config, workdir, _STUDY.value))
