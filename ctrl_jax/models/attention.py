"""Attention implementations for diffusers' Flax UNet, chosen per run (`config.attention`).

diffusers' `FlaxAttention` materialises the full score matrix: at SD1.5's 64×64 latents a
self-attention layer holds [2b·heads, 4096, 4096] scores (CFG doubles the rows), which is most
of the memory of a differentiated UNet call. `interceptor(impl)` replaces the attention core of
every `FlaxAttention` (self and cross) through `flax.linen.intercept_methods`, keeping its own
`to_q`/`to_k`/`to_v`/`to_out_0` Dense layers, so the parameters, their names, LoRA and the export
are unchanged:

  naive    diffusers' own code (the reference for parity; softmax in the activation dtype).
  chunked  memory-efficient: queries in chunks of `query_chunk` under `jax.checkpoint`, so the
           forward and the backward hold one chunk's scores ([rows, heads, chunk, L_kv]); pure
           XLA, runs on every backend. Softmax in float32.
  xla      `jax.nn.dot_product_attention(implementation="xla")`: full scores, XLA-fused.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention
           (GPU, bfloat16/float16, head dim a multiple of 8, ≤ 128; ≤ 256 on Hopper).
  auto     per layer: cudnn where it applies (GPU, 16-bit, head dim ≤ 128), else chunked for
           long sequences (L_q·L_kv ≥ `chunk_threshold`), else xla.

The VAE's single mid-block attention and the CLIP towers keep their own code: at 512² images the
VAE's [b, 4096, 4096] scores are one head (b·64 MiB in float32), and CLIP's 77 / 257 tokens are
small.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

import ctrl_jax.models  # noqa: F401  (installs the deprecation filter)
from diffusers.models.attention_flax import FlaxAttention

IMPLEMENTATIONS = ("naive", "chunked", "xla", "cudnn", "auto")
DEFAULT_QUERY_CHUNK = 1024
DEFAULT_CHUNK_THRESHOLD = 1024 * 1024


def check(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention={impl!r}; expected one of {IMPLEMENTATIONS}.")
  return impl


def _largest_divisor_at_most(n: int, limit: int) -> int:
  for c in range(min(n, max(1, limit)), 0, -1):
    if n % c == 0:
      return c
  return 1


def chunked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float,
                      query_chunk: int = DEFAULT_QUERY_CHUNK) -> jnp.ndarray:
  """softmax(q kᵀ · scale) v with queries in chunks, each chunk rematerialised.

  Args:
    q: [B, L_q, H, d]; k, v: [B, L_kv, H, d].
    query_chunk: queries per chunk (the largest divisor of L_q not above it is used).
  Returns:
    [B, L_q, H, d] in q's dtype; scores and softmax in float32.
  """
  b, lq, h, d = q.shape
  chunk = _largest_divisor_at_most(lq, query_chunk)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one(qc):
    s = jnp.einsum("bqhd,bkhd->bhqk", qc, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)

  if chunk == lq:
    return one(q)
  qs = jnp.moveaxis(q.reshape(b, lq // chunk, chunk, h, d), 1, 0)
  out = jax.lax.map(one, qs)
  return jnp.moveaxis(out, 0, 1).reshape(b, lq, h, d)


def cudnn_applies(q: jnp.ndarray, max_head_dim: int = 128) -> bool:
  """Whether `auto` uses cuDNN flash attention for q [B, L, H, d] on this backend."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= max_head_dim)


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, impl: str,
           query_chunk: int = DEFAULT_QUERY_CHUNK,
           chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD) -> jnp.ndarray:
  """Multi-head attention core for q [B, L_q, H, d], k/v [B, L_kv, H, d] → [B, L_q, H, d]."""
  scale = q.shape[-1] ** -0.5
  if impl == "auto":
    if cudnn_applies(q):
      impl = "cudnn"
    elif q.shape[1] * k.shape[1] >= chunk_threshold:
      impl = "chunked"
    else:
      impl = "xla"
  if impl == "chunked":
    return chunked_attention(q, k, v, scale, query_chunk)
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
  raise ValueError(f"attend: implementation {impl!r} (naive is diffusers' own code).")


def interceptor(impl: str, query_chunk: int = DEFAULT_QUERY_CHUNK,
                chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD) -> Optional[Callable]:
  """A `flax.linen.intercept_methods` interceptor running every `FlaxAttention.__call__` with
  `impl`; None for "naive" (diffusers' code runs unchanged)."""
  check(impl)
  if impl == "naive":
    return None

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FlaxAttention):
      return next_fun(*args, **kwargs)
    hidden = args[0]
    ctx = args[1] if len(args) > 1 else kwargs.get("context")
    ctx = hidden if ctx is None else ctx
    heads = module.heads

    def split(x):
      return x.reshape(x.shape[:2] + (heads, x.shape[-1] // heads))

    q, k, v = split(module.query(hidden)), split(module.key(ctx)), split(module.value(ctx))
    out = attend(q, k, v, impl, query_chunk, chunk_threshold)
    return module.proj_attn(out.reshape(out.shape[:2] + (-1,)))  # dropout: 0, deterministic

  return intercept
