"""Adaptive attention span, Sukhbaatar et al. 2019 (arXiv 1905.07799), as the authors' code.

The layer is the authors' `SeqAttention` (facebookresearch/adaptive-span, `models.py` and
`adaptive_span.py`): a block of M queries attends over the S = `max_span` positions that
precede each query in cat(cache, block), with a learned per-distance key embedding
`key_pe` and a soft span mask per head.

Exact semantics (each point where the authors' code differs from a literal reading of the
paper is marked *):

* Query i of the block sits at index C + i of cat(cache of C, block of M) and attends to
  the S positions at distances x = S, ..., 1 before it. * The current token (distance 0)
  is excluded. Positions before the start of the cache are zero keys and zero values
  (the authors zero-initialise the cache and zero-pad a short one); they are NOT masked
  out of the softmax.
* Logits: (q . k_x + q . key_pe[:, S - x]) / sqrt(head_dim); `key_pe` is `[1, head_dim, S]`,
  column j <-> distance S - j, shared by all heads (and, in the model, by all layers).
* Softmax over those S keys, then multiply by the span mask, then renormalise by
  (sum + 1e-8). (The paper writes the mask inside the softmax's numerator and
  denominator: m e / sum m e; the two agree up to the 1e-8.)
* * The mask at distance x is the paper's m_z evaluated at x - 1:
  m = clamp((R + z - (x - 1)) / R, 0, 1), i.e. distances 1..z+1 get weight 1, the ramp
  covers z+1 .. z+1+R. (`AdaptiveMask.mask_template` = linspace(1 - S, 0, S).)
* * The span is stored as z / S in [0, 1] per head (`current_val`, init `span_init`); the
  trainer clamps it to [0, 1] after every update (`clamp_spans`). Gradients of the clamp
  follow torch: at r = 0 or r = 1 exactly the ramp's slope 1/R passes through.
* * The L1 penalty is lambda * S * mean_heads(z / S) = lambda * mean_heads(z) per layer,
  summed over layers (`span_penalty`); it is the mean, not the sum, over heads.
* * Compute follows the span ("trimming", `trim_memory`): with
  size = clip(ceil(max_heads(z/S) * S) + R, 0, S), the first
  trim_len = floor(min(S - 1, S - size) / granularity) * granularity distances
  (granularity 64) are dropped, so the window is W = S - trim_len. The dropped distances
  have mask exactly 0, so the result changes only through the 1e-8 (the softmax is then
  over W keys instead of S, and renormalising cancels its normaliser up to the 1e-8).
  trim_len must be static under jit: it is a Python int held by the layer
  (`update_trim_lengths(model)` recomputes it on the host from the current spans; an
  `nnx.jit`ted step then retraces when it changes) or passed explicitly.
* * Span statistics (`span_stats`) are the authors' `get_current_avg_span` and
  `get_current_max_span`: clip(ceil(mean or max of z/S * S) + R, 0, S), ramp included.

The functional core works on `[batch, length, heads, head_dim]` arrays.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention import registry
from zoo.attention.heads import GATE_ACTIVATIONS, MultiHeadDotProductAttention
from zoo.parallel import mesh as mesh_lib

RENORM_EPS = 1e-8
TRIM_GRANULARITY = 64
QUERY_CHUNK = 64  # queries per chunk when the window is shorter than the block


# ----------------------------------------------------------------------------------------
# The span mask and the host-side span bookkeeping.


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


# ----------------------------------------------------------------------------------------
# Functional core pieces, shared with persistent.py.


def check_inputs(q, k, v, key_pe) -> tuple[int, jax.Array]:
  """Validates shapes; returns S and key_pe as `[head_dim, S]`."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim], got {x.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree on batch, length, heads")
  if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch, heads, head_dim")
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


def window(k, v, key_pe, block_len: int, trim_len: int):
  """Keys, values `[B, W + M, H, D]` and key_pe `[D, W]` for the window W = S - trim_len.

  Takes the last W + M positions of cat(cache, block); a cache shorter than W is
  zero-padded in front (the authors' `F.pad` in `trim_memory`).
  """
  max_span = key_pe.shape[1]
  if not isinstance(trim_len, (int, np.integer)) or not 0 <= trim_len < max_span:
    raise ValueError(f"trim_len must be a static int in [0, S - 1] = [0, {max_span - 1}], "
                     f"got {trim_len!r}")
  w = max_span - int(trim_len)
  need = w + block_len
  length = k.shape[1]
  if length >= need:
    k, v = k[:, length - need:], v[:, length - need:]
  else:
    pad = ((0, 0), (need - length, 0), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  return k, v, key_pe[:, int(trim_len):]


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


def window_mask(span_frac, max_span: int, window_len: int, ramp) -> jax.Array:
  """The span mask over the window, `[H, 1, W]`: column j <-> distance x = W - j, m at x - 1."""
  span_frac = jnp.asarray(span_frac)
  if span_frac.ndim != 1:
    raise ValueError(f"span must be one z/S per head, shape [heads], got {span_frac.shape}")
  distance = jnp.arange(window_len, 0, -1).astype(span_frac.dtype)  # W, ..., 1
  z = span_frac[:, None, None] * max_span
  return span_mask(distance - 1, z, ramp)


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
    q: `[batch, M, heads, head_dim]`, the block's queries (already projected).
    k, v: `[batch, C + M, heads, head_dim]`, keys / values of cat(cache, block): the last
      M rows are the block's own positions, the C rows before them the cache (most recent
      last). C may differ from S: a longer cache is cut, a shorter one zero-padded.
    key_pe: `[1, head_dim, S]` (or `[head_dim, S]`); column j <-> distance S - j.
    span: z / S per head, `[heads]`, or None for a fixed span S (no mask, no renormalising).
    ramp: R, the mask's ramp length.
    trim_len: static int; skip the `trim_len` farthest distances (`trim_length()`).
    eps: the renormaliser's epsilon (the authors' 1e-8).
    attn_dropout: applied to the attention weights (the authors' dropout), or None.
    query_chunk: queries per chunk of the banded computation (None: `query_chunk()`,
      64 when the window is shorter than the block, else the whole block); the result
      does not depend on it, the cost is M (W + chunk) logits.

  Returns:
    `[batch, M, heads, head_dim]` in q's dtype.
  """
  max_span, key_pe = check_inputs(q, k, v, key_pe)
  check_span(span, ramp, q.shape[2])
  k_win, v_win, pe_win = window(k, v, key_pe, q.shape[1], trim_len)
  logits = context_logits(q, k_win, pe_win, query_chunk) / math.sqrt(q.shape[-1])
  w = jax.nn.softmax(logits, axis=-1)
  if span is not None:
    w = w * window_mask(span, max_span, pe_win.shape[1], ramp).astype(w.dtype)
    w = w / (jnp.sum(w, axis=-1, keepdims=True) + eps)
  if attn_dropout is not None:
    w = attn_dropout(w)
  return context_output(w, v_win, query_chunk).astype(q.dtype)


# ----------------------------------------------------------------------------------------
# The layer.


class AdaptiveSpanAttention(MultiHeadDotProductAttention):
  """The authors' `MultiHeadSeqAttention` + `SeqAttention` + `AdaptiveSpan`.

  Bias-free `query`, `key`, `value` kernels `[width, heads, head_dim]` and `out` kernel
  `[heads, head_dim, width]` (the authors' `proj_*` with `use_bias=False`); `span`
  `[heads]` holds z / S (the authors' `current_val`); `key_pe` `[1, head_dim, S]` unless
  `shared_key_pe` (then the model passes its own, as the authors' `TransformerSeq`).

  Called as `layer(x, cache=..., key_pe=...)` with x the block `[batch, M, width]` and
  `cache` the previous inputs `[batch, C, width]` (None: an all-zero cache, the authors'
  first segment). Through the registry (`module(x, mask=None)`) it runs each sequence as
  one block with a zero cache, so it plugs into the plain causal LM (without memory
  across windows; the current token is excluded, as in the authors' code).

  Static (Python) state: `trim_len` (see `update_trim_lengths`) and `cache_size`.

  Inside `zoo.parallel.sharding_context(mesh, strategy="halo")` the block is split along
  its length over the mesh's `seq` axis (`zoo.parallel.sequence_adaptive_span`): each
  shard gets the W = S - trim_len keys / values before it from the previous shards and,
  for the first ones, from the cache (its last W inputs, projected once and replicated);
  the result equals the unsplit layer. Attention dropout then draws per-shard masks.
  """

  # The core whose strategies `zoo.parallel.sequence_adaptive_span` registers.
  sequence_parallel_core: str | None = "adaptive_span"

  def __init__(self, width: int, num_heads: int, *, causal: bool = True,
               max_span: int = 256, ramp: int = 32, span_init: float = 0.0,
               span_loss: float = 0.0, adapt_span: bool = True, adapt_cache: bool = False,
               attn_dropout: float = 0.0, shared_key_pe: bool = False,
               trim_granularity: int = TRIM_GRANULARITY, use_bias: bool = False,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs):
    if not causal:
      raise ValueError("sequential (adaptive-span) attention is causal-only")
    if not isinstance(max_span, int) or max_span < 1:
      raise ValueError(f"max_span must be a positive int, got {max_span!r}")
    if adapt_span and not (isinstance(ramp, (int, float)) and ramp > 0):
      raise ValueError(f"ramp must be > 0, got {ramp!r}")
    if not 0.0 <= span_init <= 1.0:
      raise ValueError(f"span_init is z/S and must lie in [0, 1], got {span_init!r}")
    if not isinstance(trim_granularity, int) or trim_granularity < 1:
      raise ValueError(f"trim_granularity must be a positive int, got {trim_granularity!r}")
    super().__init__(width, num_heads, causal=True, use_bias=use_bias,
                     param_dtype=param_dtype, rngs=rngs, **kwargs)
    self.max_span, self.ramp = max_span, ramp
    self.span_loss, self.adapt_span, self.adapt_cache = float(span_loss), adapt_span, adapt_cache
    self.trim_granularity = trim_granularity
    self.trim_len = 0
    self.span = (nnx.Param(jnp.full((num_heads,), span_init, param_dtype))
                 if adapt_span else None)
    self.key_pe = None if shared_key_pe else nnx.Param(
        jax.random.normal(rngs.params(), (1, self.head_dim, max_span), param_dtype))
    self.attn_dropout = nnx.Dropout(attn_dropout, rngs=rngs if attn_dropout else None)
    self.attn_dropout_rate = float(attn_dropout)

  # -- host-side span bookkeeping (the authors' AdaptiveSpan / AdaptiveMask methods).

  def span_values(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.span[...]), np.float64)

  def compute_trim_len(self) -> int:
    if not self.adapt_span:
      return 0
    return trim_length(self.span_values(), self.max_span, self.ramp,
                       granularity=self.trim_granularity)

  def update_trim_len(self) -> int:
    """Sets the static `trim_len` from the current spans (host); returns it."""
    self.trim_len = self.compute_trim_len()
    return self.trim_len

  def cache_size(self) -> int:
    """The authors' `get_cache_size`: S, or with `adapt_cache` the window plus 64."""
    if self.adapt_span and self.adapt_cache:
      return min(self.max_span, self.max_span - self.trim_len + 64)
    return self.max_span

  def penalty(self, coeff: float | None = None) -> jax.Array:
    """lambda * S * mean_heads(z/S) (the authors' `get_loss`), differentiable."""
    coeff = self.span_loss if coeff is None else coeff
    if not self.adapt_span:
      return jnp.zeros(())
    return coeff * self.max_span * jnp.mean(self.span[...])

  def clamp_span(self) -> None:
    if self.adapt_span:
      self.span[...] = jnp.clip(self.span[...], 0.0, 1.0)

  # -- forward.

  def _dropout_fn(self):
    if self.attn_dropout_rate == 0.0:
      return None
    return self.attn_dropout

  def _inputs_and_pe(self, x, cache, key_pe, trim_len):
    key_pe = self.key_pe[...] if key_pe is None else key_pe
    if key_pe is None:
      raise ValueError("this layer was built with shared_key_pe=True: pass key_pe")
    if key_pe.shape[-1] != self.max_span:
      raise ValueError(f"key_pe covers {key_pe.shape[-1]} distances, the layer's max_span "
                       f"is {self.max_span}")
    trim_len = self.trim_len if trim_len is None else trim_len
    need = self.max_span - trim_len + x.shape[1]
    # Only the last W + M inputs matter: project just those (the rest would be cut).
    h_all = x if cache is None else jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return h_all[:, max(0, h_all.shape[1] - need):], key_pe, trim_len

  def _project(self, x, h_all):
    q, k, v = self.query(x), self.key(h_all), self.value(h_all)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    return q, k, v

  def _finish(self, x, y):
    if self.gate is not None:
      y = y * GATE_ACTIVATIONS[self.gate_activation](self.gate(x))
    return self.out(y)

  def attend_seq(self, q, k, v, key_pe, trim_len):
    return seq_attention(q, k, v, key_pe, span=self.span[...] if self.adapt_span else None,
                         ramp=self.ramp, trim_len=trim_len, attn_dropout=self._dropout_fn())

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, grid=None,
               cache: jax.Array | None = None, key_pe: jax.Array | None = None,
               trim_len: int | None = None) -> jax.Array:
    """x: the block `[batch, M, width]`; cache: previous inputs `[batch, C, width]` or None.

    `mask` must be None (the window is fixed by the span); `trim_len` overrides the
    layer's static `trim_len`.
    """
    del grid
    if mask is not None:
      raise ValueError("adaptive-span attention has a fixed causal window; it takes no mask")
    ctx = mesh_lib.active()
    if ctx is not None and ctx.strategy is not None:
      return self._finish(x, self._sequence_parallel(x, cache, key_pe, trim_len, ctx))
    h_all, key_pe, trim_len = self._inputs_and_pe(x, cache, key_pe, trim_len)
    q, k, v = self._project(x, h_all)
    y = self.attend_seq(q, k, v, key_pe, trim_len)
    return self._finish(x, y)

  def core_options(self, key_pe=None, trim_len: int | None = None) -> dict:
    """The functional core's options for `zoo.parallel.sequence` (span, key_pe, trim)."""
    key_pe = self.key_pe[...] if key_pe is None else key_pe
    options = dict(key_pe=key_pe, span=self.span[...] if self.adapt_span else None,
                   ramp=self.ramp, trim_len=self.trim_len if trim_len is None else trim_len)
    drop = self.attn_dropout
    if self.attn_dropout_rate and not drop.deterministic:
      options.update(attn_dropout_rate=self.attn_dropout_rate, dropout_key=drop.rngs())
    return options

  def _sequence_parallel(self, x, cache, key_pe, trim_len, ctx):
    """The block split over `seq`; the cache's last W inputs projected and replicated."""
    from zoo.parallel import sequence  # pylint: disable=import-outside-toplevel
    _, key_pe, trim_len = self._inputs_and_pe(x[:, :0], None, key_pe, trim_len)
    q, k, v = self._project(x, x)
    options = self.core_options(key_pe, trim_len)
    if cache is not None:
      w = self.max_span - trim_len
      tail = cache[:, max(0, cache.shape[1] - w):].astype(x.dtype)
      _, k_cache, v_cache = self._project(tail[:, :0], tail)
      options.update(k_cache=k_cache, v_cache=v_cache)
    return sequence.run(self.sequence_parallel_core, q, k, v, mesh=ctx.mesh,
                        strategy=ctx.strategy, causal=True, **options)


# ----------------------------------------------------------------------------------------
# Model-level helpers for the trainer.


def _natural_key(path) -> tuple:
  parts = []
  for p in path:
    for piece in re.split(r"(\d+)", str(p)):
      if piece:
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
  return tuple(parts)


def span_layers(model) -> list[AdaptiveSpanAttention]:
  """Every adaptive-span layer in `model`, ordered by path (layers_2 before layers_10)."""
  found = [(path, m) for path, m in nnx.iter_modules(model)
           if isinstance(m, AdaptiveSpanAttention)]
  return [m for _, m in sorted(found, key=lambda pm: _natural_key(pm[0]))]


def clamp_spans(model) -> None:
  """Clamps every z/S to [0, 1]; call after each optimiser update (works under nnx.jit)."""
  for layer in span_layers(model):
    layer.clamp_span()


def update_trim_lengths(model) -> list[int]:
  """Host: sets every layer's static `trim_len` from its current spans; returns them."""
  return [layer.update_trim_len() for layer in span_layers(model)]


def span_penalty(model, coeff: float | None = None) -> jax.Array:
  """sum_layers lambda * mean_heads(z) (lambda: each layer's `span_loss` unless `coeff`)."""
  terms = [layer.penalty(coeff) for layer in span_layers(model)]
  return sum(terms, jnp.zeros(())) if terms else jnp.zeros(())


def span_stats(model) -> dict[str, Any]:
  """Host: per-layer avg / max span (the authors' definitions, ramp included) and totals.

  Returns {"avg": [per layer], "max": [per layer], "span_avg": mean over layers of avg,
  "span_max": max over layers of max, "z_mean": [per layer mean z], "z_max": [...]}
  (the authors log span_avg and span_max).
  """
  layers = [l for l in span_layers(model) if l.adapt_span]
  avg = [current_size(l.span_values(), l.max_span, l.ramp, reduce="mean") for l in layers]
  mx = [current_size(l.span_values(), l.max_span, l.ramp, reduce="max") for l in layers]
  return {
      "avg": avg, "max": mx,
      "span_avg": float(np.mean(avg)) if avg else 0.0,
      "span_max": float(max(mx)) if mx else 0.0,
      "z_mean": [float(l.span_values().mean() * l.max_span) for l in layers],
      "z_max": [float(l.span_values().max() * l.max_span) for l in layers],
  }


registry.register(
    "adaptive_span", AdaptiveSpanAttention, supports_causal=True, supports_noncausal=False,
    description="sequential attention over the S previous tokens with a learned soft span "
                "per head (Sukhbaatar et al. 2019, authors' code)")
