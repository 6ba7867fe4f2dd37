"""Benchmark kinds for adaptive span (Sukhbaatar et al. 2019), loaded by attention.py.

    python benchmarks/attention.py --kinds adaptive_span_200 adaptive_span_full \
        softmax_window --lengths 1024 2048 4096 8192 --repeats 3 \
        --out results/attention_adaptive_span.json

Mapping of the benchmark's `[batch, length, heads, head_dim]` q, k, v onto the layer (the
authors' `SeqAttention`, `zoo.attention.adaptive_span.seq_attention`): `length` is the
attention span S (the cache, as the paper's enwik8 models with S = 8192), and one step is
one block of M = 512 queries (the paper's enwik8 block; environment variable
`ADAPTIVE_SPAN_BLOCK`): the queries are the last M rows of q, and k, v hold
cat(cache of S - M, block of M). Each query attends to the S positions before it (the
current token excluded, as the authors' code); the M positions before the start of k are
the authors' zero padding of a short cache, computed like real keys, so the cost is that
of a full cache of S. The block's output fills the last M rows of the `[B, length, H, D]`
result (zeros before them), the shape attention.py's loss takes. Kinds:

* `adaptive_span_200`: learned spans about 200: z per head spread evenly over
  [150, 200] (`ADAPTIVE_SPAN_Z` sets the maximum, 200), ramp R = 32, as z/S; trimmed to
  the last max z + R = 232 distances rounded up to 64, W = 256 (`trim_length`), queries
  in chunks of 64 against their own 64 + W keys. Cost M (W + 64) logits, whatever S.
* `adaptive_span_full`: the same core, untrimmed, with every span z = S (trim_len 0):
  M (S + M) logits, what the layer costs without trimming.
* `softmax_window`: plain softmax (`jax.nn.dot_product_attention`) of the M queries over
  the same S previous positions (a boolean band mask over S + M keys; no key_pe, no span
  mask): full attention over the same S-token window.

`key_pe` `[head_dim, S]` and the spans are constants here: attention.py differentiates
with respect to q, k, v only (their own gradients would add O(H M W D), as q . key_pe).
FLOPs (attention.py's convention, fwd+bwd = 3 x forward, 2 per multiply-add) count what
is computed: 12 B H M Lk D for the q.k and w.v matmuls with Lk = W + 64 (trimmed) or
S + M (untrimmed, softmax_window) keys per query, plus 6 B H M W D for q . key_pe.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import adaptive_span as span_lib
from zoo.attention import cache_window

RAMP = 32


def block_len() -> int:
  return int(os.environ.get("ADAPTIVE_SPAN_BLOCK", 512))


def max_z() -> float:
  return float(os.environ.get("ADAPTIVE_SPAN_Z", 200))


def _spans(heads: int, max_span: int) -> np.ndarray:
  z = np.linspace(0.75 * max_z(), max_z(), heads)
  return np.minimum(z / max_span, 1.0)


def _window(length: int, spans) -> int:
  return length - span_lib.trim_length(spans, length, RAMP)


def _split(q, k, v):
  m = block_len()
  if q.shape[1] < m:
    raise ValueError(f"length {q.shape[1]} (the span S) must be >= the block {m}")
  return q[:, -m:], k, v


def _place(out, length):
  """The block's M outputs at the last M rows of `[B, length, H, D]` (zeros before them),
  the shape attention.py's loss expects."""
  return jnp.pad(out, ((0, 0), (length - out.shape[1], 0), (0, 0), (0, 0)))


def _key_pe(length, head_dim, dtype):
  return (0.1 * jax.random.normal(jax.random.key(3), (1, head_dim, length))).astype(dtype)


def _adaptive(trimmed: bool):
  def make(args):
    def attn(q, k, v):
      q, k, v = _split(q, k, v)
      length, heads = k.shape[1], q.shape[2]
      spans = _spans(heads, length) if trimmed else np.ones(heads)
      trim = span_lib.trim_length(spans, length, RAMP) if trimmed else 0
      out = span_lib.seq_attention(q, k, v, _key_pe(length, q.shape[-1], q.dtype),
                                   span=jnp.asarray(spans, jnp.float32), ramp=RAMP,
                                   trim_len=trim)
      return _place(out, length)
    del args
    return attn
  return make


def _softmax_window(args):
  del args

  def attn(q, k, v):
    q, k, v = _split(q, k, v)
    m, s = q.shape[1], k.shape[1]
    pad = ((0, 0), (m, 0), (0, 0), (0, 0))  # the zero padding seq_attention applies
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    i, j = np.arange(m)[:, None], np.arange(s + m)[None, :]
    mask = jnp.asarray((j >= i) & (j < i + s))  # the S positions before query i (at s + i)
    return _place(jax.nn.dot_product_attention(q, k, v, mask=mask[None, None]), s)
  return attn


def _flops(kind):
  def flops(args, length):
    b, h, d, m = args.batch, args.heads, args.head_dim, block_len()
    if kind == "adaptive_span_200":
      w = _window(length, _spans(h, length))
      keys = w + cache_window.query_chunk(m, w)
    else:
      w, keys = length, length + m
    pe = 6 * b * h * m * w * d if kind != "softmax_window" else 0
    return 12 * b * h * m * keys * d + pe
  return flops


KINDS = {
    "adaptive_span_200": _adaptive(trimmed=True),
    "adaptive_span_full": _adaptive(trimmed=False),
    "softmax_window": _softmax_window,
}
FLOPS = {name: _flops(name) for name in KINDS}
QUADRATIC = set()
