"""AFT-conv (Eq. 6, Eq. 8), Zhai et al. 2021 (arXiv 2105.14103).

h heads; head i has a filter w^i of s taps (1-D, the LM) or s x s taps (2-D, over the
ViT's patch grid) shared by that head's channels. With Q, K, V the projected inputs and
sigma the logistic sigmoid:

  Eq. 6:  Y^i_t = sigma(Q^i_t) * [conv(exp(K^i) * V^i, exp(w^i) - 1)_t + sum_t' exp(K^i_t') V^i_t']
                               / [conv(exp(K^i), exp(w^i) - 1)_t + sum_t' exp(K^i_t')]

i.e. Eq. 2 per head with w_t,t' = w^i at the tap that t' occupies in t's window, and 0
outside it. K has one channel per head by default (broadcast over the head's value
channels), or the full hidden width. Eq. 8 reparameterises each head's filter,
w^i = gamma_i (w^i - mean(w^i)) / std(w^i) + beta_i (`aft_conv_kernel`), with gamma = beta
= 0 at init, so that AFT-conv starts as per-head AFT-simple. Causal (1-D only): only the
current and past taps.

Numerics (`conv_sums`): the shift idea of AFT-full, mK the per-feature max of K over the
real keys and mw = max(0, max w) per head: a depthwise conv of exp(K - mK) V with
exp(w - mw) over each window, plus the keys outside it summed directly by cumulative sums
(never total minus window, which would cancel when a dominant key sits in the window with
a very negative w). When a denominator underflows, the call is recomputed exactly
(`lax.cond`, so only then) by `conv_banded`, still linear in T: the band of offsets the
filter reaches (s tokens in 1-D; in 2-D the rows it spans, 2 (s // 2) cols + s) with the
exact max per query and feature, the keys beyond it as running log-space sums
(`lax.scan`), merged; rematerialised in the backward pass, so it keeps no residuals when
not taken.

Cost: O(T s d) (1-D) or O(T s^2 d) (2-D) plus O(T d) cumulative sums; the exact fallback
O(T nb d) with nb the band above.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import logspace
from zoo.attention.aft.common import (check_qkv, compute_dtype, gate, key_mask_or_all,
                                      key_padding_mask, sees_a_key, underflows)

_sg = jax.lax.stop_gradient


def aft_conv_kernel(raw: jax.Array, gain: jax.Array, bias: jax.Array,
                    eps: float = 1e-5) -> jax.Array:
  """Eq. 8: w^i = gain_i * (w^i - mean(w^i)) / std(w^i) + bias_i, per head i.

  raw `[heads, s]` or `[heads, s, s]`; gain, bias `[heads]`; std is the population std,
  regularised as sqrt(var + eps).
  """
  axes = tuple(range(1, raw.ndim))
  expand = (slice(None),) + (None,) * len(axes)
  mean = jnp.mean(raw, axis=axes, keepdims=True)
  var = jnp.var(raw, axis=axes, keepdims=True)
  return gain[expand] * (raw - mean) * jax.lax.rsqrt(var + eps) + bias[expand]


def _depthwise(x, taps, padding):
  """Cross-correlation of x `[B, *spatial, C]` with one filter per channel, taps
  `[C, *window]`, zero padding `[(lo, hi)] * len(spatial)`; same spatial size out.

  1-D: a sum of s shifted slices, which XLA fuses into one pass (forward and backward).
  XLA:CPU's grouped convolution was 3.5x slower and superlinear in length (706 ms at
  8,192 tokens, 7.5 s at 65,536 for AFT-conv forward+backward, 8 x 64 channels, s = 11;
  shifted sums: 181 ms and 1.4 s). 2-D keeps the convolution: s^2 slices compiled 2-3x
  slower for the ImageNet kernels (11 x 11, 15 x 15) and ran only 1.4x faster.
  """
  nd = taps.ndim - 1
  if nd == 1:
    (lo, hi), t = padding[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)))
    out = xp[:, :t] * taps[:, 0]
    for j in range(1, taps.shape[1]):
      out = out + xp[:, j:j + t] * taps[:, j]
    return out
  rhs = jnp.moveaxis(taps, 0, -1)[..., None, :]  # [*window, 1, C]
  return jax.lax.conv_general_dilated(
      x, rhs, window_strides=(1, 1), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST)


def _outside_1d(x, s, causal):
  """Sum over the keys outside each query's window (t' <= t - s causal; |t - t'| > s // 2)."""
  if causal:
    return logspace.shift(logspace.prefix_sum(x, 1), -s, 1, 0.0)
  r = s // 2
  return (logspace.shift(logspace.prefix_sum(x, 1), -(r + 1), 1, 0.0)
          + logspace.shift(logspace.prefix_sum(x, 1, reverse=True), r + 1, 1, 0.0))


def _outside_2d(x, s):
  """x `[B, R, C, ...]`: sum over the cells outside each cell's s x s window: the rows
  above and below it, plus the cells beside it in its rows. Sums of non-negative weights
  only (no total-minus-window subtraction, so no cancellation)."""
  r = s // 2
  rows = jnp.sum(x, axis=2, keepdims=True)
  out = (logspace.shift(logspace.prefix_sum(rows, 1), -(r + 1), 1, 0.0)
         + logspace.shift(logspace.prefix_sum(rows, 1, reverse=True), r + 1, 1, 0.0))
  beside = (logspace.shift(logspace.prefix_sum(x, 2), -(r + 1), 2, 0.0)
            + logspace.shift(logspace.prefix_sum(x, 2, reverse=True), r + 1, 2, 0.0))
  for dr in range(-r, r + 1):
    out = out + logspace.shift(beside, dr, 1, 0.0)
  return out


def conv_tap_index(kernel_shape, length: int, grid=None, causal: bool = False) -> np.ndarray:
  """`[T, T]` index into the flattened kernel of the tap key t' occupies in query t's window
  (prod(kernel_shape[1:]) where it is outside): AFT-conv's position bias as a dense table."""
  s = kernel_shape[1]
  t = np.arange(length)
  if len(kernel_shape) == 2:
    j = (t[None, :] - t[:, None]) + ((s - 1) if causal else s // 2)
    return np.where((j >= 0) & (j < s), j, s)
  cols = grid[1]
  a = t[None, :] // cols - t[:, None] // cols + s // 2
  c = t[None, :] % cols - t[:, None] % cols + s // 2
  return np.where((a >= 0) & (a < s) & (c >= 0) & (c < s), a * s + c, s * s)


def band_offsets(kernel_shape, length: int, grid=None, causal: bool = False):
  """(lo, hi): the offsets t' - t that AFT-conv's filter reaches (2-D: the rows it spans,
  in row-major token order), clipped to the sequence."""
  s = kernel_shape[1]
  if len(kernel_shape) == 2:
    lo, hi = (-(s - 1), 0) if causal else (-(s // 2), s // 2)
  else:
    r = s // 2
    lo, hi = -(r * grid[1] + r), r * grid[1] + r
  return max(lo, -(length - 1)), min(hi, length - 1)


def band_taps(kernel_shape, length: int, grid, causal: bool, lo: int, hi: int) -> np.ndarray:
  """`[T, hi - lo + 1]` index into the flattened kernel of the tap that key t + lo + j
  occupies in query t's window (prod(kernel_shape[1:]) where none: outside the window or
  the sequence). The banded form of `conv_tap_index`, O(T (hi - lo)) memory."""
  s = kernel_shape[1]
  none = int(np.prod(kernel_shape[1:]))
  t = np.arange(length)[:, None]
  tgt = t + np.arange(lo, hi + 1)[None, :]
  inside = (tgt >= 0) & (tgt < length)
  if len(kernel_shape) == 2:
    j = (tgt - t) + ((s - 1) if causal else s // 2)
    ok = inside & (j >= 0) & (j < s)
    return np.where(ok, j, none)
  cols, r = grid[1], s // 2
  a = tgt // cols - t // cols + r
  c = tgt % cols - t % cols + r
  ok = inside & (a >= 0) & (a < s) & (c >= 0) & (c < s)
  return np.where(ok, a * s + c, none)


def tap_bias(kernel: jax.Array, index: np.ndarray) -> jax.Array:
  """`[heads, *index.shape]`: each head's tap at `index` into its flattened filter, 0 at
  the index one past the last tap (no tap: outside the window)."""
  heads = kernel.shape[0]
  flat = jnp.concatenate([kernel.reshape(heads, -1), jnp.zeros((heads, 1), kernel.dtype)],
                         axis=1)
  return flat[:, index]


def conv_band(kernel: jax.Array, length: int, grid, causal: bool):
  """(lo, hi, bias `[length, hi - lo + 1, heads]`): AFT-conv's filter as the bias of the
  keys at offsets lo..hi from each query (0 outside the window)."""
  lo, hi = band_offsets(kernel.shape, length, grid, causal)
  bias = tap_bias(kernel, band_taps(kernel.shape, length, grid, causal, lo, hi))
  return lo, hi, jnp.transpose(bias, (1, 2, 0))


def band_triple(ek, ev, real, bias, length: int) -> logspace.Triple:
  """Exact triple of the keys in each query's band: ek `[B, length + nb - 1, H, kc]`, ev
  `[B, ..., H, dh]` (the keys from offset lo of query 0 on), real `[B or 1, length + nb -
  1]` (which of them are real keys), bias `[length, nb, H]`. The max is taken over the
  band per (query, head, channel), so nothing underflows at any scale."""
  nb = bias.shape[1]
  kb = jnp.stack([ek[:, j:j + length] for j in range(nb)], axis=2)  # [B, T, nb, H, kc]
  vb = jnp.stack([ev[:, j:j + length] for j in range(nb)], axis=2)
  ok = jnp.stack([real[:, j:j + length] for j in range(nb)], axis=2)[..., None, None]
  s = kb + bias[None, :, :, :, None]
  m = logspace.finite_or_zero(jnp.max(jnp.where(ok, _sg(s), -jnp.inf), axis=2))
  e = logspace.masked_exp(s - m[:, :, None], ok)
  return (jnp.where(jnp.any(ok, axis=2), m, -jnp.inf), jnp.sum(e * vb, axis=2),
          jnp.sum(e, axis=2))


def far_triples(leaves, nb: int, length: int, causal: bool):
  """Running sums over the keys before (and, not causal, after) each query's band, within
  the block of `leaves` (triples of keys from offset lo of query 0 on): (left, right);
  right is None when causal."""
  fills = (-jnp.inf, 0.0, 0.0)
  prefix = logspace.scan(leaves, axis=1)
  left = tuple(logspace.shift(x, -1, 1, f)[:, :length] for x, f in zip(prefix, fills))
  if causal:
    return left, None
  flipped = tuple(jnp.flip(x, axis=1) for x in leaves)
  suffix = tuple(jnp.flip(x, axis=1) for x in logspace.scan(flipped, axis=1))
  right = tuple(logspace.shift(x, nb, 1, f)[:, :length] for x, f in zip(suffix, fills))
  return left, right


def conv_banded(k, v, w, key_mask, *, causal, grid):
  """Eq. 6's sums exactly, in O(T nb d): the band of biased keys with its own max per
  query, the keys beyond it by running log-space sums. Returns (num, den) of the merged
  triple. k `[B, T, H, kc]`, v `[B, T, H, dh]`, w `[H, s(, s)]`."""
  t = k.shape[1]
  lo, hi, bias = conv_band(w, t, grid, causal)
  nb = hi - lo + 1
  pad = ((0, 0), (-lo, hi), (0, 0), (0, 0))
  ek, ev = jnp.pad(k, pad), jnp.pad(v, pad)
  real = jnp.pad(key_mask, ((0, 0), (-lo, hi)))
  band = band_triple(ek, ev, real, bias, t)
  leaves = logspace.leaves(ek, ev, real[:, :, None, None])
  left, right = far_triples(leaves, nb, t, causal)
  out = logspace.merge(band, left) if right is None else logspace.merge(band, left, right)
  return out[1], out[2]


def conv_sums(k, v, w, key_mask, *, causal, grid):
  """Eq. 6's sums with the shifts mK, mw: (num `[B, T, H, dh]`, den `[B, T, H, kc]`).

  k `[B, T, H, kc]`, v `[B, T, H, dh]`, w `[H, s(, s)]`, grid (rows, cols) for a 2-D w.
  """
  b, t, heads, _ = v.shape
  s = w.shape[1]
  if w.ndim == 3:
    spatial, padding = tuple(grid), [(s // 2, s // 2)] * 2
  else:
    spatial = (t,)
    padding = [(s - 1, 0)] if causal else [(s // 2, s // 2)]
  valid = key_mask[:, :, None, None]
  # The per-feature max of K over the real keys, the per-head max of (0, w).
  mk = jnp.max(jnp.where(valid, _sg(k), -jnp.inf), axis=1, keepdims=True)
  ek = logspace.masked_exp(k - logspace.finite_or_zero(mk), valid)  # [B, T, H, kc], <= 1
  ekv = ek * v  # [B, T, H, dh]
  mw = jnp.maximum(jnp.max(_sg(w).reshape(heads, -1), axis=1), 0.0)  # [H]
  cw = jnp.exp(w - mw.reshape((heads,) + (1,) * (w.ndim - 1)))  # window weights, <= 1
  far = jnp.exp(-mw)[:, None]  # the weight of the keys outside the window, [H, 1]

  def window_sum(x):  # x [B, T, H, c]: sum over each window of x * exp(w - mw)
    c = x.shape[-1]
    xs = x.reshape((b,) + spatial + (heads * c,))
    return _depthwise(xs, jnp.repeat(cw, c, axis=0), padding).reshape(x.shape)

  def outside_sum(x):
    if w.ndim == 3:
      return _outside_2d(x.reshape((b,) + spatial + x.shape[2:]), s).reshape(x.shape)
    return _outside_1d(x, s, causal)

  return (far * outside_sum(ekv) + window_sum(ekv), far * outside_sum(ek) + window_sum(ek))


def aft_conv(q: jax.Array, k: jax.Array, v: jax.Array, kernel: jax.Array, *,
             causal: bool = False, grid: Sequence[int] | None = None,
             key_mask: jax.Array | None = None) -> jax.Array:
  """AFT-conv, Eq. 6: per-head AFT with a depthwise conv filter as position bias.

  Y^i_t = sigma(Q^i_t) * sum_t' exp(K^i_t' + b_t,t') V^i_t' / sum_t' exp(K^i_t' + b_t,t'),
  b_t,t' = w^i at the tap of t' in t's window, 0 outside it. Eq. 6's
  conv(exp(K) V, exp(w) - 1) + sum exp(K) V is evaluated without that subtraction: a
  depthwise conv of exp(K - mK) V with exp(w - mw) over the window, plus the keys outside
  the window summed directly (cumulative sums), with mK the per-feature max of K over the
  real keys and mw = max(0, max w) per head; O(T s d) (1-D) or O(T s^2 d) (2-D). If a
  denominator underflows (K or w spanning ~90 in float32), the call is recomputed exactly
  by the banded path (`lax.cond`, so only then; see the module docstring).

  Args:
    q, v: `[batch, length, heads * head_dim]`.
    k: `[batch, length, heads]` (one key channel per head, shared by its value channels) or
      `[batch, length, heads * head_dim]`.
    kernel: w (already reparameterised, see `aft_conv_kernel`): `[heads, s]` for a 1-D conv
      over the sequence, `[heads, s, s]` for a 2-D conv over `grid`. Cross-correlation
      layout, as `lax.conv`: 1-D non-causal (s odd) tap j sits at offset j - s // 2; causal,
      at offset j - (s - 1) (w[-1] is the current token, only past taps); 2-D tap (a, b) at
      (a - s // 2, b - s // 2).
    causal: 1-D only: query t sums over keys t' <= t.
    grid: (rows, cols) with rows * cols = length, the tokens in row-major order; required
      for a 2-D kernel.
    key_mask: `[batch, length]` boolean, True = a real key.
  """
  grid = None if grid is None else tuple(int(g) for g in grid)
  check_qkv(q, k, v, same_dim=False)
  key_mask = key_mask_or_all(key_mask, q.shape[0], k.shape[1])
  return _aft_conv(q, k, v, kernel, key_mask, causal=bool(causal), grid=grid)


def check_kernel(kernel_shape, dim: int, key_channels: int, *, causal: bool, length: int,
                 grid) -> None:
  """Raises ValueError unless an AFT-conv filter fits the arrays (see `aft_conv`)."""
  if len(kernel_shape) not in (2, 3) or (len(kernel_shape) == 3
                                         and kernel_shape[1] != kernel_shape[2]):
    raise ValueError(f"kernel must be [heads, s] (1-D) or [heads, s, s] (2-D), got "
                     f"{tuple(kernel_shape)}")
  heads, s = kernel_shape[0], kernel_shape[1]
  if dim % heads:
    raise ValueError(f"dim {dim} must be a multiple of the kernel's heads {heads}")
  if key_channels not in (heads, dim):
    raise ValueError(f"k must have heads ({heads}) or dim ({dim}) channels, got "
                     f"{key_channels}")
  if len(kernel_shape) == 3:
    if causal:
      raise ValueError("aft_conv: causal is 1-D only (a 2-D kernel has no causal form here)")
    if grid is None:
      raise ValueError("aft_conv with a 2-D kernel needs grid=(rows, cols) (the ViT passes "
                       "it when there is no class token)")
    if grid[0] * grid[1] != length:
      raise ValueError(f"grid {grid} has {grid[0] * grid[1]} cells but length is {length}")
  if not causal and s % 2 == 0:
    raise ValueError(f"kernel_size must be odd for a centred (non-causal) conv, got {s}")


@functools.partial(jax.jit, static_argnames=("causal", "grid"))
def _aft_conv(q, k, v, kernel, key_mask, *, causal, grid):
  b, t, dim = q.shape
  if k.shape[1] != t:
    raise ValueError(f"aft_conv is self-attention: q {q.shape} and k {k.shape} must have the "
                     f"same length")
  check_kernel(kernel.shape, dim, k.shape[2], causal=causal, length=t, grid=grid)
  heads = kernel.shape[0]
  dt = compute_dtype(q, k, v, kernel)
  qf, kf, vf = (x.astype(dt).reshape(b, t, heads, -1) for x in (q, k, v))
  wf = kernel.astype(dt)
  num, den = conv_sums(kf, vf, wf, key_mask, causal=causal, grid=grid)
  # Underflow (a denominator of a query that sees a key below ~1e-19): recompute exactly.
  underflow = underflows(den, sees_a_key(key_mask, t, causal)[..., None], dt)
  # Rematerialised in the backward pass, so that the branch not taken keeps no residuals.
  exact = jax.checkpoint(functools.partial(conv_banded, causal=causal, grid=grid))
  num, den = jax.lax.cond(underflow, lambda: exact(kf, vf, wf, key_mask), lambda: (num, den))
  return gate(qf, num, den).reshape(b, t, dim).astype(q.dtype)


def conv_attention(q, k, v, *, causal=False, mask=None, kernel, grid=None):
  """`aft_conv` with the zoo's core signature: `mask` must be a key padding mask."""
  return aft_conv(q, k, v, kernel, causal=causal, grid=grid,
                  key_mask=key_padding_mask(mask, q.shape[0], k.shape[1]))
