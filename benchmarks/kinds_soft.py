"""Benchmark kind `soft`: SOFT's functional core (Lu et al. 2021), loaded by attention.py.

    python benchmarks/attention.py --kinds softmax soft --heads 12 --head-dim 32 \
        --lengths 1024 2048 4096 8192 16384 32768 65536 --out results/attention_soft.json

The paper's Fig. 1b setting is one layer of width 384 (12 heads x 32) with 49 landmarks
("bottleneck tokens"); pass `--heads 12 --head-dim 32`. The kind takes q, k, v
`[batch, length, heads, head_dim]` like every kind but, as SOFT ties keys to queries
(K = Q), uses only q and v (k receives a zero gradient). It computes

    soft_attention(q, v, landmarks)     (zoo.attention.soft; 20 Newton steps, ridge 0.01)

with `LANDMARKS` = 49 landmarks for every length: a 1-D adaptive average pool of the
rescaled queries q / d^{1/4} over 49 contiguous, near-equal segments of the sequence
(token i goes to segment floor(49 i / length), as PyTorch's AdaptiveAvgPool1d up to where
the boundaries fall). Unlike the module's k x k pooling on a 2-D patch grid, this gives
exactly 49 landmarks whatever the length (1024 = 32 x 32 would need a 7x7 grid of
4.57-patch windows) and drops no token; the cost is the same O(n m) pooling. Not included:
the module's projections, learned (conv) landmarks and depthwise convolution on V (O(n)
each).

FLOPs of one forward+backward step (the attention.py convention: matmul multiply-adds x 2,
backward = 2 x forward for the token-sized matmuls), n tokens, m landmarks:
forward 2 B H n m (D + 2 Dv) for K1, K1^T V and K1 W, plus B H (2 m^2 D + 2 m^2 Dv + 4 I m^3)
for K2, the Newton-Schulz steps (I = 20, two m x m matmuls each) and W = inv . (K1^T V);
backward 2 x the first part, 2 x (2 m^2 D + 2 m^2 Dv) and 4 m^3 for the inverse's
exact-inverse VJP (-V^T G V^T, two matmuls). The forward part is the layer's count,
`zoo.attention.soft.soft_flops`, without the convolutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.attention import soft

LANDMARKS = 49
NUM_ITERS = 20


def segment_landmarks(q_scaled: jax.Array, num_landmarks: int = LANDMARKS) -> jax.Array:
  """Means of `num_landmarks` contiguous near-equal segments of `[B, n, H, d]` tokens."""
  n = q_scaled.shape[1]
  if n < num_landmarks:
    raise ValueError(f"length {n} < {num_landmarks} landmarks")
  ids = (jnp.arange(n) * num_landmarks) // n  # non-decreasing, every segment non-empty
  sums = jax.ops.segment_sum(jnp.moveaxis(q_scaled, 1, 0), ids, num_landmarks,
                             indices_are_sorted=True)
  counts = jax.ops.segment_sum(jnp.ones((n,), q_scaled.dtype), ids, num_landmarks,
                               indices_are_sorted=True)
  return jnp.moveaxis(sums / counts[:, None, None, None], 0, 1)


def _soft(args):
  del args

  def attn(q, k, v):
    del k  # K = Q
    landmarks = segment_landmarks(q * jnp.asarray(soft.query_scale(q.shape[-1]), q.dtype))
    return soft.soft_attention(q, v, landmarks, num_iters=NUM_ITERS)

  return attn


def _soft_flops(args, length):
  b, h, d = args.batch, args.heads, args.head_dim
  n, m, i = length, LANDMARKS, NUM_ITERS
  tokens = 2 * b * h * n * m * (2 * d + d)  # K1 (D), K1^T V (Dv), K1 W (Dv); Dv = D
  small = b * h * (2 * m * m * d + 2 * m * m * d)  # K2 and inv . (K1^T V)
  newton = b * h * 4 * i * m**3
  return 3 * tokens + 3 * small + newton + b * h * 4 * m**3


KINDS = {"soft": _soft}
FLOPS = {"soft": _soft_flops}
QUADRATIC = set()
