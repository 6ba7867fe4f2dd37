"""Masks and shape checks shared by every attention family's functional core.

Conventions (the same as `jax.nn.dot_product_attention`):

* q: `[batch, q_len, heads, head_dim]`, k and v: `[batch, kv_len, heads, head_dim]`.
* `mask`: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; True means the query
  may attend to that key.
* `causal=True`: query i sees keys j <= i (positions aligned at the start, as
  `jax.nn.dot_product_attention(is_causal=True)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.parallel import sequence as seq_lib


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises ValueError with a clear message when q, k, v do not fit together."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must be [batch, length, heads, head_dim], got shape {x.shape}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(
        f"head_dim mismatch: q has head_dim {q.shape[-1]} but k has {k.shape[-1]}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree on batch, length, heads")
  if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and heads")


# [q_len, kv_len] boolean, True where key position <= query position; offsets give the
# global positions of the first query and key (blocks, shards).
causal_mask = seq_lib.causal_block_mask


def check_mask(mask: jax.Array | None, q: jax.Array, k: jax.Array) -> jax.Array | None:
  """Validates a user mask and returns it as a 4-D boolean array (still broadcastable)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
  if mask.ndim > 4:
    raise ValueError(f"mask must have at most 4 dims [batch, heads, q_len, kv_len], got {mask.shape}")
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  try:
    jnp.broadcast_shapes(mask.shape, target)
  except ValueError:
    raise ValueError(
        f"mask shape {mask.shape} does not broadcast to [batch, heads, q_len, kv_len] = {target}"
    ) from None
  return mask


def combine_masks(mask: jax.Array | None, q_len: int, kv_len: int, *, causal: bool,
                  q_offset=0, kv_offset=0) -> jax.Array | None:
  """The user mask and-ed with the causal mask; None when nothing is masked."""
  if causal:
    c = causal_mask(q_len, kv_len, q_offset, kv_offset)[None, None]
    return c if mask is None else jnp.logical_and(mask, c)
  return mask


def split_mask(mask: jax.Array | None, q_len: int | None = None,
               kv_len: int | None = None):
  """A 4-D boolean mask as (key_keep, query_keep, general), at most one not None.

  key_keep `[B', kv_len, H', 1]`: the same keys for every query (padding masks);
  query_keep `[B', q_len, H', 1]`: every key or none, per query; general: the mask
  itself when it varies along both axes. Kernels that work tile by tile zero hidden keys
  or queries instead of masking scores. With `q_len` / `kv_len`, the keeps are broadcast
  to those lengths.
  """
  if mask is None:
    return None, None, None
  if mask.shape[-2] == 1:
    keep = mask[..., 0, :]
    if kv_len is not None:
      keep = jnp.broadcast_to(keep, keep.shape[:2] + (kv_len,))
    return jnp.swapaxes(keep, 1, 2)[..., None], None, None
  if mask.shape[-1] == 1:
    keep = mask[..., 0]
    if q_len is not None:
      keep = jnp.broadcast_to(keep, keep.shape[:2] + (q_len,))
    return None, jnp.swapaxes(keep, 1, 2)[..., None], None
  return None, None, mask
