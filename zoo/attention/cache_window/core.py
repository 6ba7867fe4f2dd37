"""Attention of a block over the window of positions before each query in cat(cache, block).

The functional pieces that adaptive span (`zoo.attention.adaptive_span`), persistent
memory (`zoo.attention.persistent`) and softmax / pointwise attention over a segment cache
share; they follow the authors' `SeqAttention` (facebookresearch/adaptive-span,
`models.py`; Sukhbaatar et al. 2019, arXiv 1905.07799):

* Query i of a block of M sits at index C + i of cat(cache of C, block of M) and attends
  to the S = `max_span` positions at distances x = S, ..., 1 before it. * The current
  token (distance 0) is excluded (the authors' code; a literal reading of the paper
  includes it). Positions before the start of the cache are zero keys and zero values
  (the authors zero-initialise the cache and zero-pad a short one); they are NOT masked
  out of the weights.
* Logits: (q . k_x + q . key_pe[:, S - x]) / sqrt(head_dim); `key_pe` `[1, head_dim, S]`,
  column j <-> distance S - j, shared by all heads (in `TransformerSeq` by all layers).
* Only the last W = S - trim_len distances are computed (`window`): adaptive span drops
  the farthest `trim_len` distances, whose span mask is 0 (the authors' `trim_memory`).
* The band (query i against rows i .. i + W - 1 of the window) is computed by the
  authors' skew / unskew trick, per chunk of `query_chunk` queries so that a block of M
  queries over a window of W costs M (W + chunk) logits, not M (W + M).

`window_attention(q, k, v, key_pe, weights_fn)` runs the whole pipeline with any weights
(softmax, pointwise); `softmax_window` and `pointwise_window` are the two without a span.
All work on `[batch, length, heads, head_dim]` arrays.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import masking
from zoo.attention.pointwise.activations import ACTIVATIONS

QUERY_CHUNK = 64  # queries per chunk when the window is shorter than the block


def check_inputs(q, k, v, key_pe) -> tuple[int, jax.Array]:
  """Validates shapes; returns S and key_pe as `[head_dim, S]`."""
  masking.check_qkv(q, k, v)
  if k.shape[1] < q.shape[1]:
    raise ValueError(f"k/v hold cat(cache, block): length {k.shape[1]} must be >= the "
                     f"block length {q.shape[1]}")
  key_pe = jnp.asarray(key_pe)
  if key_pe.ndim == 3:
    if key_pe.shape[0] != 1:
      raise ValueError(f"key_pe must be [1, head_dim, S] or [head_dim, S], got {key_pe.shape}")
    key_pe = key_pe[0]
  if key_pe.ndim != 2 or key_pe.shape[0] != q.shape[-1]:
    raise ValueError(f"key_pe must be [1, head_dim, S] with head_dim {q.shape[-1]}, "
                     f"got {key_pe.shape}")
  return key_pe.shape[1], key_pe


def check_trim_len(trim_len, max_span: int) -> int:
  """trim_len must be a static (Python) int in [0, S - 1]; returns it as an int."""
  if not isinstance(trim_len, (int, np.integer)) or not 0 <= trim_len < max_span:
    raise ValueError(f"trim_len must be a static int in [0, S - 1] = [0, {max_span - 1}], "
                     f"got {trim_len!r}")
  return int(trim_len)


def window(k, v, key_pe, block_len: int, trim_len: int):
  """Keys, values `[B, W + M, H, D]` and key_pe `[D, W]` for the window W = S - trim_len.

  Takes the last W + M positions of cat(cache, block); a cache shorter than W is
  zero-padded in front (the authors' `F.pad` in `trim_memory`).
  """
  trim_len = check_trim_len(trim_len, key_pe.shape[1])
  need = key_pe.shape[1] - trim_len + block_len
  length = k.shape[1]
  if length >= need:
    k, v = k[:, length - need:], v[:, length - need:]
  else:
    pad = ((0, 0), (need - length, 0), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  return k, v, key_pe[:, trim_len:]


def _unskew(x):
  """[..., M, W + M] -> [..., M, W] with out[i, j] = x[i, i + j] (the authors' `_unskew`)."""
  *lead, m, n = x.shape
  w = n - m
  x = x.reshape(*lead, m * n)
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, m)])
  return x.reshape(*lead, m, n + 1)[..., :w]


def _skew(x):
  """[..., M, W] -> [..., M, W + M] with out[i, i + j] = x[i, j], zeros elsewhere."""
  *lead, m, w = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, m + 1)])
  x = x.reshape(*lead, m * (w + m + 1))[..., :m * (w + m)]
  return x.reshape(*lead, m, w + m)


def compute_dtype(q):
  return jnp.promote_types(q.dtype, jnp.float32)


def query_chunk(block_len: int, window_len: int) -> int:
  """Queries per chunk of the banded computation (see `context_logits`).

  The whole block (one chunk) when the window is at least as long as the block or the
  block is short; else `QUERY_CHUNK` queries, so a block of M queries over a window of W
  costs M (W + QUERY_CHUNK) logits instead of M (W + M).
  """
  if window_len >= block_len or block_len <= QUERY_CHUNK:
    return block_len
  return QUERY_CHUNK


def _chunked(x, chunk: int, window_len: int, block_len: int):
  """[B, W + M, H, D] -> [B, nc, chunk + W, H, D]: chunk j holds rows j*chunk .. j*chunk + chunk + W.

  Built from shifted slices of the rows grouped in blocks of `chunk` (no gather, so the
  backward pass is pads and adds, not a scatter): W is rounded up to p = ceil(W / chunk)
  blocks by zero rows in front, and each chunk drops its first p * chunk - W rows. The
  block is padded with zero rows at the end up to nc * chunk queries.
  """
  nc = -(-block_len // chunk)
  blocks = -(-window_len // chunk)
  front = blocks * chunk - window_len
  back = nc * chunk - block_len
  x = jnp.pad(x, ((0, 0), (front, back), (0, 0), (0, 0)))
  xb = x.reshape(x.shape[0], nc + blocks, chunk, *x.shape[2:])
  parts = jnp.stack([xb[:, t:t + nc] for t in range(blocks + 1)], axis=2)
  parts = parts.reshape(x.shape[0], nc, (blocks + 1) * chunk, *x.shape[2:])
  return parts[:, :, front:]


def context_logits(q, k_win, pe_win, chunk: int | None = None):
  """Unscaled q . k + q . key_pe over the window, `[B, H, M, W]` (column j <-> distance W - j).

  Query i of the block sees rows i .. i + W - 1 of `k_win` (`[B, W + M, H, D]`). With
  `chunk` = c < M (default `query_chunk(M, W)`) the queries go in chunks of c, each
  against its own c + W keys (`_chunked`), so the cost is M (W + c), not M (W + M): the
  block's own keys beyond each chunk are never touched. The result is the same.
  """
  dt = compute_dtype(q)
  m, w = q.shape[1], pe_win.shape[1]
  chunk = query_chunk(m, w) if chunk is None else int(chunk)
  if chunk >= m:
    qk = _unskew(jnp.einsum("bmhd,bnhd->bhmn", q, k_win, preferred_element_type=dt))
  else:
    nc = -(-m // chunk)
    qc = jnp.pad(q, ((0, 0), (0, nc * chunk - m), (0, 0), (0, 0)))
    qc = qc.reshape(q.shape[0], nc, chunk, *q.shape[2:])
    qk = jnp.einsum("bjmhd,bjnhd->bhjmn", qc, _chunked(k_win, chunk, w, m),
                    preferred_element_type=dt)
    qk = _unskew(qk).reshape(q.shape[0], q.shape[2], nc * chunk, w)[:, :, :m]
  # (in the compute dtype: XLA:CPU has no bf16 x bf16 -> f32 dot without batch dims)
  qp = jnp.einsum("bmhd,dw->bhmw", q.astype(dt), pe_win.astype(dt))
  return qk + qp


def context_output(weights, v_win, chunk: int | None = None):
  """sum_j w[i, j] v[i + j]: `[B, H, M, W]` weights, `[B, W + M, H, D]` values -> `[B, M, H, D]`.

  Chunked as `context_logits` (same default), cost M (W + c).
  """
  dt = compute_dtype(weights)
  b, h, m, w = weights.shape
  chunk = query_chunk(m, w) if chunk is None else int(chunk)
  if chunk >= m:
    ws = _skew(weights).astype(v_win.dtype)
    return jnp.einsum("bhmn,bnhd->bmhd", ws, v_win, preferred_element_type=dt)
  nc = -(-m // chunk)
  wc = jnp.pad(weights, ((0, 0), (0, 0), (0, nc * chunk - m), (0, 0)))
  wc = _skew(wc.reshape(b, h, nc, chunk, w)).astype(v_win.dtype)
  out = jnp.einsum("bhjmn,bjnhd->bjmhd", wc, _chunked(v_win, chunk, w, m),
                   preferred_element_type=dt)
  return out.reshape(b, nc * chunk, *out.shape[3:])[:, :m]


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_pe: jax.Array,
                     weights_fn: Callable[[jax.Array], jax.Array], *, trim_len: int = 0,
                     attn_dropout: Callable[[jax.Array], jax.Array] | None = None,
                     query_chunk: int | None = None) -> jax.Array:
  """Scaled logits over the window -> `weights_fn` -> dropout -> sum of values.

  Args:
    q: `[batch, M, heads, head_dim]`, the block's queries (already projected).
    k, v: `[batch, C + M, heads, head_dim]`, keys / values of cat(cache, block): the last
      M rows are the block's own positions, the C rows before them the cache (most recent
      last). C may differ from S: a longer cache is cut, a shorter one zero-padded.
    key_pe: `[1, head_dim, S]` (or `[head_dim, S]`); column j <-> distance S - j.
    weights_fn: logits `[batch, heads, M, W]` (already divided by sqrt(head_dim)) ->
      weights of the same shape.
    trim_len: static int; skip the `trim_len` farthest distances (W = S - trim_len).
    attn_dropout: applied to the weights (the authors' dropout), or None.
    query_chunk: queries per chunk of the banded computation (None: `query_chunk()`); the
      result does not depend on it, the cost is M (W + chunk) logits.

  Returns:
    `[batch, M, heads, head_dim]` in q's dtype.
  """
  _, key_pe = check_inputs(q, k, v, key_pe)
  k_win, v_win, pe_win = window(k, v, key_pe, q.shape[1], trim_len)
  w = weights_fn(context_logits(q, k_win, pe_win, query_chunk) / math.sqrt(q.shape[-1]))
  if attn_dropout is not None:
    w = attn_dropout(w)
  return context_output(w, v_win, query_chunk).astype(q.dtype)


def softmax_window(q, k, v, key_pe, *, trim_len: int = 0, attn_dropout=None,
                   query_chunk: int | None = None) -> jax.Array:
  """Softmax over the window: the authors' `SeqAttention` with a fixed span (no mask, no
  renormalising). Arguments as `window_attention`."""
  return window_attention(q, k, v, key_pe, lambda s: jax.nn.softmax(s, axis=-1),
                          trim_len=trim_len, attn_dropout=attn_dropout,
                          query_chunk=query_chunk)


def pointwise_window(q, k, v, key_pe, *, activation: str = "relu", alpha: float = 1.0,
                     trim_len: int = 0, attn_dropout=None,
                     query_chunk: int | None = None) -> jax.Array:
  """Pointwise attention (Wortsman et al. 2023, arXiv 2309.08586) over the window:
  weights S^-alpha h(logits), no normalisation over keys. L = S for every query (zero
  keys before the stream's start carry zero values, so they add nothing). Arguments as
  `window_attention`, plus the activation h and alpha."""
  scale = float(jnp.shape(key_pe)[-1]) ** -float(alpha)
  act = ACTIVATIONS[activation]
  return window_attention(q, k, v, key_pe, lambda s: act(s) * scale, trim_len=trim_len,
                          attn_dropout=attn_dropout, query_chunk=query_chunk)


def window_flops(*, q_len: int, heads: int, head_dim: int, window_len: int,
                 slots: int = 0, **unused) -> float:
  """Forward FLOPs of a window core for one block of `q_len` queries, 2 per multiply-add.

  Each of the M = q_len queries meets the W = `window_len` = S - trim_len positions of
  its trimmed window: q . k (head_dim multiply-adds), q . key_pe (head_dim) and
  weights . v (head_dim), so 2 * heads * M * W * 3 * head_dim; each of `slots` extra
  key/value slots shared by every query (persistent memory's N vectors) adds q . k and
  weights . v: 2 * heads * M * N * 2 * head_dim. The banded computation actually runs
  M (W + chunk) (query, key) products for q . k and weights . v (`query_chunk`); the
  formula counts the window only, and elementwise work (softmax, span mask) is not
  counted. `kv_len` and `causal` of the generic formula signature are unused: the window,
  not the sequence, bounds each query's keys.
  """
  del unused
  return 2.0 * heads * q_len * (window_len * 3 * head_dim + slots * 2 * head_dim)
