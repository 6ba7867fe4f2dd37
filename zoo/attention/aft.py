"""Attention Free Transformer (AFT), Zhai et al. 2021 (arXiv 2105.14103).

No dot products between queries and keys: each key is combined with a learned position
bias, the values are averaged feature by feature with those weights, and the query gates
the result. With Q, K, V `[T, d]` the projected inputs and sigma the logistic sigmoid:

* AFT-full (Eq. 2), `aft_full`, w `[T, T]` learned:

      Y_t = sigma(Q_t) * sum_t' exp(K_t' + w_t,t') * V_t' / sum_t' exp(K_t' + w_t,t')

* AFT-local (Eq. 4), `aft_local`: Eq. 2 with w_t,t' kept where |t - t'| < s (`window`)
  and set to 0, not -inf, elsewhere: every key still counts, far ones without a bias.
* AFT-simple (Eq. 5), `aft_simple`: w = 0, so the key sums are shared by all queries:
  Y_t = sigma(Q_t) * sum_t' softmax_t'(K)_t' * V_t', linear in T.
* AFT-conv (Eq. 6), `aft_conv`: h heads; head i has a filter w^i of s taps (1-D, the LM)
  or s x s taps (2-D, over the ViT's patch grid) shared by that head's channels:

      Y^i_t = sigma(Q^i_t) * [conv(exp(K^i) * V^i, exp(w^i) - 1)_t + sum_t' exp(K^i_t') V^i_t']
                           / [conv(exp(K^i), exp(w^i) - 1)_t + sum_t' exp(K^i_t')]

  i.e. Eq. 2 per head with w_t,t' = w^i at the tap that t' occupies in t's window, and 0
  outside it. K has one channel per head by default (broadcast over the head's value
  channels), `key_per_head=False` gives it the full hidden width.
* Parameterisation (Sec. 3.3): w = u v^T with u, v `[max_len, d']` (Eq. 7, `bias_rank` d',
  init N(0, 1e-2)) for full and local; for conv, Eq. 8 per head,
  w^i = gamma_i (w^i - mean(w^i)) / std(w^i) + beta_i, with gamma = beta = 0 at init, so
  that AFT-conv starts as per-head AFT-simple (`aft_conv_kernel`).

Causal forms: the sums run over t' <= t (conv: only the current and past taps). Key
padding masks (`key_mask` `[batch, kv_len]`, True = a real key) remove keys from both sums;
a query that sees no key outputs 0.

Numerics. Every sum is computed as sum exp(s - m) * V / sum exp(s - m) with a shift m that
cancels between numerator and denominator, so nothing overflows for any scale of q, k, w,
and m is held constant under differentiation (exact: the output does not depend on it).

* `aft_full` / `aft_local`: exp(K_t' + w_t,t') = exp(K_t' - mK) * exp(w_t,t' - mw_t) with mK
  the per-feature max of K over the real keys a query sees (causal: the running max, taken
  at the end of blocks of `block_size` queries) and mw_t the max of row t of w over the
  causally visible keys, so the sums are two matmuls, O(T^2 d) time without a `[T, T, d]`
  tensor. That shift is an upper bound of the true per-(t, feature) max; the denominator
  can underflow only when the key with the largest K has a bias ~90 below the row maximum,
  or K grows by ~90 within a causal block (float32). When any denominator of a query that
  sees a key falls below sqrt(float32 tiny) ~ 1e-19, the whole call is recomputed
  (`lax.cond`, so only then) with the exact per-(t, feature) max, in blocks of queries with
  memory `block * T * d` (rematerialised in the backward pass). Under `jax.vmap` the
  `lax.cond` becomes a select and both paths run.
* `aft_simple`: non-causal, one softmax over keys per feature (exact max); causal, running
  sums of (max, num, den) triples merged in log space by a `lax.scan` with a running max,
  exact at any scale.
* `aft_conv`: the same shift idea, mK per feature and mw = max(0, max w) per head: a
  depthwise conv of exp(K - mK) V with exp(w - mw) over each window, plus the keys outside
  it summed directly by cumulative sums (never total minus window, which would cancel when
  a dominant key sits in the window with a very negative w), with the same underflow test
  and an exact fallback, still linear in T: the band of offsets the filter reaches (s
  tokens in 1-D; in 2-D the rows it spans, 2 (s // 2) cols + s) with the exact max per
  query and feature, the keys beyond it as running log-space sums (`lax.scan`), merged;
  rematerialised in the backward pass, so it keeps no residuals when not taken.

Cost: full and local O(T^2 d) time, O(T^2 + T d) memory (local is full with the windowed
bias, not the paper's O(T s d) banded form); simple O(T d); conv O(T s d) (1-D) or
O(T s^2 d) (2-D) plus O(T d) cumulative sums. The exact fallback of full and local is
O(T^2 d), of conv O(T nb d) with nb the band above.

Shapes: the cores take `[batch, length, dim]` arrays (AFT has no heads except conv's) and
compute in float32 at least (float64 stays float64); the output has q's dtype.

Modules (`AFTFull`, `AFTLocal`, `AFTSimple`, `AFTConv`), registered as `aft_full`,
`aft_local`, `aft_simple`, `aft_conv`: `query`, `key`, `value` projections width ->
`hidden_dim` (default width; `nnx.Linear`, kernel `[in, out]` = PyTorch weight^T) and `out`
hidden_dim -> width. Position bias `pos_bias_u`, `pos_bias_v` `[max_len, bias_rank]`, or
with `bias_rank=None` one table `pos_bias` `[max_len, max_len]` (zeros at init), sliced to
the sequence length. `max_len` is required for full and local: the ViT's token count is
(image_size / patch_size)^2 (+1 with pool_type='tok'), e.g. `ViT(..., image_size=224,
patch_size=16, attention='aft_full', attention_options={'max_len': 196})`; for the LM use
its `max_len`. AFT-conv: `kernel_size` s, `conv_dims` (None: 1 when causal, 2 otherwise;
2-D needs the ViT's patch grid, i.e. no class token), `conv_kernel` `[heads, s(, s)]`,
`conv_gain` and `conv_bias` `[heads]`. The backbone's `num_heads` sets AFT-conv's heads and
is unused by the other variants.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention import registry
from zoo.parallel import mesh as mesh_lib

_sg = jax.lax.stop_gradient

# Default memory budget (elements) of one block of the exact AFT-full path.
_EXACT_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------
# Checks.


def _positive_int(name: str, value, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                     f"got {value!r}")


def _compute_dtype(*xs):
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _check_qkv(q, k, v, *, same_dim: bool = True) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [batch, length, dim], got shape {x.shape}")
  if not (q.shape[0] == k.shape[0] == v.shape[0]):
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must agree on batch")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree on length")
  if q.shape[2] != v.shape[2]:
    raise ValueError(f"q {q.shape} and v {v.shape} must agree on dim (AFT is elementwise)")
  if same_dim and k.shape[2] != v.shape[2]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree on dim (AFT is elementwise)")


def _check_key_mask(key_mask, batch: int, kv_len: int):
  """`[batch, kv_len]` boolean (True = a real key) or None."""
  if key_mask is None:
    return None
  key_mask = jnp.asarray(key_mask)
  if key_mask.dtype != jnp.bool_:
    raise ValueError(f"key_mask must be boolean (True = attend), got dtype {key_mask.dtype}")
  try:
    return jnp.broadcast_to(key_mask, (batch, kv_len))
  except ValueError:
    raise ValueError(f"key_mask shape {key_mask.shape} does not broadcast to "
                     f"[batch, kv_len] = {(batch, kv_len)}") from None


def key_padding_mask(mask, batch: int, length: int):
  """A zoo mask (broadcastable to `[batch, heads, q_len, kv_len]`) -> `[batch, kv_len]`.

  AFT has no per-pair scores, so only masks that are the same for every head and query
  (key padding) can be honoured; anything else raises instead of being ignored.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
  if mask.ndim > 4:
    raise ValueError(f"mask must have at most 4 dims [batch, heads, q_len, kv_len], "
                     f"got {mask.shape}")
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(
        f"AFT supports key padding masks only (broadcastable to [batch, 1, 1, kv_len]), got "
        f"mask shape {mask.shape}: AFT has no per-query scores to mask; use causal=True for "
        f"causal masking")
  try:
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, length))
  except ValueError:
    raise ValueError(f"mask shape {mask.shape} does not broadcast to "
                     f"[batch, 1, 1, kv_len] = {(batch, 1, 1, length)}") from None


def _safe_ratio(num, den):
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _masked_exp(x, ok):
  """exp(x) where ok, 0 elsewhere, without inf/nan in values or gradients."""
  if ok is None:
    return jnp.exp(x)
  return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def _finite_or_zero(m):
  return jnp.where(jnp.isfinite(m), m, 0.0)


# ----------------------------------------------------------------------------------------
# AFT-full (Eq. 2) and AFT-local (Eq. 4).


def _full_matmul(q, k, v, w, key_mask, *, causal, block_size):
  """Sums of Eq. 2 as two matmuls with the shift mK + mw: (num, den) `[batch, q_len, d]`."""
  b, tq, d = q.shape
  tk = k.shape[1]
  # Bias side, [Tq, Tk] shared by the batch: row max over the causally visible keys.
  if causal:
    vis = jnp.asarray(np.arange(tk)[None, :] <= np.arange(tq)[:, None])
    mw = _finite_or_zero(jnp.max(jnp.where(vis, _sg(w), -jnp.inf), axis=-1, keepdims=True))
    bias = _masked_exp(w - mw, vis)
  else:
    bias = jnp.exp(w - jnp.max(_sg(w), axis=-1, keepdims=True))
  # Key side: per-feature max over the real keys a block of queries sees; padding is
  # removed here (exp(K) of a masked key is 0).
  ksg = jnp.where(key_mask[..., None], _sg(k), -jnp.inf)
  if causal:
    bq = block_size or max(64, -(-tq // 8))
    nb = -(-tq // bq)
    ends = np.minimum(np.minimum((np.arange(nb) + 1) * bq, tq) - 1, tk - 1)
    mk = jax.lax.cummax(ksg, axis=1)[:, ends]  # [B, nb, d]: the running max at block ends
    ok = jnp.asarray(np.arange(tk)[None, :] <= ends[:, None])[None, :, :, None]
    ok = ok & key_mask[:, None, :, None]  # [B, nb, Tk, 1]
  else:
    bq, nb = tq, 1
    mk = jnp.max(ksg, axis=1, keepdims=True)  # [B, 1, d]
    ok = key_mask[:, None, :, None]
  ek = _masked_exp(k[:, None] - _finite_or_zero(mk)[:, :, None], ok)  # [B, nb, Tk, d]
  # One [bq, Tk] x [Tk, d] matmul per block of queries.
  bias = jnp.pad(bias, ((0, nb * bq - tq), (0, 0))).reshape(nb, bq, tk)
  num = jnp.einsum("jqk,bjkd->bjqd", bias, ek * v[:, None]).reshape(b, nb * bq, d)
  den = jnp.einsum("jqk,bjkd->bjqd", bias, ek).reshape(b, nb * bq, d)
  return num[:, :tq], den[:, :tq]


def _exact(k, v, bias, key_mask, *, causal, max_block_elements=_EXACT_BLOCK_ELEMENTS):
  """Sums of Eq. 2 with the exact per-(query, feature) max, in blocks of queries.

  k `[B, Tk, H, kc]` (kc = 1: one key channel per head), v `[B, Tk, H, dh]`, bias
  `[H, Tq, Tk]` (H = 1 for AFT-full/local). Returns num `[B, Tq, H, dh]`, den
  `[B, Tq, H, kc]`. Memory per block ~ B * block * Tk * H * dh; the backward pass
  recomputes each block.
  """
  b, tk, h, _ = v.shape
  tq = bias.shape[1]
  be = max(1, min(tq, max_block_elements // max(1, b * tk * v.shape[2] * v.shape[3])))
  nb = -(-tq // be)
  rows = jnp.arange(nb * be).reshape(nb, be)
  wb = jnp.pad(bias, ((0, 0), (0, nb * be - tq), (0, 0))).reshape(h, nb, be, tk)
  wb = jnp.transpose(wb, (1, 2, 3, 0))  # [nb, be, Tk, H]

  @jax.checkpoint
  def block(xs):
    w_blk, r = xs
    s = k[:, None] + w_blk[None, :, :, :, None]  # [B, be, Tk, H, kc]
    ok = key_mask[:, None, :, None, None]
    if causal:
      ok = ok & (jnp.arange(tk)[None, :] <= r[:, None])[None, :, :, None, None]
    m = _finite_or_zero(jnp.max(jnp.where(ok, _sg(s), -jnp.inf), axis=2, keepdims=True))
    e = _masked_exp(s - m, ok)
    return jnp.sum(e * v[:, None], axis=2), jnp.sum(e, axis=2)

  num, den = jax.lax.map(block, (wb, rows))  # [nb, B, be, H, c]
  num = jnp.moveaxis(num, 0, 1).reshape((b, nb * be) + num.shape[3:])[:, :tq]
  den = jnp.moveaxis(den, 0, 1).reshape((b, nb * be) + den.shape[3:])[:, :tq]
  return num, den


def _full_exact(q, k, v, w, key_mask, *, causal, max_block_elements=_EXACT_BLOCK_ELEMENTS):
  """`_exact` for AFT-full: k, v `[B, T, d]`, w `[Tq, Tk]` -> (num, den) `[B, Tq, d]`."""
  del q
  num, den = _exact(k[:, :, None], v[:, :, None], w[None], key_mask, causal=causal,
                    max_block_elements=max_block_elements)
  return num[:, :, 0], den[:, :, 0]


def local_bias(pos_bias: jax.Array, window: int) -> jax.Array:
  """Eq. 4: w_t,t' where |t - t'| < window, else 0 (not -inf)."""
  _positive_int("window", window)
  tq, tk = pos_bias.shape
  near = np.abs(np.arange(tq)[:, None] - np.arange(tk)[None, :]) < window
  return jnp.where(jnp.asarray(near), pos_bias, jnp.zeros((), pos_bias.dtype))


@functools.partial(jax.jit, static_argnames=("causal", "block_size", "window"))
def _aft_full(q, k, v, w, key_mask, *, causal, block_size, window):
  dt = _compute_dtype(q, k, v, w)
  qf, kf, vf, wf = (x.astype(dt) for x in (q, k, v, w))
  if window is not None:
    wf = local_bias(wf, window)
  num, den = _full_matmul(qf, kf, vf, wf, key_mask, causal=causal, block_size=block_size)
  # The shift is an upper bound: if it left a denominator (of a query that sees a key)
  # under ~1e-19, recompute everything with the exact max.
  tq, tk = w.shape
  if causal:
    seen = prefix_sum(key_mask, 1) > 0  # [B, Tk]: some real key at or before t'
    sees_a_key = seen[:, np.minimum(np.arange(tq), tk - 1), None]
  else:
    sees_a_key = jnp.any(key_mask, axis=1)[:, None, None]
  underflow = jnp.any((den < float(np.sqrt(np.finfo(dt).tiny))) & sees_a_key)
  num, den = jax.lax.cond(underflow,
                          lambda: _full_exact(qf, kf, vf, wf, key_mask, causal=causal),
                          lambda: (num, den))
  return (jax.nn.sigmoid(qf) * _safe_ratio(num, den)).astype(q.dtype)


def _key_mask_or_all(key_mask, batch, kv_len):
  """The checked key mask, all True when None (one compiled path for both)."""
  if key_mask is None:
    return jnp.ones((batch, kv_len), bool)
  return _check_key_mask(key_mask, batch, kv_len)


def aft_full(q: jax.Array, k: jax.Array, v: jax.Array, pos_bias: jax.Array, *,
             causal: bool = False, key_mask: jax.Array | None = None,
             block_size: int | None = None) -> jax.Array:
  """AFT-full, Eq. 2: sigma(Q_t) * sum_t' exp(K_t' + w_t,t') V_t' / sum_t' exp(K_t' + w_t,t').

  Args:
    q: `[batch, q_len, dim]`; k, v: `[batch, kv_len, dim]` (already projected).
    pos_bias: w, `[q_len, kv_len]`.
    causal: query t sums over keys t' <= t only (positions aligned at the start).
    key_mask: `[batch, kv_len]` boolean, True = a real key; masked keys leave both sums.
    block_size: causal only: queries per block sharing one running max of K (default
      max(64, q_len / 8)); smaller blocks follow the running max more closely.

  Returns:
    `[batch, q_len, dim]` in q's dtype. O(q_len * kv_len * dim) time, no
    `[q_len, kv_len, dim]` tensor; see the module docstring for the numerics.
  """
  return _full_or_local(q, k, v, pos_bias, causal=causal, key_mask=key_mask,
                        block_size=block_size, window=None)


def aft_local(q: jax.Array, k: jax.Array, v: jax.Array, pos_bias: jax.Array, *, window: int,
              causal: bool = False, key_mask: jax.Array | None = None,
              block_size: int | None = None) -> jax.Array:
  """AFT-local, Eq. 4: `aft_full` with w zeroed (not masked) where |t - t'| >= window.

  Far keys still count, with bias 0: AFT-local keeps global connectivity. Same arguments
  as `aft_full`, plus `window` s >= 1 (s >= length gives AFT-full).
  """
  _positive_int("window", window)
  return _full_or_local(q, k, v, pos_bias, causal=causal, key_mask=key_mask,
                        block_size=block_size, window=int(window))


def _full_or_local(q, k, v, pos_bias, *, causal, key_mask, block_size, window):
  _check_qkv(q, k, v)
  _positive_int("block_size", block_size, allow_none=True)
  b, tq, _ = q.shape
  tk = k.shape[1]
  if pos_bias.shape != (tq, tk):
    raise ValueError(f"pos_bias must be [q_len, kv_len] = {(tq, tk)}, got {pos_bias.shape}")
  key_mask = _key_mask_or_all(key_mask, b, tk)
  return _aft_full(q, k, v, pos_bias, key_mask, causal=bool(causal), block_size=block_size,
                   window=window)


# ----------------------------------------------------------------------------------------
# Log-space triples (m, num, den): sum exp(s) V = exp(m) num, sum exp(s) = exp(m) den.
# m is built from stop_gradient values only, so it is a constant for differentiation.


def _leaves(k, v, valid):
  """One triple per key: m = K, num = V, den = 1 (empty where not valid)."""
  e = jnp.where(valid, jnp.exp(k - _sg(k)), 0.0)  # 1 (with d/dK) or 0
  return jnp.where(valid, _sg(k), -jnp.inf), e * v, e


def _merge(a, b):
  ma, na, da = a
  mb, nb, db = b
  m = jnp.maximum(ma, mb)
  ref = _finite_or_zero(m)
  sa, sb = jnp.exp(ma - ref), jnp.exp(mb - ref)
  return m, na * sa + nb * sb, da * sa + db * sb


def _scan(t, axis):
  """Running merge along `axis`: element i of the result merges elements <= i.

  A sequential `lax.scan` with a (running max, num, den) carry: exact at any scale, O(n)
  work and a small graph (an associative scan of triples compiles several times slower).
  """
  xs = tuple(jnp.moveaxis(x, axis, 0) for x in t)

  def step(carry, x):
    carry = _merge(carry, x)
    return carry, carry

  m, n, d = xs
  init = (jnp.full(m.shape[1:], -jnp.inf, m.dtype), jnp.zeros(n.shape[1:], n.dtype),
          jnp.zeros(d.shape[1:], d.dtype))
  _, out = jax.lax.scan(step, init, xs)
  return tuple(jnp.moveaxis(x, 0, axis) for x in out)


def _shift(x, offset: int, axis: int, fill):
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
_PREFIX_BLOCK = 64


def prefix_sum(x: jax.Array, axis: int, reverse: bool = False, *,
               block: int = _PREFIX_BLOCK) -> jax.Array:
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
  carry = _shift(prefix_sum(totals, axis, reverse, block=block), 1 if reverse else -1, axis, 0)
  out = (within + jnp.expand_dims(carry, axis + 1)).reshape(
      x.shape[:axis] + (nb * block,) + x.shape[axis + 1:])
  return jax.lax.slice_in_dim(out, 0, n, axis=axis)


def _ratio(t):
  return _safe_ratio(t[1], t[2])


# ----------------------------------------------------------------------------------------
# AFT-simple (Eq. 5).


def aft_simple(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
               key_mask: jax.Array | None = None) -> jax.Array:
  """AFT-simple, Eq. 5: sigma(Q_t) * sum_t' softmax_t'(K)_t' V_t' (per feature).

  Linear time and memory in length. Causal: running sums over t' <= t with a running max
  (a scan of log-space triples), exact at any scale.

  Args:
    q: `[batch, q_len, dim]`; k, v: `[batch, kv_len, dim]`.
    causal: query t sums over keys t' <= t (queries past kv_len see every key).
    key_mask: `[batch, kv_len]` boolean, True = a real key.
  """
  _check_qkv(q, k, v)
  key_mask = _key_mask_or_all(key_mask, q.shape[0], k.shape[1])
  return _aft_simple(q, k, v, key_mask, causal=bool(causal))


@functools.partial(jax.jit, static_argnames=("causal",))
def _aft_simple(q, k, v, key_mask, *, causal):
  tq, tk = q.shape[1], k.shape[1]
  dt = _compute_dtype(q, k, v)
  qf, kf, vf = (x.astype(dt) for x in (q, k, v))
  valid = key_mask[..., None]
  if causal:
    y = _ratio(_scan(_leaves(kf, vf, valid), axis=1))[:, np.minimum(np.arange(tq), tk - 1)]
  else:
    mk = _finite_or_zero(jnp.max(jnp.where(valid, _sg(kf), -jnp.inf), axis=1, keepdims=True))
    e = _masked_exp(kf - mk, valid)
    y = _safe_ratio(jnp.sum(e * vf, axis=1, keepdims=True), jnp.sum(e, axis=1, keepdims=True))
  return (jax.nn.sigmoid(qf) * y).astype(q.dtype)


# ----------------------------------------------------------------------------------------
# AFT-conv (Eq. 6, Eq. 8).


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
    return _shift(prefix_sum(x, 1), -s, 1, 0.0)
  r = s // 2
  return (_shift(prefix_sum(x, 1), -(r + 1), 1, 0.0)
          + _shift(prefix_sum(x, 1, reverse=True), r + 1, 1, 0.0))


def _outside_2d(x, s):
  """x `[B, R, C, ...]`: sum over the cells outside each cell's s x s window: the rows
  above and below it, plus the cells beside it in its rows. Sums of non-negative weights
  only (no total-minus-window subtraction, so no cancellation)."""
  r = s // 2
  rows = jnp.sum(x, axis=2, keepdims=True)
  out = (_shift(prefix_sum(rows, 1), -(r + 1), 1, 0.0)
         + _shift(prefix_sum(rows, 1, reverse=True), r + 1, 1, 0.0))
  beside = (_shift(prefix_sum(x, 2), -(r + 1), 2, 0.0)
            + _shift(prefix_sum(x, 2, reverse=True), r + 1, 2, 0.0))
  for dr in range(-r, r + 1):
    out = out + _shift(beside, dr, 1, 0.0)
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


def band_triple(ek, ev, real, bias, length: int):
  """Exact triple of the keys in each query's band: ek `[B, length + nb - 1, H, kc]`, ev
  `[B, ..., H, dh]` (the keys from offset lo of query 0 on), real `[B or 1, length + nb -
  1]` (which of them are real keys), bias `[length, nb, H]`. The max is taken over the
  band per (query, head, channel), so nothing underflows at any scale."""
  nb = bias.shape[1]
  kb = jnp.stack([ek[:, j:j + length] for j in range(nb)], axis=2)  # [B, T, nb, H, kc]
  vb = jnp.stack([ev[:, j:j + length] for j in range(nb)], axis=2)
  ok = jnp.stack([real[:, j:j + length] for j in range(nb)], axis=2)[..., None, None]
  s = kb + bias[None, :, :, :, None]
  m = _finite_or_zero(jnp.max(jnp.where(ok, _sg(s), -jnp.inf), axis=2))
  e = _masked_exp(s - m[:, :, None], ok)
  return (jnp.where(jnp.any(ok, axis=2), m, -jnp.inf), jnp.sum(e * vb, axis=2),
          jnp.sum(e, axis=2))


def far_triples(leaves, nb: int, length: int, causal: bool):
  """Running sums over the keys before (and, not causal, after) each query's band, within
  the block of `leaves` (triples of keys from offset lo of query 0 on): (left, right);
  right is None when causal."""
  fills = (-jnp.inf, 0.0, 0.0)
  prefix = _scan(leaves, axis=1)
  left = tuple(_shift(x, -1, 1, f)[:, :length] for x, f in zip(prefix, fills))
  if causal:
    return left, None
  flipped = tuple(jnp.flip(x, axis=1) for x in leaves)
  suffix = tuple(jnp.flip(x, axis=1) for x in _scan(flipped, axis=1))
  right = tuple(_shift(x, nb, 1, f)[:, :length] for x, f in zip(suffix, fills))
  return left, right


def _conv_banded(k, v, w, key_mask, *, causal, grid):
  """Eq. 6's sums exactly, in O(T nb d): the band of biased keys with its own max per
  query, the keys beyond it by running log-space sums. Returns (num, den) of the merged
  triple. k `[B, T, H, kc]`, v `[B, T, H, dh]`, w `[H, s(, s)]`."""
  t, heads = k.shape[1], w.shape[0]
  lo, hi = band_offsets(w.shape, t, grid, causal)
  nb = hi - lo + 1
  pad = ((0, 0), (-lo, hi), (0, 0), (0, 0))
  ek, ev = jnp.pad(k, pad), jnp.pad(v, pad)
  real = jnp.pad(key_mask, ((0, 0), (-lo, hi)))
  flat = jnp.concatenate([w.reshape(heads, -1), jnp.zeros((heads, 1), w.dtype)], axis=1)
  bias = jnp.transpose(flat[:, band_taps(w.shape, t, grid, causal, lo, hi)], (1, 2, 0))
  band = band_triple(ek, ev, real, bias, t)
  leaves = _leaves(ek, ev, real[:, :, None, None])
  left, right = far_triples(leaves, nb, t, causal)
  out = _merge(band, left)
  if right is not None:
    out = _merge(out, right)
  return out[1], out[2]


def _conv_sums(k, v, w, key_mask, *, causal, grid):
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
  ek = _masked_exp(k - _finite_or_zero(mk), valid)  # [B, T, H, kc], <= 1
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
  _check_qkv(q, k, v, same_dim=False)
  key_mask = _key_mask_or_all(key_mask, q.shape[0], k.shape[1])
  return _aft_conv(q, k, v, kernel, key_mask, causal=bool(causal), grid=grid)


@functools.partial(jax.jit, static_argnames=("causal", "grid"))
def _aft_conv(q, k, v, kernel, key_mask, *, causal, grid):
  b, t, dim = q.shape
  if k.shape[1] != t:
    raise ValueError(f"aft_conv is self-attention: q {q.shape} and k {k.shape} must have the "
                     f"same length")
  if kernel.ndim not in (2, 3) or (kernel.ndim == 3 and kernel.shape[1] != kernel.shape[2]):
    raise ValueError(f"kernel must be [heads, s] (1-D) or [heads, s, s] (2-D), got "
                     f"{kernel.shape}")
  heads, s = kernel.shape[0], kernel.shape[1]
  if dim % heads:
    raise ValueError(f"dim {dim} must be a multiple of the kernel's heads {heads}")
  if k.shape[2] not in (heads, dim):
    raise ValueError(f"k must have heads ({heads}) or dim ({dim}) channels, got {k.shape}")
  two_d = kernel.ndim == 3
  if two_d and causal:
    raise ValueError("aft_conv: causal is 1-D only (a 2-D kernel has no causal form here)")
  if not causal and s % 2 == 0:
    raise ValueError(f"kernel_size must be odd for a centred (non-causal) conv, got {s}")
  dt = _compute_dtype(q, k, v, kernel)
  dh = dim // heads
  qf = q.astype(dt).reshape(b, t, heads, dh)
  vf = v.astype(dt).reshape(b, t, heads, dh)
  kf = k.astype(dt).reshape(b, t, heads, -1)
  wf = kernel.astype(dt)
  if two_d:
    if grid is None:
      raise ValueError("aft_conv with a 2-D kernel needs grid=(rows, cols) (the ViT passes "
                       "it when there is no class token)")
    if grid[0] * grid[1] != t:
      raise ValueError(f"grid {grid} has {grid[0] * grid[1]} cells but length is {t}")
  num, den = _conv_sums(kf, vf, wf, key_mask, causal=causal, grid=grid)
  # Underflow (a denominator of a query that sees a key below ~1e-19): recompute exactly.
  if causal:
    sees_a_key = (prefix_sum(key_mask, 1) > 0)[:, :, None, None]
  else:
    sees_a_key = jnp.any(key_mask, axis=1)[:, None, None, None]
  underflow = jnp.any((den < float(np.sqrt(np.finfo(dt).tiny))) & sees_a_key)

  # Rematerialised in the backward pass, so that the branch not taken keeps no residuals.
  exact = jax.checkpoint(functools.partial(_conv_banded, causal=causal, grid=grid))
  num, den = jax.lax.cond(underflow, lambda: exact(kf, vf, wf, key_mask), lambda: (num, den))
  return (jax.nn.sigmoid(qf) * _safe_ratio(num, den)).reshape(b, t, dim).astype(q.dtype)


# ----------------------------------------------------------------------------------------
# Modules.


class _AFTBase(nnx.Module):
  """query/key/value projections width -> hidden_dim, a core, and `out` hidden_dim -> width."""

  family = "aft"

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               hidden_dim: int | None = None, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    _positive_int("width", width)
    _positive_int("hidden_dim", hidden_dim, allow_none=True)
    self.width, self.num_heads, self.causal = width, num_heads, causal
    self.hidden_dim = hidden = hidden_dim or width
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform())
    self.query = nnx.Linear(width, hidden, **kw)
    self.key = nnx.Linear(width, self._key_features(hidden), **kw)
    self.value = nnx.Linear(width, hidden, **kw)
    self.out = nnx.Linear(hidden, width, **kw)

  def _key_features(self, hidden: int) -> int:
    return hidden

  # The core whose strategies `zoo.parallel.sequence_aft` registers (= the family name).
  sequence_parallel_core: str | None = None

  def attend(self, q, k, v, *, key_mask=None, grid=None):
    raise NotImplementedError

  def core_options(self, length: int, grid=None) -> dict:
    """The core's options for the sequence-parallel strategies (position bias, kernel)."""
    return {}

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, grid=None) -> jax.Array:
    """x `[batch, length, width]` -> `[batch, length, width]`.

    mask: key padding only (broadcastable to `[batch, 1, 1, length]`, True = attend);
    other masks raise. grid: the ViT's (rows, cols) patch grid (used by 2-D AFT-conv).
    Inside `zoo.parallel.sharding_context(..., strategy=...)` the core runs split along
    the sequence (`zoo.parallel.sequence_aft`), which takes no mask.
    """
    if x.ndim != 3:
      raise ValueError(f"{self.family} expects x [batch, length, width], got {x.shape}")
    q, k, v = self.query(x), self.key(x), self.value(x)
    ctx = mesh_lib.active()
    if ctx is not None and ctx.strategy is not None:
      from zoo.parallel import sequence  # pylint: disable=import-outside-toplevel
      if mask is not None:
        raise ValueError("sequence-parallel attention takes no mask")
      y = sequence.run(self.sequence_parallel_core, q, k, v, mesh=ctx.mesh,
                       strategy=ctx.strategy, causal=self.causal,
                       **self.core_options(x.shape[1], grid))
    else:
      key_mask = key_padding_mask(mask, x.shape[0], x.shape[1])
      y = self.attend(q, k, v, key_mask=key_mask, grid=grid)
    return self.out(y)


class _PositionBiasMixin:
  """w = u v^T (Eq. 7) or a full table, sliced to the sequence length."""

  def _init_position_bias(self, max_len, bias_rank, param_dtype, rngs):
    if max_len is None:
      raise ValueError(
          f"{self.family} needs max_len (the longest sequence, which sizes the position bias);"
          f" set attention_options={{'max_len': ...}}: the LM's max_len, or the ViT's token "
          f"count (image_size / patch_size) ** 2 (+1 with a class token)")
    _positive_int("max_len", max_len)
    _positive_int("bias_rank", bias_rank, allow_none=True)
    self.max_len, self.bias_rank = max_len, bias_rank
    if bias_rank is None:
      self.pos_bias = nnx.Param(jnp.zeros((max_len, max_len), param_dtype))
    else:
      init = nnx.initializers.normal(stddev=1e-2)
      self.pos_bias_u = nnx.Param(init(rngs.params(), (max_len, bias_rank), param_dtype))
      self.pos_bias_v = nnx.Param(init(rngs.params(), (max_len, bias_rank), param_dtype))

  def position_bias(self, q_len: int, kv_len: int) -> jax.Array:
    """w `[q_len, kv_len]` (float32 or the param dtype)."""
    if max(q_len, kv_len) > self.max_len:
      raise ValueError(f"sequence length {max(q_len, kv_len)} exceeds {self.family}'s "
                       f"max_len {self.max_len}")
    if self.bias_rank is None:
      return self.pos_bias[:q_len, :kv_len]
    return self.pos_bias_u[:q_len] @ self.pos_bias_v[:kv_len].T


class AFTFull(_PositionBiasMixin, _AFTBase):
  """AFT-full (Eq. 2) with a factorised (Eq. 7) or full position bias."""

  family = "aft_full"

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               max_len: int | None = None, bias_rank: int | None = 128,
               block_size: int | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs,
               **kwargs):
    _positive_int("block_size", block_size, allow_none=True)
    super().__init__(width, num_heads, causal=causal, param_dtype=param_dtype, rngs=rngs,
                     **kwargs)
    self._init_position_bias(max_len, bias_rank, param_dtype, rngs)
    self.block_size = block_size

  sequence_parallel_core = "aft_full"

  def core_options(self, length: int, grid=None) -> dict:
    return {"pos_bias": self.position_bias(length, length), "block_size": self.block_size}

  def attend(self, q, k, v, *, key_mask=None, grid=None):
    w = self.position_bias(q.shape[1], k.shape[1])
    return aft_full(q, k, v, w, causal=self.causal, key_mask=key_mask,
                    block_size=self.block_size)


class AFTLocal(AFTFull):
  """AFT-local (Eq. 4): AFT-full with the bias zeroed outside |t - t'| < window."""

  family = "aft_local"

  def __init__(self, width: int, num_heads: int, *, window: int | None = None, **kwargs):
    if window is None:
      raise ValueError("aft_local needs window (the local span s: the bias is kept where "
                       "|t - t'| < window)")
    _positive_int("window", window)
    super().__init__(width, num_heads, **kwargs)
    self.window = window

  sequence_parallel_core = "aft_local"

  def core_options(self, length: int, grid=None) -> dict:
    return {**super().core_options(length, grid), "window": self.window}

  def attend(self, q, k, v, *, key_mask=None, grid=None):
    w = self.position_bias(q.shape[1], k.shape[1])
    return aft_local(q, k, v, w, window=self.window, causal=self.causal, key_mask=key_mask,
                     block_size=self.block_size)


class AFTSimple(_AFTBase):
  """AFT-simple (Eq. 5): no position bias, linear in length."""

  family = "aft_simple"

  def __init__(self, width: int, num_heads: int, **kwargs):
    super().__init__(width, num_heads, **kwargs)

  sequence_parallel_core = "aft_simple"

  def attend(self, q, k, v, *, key_mask=None, grid=None):
    return aft_simple(q, k, v, causal=self.causal, key_mask=key_mask)


class AFTConv(_AFTBase):
  """AFT-conv (Eq. 6, 8): `num_heads` heads, a depthwise s (x s) filter per head.

  conv_dims: 1 (over the token sequence; causal uses past taps only) or 2 (over the ViT's
  patch grid, non-causal); None picks 1 when causal, else 2. key_per_head: K has one channel
  per head (default) or hidden_dim channels.
  """

  family = "aft_conv"

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               kernel_size: int = 3, conv_dims: int | None = None, key_per_head: bool = True,
               hidden_dim: int | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs,
               **kwargs):
    _positive_int("kernel_size", kernel_size)
    _positive_int("num_heads", num_heads)
    if conv_dims is None:
      conv_dims = 1 if causal else 2
    if conv_dims not in (1, 2) or isinstance(conv_dims, bool):
      raise ValueError(f"conv_dims must be 1, 2 or None, got {conv_dims!r}")
    if causal and conv_dims == 2:
      raise ValueError("conv_dims=2 has no causal form; use conv_dims=1 in a causal model")
    if not causal and kernel_size % 2 == 0:
      raise ValueError(f"kernel_size must be odd for a centred (non-causal) conv, got "
                       f"{kernel_size}")
    if not isinstance(key_per_head, bool):
      raise ValueError(f"key_per_head must be a bool, got {key_per_head!r}")
    hidden = hidden_dim or width
    if hidden % num_heads:
      raise ValueError(f"hidden_dim {hidden} must be a multiple of num_heads {num_heads}")
    self.kernel_size, self.conv_dims, self.key_per_head = kernel_size, conv_dims, key_per_head
    super().__init__(width, num_heads, causal=causal, hidden_dim=hidden_dim,
                     param_dtype=param_dtype, rngs=rngs, **kwargs)
    shape = (num_heads,) + (kernel_size,) * conv_dims
    # The raw filter's scale is irrelevant after Eq. 8's standardisation; gain and bias 0.
    self.conv_kernel = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), shape, param_dtype))
    self.conv_gain = nnx.Param(jnp.zeros((num_heads,), param_dtype))
    self.conv_bias = nnx.Param(jnp.zeros((num_heads,), param_dtype))

  def _key_features(self, hidden: int) -> int:
    return self.num_heads if self.key_per_head else hidden

  def kernel(self) -> jax.Array:
    """The reparameterised filter w (Eq. 8), `[heads, s(, s)]`."""
    return aft_conv_kernel(self.conv_kernel[...], self.conv_gain[...], self.conv_bias[...])

  sequence_parallel_core = "aft_conv"

  def core_options(self, length: int, grid=None) -> dict:
    self._check_grid(grid)
    return {"kernel": self.kernel(), "grid": grid if self.conv_dims == 2 else None}

  def _check_grid(self, grid):
    if self.conv_dims == 2 and grid is None:
      raise ValueError(
          "aft_conv with conv_dims=2 needs the patch grid: in the ViT use a pool_type other "
          "than 'tok' (no class token), or set attention_options={'conv_dims': 1}")

  def attend(self, q, k, v, *, key_mask=None, grid=None):
    self._check_grid(grid)
    return aft_conv(q, k, v, self.kernel(), causal=self.causal,
                    grid=grid if self.conv_dims == 2 else None, key_mask=key_mask)


registry.register(
    "aft_full", AFTFull, supports_causal=True,
    description="AFT-full (Zhai et al. 2021, Eq. 2): exp(K + w)-weighted average of V per "
                "feature, gated by sigmoid(Q); needs max_len")
registry.register(
    "aft_local", AFTLocal, supports_causal=True,
    description="AFT-local (Eq. 4): AFT-full with the position bias only within |t - t'| < "
                "window; needs max_len and window")
registry.register(
    "aft_simple", AFTSimple, supports_causal=True,
    description="AFT-simple (Eq. 5): softmax over keys per feature, no position bias, linear")
registry.register(
    "aft_conv", AFTConv, supports_causal=True,
    description="AFT-conv (Eq. 6): per-head depthwise-conv position bias (1-D causal or 2-D "
                "over the ViT patch grid), starts as per-head AFT-simple")
