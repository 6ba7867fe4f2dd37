"""Sequence-parallel adaptive span and persistent memory: the `halo` strategy.

Registered with `zoo.parallel.sequence.register` for the cores `adaptive_span`
(`zoo.attention.adaptive_span.seq_attention`) and `persistent_memory`
(`zoo.attention.persistent.persistent_seq_attention`): the same code path, the persistent
slots (`pers_key`, `pers_val`) replicated on every shard like `key_pe` and the spans.

    zoo.parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, kind="adaptive_span", strategy="halo", causal=True,
        key_pe=key_pe, span=span, ramp=32, trim_len=trim,          # the core's options
        k_cache=k_cache, v_cache=v_cache)                          # optional

Semantics (what it equals, in values and gradients, including those of `span`, `key_pe`,
the persistent slots and the cache): q, k, v `[B, L, H, D]` are one block of L tokens
(the authors' block of M = L queries), sharded along L over the mesh's `seq` axis;
`k_cache`, `v_cache` `[B, C, H, D]` are the keys and values of the C tokens before the
block (projected from the layer's cached inputs, most recent last), or None for the
authors' all-zero first cache. The result is the single-device core on
cat(cache, block):

    seq_attention(q, cat(k_cache, k), cat(v_cache, v), key_pe, span=..., trim_len=...)

Each query sees the W = S - trim_len positions before it (distances W..1; the current
token is excluded, as in the authors' code), so with c = L / n tokens per shard, shard i
needs the W keys and values before position i c: they come from the previous
ceil(W / c) shards (one `ppermute` per distance t, shard i - t -> shard i, sending only
the rows needed; no wrap-around) and, where the window reaches before the block, from
the cache. The cache is replicated (its last W rows: a C < W cache is zero-padded in
front as by the core), so each shard slices its own part. Then every shard runs the core
on its c queries against W + c keys: cost per shard c (W + chunk) logits, communication
W rows of k and v per shard. Trimming is what makes this cheap: W follows the span, not
S. `trim_len` must be static (a Python int), as for the core.

Attention dropout (`attn_dropout_rate` with `dropout_key`) draws each shard's mask from
the key folded with the shard index: statistically the same dropout as single-device,
not the same random numbers. `layout` must be natural; `causal` must be True.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.attention import adaptive_span as span_lib
from zoo.attention import persistent as pers_lib
from zoo.parallel import sequence


def _dropout(rate: float, key):
  if not rate or key is None:
    return None
  key = jax.random.fold_in(key, jax.lax.axis_index("seq"))

  def drop(w):
    nonlocal key
    key, sub = jax.random.split(key)
    keep = jax.random.bernoulli(sub, 1.0 - rate, w.shape)
    return jnp.where(keep, w / (1.0 - rate), 0.0).astype(w.dtype)

  return drop


def _cache_tail(cache, like, window_len: int):
  """The last `window_len` rows of the cache `[B, C, H, D]`, zero-padded in front."""
  if cache is None:
    return jnp.zeros(like.shape[:1] + (window_len,) + like.shape[2:], like.dtype)
  if cache.ndim != 4 or cache.shape[0] != like.shape[0] or cache.shape[2:] != like.shape[2:]:
    raise ValueError(f"k_cache / v_cache must be [batch, C, heads, head_dim] matching k "
                     f"{like.shape}, got {cache.shape}")
  cache = cache.astype(like.dtype)
  c = cache.shape[1]
  if c >= window_len:
    return cache[:, c - window_len:]
  return jnp.pad(cache, ((0, 0), (window_len - c, 0), (0, 0), (0, 0)))


def halo_window(x, cache_tail, *, num_shards: int, window_len: int):
  """Inside `shard_map`: the `window_len` rows before this shard's block, `[B, W, H, D]`.

  x: this shard's block `[B, c, H, D]`; cache_tail: the replicated `[B, W, H, D]` rows
  before the whole sequence. Rows from earlier shards arrive by `ppermute` (shard i - t
  sends to shard i; shards with i - t < 0 receive zeros, filled from the cache).
  """
  n, c, w = num_shards, x.shape[1], window_len
  shard = jax.lax.axis_index("seq")
  hops = -(-w // c)  # shards' worth of rows behind the block
  parts = []
  for t in range(hops, 0, -1):  # farthest first
    rows = w - (hops - 1) * c if t == hops else c  # only what the window needs
    if t >= n:  # no shard that far back: all from the cache
      parts.append(jnp.zeros(x.shape[:1] + (rows,) + x.shape[2:], x.dtype))
      continue
    parts.append(jax.lax.ppermute(x[:, c - rows:], "seq", [(i, i + t) for i in range(n - t)]))
  from_shards = jnp.concatenate(parts, axis=1)  # positions shard*c - w .. shard*c - 1
  # Positions p < 0 come from the cache: cache_tail[p + w] = padded[shard*c + j].
  padded = jnp.concatenate([cache_tail, jnp.zeros_like(cache_tail)], axis=1)
  start = jnp.minimum(shard * c, w)
  from_cache = jax.lax.dynamic_slice_in_dim(padded, start, w, axis=1)
  return from_shards + from_cache


def _halo(q, k, v, *, mesh, causal, layout, key_pe, span=None, ramp=None, trim_len=0,
          eps=span_lib.RENORM_EPS, pers_key=None, pers_val=None, k_cache=None, v_cache=None,
          attn_dropout_rate=0.0, dropout_key=None, query_chunk=None, persistent=False):
  if not causal:
    raise ValueError("adaptive-span attention is causal-only: pass causal=True")
  if layout != "natural":
    raise ValueError(f"the halo strategy takes the natural token order, got layout={layout!r}")
  if persistent and (pers_key is None or pers_val is None):
    raise ValueError("persistent_memory needs pers_key and pers_val")
  if (k_cache is None) != (v_cache is None):
    raise ValueError("pass both k_cache and v_cache, or neither")
  n = mesh.shape["seq"]
  max_span, key_pe = span_lib.check_inputs(q, k, v, key_pe)
  span_lib.check_span(span, ramp, q.shape[2])
  if not isinstance(trim_len, int) or not 0 <= trim_len < max_span:
    raise ValueError(f"trim_len must be a static int in [0, S - 1] = [0, {max_span - 1}], "
                     f"got {trim_len!r}")
  w = max_span - trim_len
  k_tail, v_tail = _cache_tail(k_cache, k, w), _cache_tail(v_cache, v, w)
  spec = sequence.qkv_spec(mesh)
  rep4 = P(sequence.batch_axes(mesh), None, None, None)
  params = {"key_pe": key_pe, "span": span, "pers_key": pers_key, "pers_val": pers_val,
            "dropout_key": dropout_key}
  params = {name: x for name, x in params.items() if x is not None}

  def local(q, k, v, k_tail, v_tail, params):
    k_ext = jnp.concatenate([halo_window(k, k_tail, num_shards=n, window_len=w), k], axis=1)
    v_ext = jnp.concatenate([halo_window(v, v_tail, num_shards=n, window_len=w), v], axis=1)
    common = dict(span=params.get("span"), ramp=ramp, trim_len=trim_len, eps=eps,
                  attn_dropout=_dropout(attn_dropout_rate, params.get("dropout_key")),
                  query_chunk=query_chunk)
    if persistent:
      return pers_lib.persistent_seq_attention(q, k_ext, v_ext, params["key_pe"],
                                               params["pers_key"], params["pers_val"], **common)
    return span_lib.seq_attention(q, k_ext, v_ext, params["key_pe"], **common)

  param_specs = jax.tree.map(lambda _: P(), params)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, rep4, rep4, param_specs),
                       out_specs=spec, check_vma=False)(q, k, v, k_tail, v_tail, params)


def _reference(q, k, v, *, key_pe, k_cache=None, v_cache=None, persistent=False, **options):
  """The single-device equivalent of the halo strategy (for tests and checks)."""
  if k_cache is not None:
    k, v = jnp.concatenate([k_cache, k], axis=1), jnp.concatenate([v_cache, v], axis=1)
  if persistent:
    return pers_lib.persistent_seq_attention(q, k, v, key_pe, **options)
  return span_lib.seq_attention(q, k, v, key_pe, **options)


sequence.register("adaptive_span", "halo", functools.partial(_halo, persistent=False))
sequence.register("persistent_memory", "halo", functools.partial(_halo, persistent=True))
