"""CTRL fine-tuning (and, for benchmarks, the missing earlier stages and the evaluation).

  python -m ctrl_jax.launch.finetune --config=configs/digits.py --workdir=runs/digits
  python -m ctrl_jax.launch.finetune --config=configs/smoke.py --workdir=runs/smoke

Rerunning the same command resumes from the last checkpoint in --workdir.
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import experiment  # noqa: E402
from ctrl_jax.baselines import compare  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402
from ctrl_jax.runtime import multihost  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help


def finetune_and_evaluate(config, workdir):
  evaluate = config.get("eval") and config.eval.get("run_after_finetune")
  if evaluate:
    compare.validate_eval_method(config)  # before any work, not after training
  out = experiment.finetune(config, workdir)
  if multihost.is_main():
    print(f"[finetune] done in {out['wall_time_s']:.1f}s; outputs in {workdir}", flush=True)
  if evaluate:
    compare.evaluate_run(config, workdir, out["params"])


if __name__ == "__main__":
  common.run(finetune_and_evaluate)
