"""What every launcher shares: the --config / --workdir flags, their help, the workdir check and
lock, and an absl main that reports a failure in one line.

Multi-host (Cloud TPU VM slice, multi-node GPU): with `CTRL_JAX_DISTRIBUTED=1` in the
environment every process calls `jax.distributed.initialize()` before any other jax use. The
argument-free form auto-detects Cloud TPU, SLURM and Open MPI; elsewhere set
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Compiled programs are cached on disk (jax's persistent compilation cache) in
$CTRL_JAX_COMPILE_CACHE, default ~/.cache/ctrl_jax/jax_cache ("off" disables it): a rerun or
resume skips the compilations (tens of seconds on CPU, minutes at SD scale).
"""
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctrl_jax.runtime import loop
from ctrl_jax.runtime import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, configs/NAME.py[:variant]; override any field "
    "with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs and outputs (created if missing; local or "
    "gs://). Rerunning with the same --workdir resumes.")
flags.mark_flags_as_required(["config", "workdir"])

HELP = """
Config overrides:
  --config=configs/NAME.py[:variant] picks a config (e.g. configs/digits.py:multitask); any
  field can then be set on the command line: --config.num_updates=100,
  --config.eval.samples_per_cell=20, --config.prompts='("cat", "dog")'. A wrong name, type or
  value is refused before any work.

Environment variables:
  CTRL_JAX_COMPILE_CACHE=DIR|off  jax's persistent compilation cache (default
                                  ~/.cache/ctrl_jax/jax_cache): reruns skip compilation.
  CTRL_JAX_HUGEPAGES=0            do not re-execute with glibc's huge-page tunable (CPU).
  CTRL_JAX_DISTRIBUTED=1          multi-host: jax.distributed.initialize() first, with
                                  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
                                  where the platform does not provide them.
  JAX_PLATFORMS, XLA_FLAGS        as in jax (e.g. JAX_PLATFORMS=cpu).

Exit status: 0 done, or stopped by SIGTERM after saving a checkpoint; 130 stopped by SIGINT
after saving; 1 any error, reported in one line (--verbosity=1 shows the traceback).
"""


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


def one_line(error: BaseException) -> str:
  """`Type: message` on one line (the first line of a multi-line message)."""
  text = " ".join(str(error).split("\n")[0].split()) or repr(error)
  return f"{type(error).__name__}: {text}"


def _lock(workdir: str) -> workdir_lib.Lock:
  import jax  # pylint: disable=g-import-not-at-top
  return workdir_lib.Lock(workdir, enabled=jax.process_index() == 0)


def _fail(message: str) -> None:
  print(f"error: {message}  (--verbosity=1 shows the traceback)", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with every failure in one line: a bad flag value, and a --config
  override of a field the config lacks (ml_collections raises a bare AttributeError)."""
  verbose = any(a.startswith(("--verbosity", "-v=", "--v=")) and not a.endswith(("=0", "=-1"))
                for a in argv)
  for arg in argv[1:]:
    if arg.startswith("--config=") and not verbose:
      path = arg[len("--config="):].split(":")[0]
      if not os.path.isfile(path):
        _fail(f"--config={path}: no such config file (configs/*.py).")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if verbose:
      raise
    text = str(e)
    if "Traceback (most recent call last)" in text:  # a config file that raised: its last line
      text = f"{text.split(':')[0]}: {text.strip().splitlines()[-1]}"
    _fail(f"bad flag: {' '.join(text.split())}")
  except (AttributeError, KeyError) as e:
    if verbose:
      raise
    # ml_collections' message: "'name'" and, sometimes, a line "Did you mean …?"
    lines = str(e).replace("\\n", "\n").split("\n")
    field = lines[0].strip("\"'\\ ")
    hint = " " + lines[1].strip("\"'\\ ") if len(lines) > 1 else ""
    _fail(f"a --config override names {field!r}, which is not a field of the config.{hint}")
  except Exception as e:  # pylint: disable=broad-except  (a config file that does not load)
    if verbose:
      raise
    _fail(f"bad flag: {one_line(e)}")
  return []


def run(stage: Callable[..., object]) -> None:
  """app.run of `stage(config, workdir)`: the workdir checked and locked first, orbax's
  per-operation INFO logs silenced, any failure one line on stderr and exit status 1 (the
  traceback with --verbosity=1), a preemption exit 0 (SIGTERM) or 130 (SIGINT)."""
  main_module = sys.modules["__main__"]
  main_module.__doc__ = (main_module.__doc__ or "") + HELP

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    verbose = logging.get_verbosity() >= logging.DEBUG
    try:
      _maybe_initialize_distributed()
      _enable_compilation_cache()
      if not verbose:
        logging.set_verbosity(logging.WARNING)
      workdir_lib.check(_WORKDIR.value)
      with _lock(_WORKDIR.value):
        stage(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as e:
      print(e, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print("interrupted.", file=sys.stderr, flush=True)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if verbose:
        raise
      _fail(one_line(e))

  app.run(main, flags_parser=_parse_flags)
