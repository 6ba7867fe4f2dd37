"""AFT split along the sequence (Zhai et al. 2021): every variant over the mesh's `seq` axis.

The strategies take the cores' arrays, `[batch, length, dim]` (sharded or not; length over
`seq`, batch over `data`/`fsdp`), plus the cores' options (`pos_bias` `[L, L]`, `window`,
`kernel`, `grid`), and equal the single-device cores in values and gradients. They are
built from the generic blocks of `zoo.parallel.sequence` (`length_spec`, `halo_exchange`,
`ring_loop`) and declared per variant in `STRATEGIES`.

Everything is a sum over keys of exp(K_t' + b_t,t') V_t' and exp(K_t' + b_t,t') (Eq. 2), so
shards exchange partial sums kept as log-space triples (m, num, den) with sum exp(s) V =
exp(m) num (`zoo.attention.logspace`; m never carries a gradient). Merging two triples
rescales to the larger m, so no shard's sums overflow or underflow because of another's.

* `halo` (`aft_local`, `aft_conv` 1-D and 2-D, `aft_simple`): a query's biased keys lie
  within a band of offsets [-hl, hr] (local: |t - t'| < window, Eq. 4; conv: the filter's
  taps, Eq. 6, in 2-D the band of rows it spans); every other key has bias 0. Each shard
  receives the hl keys before it and the hr after it from its neighbours
  (`halo_exchange`) and sums the band exactly (max over the band, per query and feature).
  The far keys (bias 0) are running sums: a scan over the shard's extended block, plus the
  other shards' totals (one `all_gather` of a triple per shard) and the neighbours' partial
  sums beyond the halo. Cost per shard O(c * (hl + hr + 1) * d) with c = L / n; needs
  hl, hr <= c.
* AFT-simple (Eq. 5) has no position bias: each shard sends only its totals (non-causal:
  the merged totals of all shards; causal: the exclusive prefix over earlier shards, merged
  with a local running scan). `all_gather`, `ring` and `halo` all run this exchange (k and
  v never move), so any configured strategy works.
* `ring` (`aft_full`, and `aft_local` / `aft_conv` through their dense bias): key/value
  blocks travel round the ring (`ring_loop`); each shard holds its rows of the bias and
  slices the matching columns of the block that arrived, and keeps a running triple per
  (query, feature), as online softmax. Block sums use the shift of the single-device fast
  path (the block's per-feature max of K plus the row max of the bias), an upper bound of
  the exact max: a block whose K or bias spans more than ~80 (float32) can underflow, and
  there is no exact fallback here (the halo strategy is exact at any scale). Causal rings
  are not load-balanced (no zigzag): shards skip nothing, later key blocks are masked.
  Gradients by autodiff through the loop (residual memory O(L) per device).
* `all_gather`: keys and values gathered, local queries, one block as in the ring.
* `gspmd`: the single-device core with sharding constraints on its inputs and output; the
  partitioner decides the collectives (it may gather whole arrays).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zoo.attention import logspace
from zoo.attention.aft.common import compute_dtype, gate
from zoo.attention.aft.conv import (band_triple, check_kernel, conv_attention, conv_band,
                                    conv_tap_index, far_triples, tap_bias)
from zoo.attention.aft.full_local import full_attention, local_attention, local_bias
from zoo.attention.aft.simple import simple_attention
from zoo.parallel import sequence as seq_lib

_sg = jax.lax.stop_gradient
AXIS = seq_lib.AXIS


# ----------------------------------------------------------------------------- helpers

def _check_layout(layout: str) -> None:
  if layout != "natural":
    raise ValueError("AFT sequence-parallel strategies take the natural token order "
                     f"(layout='natural'), got layout={layout!r}")


def _heads(q, k, v, heads: int):
  """[B, L, dim] -> q, v [B, L, H, dim / H], k [B, L, H, kdim / H], in the compute dtype."""
  dt = compute_dtype(q, k, v)
  b, length, _ = q.shape
  return tuple(x.astype(dt).reshape(b, length, heads, -1) for x in (q, k, v))


def _output(q, num, den, like):
  """sigmoid(Q) * num / den (0 where nothing is seen), back to `[B, L, dim]`."""
  return gate(q, num, den).reshape(like.shape).astype(like.dtype)


def _leaves(k, v):
  return logspace.leaves(k, v, jnp.ones((), bool))


def _gather_totals(total):
  """Every shard's total triple, `[n, ...]`."""
  return tuple(jax.lax.all_gather(x, AXIS) for x in total)


def _shards_where(totals, keep):
  """Merge of the gathered totals of the shards s with keep[s]."""
  keep = keep.reshape((-1,) + (1,) * (totals[0].ndim - 1))
  return logspace.reduce(logspace.select(keep, totals), axis=0)


# ----------------------------------------------------------------------------- AFT-simple

def _simple_sums(q, k, v, *, mesh, causal):
  """AFT-simple in head layout: only per-shard summaries cross shards."""
  n = mesh.shape[AXIS]

  def local(q, k, v):
    shard = jax.lax.axis_index(AXIS)
    leaves = _leaves(k, v)
    totals = _gather_totals(logspace.reduce(leaves, axis=1))  # [n, B, H, c]
    if not causal:
      _, num, den = _shards_where(totals, jnp.ones((n,), bool))
      return jnp.broadcast_to(num[:, None], v.shape), jnp.broadcast_to(den[:, None], k.shape)
    before = _shards_where(totals, jnp.arange(n) < shard)  # the exclusive prefix over shards
    before = tuple(x[:, None] for x in before)
    _, num, den = logspace.merge(before, logspace.scan(leaves, axis=1))
    return num, den

  spec = seq_lib.length_spec(mesh, 4)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec),
                       check_vma=False)(q, k, v)


def _simple(q, k, v, *, mesh, causal, layout):
  _check_layout(layout)
  qh, kh, vh = _heads(q, k, v, 1)
  num, den = _simple_sums(qh, kh, vh, mesh=mesh, causal=causal)
  return _output(qh, num, den, q)


# ----------------------------------------------------------------------------- halo

def _halo_sums(q, k, v, band_bias, *, mesh, causal, lo, hi):
  """Banded AFT: keys at offsets lo..hi from the query carry `band_bias`, others bias 0.

  q, v `[B, L, H, dh]`, k `[B, L, H, kc]`, band_bias `[L, hi - lo + 1, H]` (the bias of key
  t + lo + j for query t; entries for keys outside [0, L) are ignored). Causal needs hi <= 0.
  Returns (num, den) of the triple for every query, sharded as q.
  """
  n = mesh.shape[AXIS]
  length = q.shape[1]
  c = length // n
  hl, hr = -lo, hi
  nb = hl + hr + 1
  if hl > c or hr > c:
    raise ValueError(f"the halo strategy needs the band of biased keys ({hl} before, {hr} "
                     f"after each query) to fit in one neighbour's block of {c} tokens "
                     f"(length {length} over {n} shards); use fewer shards, or the ring or "
                     f"all_gather strategy")

  def local(k, v, bias):
    shard = jax.lax.axis_index(AXIS)
    # The extended block: hl keys from the left neighbour, ours, hr from the right one.
    kc = k.shape[-1]
    ext = seq_lib.halo_exchange(jnp.concatenate([k, v], axis=-1), hl, hr, n)
    ek, ev = ext[..., :kc], ext[..., kc:]
    pos = shard * c - hl + jnp.arange(c + hl + hr)  # global positions of the block
    real = (pos >= 0) & (pos < length)

    # The band, exact (max over its keys per query, head and channel); the far keys (bias
    # 0): running sums over the extended block, plus the other shards' partial sums.
    band = band_triple(ek, ev, real[None], bias, c)
    left, right = far_triples(logspace.select(real[None, :, None, None], _leaves(ek, ev)),
                              nb, c, causal)
    own = _leaves(k, v)
    totals = _gather_totals(logspace.reduce(own, axis=1))  # [n, B, H, c]
    # Before the block: shards < shard - 1 whole, and the left neighbour's first c - hl.
    left_part = seq_lib.from_neighbour(logspace.reduce_range(own, 0, c - hl), before=True,
                                       num_shards=n)
    before = logspace.merge(_shards_where(totals, jnp.arange(n) < shard - 1),
                            logspace.select(shard > 0, left_part))
    far = logspace.merge(left, tuple(x[:, None] for x in before))
    if not causal:  # after the block: the right neighbour's last c - hr, shards > shard + 1
      right_part = seq_lib.from_neighbour(logspace.reduce_range(own, hr, c), before=False,
                                          num_shards=n)
      after = logspace.merge(_shards_where(totals, jnp.arange(n) > shard + 1),
                             logspace.select(shard < n - 1, right_part))
      far = logspace.merge(far, right, tuple(x[:, None] for x in after))
    _, num, den = logspace.merge(band, far)
    return num, den

  spec = seq_lib.length_spec(mesh, 4)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(AXIS, None, None)),
                       out_specs=(spec, spec), check_vma=False)(k, v, band_bias)


def _band_index(length: int, lo: int, hi: int) -> np.ndarray:
  """`[L, hi - lo + 1]` key positions t + lo + j, clipped into [0, L)."""
  return np.clip(np.arange(length)[:, None] + np.arange(lo, hi + 1)[None, :], 0, length - 1)


def _check_pos_bias(pos_bias, length: int) -> None:
  if pos_bias.shape != (length, length):
    raise ValueError(f"pos_bias must be [length, length] = {(length, length)}, got "
                     f"{pos_bias.shape}")


def _local_halo(q, k, v, *, mesh, causal, layout, pos_bias, window, block_size=None):
  del block_size
  _check_layout(layout)
  length = q.shape[1]
  lo, hi = -(window - 1), (0 if causal else window - 1)
  lo, hi = max(lo, -(length - 1)), min(hi, length - 1)
  _check_pos_bias(pos_bias, length)
  qh, kh, vh = _heads(q, k, v, 1)
  band = jnp.take_along_axis(pos_bias.astype(qh.dtype), jnp.asarray(_band_index(length, lo, hi)),
                             axis=1)[:, :, None]
  num, den = _halo_sums(qh, kh, vh, band, mesh=mesh, causal=causal, lo=lo, hi=hi)
  return _output(qh, num, den, q)


def _check_conv(q, k, kernel, causal, grid):
  grid = None if grid is None else tuple(int(g) for g in grid)
  check_kernel(kernel.shape, q.shape[2], k.shape[2], causal=causal, length=q.shape[1],
               grid=grid)
  return grid


def _conv_halo(q, k, v, *, mesh, causal, layout, kernel, grid=None):
  _check_layout(layout)
  grid = _check_conv(q, k, kernel, causal, grid)
  qh, kh, vh = _heads(q, k, v, kernel.shape[0])
  lo, hi, band = conv_band(kernel.astype(qh.dtype), q.shape[1], grid, causal)
  num, den = _halo_sums(qh, kh, vh, band, mesh=mesh, causal=causal, lo=lo, hi=hi)
  return _output(qh, num, den, q)


# ----------------------------------------------------------------------------- ring, all-gather

def _block(k, v, bias, vis):
  """Triple of one key block for every query: k `[B, Tk, H, kc]`, v `[B, Tk, H, dh]`,
  bias `[H, Tq, Tk]`, vis `[Tq, Tk]` boolean or None (all visible)."""
  mk = jnp.max(_sg(k), axis=1, keepdims=True)  # [B, 1, H, kc]
  ek = jnp.exp(k - mk)
  if vis is None:
    mw = jnp.max(_sg(bias), axis=-1, keepdims=True)
    eb = jnp.exp(bias - mw)
    seen = jnp.ones(bias.shape[1], bool)
  else:
    mw = logspace.finite_or_zero(
        jnp.max(jnp.where(vis, _sg(bias), -jnp.inf), axis=-1, keepdims=True))
    eb = logspace.masked_exp(bias - mw, vis)
    seen = jnp.any(vis, axis=-1)
  num = jnp.einsum("hqk,bkhd->bqhd", eb, ek * v, precision=jax.lax.Precision.HIGHEST)
  den = jnp.einsum("hqk,bkhd->bqhd", eb, ek, precision=jax.lax.Precision.HIGHEST)
  m = mk + jnp.transpose(mw, (1, 0, 2))[None]  # [B, Tq, H, kc]
  return jnp.where(seen[None, :, None, None], m, -jnp.inf), num, den


def _dense_sums(q, k, v, bias, *, mesh, causal, strategy):
  """Ring or all-gather sums with a dense bias `[H, L, L]` (rows sharded with the queries)."""
  n = mesh.shape[AXIS]
  spec = seq_lib.length_spec(mesh, 4)

  def ring(q, k, v, bias):
    shard, c = jax.lax.axis_index(AXIS), q.shape[1]

    def step(src, acc, blocks):
      kb, vb = blocks
      cols = jax.lax.dynamic_slice_in_dim(bias, src * c, c, axis=2)
      vis = seq_lib.causal_block_mask(c, c, shard * c, src * c) if causal else None
      return logspace.merge(acc, _block(kb, vb, cols, vis)), blocks

    m0 = jnp.zeros(q.shape[:3] + k.shape[3:], q.dtype)
    acc, _ = seq_lib.ring_loop(step, logspace.empty(m0, q), (k, v), n)
    return acc[1], acc[2]

  def gathered(q, k, v, bias):
    shard, c = jax.lax.axis_index(AXIS), q.shape[1]
    k_all = jax.lax.all_gather(k, AXIS, axis=1, tiled=True)
    v_all = jax.lax.all_gather(v, AXIS, axis=1, tiled=True)
    vis = seq_lib.causal_block_mask(c, k_all.shape[1], shard * c) if causal else None
    _, num, den = _block(k_all, v_all, bias, vis)
    return num, den

  fn = ring if strategy == "ring" else gathered
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(None, AXIS, None)),
                       out_specs=(spec, spec), check_vma=False)(q, k, v, bias)


def _full_dense(q, k, v, *, mesh, causal, layout, strategy, pos_bias, window=None,
                block_size=None):
  del block_size
  _check_layout(layout)
  _check_pos_bias(pos_bias, q.shape[1])
  qh, kh, vh = _heads(q, k, v, 1)
  w = pos_bias.astype(qh.dtype)
  if window is not None:
    w = local_bias(w, window)
  num, den = _dense_sums(qh, kh, vh, w[None], mesh=mesh, causal=causal, strategy=strategy)
  return _output(qh, num, den, q)


def _conv_dense(q, k, v, *, mesh, causal, layout, strategy, kernel, grid=None):
  _check_layout(layout)
  grid = _check_conv(q, k, kernel, causal, grid)
  qh, kh, vh = _heads(q, k, v, kernel.shape[0])
  bias = tap_bias(kernel.astype(qh.dtype),
                  conv_tap_index(kernel.shape, q.shape[1], grid, causal))
  num, den = _dense_sums(qh, kh, vh, bias, mesh=mesh, causal=causal, strategy=strategy)
  return _output(qh, num, den, q)


# ----------------------------------------------------------------------------- gspmd

def _gspmd(core_fn, q, k, v, *, mesh, causal, layout, **options):
  """The single-device core under sharding constraints (length over `seq`)."""
  _check_layout(layout)
  spec = seq_lib.length_spec(mesh, 3)
  q, k, v = (seq_lib.constrain_spec(x, mesh, spec) for x in (q, k, v))
  return seq_lib.constrain_spec(core_fn(q, k, v, causal=causal, mask=None, **options), mesh,
                                spec)


# ----------------------------------------------------------------------------- per variant

def _dense(fn, strategy):
  return functools.partial(fn, strategy=strategy)


STRATEGIES = {
    "aft_full": {"gspmd": functools.partial(_gspmd, full_attention),
                 "all_gather": _dense(_full_dense, "all_gather"),
                 "ring": _dense(_full_dense, "ring")},
    "aft_local": {"gspmd": functools.partial(_gspmd, local_attention),
                  "all_gather": _dense(_full_dense, "all_gather"),
                  "ring": _dense(_full_dense, "ring"),
                  "halo": _local_halo},
    "aft_simple": {"gspmd": functools.partial(_gspmd, simple_attention),
                   "all_gather": _simple, "ring": _simple, "halo": _simple},
    "aft_conv": {"gspmd": functools.partial(_gspmd, conv_attention),
                 "all_gather": _dense(_conv_dense, "all_gather"),
                 "ring": _dense(_conv_dense, "ring"),
                 "halo": _conv_halo},
}
