"""Sequence-parallel AFT (Zhai et al. 2021): every variant split along length over `seq`.

Registered with `zoo.parallel.sequence.register` for the cores `aft_full`, `aft_local`,
`aft_simple` and `aft_conv` (the modules' `sequence_parallel_core`). The functions take
the cores' arrays, `[batch, length, dim]` (sharded or not; length over `seq`, batch over
`data`/`fsdp`), plus the cores' options (`pos_bias` `[L, L]`, `window`, `kernel`, `grid`),
and equal the single-device cores in values and gradients.

Everything is a sum over keys of exp(K_t' + b_t,t') V_t' and exp(K_t' + b_t,t'), so shards
exchange partial sums kept as log-space triples (m, num, den) with sum exp(s) V = exp(m) num
(the same triples as `aft._scan`; m never carries a gradient). Merging two triples rescales
to the larger m, so no shard's sums overflow or underflow because of another's scale.

* `halo` (`aft_local`, `aft_conv` 1-D and 2-D, `aft_simple`): a query's biased keys lie
  within a band of offsets [-hl, hr] (local: |t - t'| < window; conv: the filter's taps,
  in 2-D the band of rows it spans); every other key has bias 0. Each shard receives the
  hl keys before it and the hr after it from its neighbours (`ppermute`) and sums the band
  exactly (max over the band, per query and feature). The far keys (bias 0) are running
  sums: a scan over the shard's extended block, plus the other shards' totals (one
  `all_gather` of a triple per shard) and the neighbours' partial sums beyond the halo.
  Cost per shard O(c * (hl + hr + 1) * d) with c = L / n; needs hl, hr <= c.
* AFT-simple has no position bias: each shard sends only its totals (non-causal: the
  merged totals of all shards; causal: the exclusive prefix over earlier shards, merged
  with a local running scan). `all_gather`, `ring` and `halo` all run this exchange (k and
  v never move), so any configured strategy works.
* `ring` (`aft_full`, and `aft_local` / `aft_conv` through their dense bias): key/value
  blocks travel round the ring (`ppermute`); each shard holds its rows of the bias and
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
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo.attention import aft
from zoo.parallel import sequence

_sg = jax.lax.stop_gradient
_finite = aft._finite_or_zero  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- helpers

def _spec(mesh, ndim: int) -> P:
  return P(sequence.batch_axes(mesh), "seq", *([None] * (ndim - 2)))


def _check_layout(layout: str) -> None:
  if layout != "natural":
    raise ValueError("AFT sequence-parallel strategies take the natural token order "
                     f"(layout='natural'), got layout={layout!r}")


def _dtype(*xs):
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _heads(q, k, v, heads: int):
  """[B, L, dim] -> q, v [B, L, H, dim / H], k [B, L, H, kdim / H], in the compute dtype."""
  dt = _dtype(q, k, v)
  b, length, _ = q.shape
  return tuple(x.astype(dt).reshape(b, length, heads, -1) for x in (q, k, v))


def _output(q, num, den, like):
  """sigmoid(Q) * num / den (0 where nothing is seen), back to `[B, L, dim]`."""
  y = jax.nn.sigmoid(q) * aft._safe_ratio(num, den)  # pylint: disable=protected-access
  return y.reshape(like.shape).astype(like.dtype)


def _empty(like_m, like_n):
  return (jnp.full(like_m.shape, -jnp.inf, like_m.dtype), jnp.zeros(like_n.shape, like_n.dtype),
          jnp.zeros(like_m.shape, like_m.dtype))


def _select(keep, t):
  """t where `keep` (broadcast), the empty triple elsewhere."""
  m, n, d = t
  return jnp.where(keep, m, -jnp.inf), jnp.where(keep, n, 0.0), jnp.where(keep, d, 0.0)


def _reduce(t, axis: int):
  """Merges the triples along `axis` into one (the axis is removed)."""
  m, n, d = t
  top = jnp.max(m, axis=axis, keepdims=True)
  scale = jnp.exp(m - _finite(top))
  return (jnp.squeeze(top, axis), jnp.sum(n * scale, axis=axis),
          jnp.sum(d * scale, axis=axis))


def _reduce_range(t, start: int, stop: int):
  """Merge of t[:, start:stop] along axis 1 (the empty triple when the range is empty)."""
  if stop <= start:
    return _empty(t[0][:, 0], t[1][:, 0])
  return _reduce(tuple(x[:, start:stop] for x in t), axis=1)


def _leaves(k, v):
  return aft._leaves(k, v, jnp.ones((), bool))  # pylint: disable=protected-access


def _merge(*ts):
  out = ts[0]
  for t in ts[1:]:
    out = aft._merge(out, t)  # pylint: disable=protected-access
  return out


def _gather_totals(total):
  """Every shard's total triple, `[n, ...]`."""
  return tuple(jax.lax.all_gather(x, "seq") for x in total)


def _shards_where(totals, keep):
  """Merge of the gathered totals of the shards s with keep[s]."""
  keep = keep.reshape((-1,) + (1,) * (totals[0].ndim - 1))
  return _reduce(_select(keep, totals), axis=0)


# ----------------------------------------------------------------------------- AFT-simple

def _simple_sums(q, k, v, *, mesh, causal):
  """AFT-simple in head layout: only per-shard summaries cross shards."""
  n = mesh.shape["seq"]

  def local(q, k, v):
    shard = jax.lax.axis_index("seq")
    leaves = _leaves(k, v)
    totals = _gather_totals(_reduce(leaves, axis=1))  # [n, B, H, c]
    if not causal:
      m, num, den = _shards_where(totals, jnp.ones((n,), bool))
      return jnp.broadcast_to(num[:, None], v.shape), jnp.broadcast_to(den[:, None], k.shape)
    before = _shards_where(totals, jnp.arange(n) < shard)  # the exclusive prefix over shards
    before = tuple(x[:, None] for x in before)
    _, num, den = _merge(before, aft._scan(leaves, axis=1))  # pylint: disable=protected-access
    return num, den

  spec = _spec(mesh, 4)
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
  n = mesh.shape["seq"]
  length = q.shape[1]
  c = length // n
  hl, hr = -lo, hi
  nb = hl + hr + 1
  if hl > c or hr > c:
    raise ValueError(f"the halo strategy needs the band of biased keys ({hl} before, {hr} "
                     f"after each query) to fit in one neighbour's block of {c} tokens "
                     f"(length {length} over {n} shards); use fewer shards, or the ring or "
                     f"all_gather strategy")
  right_to_left = [(i, (i - 1) % n) for i in range(n)]
  left_to_right = [(i, (i + 1) % n) for i in range(n)]

  def local(k, v, bias):
    shard = jax.lax.axis_index("seq")
    # The extended block: hl keys from the left neighbour, ours, hr from the right one.
    parts_k, parts_v = [], []
    if hl:
      lk, lv = jax.lax.ppermute((k[:, c - hl:], v[:, c - hl:]), "seq", left_to_right)
      parts_k.append(lk)
      parts_v.append(lv)
    parts_k.append(k)
    parts_v.append(v)
    if hr:
      rk, rv = jax.lax.ppermute((k[:, :hr], v[:, :hr]), "seq", right_to_left)
      parts_k.append(rk)
      parts_v.append(rv)
    ek, ev = jnp.concatenate(parts_k, axis=1), jnp.concatenate(parts_v, axis=1)
    pos = shard * c - hl + jnp.arange(c + hl + hr)  # global positions of the block
    real = (pos >= 0) & (pos < length)

    # The band, exact (max over its keys per query, head and channel); the far keys (bias
    # 0): running sums over the extended block, plus the other shards' partial sums.
    band = aft.band_triple(ek, ev, real[None], bias, c)
    left, right = aft.far_triples(_select(real[None, :, None, None], _leaves(ek, ev)), nb, c,
                                  causal)
    own = _leaves(k, v)
    totals = _gather_totals(_reduce(own, axis=1))  # [n, B, H, c]
    # Before the block: shards < shard - 1 whole, and the left neighbour's first c - hl.
    left_part = tuple(jax.lax.ppermute(x, "seq", left_to_right)
                      for x in _reduce_range(own, 0, c - hl))
    before = _merge(_shards_where(totals, jnp.arange(n) < shard - 1),
                    _select(shard > 0, left_part))
    far = _merge(left, tuple(x[:, None] for x in before))
    if not causal:  # after the block: the right neighbour's last c - hr, shards > shard + 1
      right_part = tuple(jax.lax.ppermute(x, "seq", right_to_left)
                         for x in _reduce_range(own, hr, c))
      after = _merge(_shards_where(totals, jnp.arange(n) > shard + 1),
                     _select(shard < n - 1, right_part))
      far = _merge(far, right, tuple(x[:, None] for x in after))
    _, num, den = _merge(band, far)
    return num, den

  spec = _spec(mesh, 4)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P("seq", None, None)),
                       out_specs=(spec, spec), check_vma=False)(k, v, band_bias)


def _band_index(length: int, lo: int, hi: int) -> np.ndarray:
  """`[L, hi - lo + 1]` key positions t + lo + j, clipped into [0, L)."""
  return np.clip(np.arange(length)[:, None] + np.arange(lo, hi + 1)[None, :], 0, length - 1)


def _local_halo(q, k, v, *, mesh, causal, layout, pos_bias, window, block_size=None):
  del block_size
  _check_layout(layout)
  length = q.shape[1]
  lo, hi = -(window - 1), (0 if causal else window - 1)
  lo, hi = max(lo, -(length - 1)), min(hi, length - 1)
  if pos_bias.shape != (length, length):
    raise ValueError(f"pos_bias must be [length, length] = {(length, length)}, got "
                     f"{pos_bias.shape}")
  qh, kh, vh = _heads(q, k, v, 1)
  band = jnp.take_along_axis(pos_bias.astype(qh.dtype), jnp.asarray(_band_index(length, lo, hi)),
                             axis=1)[:, :, None]
  num, den = _halo_sums(qh, kh, vh, band, mesh=mesh, causal=causal, lo=lo, hi=hi)
  return _output(qh, num, den, q)


def _conv_band(kernel, length, grid, causal):
  """(lo, hi, band bias `[L, nb, H]`) of AFT-conv's filter: the taps, 0 elsewhere."""
  heads = kernel.shape[0]
  lo, hi = aft.band_offsets(kernel.shape, length, grid, causal)
  idx = aft.band_taps(kernel.shape, length, grid, causal, lo, hi)
  flat = jnp.concatenate([kernel.reshape(heads, -1), jnp.zeros((heads, 1), kernel.dtype)], 1)
  return lo, hi, jnp.transpose(flat[:, idx], (1, 2, 0))


def _check_conv(q, kernel, causal, grid):
  if kernel.ndim == 3:
    if causal:
      raise ValueError("aft_conv: causal is 1-D only")
    if grid is None or grid[0] * grid[1] != q.shape[1]:
      raise ValueError(f"aft_conv with a 2-D kernel needs grid=(rows, cols) with rows * cols "
                       f"= length {q.shape[1]}, got {grid}")
  elif kernel.ndim != 2:
    raise ValueError(f"kernel must be [heads, s] or [heads, s, s], got {kernel.shape}")
  return None if grid is None else tuple(int(g) for g in grid)


def _conv_halo(q, k, v, *, mesh, causal, layout, kernel, grid=None):
  _check_layout(layout)
  grid = _check_conv(q, kernel, causal, grid)
  qh, kh, vh = _heads(q, k, v, kernel.shape[0])
  lo, hi, band = _conv_band(kernel.astype(qh.dtype), q.shape[1], grid, causal)
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
    mw = _finite(jnp.max(jnp.where(vis, _sg(bias), -jnp.inf), axis=-1, keepdims=True))
    eb = aft._masked_exp(bias - mw, vis)  # pylint: disable=protected-access
    seen = jnp.any(vis, axis=-1)
  num = jnp.einsum("hqk,bkhd->bqhd", eb, ek * v, precision=jax.lax.Precision.HIGHEST)
  den = jnp.einsum("hqk,bkhd->bqhd", eb, ek, precision=jax.lax.Precision.HIGHEST)
  m = mk + jnp.transpose(mw, (1, 0, 2))[None]  # [B, Tq, H, kc]
  return jnp.where(seen[None, :, None, None], m, -jnp.inf), num, den


def _causal_vis(q_start, k_start, tq, tk):
  return (k_start + jnp.arange(tk))[None, :] <= (q_start + jnp.arange(tq))[:, None]


def _dense_sums(q, k, v, bias, *, mesh, causal, strategy):
  """Ring or all-gather sums with a dense bias `[H, L, L]` (rows sharded with the queries)."""
  n = mesh.shape["seq"]
  spec = _spec(mesh, 4)

  def ring(q, k, v, bias):
    shard, c = jax.lax.axis_index("seq"), q.shape[1]

    def body(t, carry):
      acc, kb, vb = carry
      src = (shard - t) % n
      cols = jax.lax.dynamic_slice_in_dim(bias, src * c, c, axis=2)
      vis = _causal_vis(shard * c, src * c, c, c) if causal else None
      acc = _merge(acc, _block(kb, vb, cols, vis))
      kb, vb = jax.lax.ppermute((kb, vb), "seq", [(i, (i + 1) % n) for i in range(n)])
      return acc, kb, vb

    m0 = jnp.zeros(q.shape[:3] + k.shape[3:], q.dtype)
    acc, _, _ = jax.lax.fori_loop(0, n, body, (_empty(m0, q), k, v))
    return acc[1], acc[2]

  def gathered(q, k, v, bias):
    shard, c = jax.lax.axis_index("seq"), q.shape[1]
    k_all = jax.lax.all_gather(k, "seq", axis=1, tiled=True)
    v_all = jax.lax.all_gather(v, "seq", axis=1, tiled=True)
    vis = _causal_vis(shard * c, 0, c, k_all.shape[1]) if causal else None
    _, num, den = _block(k_all, v_all, bias, vis)
    return num, den

  fn = ring if strategy == "ring" else gathered
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(None, "seq", None)),
                       out_specs=(spec, spec), check_vma=False)(q, k, v, bias)


def _full_dense(q, k, v, *, mesh, causal, layout, strategy, pos_bias, window=None,
                block_size=None):
  del block_size
  _check_layout(layout)
  length = q.shape[1]
  if pos_bias.shape != (length, length):
    raise ValueError(f"pos_bias must be [length, length] = {(length, length)}, got "
                     f"{pos_bias.shape}")
  qh, kh, vh = _heads(q, k, v, 1)
  w = pos_bias.astype(qh.dtype)
  if window is not None:
    w = aft.local_bias(w, window)
  num, den = _dense_sums(qh, kh, vh, w[None], mesh=mesh, causal=causal, strategy=strategy)
  return _output(qh, num, den, q)


def _conv_dense(q, k, v, *, mesh, causal, layout, strategy, kernel, grid=None):
  _check_layout(layout)
  grid = _check_conv(q, kernel, causal, grid)
  heads, length = kernel.shape[0], q.shape[1]
  qh, kh, vh = _heads(q, k, v, heads)
  idx = aft.conv_tap_index(kernel.shape, length, grid, causal)
  flat = jnp.concatenate([kernel.reshape(heads, -1).astype(qh.dtype),
                          jnp.zeros((heads, 1), qh.dtype)], axis=1)
  num, den = _dense_sums(qh, kh, vh, flat[:, idx], mesh=mesh, causal=causal,
                         strategy=strategy)
  return _output(qh, num, den, q)


# ----------------------------------------------------------------------------- gspmd

def _gspmd(core, q, k, v, *, mesh, causal, layout, **options):
  """The single-device core under sharding constraints (length over `seq`)."""
  _check_layout(layout)
  sharding = NamedSharding(mesh, _spec(mesh, 3))
  q, k, v = (jax.lax.with_sharding_constraint(x, sharding) for x in (q, k, v))
  return jax.lax.with_sharding_constraint(core(q, k, v, causal=causal, **options), sharding)


def _full_core(q, k, v, *, causal, pos_bias, block_size=None):
  return aft.aft_full(q, k, v, pos_bias, causal=causal, block_size=block_size)


def _local_core(q, k, v, *, causal, pos_bias, window, block_size=None):
  return aft.aft_local(q, k, v, pos_bias, window=window, causal=causal, block_size=block_size)


def _conv_core(q, k, v, *, causal, kernel, grid=None):
  return aft.aft_conv(q, k, v, kernel, causal=causal, grid=grid)


def _simple_core(q, k, v, *, causal):
  return aft.aft_simple(q, k, v, causal=causal)


# ----------------------------------------------------------------------------- registry

for _strategy in ("all_gather", "ring", "halo"):
  sequence.register("aft_simple", _strategy, _simple)
sequence.register("aft_simple", "gspmd", functools.partial(_gspmd, _simple_core))

for _strategy in ("all_gather", "ring"):
  sequence.register("aft_full", _strategy, functools.partial(_full_dense, strategy=_strategy))
  sequence.register("aft_local", _strategy, functools.partial(_full_dense, strategy=_strategy))
  sequence.register("aft_conv", _strategy, functools.partial(_conv_dense, strategy=_strategy))
sequence.register("aft_full", "gspmd", functools.partial(_gspmd, _full_core))
sequence.register("aft_local", "gspmd", functools.partial(_gspmd, _local_core))
sequence.register("aft_conv", "gspmd", functools.partial(_gspmd, _conv_core))
sequence.register("aft_local", "halo", _local_halo)
sequence.register("aft_conv", "halo", _conv_halo)
