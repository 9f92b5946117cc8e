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

# The longest files first: with `-n 2 --dist loadfile` (the README's command) each file runs on
# one worker in collection order, so a long file started last would run alone at the end.
LONGEST_FIRST = ("test_multihost.py", "test_sd_pipeline.py", "test_digits_pipeline.py",
                 "test_train.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
