"""Compiling on a background thread from ShapeDtypeStructs: the real call reuses the executable
when the arguments match (shape, dtype, sharding), compiles again when they do not, and a
failed background compilation is reported, not raised."""
import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.runtime import background_compile
from ctrl_jax.runtime import sharding as shd


def _step(mesh):
  def f(state, batch, scale):
    return {"w": state["w"] + scale * jnp.mean(batch, axis=0)}, jnp.sum(batch)

  repl, data = shd.replicated(mesh), shd.data_sharded(mesh)
  return shd.jit(f, mesh, in_shardings=(repl, data, repl), out_shardings=(repl, repl))


def _args(mesh, n=16):
  state = jax.device_put({"w": jnp.zeros((3,), jnp.float32)}, shd.replicated(mesh))
  batch = jax.device_put(np.arange(n * 3, dtype=np.float32).reshape(n, 3),
                         shd.data_sharded(mesh))
  scale = jax.device_put(jnp.asarray(0.5, jnp.float32), shd.replicated(mesh))
  return state, batch, scale


def test_the_first_call_reuses_the_background_executable():
  mesh = shd.make_mesh()
  assert mesh.size == 8  # conftest: 8 fake devices, so the shardings are real
  step = _step(mesh)
  state, batch, scale = _args(mesh)
  abstract = [background_compile.abstract_like(a, a.sharding) if hasattr(a, "sharding") else
              background_compile.abstract_like(a, shd.replicated(mesh))
              for a in (state["w"], batch, scale)]
  bg = background_compile.BackgroundCompile(step, {"w": abstract[0]}, abstract[1], abstract[2],
                                            name="f").wait()
  assert bg.error is None and bg.seconds > 0
  with background_compile.count_compiles("f") as n:
    new_state, total = step(state, batch, scale)
  assert n[0] == 0
  np.testing.assert_allclose(np.asarray(new_state["w"]),
                             0.5 * np.asarray(batch).mean(0), rtol=1e-6)
  assert float(total) == float(np.asarray(batch).sum())


def test_a_mismatched_abstract_argument_means_the_call_compiles():
  mesh = shd.make_mesh()
  step = _step(mesh)
  state, batch, scale = _args(mesh, n=24)  # the background compiled for 16 rows
  repl = shd.replicated(mesh)
  bg = background_compile.BackgroundCompile(
      step, background_compile.abstract_like(state, repl),
      jax.ShapeDtypeStruct((16, 3), jnp.float32, sharding=shd.data_sharded(mesh)),
      background_compile.abstract_like(scale, repl), name="f").wait()
  assert bg.error is None
  with background_compile.count_compiles("f") as n:
    jax.block_until_ready(step(state, batch, scale))
  assert n[0] == 1


def test_a_failing_background_compilation_is_reported_not_raised():
  mesh = shd.make_mesh()
  step = _step(mesh)
  bg = background_compile.BackgroundCompile(  # wrong pytree: no "w" in the state
      step, {"v": jax.ShapeDtypeStruct((3,), jnp.float32)},
      jax.ShapeDtypeStruct((16, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
      name="f").wait()
  assert bg.error is not None and "KeyError" in bg.error and bg.seconds is not None
