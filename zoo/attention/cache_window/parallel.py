"""Window attention over cat(cache, block) split along the block: the `halo` strategy.

`halo(window_fn)` builds the strategy of any window core (`core.softmax_window`,
`core.pointwise_window`, `adaptive_span.seq_attention`, `persistent.persistent_seq_attention`):

    zoo.attention.sequence_parallel_attention(
        q, k, v, mesh=mesh, kind="adaptive_span", strategy="halo", causal=True,
        key_pe=key_pe, span=span, ramp=32, trim_len=trim,          # the core's options
        k_cache=k_cache, v_cache=v_cache)                          # optional

Semantics (what it equals, in values and gradients, including those of `key_pe`, the
spans, the persistent slots and the cache): q, k, v `[B, L, H, D]` are one block of L
tokens (the authors' block of M = L queries), sharded along L over the mesh's `seq` axis;
`k_cache`, `v_cache` `[B, C, H, D]` are the keys and values of the C tokens before the
block (projected from the layer's cached inputs, most recent last), or None for the
authors' all-zero first cache. The result is the single-device core on cat(cache, block):

    window_fn(q, cat(k_cache, k), cat(v_cache, v), key_pe, trim_len=..., **options)

Each query sees the W = S - trim_len positions before it (distances W..1; the current
token is excluded, as in the authors' code), so with c = L / n tokens per shard, shard i
needs the W keys and values before position i c: `zoo.parallel.sequence.preceding_rows`
brings them from the previous ceil(W / c) shards (one `ppermute` per distance, only the
rows needed, no wrap-around) and, where the window reaches before the block, from the
cache. The cache is replicated (its last W rows; a C < W cache is zero-padded in front as
by the core), so each shard slices its own part. Then every shard runs the core on its c
queries against W + c keys: cost per shard c (W + chunk) logits, communication W rows of
k and v per shard. Trimming is what makes this cheap: W follows the span, not S.
`trim_len` must be static (a Python int), as for the core.

Array-valued options (`span`, `pers_key`, `pers_val`) are replicated on every shard like
`key_pe`; the others (`ramp`, `activation`, ...) are static. Attention dropout
(`attn_dropout_rate` with `dropout_key`) draws each shard's mask from the key folded with
the shard index: statistically the same dropout as single-device, not the same random
numbers. `layout` must be natural; `causal` must be True.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zoo.attention.cache_window.core import check_inputs, check_trim_len
from zoo.parallel import sequence as seq_lib


def shard_dropout(rate: float, key):
  """Inside `shard_map`: dropout of the weights with a key folded with the shard index
  (each call draws a fresh subkey); None when off."""
  if not rate or key is None:
    return None
  key = jax.random.fold_in(key, jax.lax.axis_index(seq_lib.AXIS))

  def drop(w):
    nonlocal key
    key, sub = jax.random.split(key)
    keep = jax.random.bernoulli(sub, 1.0 - rate, w.shape)
    return jnp.where(keep, w / (1.0 - rate), 0.0).astype(w.dtype)

  return drop


def cache_tail(cache, like, window_len: int):
  """The last `window_len` rows of the cache `[B, C, H, D]`, zero-padded in front; None
  stays None (an all-zero cache)."""
  if cache is None:
    return None
  if cache.ndim != 4 or cache.shape[0] != like.shape[0] or cache.shape[2:] != like.shape[2:]:
    raise ValueError(f"k_cache / v_cache must be [batch, C, heads, head_dim] matching k "
                     f"{like.shape}, got {cache.shape}")
  cache = cache.astype(like.dtype)
  c = cache.shape[1]
  if c >= window_len:
    return cache[:, c - window_len:]
  return jnp.pad(cache, ((0, 0), (window_len - c, 0), (0, 0), (0, 0)))


def check_cache_args(causal: bool, k_cache, v_cache) -> None:
  if not causal:
    raise ValueError("attention over a cache window is causal-only: pass causal=True")
  if (k_cache is None) != (v_cache is None):
    raise ValueError("pass both k_cache and v_cache, or neither")


def halo(window_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """The `halo` strategy of the window core `window_fn(q, k, v, key_pe, *, trim_len,
  attn_dropout, **options)` (see the module docstring)."""

  def strategy(q, k, v, *, mesh, causal, layout, key_pe, trim_len=0, k_cache=None,
               v_cache=None, attn_dropout_rate=0.0, dropout_key=None, **options):
    check_cache_args(causal, k_cache, v_cache)
    if layout != "natural":
      raise ValueError(f"the halo strategy takes the natural token order, got "
                       f"layout={layout!r}")
    n = mesh.shape[seq_lib.AXIS]
    max_span, key_pe = check_inputs(q, k, v, key_pe)
    w = max_span - check_trim_len(trim_len, max_span)
    tails = {"k": cache_tail(k_cache, k, w), "v": cache_tail(v_cache, v, w)}
    tails = {name: x for name, x in tails.items() if x is not None}
    is_array = lambda x: isinstance(x, (jax.Array, np.ndarray))
    static = {name: x for name, x in options.items() if not is_array(x)}
    arrays = {name: x for name, x in options.items() if is_array(x)}
    arrays["key_pe"] = key_pe
    if attn_dropout_rate and dropout_key is not None:
      arrays["dropout_key"] = dropout_key
    spec = seq_lib.length_spec(mesh)
    rep4 = P(seq_lib.batch_axes(mesh), None, None, None)

    def local(q, k, v, tails, arrays):
      arrays = dict(arrays)
      k_ext = jnp.concatenate([seq_lib.preceding_rows(k, w, n, tails.get("k")), k], axis=1)
      v_ext = jnp.concatenate([seq_lib.preceding_rows(v, w, n, tails.get("v")), v], axis=1)
      drop = shard_dropout(attn_dropout_rate, arrays.pop("dropout_key", None))
      return window_fn(q, k_ext, v_ext, arrays.pop("key_pe"), trim_len=trim_len,
                       attn_dropout=drop, **arrays, **static)

    return jax.shard_map(
        local, mesh=mesh, out_specs=spec, check_vma=False,
        in_specs=(spec, spec, spec, jax.tree.map(lambda _: rep4, tails),
                  jax.tree.map(lambda _: P(), arrays)))(q, k, v, tails, arrays)

  return strategy
