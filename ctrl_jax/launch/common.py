"""What every launcher shares: the --config / --workdir flags and a quiet absl main.

Multi-host (Cloud TPU VM slice, multi-node GPU): with `CTRL_JAX_DISTRIBUTED=1` in the
environment every process calls `jax.distributed.initialize()` before any other jax use. The
argument-free form auto-detects Cloud TPU, SLURM and Open MPI; elsewhere set
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Compiled programs are cached on disk (jax's persistent compilation cache) in
$CTRL_JAX_COMPILE_CACHE, default ~/.cache/ctrl_jax/jax_cache ("off" disables it): a rerun or
resume skips the compilations (tens of seconds on CPU, minutes at SD scale).
"""
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` iff CTRL_JAX_DISTRIBUTED=1 (see the module docstring)."""
  if os.environ.get("CTRL_JAX_DISTRIBUTED", "0") != "1":
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if "JAX_NUM_PROCESSES" in os.environ:  # not read by jax itself (the address is)
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in os.environ:
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)


def _enable_compilation_cache() -> None:
  path = os.environ.get("CTRL_JAX_COMPILE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "ctrl_jax", "jax_cache"))
  if path == "off":
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:  # set by the user (e.g. JAX_COMPILATION_CACHE_DIR)
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(stage: Callable[..., object]) -> None:
  """app.run of `stage(config, workdir)`, with orbax's per-operation INFO logs silenced."""

  def main(argv):
    del argv
    _maybe_initialize_distributed()
    _enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)
    stage(_CONFIG.value, _WORKDIR.value)

  app.run(main)
