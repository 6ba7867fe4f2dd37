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
from zoo.attention import registry
from zoo.attention.heads import MultiHeadDotProductAttention

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "gelu": jax.nn.gelu,  # tanh approximation, jax's default
    "softplus": jax.nn.softplus,
    "identity": lambda x: x,
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
}


def check_options(activation: str, alpha: float, block_size: int | None) -> None:
  """Raises ValueError naming the bad option."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
  if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


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


def _length_scale(mask, q_len, kv_len, *, causal, kv_length, alpha) -> jax.Array:
  """L^-alpha as float32, broadcastable to `[batch, heads, q_len, 1]`."""
  if kv_length is None:
    counts = visible_key_counts(mask, q_len, kv_len, causal=causal)
  else:
    counts = jnp.asarray(kv_length)
    counts = counts.reshape((1,) * (3 - counts.ndim) + counts.shape)[..., None]
  counts = jnp.maximum(counts.astype(jnp.float32), 1.0)  # a query that sees nothing outputs 0
  return counts ** (-float(alpha))


def _block_valid(mask_block, q_len, block_size, kv_len, block_index, causal):
  """Which (query, key) pairs of one key block count, `[.., q_len, block_size]`."""
  k_pos = block_index * block_size + jnp.arange(block_size)
  valid = (k_pos < kv_len)[None, None, None, :]
  if causal:
    valid = valid & (k_pos[None, :] <= jnp.arange(q_len)[:, None])[None, None]
  if mask_block is not None:
    valid = valid & mask_block
  return valid


def _key_blocks(k, v, mask, block_size):
  """Splits keys, values (as `[blocks, batch, heads, block, dim]`) and mask into blocks."""
  b, kv_len, h, _ = k.shape
  num_blocks = -(-kv_len // block_size)
  pad = num_blocks * block_size - kv_len

  def split(x):  # [B, L, H, D] -> [nb, B, H, bs, D]
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    x = x.reshape(b, num_blocks, block_size, h, x.shape[-1])
    return x.transpose(1, 0, 3, 2, 4)

  mask_blocks = None
  if mask is not None:
    m = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad),))
    m = m.reshape(m.shape[:3] + (num_blocks, block_size))
    mask_blocks = jnp.moveaxis(m, 3, 0)
  return num_blocks, split(k), split(v), mask_blocks


def _scan_blocks(body, init, num_blocks, kb, vb, mb):
  xs = (jnp.arange(num_blocks), kb, vb, mb)
  return jax.lax.scan(body, init, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, mask, length_scale, activation, scale, causal, block_size):
  return _blockwise_fwd(q, k, v, mask, length_scale, activation, scale, causal, block_size)[0]


def _blockwise_fwd(q, k, v, mask, length_scale, activation, scale, causal, block_size):
  h = ACTIVATIONS[activation]
  kv_len, q_len = k.shape[1], q.shape[1]
  num_blocks, kb, vb, mb = _key_blocks(k, v, mask, block_size)
  qt = q.transpose(0, 2, 1, 3)  # [B, H, Lq, D]: batch dims leading, no per-block copies

  def body(acc, xs):
    i, kblk, vblk, mblk = xs
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kblk, preferred_element_type=jnp.float32) * scale
    valid = _block_valid(mblk, q_len, block_size, kv_len, i, causal)
    w = jnp.where(valid, h(s), 0.0).astype(vblk.dtype)
    return acc + jnp.einsum("bhqk,bhkd->bhqd", w, vblk, preferred_element_type=jnp.float32), None

  acc0 = jnp.zeros(qt.shape[:3] + (v.shape[-1],), jnp.float32)
  acc, _ = _scan_blocks(body, acc0, num_blocks, kb, vb, mb)
  out = (acc * length_scale).astype(q.dtype).transpose(0, 2, 1, 3)
  return out, (q, k, v, mask, length_scale)


def _blockwise_bwd(activation, scale, causal, block_size, residuals, g):
  q, k, v, mask, length_scale = residuals
  h = ACTIVATIONS[activation]
  b, kv_len, heads, _ = k.shape
  q_len = q.shape[1]
  num_blocks, kb, vb, mb = _key_blocks(k, v, mask, block_size)
  qt = q.transpose(0, 2, 1, 3).astype(jnp.float32)
  gt = g.transpose(0, 2, 1, 3).astype(jnp.float32) * length_scale  # dL/d(sum_j h(s_ij) v_j)

  def body(dq, xs):
    i, kblk, vblk, mblk = xs
    kblk, vblk = kblk.astype(jnp.float32), vblk.astype(jnp.float32)
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kblk) * scale
    hs, dhs = jax.jvp(h, (s,), (jnp.ones_like(s),))  # h and h' entry by entry
    valid = _block_valid(mblk, q_len, block_size, kv_len, i, causal)
    w = jnp.where(valid, hs, 0.0)
    dv = jnp.einsum("bhqk,bhqd->bhkd", w, gt)
    ds = jnp.where(valid, jnp.einsum("bhqd,bhkd->bhqk", gt, vblk) * dhs, 0.0) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qt)
    return dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kblk), (dk, dv)

  dq, (dkb, dvb) = _scan_blocks(body, jnp.zeros_like(qt), num_blocks, kb, vb, mb)

  def unblock(x, like):  # [nb, B, H, bs, D] -> [B, L, H, D]
    x = x.transpose(1, 0, 3, 2, 4).reshape(b, num_blocks * block_size, heads, x.shape[-1])
    return x[:, :kv_len].astype(like.dtype)

  dq = dq.transpose(0, 2, 1, 3).astype(q.dtype)
  return dq, unblock(dkb, k), unblock(dvb, v), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def pointwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        activation: str = "relu", alpha: float = 1.0, causal: bool = False,
                        mask: jax.Array | None = None, kv_length=None,
                        block_size: int | None = None) -> jax.Array:
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

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype; accumulation is in float32.
  """
  check_options(activation, alpha, block_size)
  masking.check_qkv(q, k, v)
  mask = masking.check_mask(mask, q, k)
  q_len, kv_len = q.shape[1], k.shape[1]
  scale = 1.0 / math.sqrt(q.shape[-1])
  length_scale = _length_scale(mask, q_len, kv_len, causal=causal, kv_length=kv_length,
                               alpha=alpha)
  if block_size is not None:
    return _blockwise(q, k, v, mask, length_scale, activation, scale, causal, block_size)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  w = ACTIVATIONS[activation](s)
  full_mask = masking.combine_masks(mask, q_len, kv_len, causal=causal)
  if full_mask is not None:
    w = jnp.where(full_mask, w, 0.0)
  out = jnp.einsum("bhqk,bkhd->bhqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out * length_scale).astype(q.dtype).transpose(0, 2, 1, 3)


class PointwiseAttention(MultiHeadDotProductAttention):
  """Multi-head pointwise attention: the shared projections around `pointwise_attention`."""

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               activation: str = "relu", alpha: float = 1.0, block_size: int | None = None,
               **kwargs):
    check_options(activation, alpha, block_size)
    super().__init__(width, num_heads, causal=causal, **kwargs)
    self.activation, self.alpha, self.block_size = activation, float(alpha), block_size

  def attend(self, q, k, v, *, mask=None):
    return pointwise_attention(q, k, v, activation=self.activation, alpha=self.alpha,
                               causal=self.causal, mask=mask, block_size=self.block_size)


registry.register(
    "pointwise", PointwiseAttention,
    description="L^-alpha * h(q.k/sqrt(d)), any activation h; no normalisation over keys")
for _name in ACTIVATIONS:
  registry.register(
      _name, PointwiseAttention, defaults={"activation": _name},
      description=f"pointwise attention with h = {_name} (alpha = 1 unless set)")
