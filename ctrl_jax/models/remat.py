"""Per-layer rematerialisation inside diffusers' Flax UNet, without owning its modules.

`jax.checkpoint` around a whole UNet call (core.sampling's `remat_policy`) keeps the trajectory's
memory flat in the number of steps, but the backward of one call still recomputes and holds
every activation of that call: at SD1.5 size, 8 CFG rows at 64×64 latents, ≈ 25 GiB. With
`interceptor()` active, every `FlaxResnetBlock2D` and `FlaxTransformer2DModel` call runs under
`flax.linen.remat` (lifted `jax.checkpoint`), so that backward holds the layers' inputs and one
layer's activations at a time, for one more forward of each layer.

The lifted call re-enters the same method on the lifted module; a trace-time flag lets that
inner call through, so a layer is rematerialised once, not recursively. Other interceptors
(LoRA, label embedding, attention) apply inside unchanged.
"""
from __future__ import annotations

import threading
from typing import Callable

import flax.linen as nn
import jax

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from diffusers.models.resnet_flax import FlaxResnetBlock2D
from diffusers.models.attention_flax import FlaxTransformer2DModel

LAYERS = (FlaxResnetBlock2D, FlaxTransformer2DModel)
_inside = threading.local()


def interceptor(policy: Callable = jax.checkpoint_policies.nothing_saveable) -> Callable:
  """A `flax.linen.intercept_methods` interceptor rematerialising every UNet layer call."""

  def layer(module, *args, **kwargs):
    _inside.active = True
    try:
      return module(*args, **kwargs)
    finally:
      _inside.active = False

  def intercept(next_fun, args, kwargs, context):
    if (context.method_name != "__call__" or not isinstance(context.module, LAYERS)
        or getattr(_inside, "active", False)):
      return next_fun(*args, **kwargs)
    static = tuple(i + 1 for i, a in enumerate(args) if isinstance(a, bool))
    # prevent_cse=True: the layer recompute runs inside the whole call's own recompute (one scan
    # body), where XLA would otherwise merge the two and keep every activation again.
    return nn.remat(layer, policy=policy, prevent_cse=True, static_argnums=static)(
        context.module, *args, **kwargs)

  return intercept
