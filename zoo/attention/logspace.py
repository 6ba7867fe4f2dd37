"""Log-space numerics shared by the families that sum exponentials over keys.

A triple (m, num, den) stands for the sums  sum_j exp(s_j) v_j = exp(m) num  and
sum_j exp(s_j) = exp(m) den, with m a running maximum. Merging two triples rescales to the
larger m, so no partial sum overflows or underflows because of another's scale: the
online softmax of ring attention and AFT's scans and shard exchanges are the same merge.
The arrays broadcast: m and den may carry a trailing 1 where num carries a feature axis
(softmax: `[b, h, q, 1]` against `[b, h, q, d]`), or all three the same shape (AFT: one
triple per feature).

`prefix_sum` is a blocked cumulative sum, linear on every backend (XLA lowers a
sequence-long `cumsum` to a reduce-window that the GPU runs in quadratic time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Triple = tuple[jax.Array, jax.Array, jax.Array]

_sg = jax.lax.stop_gradient


def finite_or_zero(m: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(m), m, 0.0)


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, 0 where den is 0 (nothing seen)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_exp(x: jax.Array, ok: jax.Array | None) -> jax.Array:
  """exp(x) where ok, 0 elsewhere, without inf/nan in values or gradients."""
  if ok is None:
    return jnp.exp(x)
  return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def empty(like_m: jax.Array, like_num: jax.Array) -> Triple:
  """The triple of an empty sum (m = -inf, num = den = 0)."""
  return (jnp.full(like_m.shape, -jnp.inf, like_m.dtype), jnp.zeros(like_num.shape, like_num.dtype),
          jnp.zeros(like_m.shape, like_m.dtype))


def leaves(k: jax.Array, v: jax.Array, valid) -> Triple:
  """One triple per key: m = k, num = v, den = 1 (empty where not valid).

  m is a stop_gradient value, so it is a constant for differentiation; the gradient with
  respect to k flows through num and den (exp(k - sg(k)) = 1 with derivative 1)."""
  e = jnp.where(valid, jnp.exp(k - _sg(k)), 0.0)  # 1 (with d/dK) or 0
  return jnp.where(valid, _sg(k), -jnp.inf), e * v, e


def merge(*triples: Triple) -> Triple:
  """The triple of the union of the sums."""
  m, num, den = triples[0]
  for mb, nb, db in triples[1:]:
    top = jnp.maximum(m, mb)
    ref = finite_or_zero(top)
    sa, sb = jnp.exp(m - ref), jnp.exp(mb - ref)
    m, num, den = top, num * sa + nb * sb, den * sa + db * sb
  return m, num, den


def select(keep, t: Triple) -> Triple:
  """t where `keep` (broadcast), the empty triple elsewhere."""
  m, n, d = t
  return jnp.where(keep, m, -jnp.inf), jnp.where(keep, n, 0.0), jnp.where(keep, d, 0.0)


def reduce(t: Triple, axis: int) -> Triple:
  """Merges the triples along `axis` into one (the axis is removed)."""
  m, n, d = t
  top = jnp.max(m, axis=axis, keepdims=True)
  scale = jnp.exp(m - finite_or_zero(top))
  return jnp.squeeze(top, axis), jnp.sum(n * scale, axis=axis), jnp.sum(d * scale, axis=axis)


def reduce_range(t: Triple, start: int, stop: int) -> Triple:
  """Merge of t[:, start:stop] along axis 1 (the empty triple when the range is empty)."""
  if stop <= start:
    return empty(t[0][:, 0], t[1][:, 0])
  return reduce(tuple(x[:, start:stop] for x in t), axis=1)


def scan(t: Triple, axis: int) -> Triple:
  """Running merge along `axis`: element i of the result merges elements <= i.

  A sequential `lax.scan` with a (running max, num, den) carry: exact at any scale, O(n)
  work and a small graph (an associative scan of triples compiles several times slower).
  """
  xs = tuple(jnp.moveaxis(x, axis, 0) for x in t)

  def step(carry, x):
    carry = merge(carry, x)
    return carry, carry

  _, out = jax.lax.scan(step, empty(xs[0][0], xs[1][0]), xs)
  return tuple(jnp.moveaxis(x, 0, axis) for x in out)


def ratio(t: Triple) -> jax.Array:
  """num / den: the normalised sum (0 where nothing is seen)."""
  return safe_ratio(t[1], t[2])


def shift(x: jax.Array, offset: int, axis: int, fill) -> jax.Array:
  """y[..., i, ...] = x[..., i + offset, ...], `fill` where i + offset is out of range."""
  if offset == 0:
    return x
  n = x.shape[axis]
  if abs(offset) >= n:
    return jnp.full_like(x, fill)
  pad = [(0, 0)] * x.ndim
  if offset > 0:
    x = jax.lax.slice_in_dim(x, offset, n, axis=axis)
    pad[axis] = (0, offset)
  else:
    x = jax.lax.slice_in_dim(x, 0, n + offset, axis=axis)
    pad[axis] = (-offset, 0)
  return jnp.pad(x, pad, constant_values=fill)


# Block of `prefix_sum`'s inner cumulative sums (the longest reduce-window it leaves).
PREFIX_BLOCK = 64


def prefix_sum(x: jax.Array, axis: int, reverse: bool = False, *,
               block: int = PREFIX_BLOCK) -> jax.Array:
  """Inclusive cumulative sum along `axis` (`reverse`: from the end), linear on every backend.

  Equal to `jax.lax.cumsum` up to rounding, but `jnp.cumsum` / `lax.cumsum` lower to a
  reduce-window as long as the axis, which XLA evaluates in O(n * window) = O(n^2) on GPU
  (measured quadratic on an H200). Here: a cumulative sum within blocks of `block`, the
  exclusive prefix sum of the block totals (recursively, n / block of them), added back, so
  no reduce-window is longer than `block`: O(n * block) work, O(n) memory, any dtype
  (bool counts as int32, as `jnp.cumsum`). The blocked sum rounds no worse than a
  sequential one (each output is a within-block sum plus one carried total).
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.int32)
  axis = axis % x.ndim
  n = x.shape[axis]
  if n <= block:
    return jax.lax.cumsum(x, axis=axis, reverse=reverse)
  nb = -(-n // block)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, nb * block - n)  # trailing zeros change neither direction's sums
  xb = jnp.pad(x, pad).reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1:])
  within = jax.lax.cumsum(xb, axis=axis + 1, reverse=reverse)
  totals = jax.lax.index_in_dim(within, 0 if reverse else block - 1, axis + 1, keepdims=False)
  # The totals of the blocks before (reverse: after) each block.
  carry = shift(prefix_sum(totals, axis, reverse, block=block), 1 if reverse else -1, axis, 0)
  out = (within + jnp.expand_dims(carry, axis + 1)).reshape(
      x.shape[:axis] + (nb * block,) + x.shape[axis + 1:])
  return jax.lax.slice_in_dim(out, 0, n, axis=axis)
