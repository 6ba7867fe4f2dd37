"""AFT-simple (Eq. 5), Zhai et al. 2021 (arXiv 2105.14103).

With w = 0 the key sums of Eq. 2 are shared by all queries:

    Eq. 5:  Y_t = sigma(Q_t) * sum_t' softmax_t'(K)_t' * V_t'   (per feature)

linear in length. Non-causal: one softmax over keys per feature (exact max). Causal: the
sums run over t' <= t, as running sums of log-space triples (m, num, den) merged by a
`lax.scan` with a running max (`zoo.attention.logspace.scan`), exact at any scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import logspace
from zoo.attention.aft.common import (check_qkv, compute_dtype, key_mask_or_all,
                                      key_padding_mask)

_sg = jax.lax.stop_gradient


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
  check_qkv(q, k, v)
  key_mask = key_mask_or_all(key_mask, q.shape[0], k.shape[1])
  return _aft_simple(q, k, v, key_mask, causal=bool(causal))


@functools.partial(jax.jit, static_argnames=("causal",))
def _aft_simple(q, k, v, key_mask, *, causal):
  tq, tk = q.shape[1], k.shape[1]
  dt = compute_dtype(q, k, v)
  qf, kf, vf = (x.astype(dt) for x in (q, k, v))
  valid = key_mask[..., None]
  if causal:
    y = logspace.ratio(logspace.scan(logspace.leaves(kf, vf, valid), axis=1))
    y = y[:, np.minimum(np.arange(tq), tk - 1)]
  else:
    mk = logspace.finite_or_zero(
        jnp.max(jnp.where(valid, _sg(kf), -jnp.inf), axis=1, keepdims=True))
    e = logspace.masked_exp(kf - mk, valid)
    y = logspace.safe_ratio(jnp.sum(e * vf, axis=1, keepdims=True),
                            jnp.sum(e, axis=1, keepdims=True))
  return (jax.nn.sigmoid(qf) * y).astype(q.dtype)


def simple_attention(q, k, v, *, causal=False, mask=None):
  """`aft_simple` with the zoo's core signature: `mask` must be a key padding mask."""
  return aft_simple(q, k, v, causal=causal,
                    key_mask=key_padding_mask(mask, q.shape[0], k.shape[1]))
