"""Persistent memory / all-attention, Sukhbaatar et al. 2019 (arXiv 1907.01470), as the authors' code.

N learned key and value vectors per head and layer are appended to the context keys and
values (facebookresearch/adaptive-span, `persistent_memory.py`). The all-attention layer
(`TransformerSeq` with `attention="persistent_memory"`) drops the feed-forward sublayer
and its LayerNorm: the persistent vectors take the feed-forward's role
(`PersistentMemoryAttention.replaces_feed_forward`).

Exact semantics (authors' code; * marks where it differs from a literal reading of the
paper):

* * Parameters are stored scaled and rescaled at use: the stored keys are N(0, 1) /
  sqrt(head_dim) and are used as pers_key * sqrt(head_dim); the stored values are
  N(0, 1) / sqrt(N), used as pers_val * sqrt(N). (This changes the effective learning
  rate of the vectors, not the function.) Here both are stored `[N, heads, head_dim]`;
  the authors' layouts are key `[heads, head_dim, N]` and val `[heads, N, head_dim]`.
* Context logits (q . k + q . key_pe over the window of `zoo.attention.cache_window`)
  and persistent logits q . (sqrt(d) pers_key) share one softmax over W + N slots, both
  divided by sqrt(d). * The persistent slots carry no position embedding and no span mask.
* * With an adaptive span the mask multiplies the context weights only, then context and
  persistent weights are renormalised jointly by (sum + 1e-8).
* out = sum_ctx w v + sum_pers w (sqrt(N) pers_val); attention dropout applies to the
  context and persistent weights separately (the same rate).

Registered as `persistent_memory` (causal, over a segment cache), with the `halo`
strategy of `cache_window.parallel` (the persistent slots replicated on every shard).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import registry
from zoo.attention.adaptive_span import (RENORM_EPS, AdaptiveSpanAttention,
                                         AdaptiveSpanOptions, check_span, window_mask)
from zoo.attention.cache_window import (check_inputs, compute_dtype, context_logits,
                                        context_output, make_core, window)
from zoo.attention.options import positive_int


def check_persistent(pers_key, pers_val, num_heads: int, head_dim: int) -> int:
  """Validates stored persistent keys / values `[N, heads, head_dim]`; returns N."""
  for name, x in (("pers_key", pers_key), ("pers_val", pers_val)):
    if x.ndim != 3 or x.shape[1:] != (num_heads, head_dim):
      raise ValueError(f"{name} must be [N, heads={num_heads}, head_dim={head_dim}], "
                       f"got {x.shape}")
  if pers_key.shape[0] != pers_val.shape[0] or pers_key.shape[0] < 1:
    raise ValueError(f"pers_key {pers_key.shape} and pers_val {pers_val.shape} must hold "
                     f"the same N >= 1 vectors")
  return pers_key.shape[0]


def persistent_seq_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_pe: jax.Array,
                             pers_key: jax.Array, pers_val: jax.Array, *,
                             span: jax.Array | None = None, ramp: float | None = None,
                             trim_len: int = 0, eps: float = RENORM_EPS,
                             attn_dropout: Callable[[jax.Array], jax.Array] | None = None,
                             query_chunk: int | None = None) -> jax.Array:
  """`SeqAttention` with `PersistentMemory` (and `AdaptiveSpan` when `span` is given).

  Args:
    q, k, v, key_pe, span, ramp, trim_len, eps, attn_dropout, query_chunk: as
      `zoo.attention.adaptive_span.seq_attention`.
    pers_key: stored persistent keys `[N, heads, head_dim]`, used times sqrt(head_dim).
    pers_val: stored persistent values `[N, heads, head_dim]`, used times sqrt(N).

  Returns:
    `[batch, M, heads, head_dim]` in q's dtype.
  """
  max_span, key_pe = check_inputs(q, k, v, key_pe)
  heads, head_dim = q.shape[2], q.shape[3]
  n = check_persistent(pers_key, pers_val, heads, head_dim)
  check_span(span, ramp, heads)
  dt = compute_dtype(q)
  k_win, v_win, pe_win = window(k, v, key_pe, q.shape[1], trim_len)
  ctx = context_logits(q, k_win, pe_win, query_chunk)
  pk = pers_key.astype(dt) * math.sqrt(head_dim)
  pers = jnp.einsum("bmhd,nhd->bhmn", q.astype(dt), pk)
  logits = jnp.concatenate([ctx, pers], axis=-1) / math.sqrt(head_dim)
  w = jax.nn.softmax(logits, axis=-1)
  w_ctx, w_pers = w[..., :-n], w[..., -n:]
  if span is not None:
    w_ctx = w_ctx * window_mask(span, max_span, pe_win.shape[1], ramp).astype(dt)
    total = (jnp.sum(w_ctx, axis=-1, keepdims=True) + jnp.sum(w_pers, axis=-1, keepdims=True)
             + eps)
    w_ctx, w_pers = w_ctx / total, w_pers / total
  if attn_dropout is not None:
    w_ctx, w_pers = attn_dropout(w_ctx), attn_dropout(w_pers)
  out = context_output(w_ctx, v_win, query_chunk)
  pv = pers_val.astype(dt) * math.sqrt(n)
  out = out + jnp.einsum("bhmn,nhd->bmhd", w_pers, pv)
  return out.astype(q.dtype)


CORE = make_core("persistent_memory", persistent_seq_attention)


@dataclasses.dataclass(frozen=True)
class PersistentMemoryOptions(AdaptiveSpanOptions):
  """The span options plus persistent_size: N, the persistent vectors per head."""
  persistent_size: int = 16

  def check(self) -> None:
    super().check()
    positive_int("persistent_size", self.persistent_size)


class PersistentMemoryAttention(AdaptiveSpanAttention):
  """`AdaptiveSpanAttention` plus N persistent key / value vectors per head.

  Extra parameters `pers_key`, `pers_val` `[N, heads, head_dim]`, stored scaled
  (N(0, 1)/sqrt(head_dim) and N(0, 1)/sqrt(N) at init, the authors' init), drawn after
  every parameter of the span layer.
  """

  family = "persistent_memory"
  Options = PersistentMemoryOptions
  core = CORE
  replaces_feed_forward = True

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    super().build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n = self.options.persistent_size
    shape = (n, self.num_heads, self.head_dim)
    self.pers_key = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype)
                              / math.sqrt(self.head_dim))
    self.pers_val = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype)
                              / math.sqrt(n))

  @property
  def persistent_size(self) -> int:
    return self.options.persistent_size

  def core_kwargs(self, q, k, v, *, grid):
    return {**super().core_kwargs(q, k, v, grid=grid), "pers_key": self.pers_key[...],
            "pers_val": self.pers_val[...]}

  def flops_kwargs(self, length: int, grid=None):
    return {**super().flops_kwargs(length, grid), "slots": self.persistent_size}


registry.register(
    "persistent_memory", PersistentMemoryAttention,
    description="adaptive-span attention with N learned persistent key/value vectors per "
                "head in the softmax (all-attention, Sukhbaatar et al. 2019b, authors' code)")

__all__ = ["CORE", "PersistentMemoryAttention", "PersistentMemoryOptions", "check_persistent",
           "persistent_seq_attention"]
