"""Pointwise (ReLU and friends) attention, Wortsman et al. 2023 (arXiv 2309.08586).

Eq. 1 of the paper with phi = L^-alpha * h, applied entry by entry:

    alpha_ij = L^-alpha * h(q_i . k_j / sqrt(d)),      o_i = sum_j alpha_ij v_j

with h one of `ACTIVATIONS`. There is no normalisation over keys, so a query's output is a
plain sum over key blocks: a sequence split across devices needs no running max or sum
(the paper's Sec. 1 motivation), and the blockwise path below is just a loop of matmuls.

L is the number of keys each query can see: all keys; with `causal`, its own position + 1;
with a padding mask, the unmasked count; `kv_length` overrides it (e.g. the global length
when k and v are one shard of a longer sequence). alpha = 1 is the paper's relu/seqlen.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from zoo.attention import masking
from zoo.attention.options import nonnegative_number, positive_int
from zoo.attention.pointwise import pallas
from zoo.attention.pointwise.activations import ACTIVATIONS


# None: XLA (dense, or blockwise with block_size); "pallas": the fused Pallas/Triton GPU
# kernel of pallas.py; "pallas_interpret": that kernel in the Pallas interpreter.
IMPLEMENTATIONS = (None, "pallas", "pallas_interpret")


def check_options(activation: str, alpha: float, block_size: int | None,
                  implementation: str | None = None,
                  query_block_size: int | None = None) -> None:
  """Raises ValueError naming the bad option."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
  nonnegative_number("alpha", alpha)
  positive_int("block_size", block_size, allow_none=True)
  positive_int("query_block_size", query_block_size, allow_none=True)
  if query_block_size is not None:
    if block_size is None:
      raise ValueError("query_block_size sets the query tile of the blockwise path: "
                       "give block_size too")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is not None and block_size is not None:
    raise ValueError(f"block_size is for the XLA blockwise path; implementation="
                     f"{implementation!r} uses its own tiles: give one or the other")


def visible_key_counts(mask: jax.Array | None, q_len: int, kv_len: int, *,
                       causal: bool) -> jax.Array:
  """Number of keys each query sees, broadcastable to `[batch, heads, q_len, 1]`.

  Linear memory for the common cases (no mask, causal, key padding masks); a mask that
  varies per query is summed directly.
  """
  q_idx = jnp.arange(q_len)
  if mask is None:
    counts = jnp.minimum(q_idx + 1, kv_len) if causal else jnp.full((q_len,), kv_len)
    return counts.reshape(1, 1, q_len, 1)
  if mask.shape[-2] == 1:  # the same keys for every query: a padding mask
    if causal:
      running = jnp.cumsum(mask, axis=-1, dtype=jnp.int32)  # [B, H, 1, kv_len]
      counts = jnp.take(running, jnp.clip(q_idx, 0, kv_len - 1), axis=-1)
      counts = jnp.where(q_idx < kv_len, counts, running[..., -1:])
      return jnp.moveaxis(counts, -1, -2)
    return jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32)
  full = masking.combine_masks(mask, q_len, kv_len, causal=causal)
  return jnp.sum(full, axis=-1, keepdims=True, dtype=jnp.int32)


def length_scale(mask, q_len, kv_len, *, causal, kv_length, alpha,
                  dtype=jnp.float32) -> jax.Array:
  """L^-alpha (float32, or float64 under x64 inputs), broadcastable to `[batch, heads, q_len, 1]`."""
  if kv_length is None:
    counts = visible_key_counts(mask, q_len, kv_len, causal=causal)
  else:
    counts = jnp.asarray(kv_length)
    counts = counts.reshape((1,) * (3 - counts.ndim) + counts.shape)[..., None]
  counts = jnp.maximum(counts.astype(dtype), 1.0)  # a query that sees nothing outputs 0
  return counts ** (-float(alpha))


# ---------------------------------------------------------------------------------------
# Blockwise path: a loop over tq x tk tiles of the score matrix (tk = block_size, tq from
# `tile_sizes`) with a custom VJP. Memory is O(tq * tk + L * head_dim) per (batch, head),
# linear in length.
#
# Layout choices for XLA:CPU: q, k, v are tiled once to `[tiles, B, H, tile, D]` (batch and
# heads leading, a tile a contiguous slice), so every matmul below is a batched GEMM whose
# left operand contracts over its minor dimension (those go to XLA:CPU's fast dot path; a
# left operand contracting over its major dimension falls back to a slower one). The
# backward pass therefore works on transposed tiles, s^T = k q^T `[.., tile_k, tile_q]`:
# dv = h(s^T) do and dk = ds^T q contract over the minor axis of s^T, and dq^T = k^T ds^T
# uses the pre-transposed keys `[.., D, tile_k]`; dq is accumulated transposed.
#
# Padding: the last tile of q, k, v (and of the cotangent) is padded with zeros. A zero
# value row contributes nothing to the output and a zero key/query row receives and passes
# no gradient, whatever h(0) is, so padding needs no mask. Key-only masks
# (`[.., 1, kv_len]`) are applied the same way, by zeroing the hidden keys and values (and
# their gradients); query-only masks (`[.., q_len, 1]`) by zeroing the hidden queries and
# their outputs. Only a mask that varies along both axes is sliced per tile. Causal runs
# visit only tiles on or below the diagonal and mask just the tiles that straddle it.
# 1/sqrt(d) is folded into q (O(L d)) instead of into every score tile.
#
# Cost: 7 tile GEMMs per tile pair (2 forward, 5 backward: s is recomputed), against 6 for
# a dense path that keeps its scores. Tile shape matters on CPU: XLA:CPU (jax 0.10) runs a
# GEMM on one thread below roughly 2^26 multiply-adds and on all cores above, so square
# 256 x 256 tiles of 8 heads ran on one core; rectangular tiles with a longer query side
# (the automatic query tile) run on both (benchmarks/attention.py, README).


# 2^26 = 8 heads of 512 x 256 tiles at head_dim 64, the smallest that XLA:CPU (jax 0.10,
# XNNPACK dots) spread over both cores of the 2-core test machine: 512 x 128 ran on one.
AUTO_TILE_MACS = 1 << 26


def tile_sizes(block_size, query_block_size, q_len, kv_len, batch_heads, head_dim):
  """(query tile, key tile) of the blockwise path.

  The key tile is `block_size` (at most kv_len). The query tile is `query_block_size` when
  given; by default the smallest power of two, and at least the key tile, for which one
  tile GEMM does AUTO_TILE_MACS multiply-adds (batch * heads * tq * tk * head_dim): XLA:CPU
  runs a GEMM on all cores only from about that size. A score tile then takes about
  4 * AUTO_TILE_MACS / head_dim bytes (4 MiB at head_dim 64), whatever the batch and heads.
  """
  tk = max(1, min(block_size, kv_len))
  if query_block_size is None:
    wanted = -(-AUTO_TILE_MACS // (batch_heads * tk * max(head_dim, 1)))
    tq = 1 << (max(tk, wanted) - 1).bit_length()
  else:
    tq = query_block_size
  return max(1, min(tq, q_len)), tk


def _zero_where_hidden(x, keep):
  return x if keep is None else jnp.where(keep, x, jnp.zeros((), x.dtype))


def _to_tiles(x, num_tiles, tile):
  """`[B, L, H, D]` -> `[num_tiles, B, H, tile, D]`, zero-padded along L."""
  b, length, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, num_tiles * tile - length), (0, 0), (0, 0)))
  return x.reshape(b, num_tiles, tile, h, d).transpose(1, 0, 3, 2, 4)


def _from_tiles(x, length):
  """`[num_tiles, B, H, tile, D]` -> `[B, length, H, D]`."""
  n, b, h, tile, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, n * tile, h, d)[:, :length]


def _tile_mask(general, causal, i, j, tiles, *, transpose=False):
  """Which pairs of (query tile i, key tile j) count, `[.., tq, tk]`; None when all do."""
  tq, tk = tiles
  valid = None
  if causal:  # key position <= query position
    valid = (j * tk + jnp.arange(tk))[None, :] <= (i * tq + jnp.arange(tq))[:, None]
  if general is not None:
    m = jax.lax.dynamic_slice(general, (0, 0, i * tq, j * tk), general.shape[:2] + (tq, tk))
    valid = m if valid is None else valid & m
  if valid is not None and transpose:
    valid = jnp.swapaxes(valid, -1, -2)
  return valid


def _blockwise_setup(q, k, mask, block_size, query_block_size):
  b, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  tq, tk = tile_sizes(block_size, query_block_size, q_len, kv_len, b * heads,
                        q.shape[-1])
  nq, nk = -(-q_len // tq), -(-kv_len // tk)
  key_keep, query_keep, general = masking.split_mask(mask)
  if general is not None:  # padded tiles are hidden
    general = jnp.broadcast_to(general, general.shape[:2] + (q_len, kv_len))
    general = jnp.pad(general, ((0, 0), (0, 0), (0, nq * tq - q_len), (0, nk * tk - kv_len)))
  return (tq, tk), nq, nk, key_keep, query_keep, general


def _causal_key_tiles(i, tiles, nk):
  """Causal, query tile i: key tiles [0, full) are wholly visible, [full, end) partly."""
  tq, tk = tiles
  full = jnp.minimum((i * tq + 1) // tk, nk)
  end = jnp.minimum(((i + 1) * tq - 1) // tk + 1, nk)
  return full, jnp.maximum(end, full)


def _causal_query_tiles(j, tiles, nq):
  """Causal, key tile j: query tiles [start, full) see it partly, [full, nq) wholly."""
  tq, tk = tiles
  start = jnp.minimum((j * tk) // tq, nq)
  full = jnp.minimum(-(-((j + 1) * tk - 1) // tq), nq)
  return start, jnp.maximum(full, start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _blockwise(q, k, v, mask, length_scale, activation, scale, causal, block_size,
               query_block_size):
  return _blockwise_fwd(q, k, v, mask, length_scale, activation, scale, causal, block_size,
                        query_block_size)[0]


def _blockwise_fwd(q, k, v, mask, length_scale, activation, scale, causal, block_size,
                   query_block_size):
  h = ACTIVATIONS[activation]
  b, q_len, heads, _ = q.shape
  kv_len, dv = k.shape[1], v.shape[-1]
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
  if q_len == 0 or kv_len == 0:  # nothing to loop over; a query without keys outputs 0
    return jnp.zeros(q.shape[:3] + (dv,), q.dtype), (q, k, v, mask, length_scale)
  tiles, nq, nk, key_keep, query_keep, general = _blockwise_setup(
      q, k, mask, block_size, query_block_size)
  # 1/sqrt(d) goes into q once (O(L d)) rather than into every score tile, unless that
  # would round q to a narrower dtype.
  prescale = q.dtype == acc_dtype
  qt = _to_tiles(_zero_where_hidden(q * scale if prescale else q, query_keep), nq, tiles[0])
  kt = _to_tiles(_zero_where_hidden(k, key_keep), nk, tiles[1])
  vt = _to_tiles(_zero_where_hidden(v, key_keep), nk, tiles[1])

  def query_tile(_, i):
    qi = qt[i]

    def key_tile(j, acc, masked):
      s = jnp.einsum("bhqd,bhkd->bhqk", qi, kt[j], preferred_element_type=acc_dtype)
      w = h(s if prescale else s * scale)
      valid = _tile_mask(general, causal and masked, i, j, tiles)
      if valid is not None:
        w = jnp.where(valid, w, 0.0)
      return acc + jnp.einsum("bhqk,bhkd->bhqd", w.astype(v.dtype), vt[j],
                              preferred_element_type=acc_dtype)

    acc = jnp.zeros((b, heads, tiles[0], dv), acc_dtype)
    if not causal:
      return None, jax.lax.fori_loop(0, nk, lambda j, c: key_tile(j, c, False), acc)
    # Causal: key tiles wholly at or before the tile's first query unmasked, the ones
    # straddling the diagonal masked, later ones skipped.
    full, end = _causal_key_tiles(i, tiles, nk)
    acc = jax.lax.fori_loop(0, full, lambda j, c: key_tile(j, c, False), acc)
    return None, jax.lax.fori_loop(full, end, lambda j, c: key_tile(j, c, True), acc)

  _, out = jax.lax.scan(query_tile, None, jnp.arange(nq))
  out = _from_tiles(out, q_len) * jnp.swapaxes(length_scale, 1, 2).astype(acc_dtype)
  out = _zero_where_hidden(out, query_keep)
  return out.astype(q.dtype), (q, k, v, mask, length_scale)


def _blockwise_bwd(activation, scale, causal, block_size, query_block_size, residuals, g):
  q, k, v, mask, length_scale = residuals
  h = ACTIVATIONS[activation]
  b, q_len, heads, d = q.shape
  kv_len, dv_dim = k.shape[1], v.shape[-1]
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
  if q_len == 0 or kv_len == 0:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None, None
  tiles, nq, nk, key_keep, query_keep, general = _blockwise_setup(
      q, k, mask, block_size, query_block_size)
  tq, tk = tiles
  # dL/d(sum_j h(s_ij) v_j): the cotangent times L^-alpha; zero for hidden queries.
  g = g.astype(acc_dtype) * jnp.swapaxes(length_scale, 1, 2).astype(acc_dtype)
  gt = _to_tiles(_zero_where_hidden(g, query_keep), nq, tq)
  # Scores from the scaled queries q~ = q / sqrt(d): ds/dk = q~, and dq = ds k / sqrt(d).
  qt = _to_tiles(_zero_where_hidden(q, query_keep).astype(acc_dtype) * scale, nq, tq)
  kt = _to_tiles(_zero_where_hidden(k, key_keep).astype(acc_dtype), nk, tk)
  vt = _to_tiles(_zero_where_hidden(v, key_keep).astype(acc_dtype), nk, tk)
  ktt = jnp.swapaxes(kt, -1, -2)  # [nk, B, H, D, tk]: left operand of dq^T = k^T ds^T

  def key_tile(dqt, j):
    kj, vj, kjt = kt[j], vt[j], ktt[j]

    def query_tile(i, carry, masked):
      dk, dv, dqt = carry
      qi, gi = qt[i], gt[i]
      st = jnp.einsum("bhkd,bhqd->bhkq", kj, qi, preferred_element_type=acc_dtype)
      dpt = jnp.einsum("bhkd,bhqd->bhkq", vj, gi, preferred_element_type=acc_dtype)
      ht, dht = jax.jvp(h, (st,), (jnp.ones_like(st),))  # h and h' in one pass
      dst = dpt * dht
      valid = _tile_mask(general, causal and masked, i, j, tiles, transpose=True)
      if valid is not None:
        ht, dst = jnp.where(valid, ht, 0.0), jnp.where(valid, dst, 0.0)
      dv = dv + jnp.einsum("bhkq,bhqd->bhkd", ht, gi, preferred_element_type=acc_dtype)
      dk = dk + jnp.einsum("bhkq,bhqd->bhkd", dst, qi, preferred_element_type=acc_dtype)
      dq_i = jnp.einsum("bhdk,bhkq->bhdq", kjt, dst, preferred_element_type=acc_dtype)
      return dk, dv, dqt.at[i].add(dq_i)

    carry = (jnp.zeros((b, heads, tk, d), acc_dtype),
             jnp.zeros((b, heads, tk, dv_dim), acc_dtype), dqt)
    if causal:
      # Query tiles straddling the diagonal see key tile j in part (masked), later ones
      # wholly, earlier ones not at all. Key tiles past the last query (kv_len > q_len)
      # are seen by no query: both loops are then empty.
      start, full = _causal_query_tiles(j, tiles, nq)
      carry = jax.lax.fori_loop(start, full, lambda i, c: query_tile(i, c, True), carry)
      carry = jax.lax.fori_loop(full, nq, lambda i, c: query_tile(i, c, False), carry)
    else:
      carry = jax.lax.fori_loop(0, nq, lambda i, c: query_tile(i, c, False), carry)
    dk, dv, dqt = carry
    return dqt, (dk, dv)

  dqt0 = jnp.zeros((nq, b, heads, d, tq), acc_dtype)
  dqt, (dk, dv) = jax.lax.scan(key_tile, dqt0, jnp.arange(nk))
  dq = _zero_where_hidden(_from_tiles(jnp.swapaxes(dqt, -1, -2), q_len) * scale, query_keep)
  dk = _zero_where_hidden(_from_tiles(dk, kv_len), key_keep)
  dv = _zero_where_hidden(_from_tiles(dv, kv_len), key_keep)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def pointwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        activation: str = "relu", alpha: float = 1.0, causal: bool = False,
                        mask: jax.Array | None = None, kv_length=None,
                        block_size: int | None = None,
                        query_block_size: int | None = None,
                        implementation: str | None = None) -> jax.Array:
  """o_i = L^-alpha * sum_j h(q_i . k_j / sqrt(d)) v_j  (Wortsman et al. 2023, Eq. 1).

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, heads, head_dim]`.
    activation: h, one of relu, relu2, gelu (tanh form), softplus, identity, relu6, sigmoid.
    alpha: the sequence-length exponent (1.0 is relu/seqlen, 0.0 no scaling).
    causal: query i sees keys j <= i; L is then i + 1.
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True = attend. L
      counts the keys a query sees after masking.
    kv_length: overrides L; a number or an array broadcastable to `[batch, heads, q_len]`
      (the global key count when k, v are one shard of a longer sequence).
    block_size: None for the dense O(q_len * kv_len) path; an int for the memory-efficient
      path that loops over key blocks of that size with a custom VJP (forward and backward
      memory linear in length). Any kv_len works: the last block is padded and masked.
    query_block_size: the query tile of that path; None picks one large enough for
      XLA:CPU to run each tile GEMM on all cores (`tile_sizes`). Memory is
      O(query_block_size * block_size) per (batch, head) plus O(length * head_dim).
    implementation: None for the XLA paths above; "pallas" for the fused Pallas (Triton)
      GPU kernel (`pallas.py`; float32/bfloat16/float16; a ValueError off the GPU,
      and for masks that vary along both the query and the key axis); "pallas_interpret"
      for that kernel in the Pallas interpreter (any backend, slow: for tests).

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype; accumulation is in float32 (float64
    for float64 inputs).
  """
  check_options(activation, alpha, block_size, implementation, query_block_size)
  masking.check_qkv(q, k, v)
  mask = masking.check_mask(mask, q, k)
  q_len, kv_len = q.shape[1], k.shape[1]
  scale = 1.0 / math.sqrt(q.shape[-1])
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
  scale_l = length_scale(mask, q_len, kv_len, causal=causal, kv_length=kv_length,
                               alpha=alpha, dtype=acc_dtype)
  if implementation is not None:
    return pallas.pointwise_attention_pallas(
        q, k, v, scale_l, activation=activation, scale=scale, causal=causal, mask=mask,
        interpret=implementation == "pallas_interpret")
  if block_size is not None:
    return _blockwise(q, k, v, mask, scale_l, activation, scale, causal, block_size,
                      query_block_size)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc_dtype) * scale
  w = ACTIVATIONS[activation](s)
  full_mask = masking.combine_masks(mask, q_len, kv_len, causal=causal)
  if full_mask is not None:
    w = jnp.where(full_mask, w, 0.0)
  out = jnp.einsum("bhqk,bkhd->bhqd", w.astype(v.dtype), v, preferred_element_type=acc_dtype)
  return (out * scale_l).astype(q.dtype).transpose(0, 2, 1, 3)
