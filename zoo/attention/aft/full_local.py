"""AFT-full (Eq. 2) and AFT-local (Eq. 4), Zhai et al. 2021 (arXiv 2105.14103).

With Q, K, V `[T, d]` the projected inputs, w `[T, T]` the learned position bias and sigma
the logistic sigmoid:

    Eq. 2 (full):  Y_t = sigma(Q_t) * sum_t' exp(K_t' + w_t,t') V_t' / sum_t' exp(K_t' + w_t,t')

Eq. 4 (local) is Eq. 2 with w_t,t' kept where |t - t'| < s (`window`) and set to 0, not
-inf, elsewhere (`local_bias`): every key still counts, far ones without a bias. Causal:
the sums run over t' <= t. Key padding (`key_mask`) removes keys from both sums; a query
that sees no key outputs 0.

Numerics. exp(K_t' + w_t,t') = exp(K_t' - mK) * exp(w_t,t' - mw_t) with mK the per-feature
max of K over the real keys a query sees (causal: the running max, taken at the end of
blocks of `block_size` queries) and mw_t the max of row t of w over the causally visible
keys, so the sums are two matmuls (`full_matmul`), O(T^2 d) time without a `[T, T, d]`
tensor; the shift cancels between numerator and denominator and is held constant under
differentiation. It is an upper bound of the true per-(t, feature) max: the denominator
can underflow only when the key with the largest K has a bias ~90 below the row maximum,
or K grows by ~90 within a causal block (float32). When any denominator of a query that
sees a key falls below sqrt(float32 tiny) ~ 1e-19, the whole call is recomputed
(`lax.cond`, so only then) with the exact per-(t, feature) max (`full_exact`), in blocks of
queries with memory `block * T * d` (rematerialised in the backward pass). Under
`jax.vmap` the `lax.cond` becomes a select and both paths run.

Cost: O(T^2 d) time, O(T^2 + T d) memory (local is full with the windowed bias, not the
paper's O(T s d) banded form; the sequence-parallel `halo` strategy is banded).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import logspace
from zoo.attention.aft.common import (check_qkv, compute_dtype, gate, key_mask_or_all,
                                      key_padding_mask, sees_a_key, underflows)
from zoo.attention.options import positive_int

_sg = jax.lax.stop_gradient

# Default memory budget (elements) of one block of the exact path.
EXACT_BLOCK_ELEMENTS = 1 << 24


def full_matmul(q, k, v, w, key_mask, *, causal, block_size):
  """Sums of Eq. 2 as two matmuls with the shift mK + mw: (num, den) `[batch, q_len, d]`."""
  b, tq, d = q.shape
  tk = k.shape[1]
  # Bias side, [Tq, Tk] shared by the batch: row max over the causally visible keys.
  if causal:
    vis = jnp.asarray(np.arange(tk)[None, :] <= np.arange(tq)[:, None])
    mw = logspace.finite_or_zero(
        jnp.max(jnp.where(vis, _sg(w), -jnp.inf), axis=-1, keepdims=True))
    bias = logspace.masked_exp(w - mw, vis)
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
  ek = logspace.masked_exp(k[:, None] - logspace.finite_or_zero(mk)[:, :, None], ok)
  # One [bq, Tk] x [Tk, d] matmul per block of queries.
  bias = jnp.pad(bias, ((0, nb * bq - tq), (0, 0))).reshape(nb, bq, tk)
  num = jnp.einsum("jqk,bjkd->bjqd", bias, ek * v[:, None]).reshape(b, nb * bq, d)
  den = jnp.einsum("jqk,bjkd->bjqd", bias, ek).reshape(b, nb * bq, d)
  return num[:, :tq], den[:, :tq]


def exact_sums(k, v, bias, key_mask, *, causal, max_block_elements=EXACT_BLOCK_ELEMENTS):
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
    m = logspace.finite_or_zero(jnp.max(jnp.where(ok, _sg(s), -jnp.inf), axis=2,
                                        keepdims=True))
    e = logspace.masked_exp(s - m, ok)
    return jnp.sum(e * v[:, None], axis=2), jnp.sum(e, axis=2)

  num, den = jax.lax.map(block, (wb, rows))  # [nb, B, be, H, c]
  num = jnp.moveaxis(num, 0, 1).reshape((b, nb * be) + num.shape[3:])[:, :tq]
  den = jnp.moveaxis(den, 0, 1).reshape((b, nb * be) + den.shape[3:])[:, :tq]
  return num, den


def full_exact(q, k, v, w, key_mask, *, causal, max_block_elements=EXACT_BLOCK_ELEMENTS):
  """`exact_sums` for AFT-full: k, v `[B, T, d]`, w `[Tq, Tk]` -> (num, den) `[B, Tq, d]`."""
  del q
  num, den = exact_sums(k[:, :, None], v[:, :, None], w[None], key_mask, causal=causal,
                        max_block_elements=max_block_elements)
  return num[:, :, 0], den[:, :, 0]


def local_bias(pos_bias: jax.Array, window: int) -> jax.Array:
  """Eq. 4: w_t,t' where |t - t'| < window, else 0 (not -inf)."""
  positive_int("window", window)
  tq, tk = pos_bias.shape
  near = np.abs(np.arange(tq)[:, None] - np.arange(tk)[None, :]) < window
  return jnp.where(jnp.asarray(near), pos_bias, jnp.zeros((), pos_bias.dtype))


@functools.partial(jax.jit, static_argnames=("causal", "block_size", "window"))
def _aft_full(q, k, v, w, key_mask, *, causal, block_size, window):
  dt = compute_dtype(q, k, v, w)
  qf, kf, vf, wf = (x.astype(dt) for x in (q, k, v, w))
  if window is not None:
    wf = local_bias(wf, window)
  num, den = full_matmul(qf, kf, vf, wf, key_mask, causal=causal, block_size=block_size)
  # The shift is an upper bound: if it left a denominator (of a query that sees a key)
  # under ~1e-19, recompute everything with the exact max.
  underflow = underflows(den, sees_a_key(key_mask, w.shape[0], causal), dt)
  num, den = jax.lax.cond(underflow,
                          lambda: full_exact(qf, kf, vf, wf, key_mask, causal=causal),
                          lambda: (num, den))
  return gate(qf, num, den).astype(q.dtype)


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
  positive_int("window", window)
  return _full_or_local(q, k, v, pos_bias, causal=causal, key_mask=key_mask,
                        block_size=block_size, window=int(window))


def _full_or_local(q, k, v, pos_bias, *, causal, key_mask, block_size, window):
  check_qkv(q, k, v)
  positive_int("block_size", block_size, allow_none=True)
  b, tq, _ = q.shape
  tk = k.shape[1]
  if pos_bias.shape != (tq, tk):
    raise ValueError(f"pos_bias must be [q_len, kv_len] = {(tq, tk)}, got {pos_bias.shape}")
  key_mask = key_mask_or_all(key_mask, b, tk)
  return _aft_full(q, k, v, pos_bias, key_mask, causal=bool(causal), block_size=block_size,
                   window=window)


def full_attention(q, k, v, *, causal=False, mask=None, pos_bias, block_size=None):
  """`aft_full` with the zoo's core signature: `mask` must be a key padding mask."""
  return aft_full(q, k, v, pos_bias, causal=causal, block_size=block_size,
                  key_mask=key_padding_mask(mask, q.shape[0], k.shape[1]))


def local_attention(q, k, v, *, causal=False, mask=None, pos_bias, window, block_size=None):
  """`aft_local` with the zoo's core signature: `mask` must be a key padding mask."""
  return aft_local(q, k, v, pos_bias, window=window, causal=causal, block_size=block_size,
                   key_mask=key_padding_mask(mask, q.shape[0], k.shape[1]))
