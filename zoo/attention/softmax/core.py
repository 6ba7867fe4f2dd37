"""Softmax attention: the baseline, through `jax.nn.dot_product_attention`.

out_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j   (Vaswani et al. 2017, Eq. 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.attention import masking

IMPLEMENTATIONS = (None, "xla", "cudnn")


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                      mask: jax.Array | None = None,
                      implementation: str | None = None) -> jax.Array:
  """Scaled dot-product softmax attention.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, heads, head_dim]`.
    causal: query i attends to keys j <= i only.
    mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`, True = attend.
    implementation: passed to `jax.nn.dot_product_attention`: None (XLA picks), "xla", or
      "cudnn" (the fused cuDNN flash kernel: NVIDIA GPUs, float16/bfloat16 only).

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype. float64 inputs take a plain einsum
    path in float64 (jax.nn.dot_product_attention's softmax runs in float32).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  masking.check_qkv(q, k, v)
  mask = masking.check_mask(mask, q, k)
  if q.dtype == jnp.float64:  # dot_product_attention computes its softmax in float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    full = masking.combine_masks(mask, q.shape[1], k.shape[1], causal=causal)
    if full is not None:
      s = jnp.where(full, s, jnp.finfo(s.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation=implementation)
