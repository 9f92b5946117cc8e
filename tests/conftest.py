"""Test set-up: 8 fake CPU devices (sharding tests), a persistent compilation cache (the same
tiny train step is compiled by several tests), shared tiny problems, and the longest test files
first."""
import os
import tempfile

import chex

chex.set_n_cpu_devices(8)

import jax  # noqa: E402  (after the device count is set)

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("CTRL_JAX_TEST_CACHE",
                                 os.path.join(tempfile.gettempdir(), "ctrl_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
  """One full digits :quick run in-process (8 fake devices), shared by the pipeline and the
  posterior tests; returns (workdir, finetune out, metrics)."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import digits as digits_config  # pylint: disable=g-import-not-at-top
  from ctrl_jax import experiment  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("quick"))
  config = digits_config.get_config("quick")
  out = experiment.finetune(config, workdir)
  metrics = experiment.evaluate(config, workdir, out["params"])
  return workdir, out, metrics

# The longest files first: with `-n 2 --dist loadfile` (the README's command) each file runs on
# one worker in collection order (pytest.ini: --no-loadscope-reorder), so a long file started
# last would run alone at the end.
LONGEST_FIRST = ("test_multihost.py", "test_sd_pipeline.py", "test_digits_pipeline.py",
                 "test_train.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
