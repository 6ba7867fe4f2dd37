"""Adaptive attention span (Sukhbaatar et al. 2019, arXiv 1905.07799): the functional core.

`seq_attention` is the authors' `SeqAttention` with `AdaptiveSpan`
(facebookresearch/adaptive-span, `models.py` and `adaptive_span.py`) over the window of
`zoo.attention.cache_window` (see there for the window, `key_pe` and the excluded
current token). Each point where the authors' code differs from a literal reading of the
paper is marked *:

* Softmax over the window's keys, then multiply by the span mask, then renormalise by
  (sum + 1e-8). (The paper writes the mask inside the softmax's numerator and
  denominator: m e / sum m e; the two agree up to the 1e-8.)
* * The mask at distance x is the paper's m_z evaluated at x - 1:
  m = clamp((R + z - (x - 1)) / R, 0, 1), i.e. distances 1..z+1 get weight 1, the ramp
  covers z+1 .. z+1+R. (`AdaptiveMask.mask_template` = linspace(1 - S, 0, S).)
* * The span is stored as z / S in [0, 1] per head (`current_val`, init `span_init`); the
  trainer clamps it to [0, 1] after every update (`clamp_spans`). Gradients of the clamp
  follow torch: at r = 0 or r = 1 exactly the ramp's slope 1/R passes through.
* * Compute follows the span ("trimming", `trim_memory`): with
  size = clip(ceil(max_heads(z/S) * S) + R, 0, S), the first
  trim_len = floor(min(S - 1, S - size) / granularity) * granularity distances
  (granularity 64) are dropped, so the window is W = S - trim_len. The dropped distances
  have mask exactly 0, so the result changes only through the 1e-8 (the softmax is then
  over W keys instead of S, and renormalising cancels its normaliser up to the 1e-8).
  trim_len must be static under jit (a Python int; `trim_length` computes it on the
  host from concrete spans).
* * Span statistics are the authors' `get_current_avg_span` and `get_current_max_span`:
  clip(ceil(mean or max of z/S * S) + R, 0, S), ramp included (`current_size`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention.cache_window.core import check_inputs, window_attention

RENORM_EPS = 1e-8
TRIM_GRANULARITY = 64


def span_mask(distance, z, ramp):
  """m_z(x) = clamp((ramp + z - x) / ramp, 0, 1) (paper, Sec. 2.2), differentiable in z.

  Inside the ramp (0 <= r <= 1, boundaries included as torch's clamp) the gradient is
  d m / d z = 1 / ramp and d m / d x = -1 / ramp; outside it is 0.
  """
  r = (ramp + z - distance) / ramp
  inside = (r >= 0) & (r <= 1)
  return jnp.where(inside, r, jnp.clip(r, 0.0, 1.0))


def current_size(span_frac, max_span: int, ramp: int, *, reduce: str = "max",
                 include_ramp: bool = True) -> int:
  """The authors' `AdaptiveMask.get_current_{max,avg}_size` (host; concrete spans).

  clip(ceil(reduce(z/S) * S) (+ ramp), 0, S), with `reduce` "max" or "mean" over heads.
  """
  frac = np.asarray(jax.device_get(span_frac), np.float64)
  value = float(frac.max() if reduce == "max" else frac.mean())
  size = math.ceil(value * max_span) + (ramp if include_ramp else 0)
  return max(0, min(int(max_span), size))


def trim_length(span_frac, max_span: int, ramp: int, *,
                granularity: int = TRIM_GRANULARITY) -> int:
  """How many of the farthest distances can be skipped (the authors' `get_trim_len`).

  floor(min(S - 1, S - size) / granularity) * granularity with size the current max span
  plus ramp; the kept window W = S - trim_len always covers every distance with a
  nonzero mask.
  """
  size = current_size(span_frac, max_span, ramp, reduce="max")
  trim = min(max_span - 1, max_span - size)
  return (trim // granularity) * granularity


def window_mask(span_frac, max_span: int, window_len: int, ramp) -> jax.Array:
  """The span mask over the window, `[H, 1, W]`: column j <-> distance x = W - j, m at x - 1."""
  span_frac = jnp.asarray(span_frac)
  if span_frac.ndim != 1:
    raise ValueError(f"span must be one z/S per head, shape [heads], got {span_frac.shape}")
  distance = jnp.arange(window_len, 0, -1).astype(span_frac.dtype)  # W, ..., 1
  z = span_frac[:, None, None] * max_span
  return span_mask(distance - 1, z, ramp)


def check_span(span, ramp, num_heads):
  if span is None:
    return
  if ramp is None or not float(ramp) > 0:
    raise ValueError(f"ramp must be > 0 with an adaptive span, got {ramp!r}")
  if jnp.shape(span) != (num_heads,):
    raise ValueError(f"span must be z/S per head, shape ({num_heads},), got {jnp.shape(span)}")


def seq_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_pe: jax.Array, *,
                  span: jax.Array | None = None, ramp: float | None = None,
                  trim_len: int = 0, eps: float = RENORM_EPS,
                  attn_dropout: Callable[[jax.Array], jax.Array] | None = None,
                  query_chunk: int | None = None) -> jax.Array:
  """The authors' `SeqAttention` (with `AdaptiveSpan` when `span` is given).

  Args:
    q, k, v, key_pe, attn_dropout, query_chunk: as `cache_window.window_attention` (q the
      block's M queries, k and v cat(cache, block), key_pe `[1, head_dim, S]`).
    span: z / S per head, `[heads]`, or None for a fixed span S (no mask, no
      renormalising: `cache_window.softmax_window`).
    ramp: R, the mask's ramp length.
    trim_len: static int; skip the `trim_len` farthest distances (`trim_length()`).
    eps: the renormaliser's epsilon (the authors' 1e-8).

  Returns:
    `[batch, M, heads, head_dim]` in q's dtype.
  """
  max_span, _ = check_inputs(q, k, v, key_pe)
  check_span(span, ramp, q.shape[2])

  def weights(logits):
    w = jax.nn.softmax(logits, axis=-1)
    if span is None:
      return w
    w = w * window_mask(span, max_span, logits.shape[-1], ramp).astype(w.dtype)
    return w / (jnp.sum(w, axis=-1, keepdims=True) + eps)

  return window_attention(q, k, v, key_pe, weights, trim_len=trim_len,
                          attn_dropout=attn_dropout, query_chunk=query_chunk)
