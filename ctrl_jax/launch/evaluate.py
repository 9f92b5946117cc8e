"""Evaluates a CTRL run: samples every (c, y) cell from the fine-tuned and the pre-trained
model, judges them, writes DIR/eval/ (samples.npz, metrics.json, summary.md, PNG figures).
With --config.eval.method=<a baseline of ctrl_jax.baselines.compare> it evaluates that method on
the pre-trained model instead, into DIR/eval_<method>/.

  python -m ctrl_jax.launch.evaluate --config=configs/digits.py --workdir=runs/digits
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import experiment  # noqa: E402
from ctrl_jax.baselines import compare  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help


def evaluate(config, workdir):
  experiment.validate_config(config)
  compare.evaluate_run(config, workdir)


if __name__ == "__main__":
  common.run(evaluate)
