"""Test set-up: 8 fake CPU devices (sharding tests), a persistent compilation cache (the same
tiny train step is compiled by several tests), and shared tiny problems."""
import os
import tempfile

import chex

chex.set_n_cpu_devices(8)

import jax  # noqa: E402  (after the device count is set)

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("CTRL_JAX_TEST_CACHE",
                                 os.path.join(tempfile.gettempdir(), "ctrl_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
