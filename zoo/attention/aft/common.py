"""What every AFT core shares: the compute dtype, shape checks and key padding masks.

The cores take `[batch, length, dim]` arrays (AFT has no heads, except AFT-conv's) and a
key padding mask `key_mask` `[batch, kv_len]` (True = a real key); the zoo's general
`mask` (broadcastable to `[batch, heads, q_len, kv_len]`) becomes one by
`key_padding_mask`, which refuses any mask that varies per head or query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import logspace, masking


def compute_dtype(*xs) -> jnp.dtype:
  """float32 at least (float64 stays float64)."""
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def check_qkv(q, k, v, *, same_dim: bool = True) -> None:
  """q, k, v `[batch, length, dim]`, elementwise over dim (k may differ when not `same_dim`)."""
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


def key_mask_or_all(key_mask, batch: int, kv_len: int) -> jax.Array:
  """`key_mask` checked and broadcast to `[batch, kv_len]`; all True when None (one
  compiled path for both)."""
  if key_mask is None:
    return jnp.ones((batch, kv_len), bool)
  key_mask = jnp.asarray(key_mask)
  if key_mask.dtype != jnp.bool_:
    raise ValueError(f"key_mask must be boolean (True = attend), got dtype {key_mask.dtype}")
  try:
    return jnp.broadcast_to(key_mask, (batch, kv_len))
  except ValueError:
    raise ValueError(f"key_mask shape {key_mask.shape} does not broadcast to "
                     f"[batch, kv_len] = {(batch, kv_len)}") from None


def key_padding_mask(mask, batch: int, length: int) -> jax.Array | None:
  """A zoo mask (broadcastable to `[batch, heads, q_len, kv_len]`) -> `[batch, kv_len]`.

  AFT has no per-pair scores, so only masks that are the same for every head and query
  (key padding) can be honoured; anything else raises instead of being ignored.
  """
  # `masking.check_mask` checks against [batch, heads, q_len, kv_len] = [batch, 1, 1, length].
  mask = masking.check_mask(mask, jax.ShapeDtypeStruct((batch, 1, 1), jnp.float32),
                            jax.ShapeDtypeStruct((batch, length), jnp.float32))
  if mask is None:
    return None
  if mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(
        f"AFT supports key padding masks only (broadcastable to [batch, 1, 1, kv_len]), got "
        f"mask shape {mask.shape}: AFT has no per-query scores to mask; use causal=True for "
        f"causal masking")
  return jnp.broadcast_to(mask[:, 0, 0, :], (batch, length))


def gate(q: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
  """sigma(Q) * num / den (0 where nothing is seen): every variant's output."""
  return jax.nn.sigmoid(q) * logspace.safe_ratio(num, den)


def sees_a_key(key_mask, q_len: int, causal: bool) -> jax.Array:
  """`[B, q_len, 1]` (or `[B, 1, 1]`): whether each query sees at least one real key."""
  if causal:
    seen = logspace.prefix_sum(key_mask, 1) > 0  # [B, Tk]: some real key at or before t'
    return seen[:, np.minimum(np.arange(q_len), key_mask.shape[1] - 1), None]
  return jnp.any(key_mask, axis=1)[:, None, None]


def underflows(den, sees, dtype) -> jax.Array:
  """Whether a denominator of a query that sees a key fell below sqrt(tiny) (~1e-19 in
  float32): the shifted fast path lost it, and the exact path must recompute."""
  return jnp.any((den < float(np.sqrt(np.finfo(dtype).tiny))) & sees)
