"""The adaptive-span layer: the authors' `MultiHeadSeqAttention` + `SeqAttention` +
`AdaptiveSpan` (facebookresearch/adaptive-span; Sukhbaatar et al. 2019, arXiv 1905.07799)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention.adaptive_span.core import TRIM_GRANULARITY, seq_attention, trim_length
from zoo.attention.cache_window import CacheWindowAttention, CacheWindowOptions, make_core
from zoo.attention.options import boolean, compute_only, nonnegative_number, positive_int

CORE = make_core("adaptive_span", seq_attention)


@dataclasses.dataclass(frozen=True)
class AdaptiveSpanOptions(CacheWindowOptions):
  """The span options (the authors' flags in parentheses).

  ramp: R, the mask's ramp length (`adapt_span_ramp`).
  span_init: initial z/S of every head, in [0, 1] (`adapt_span_init`).
  span_loss: lambda of the L1 span penalty (`adapt_span_loss`); needs adapt_span.
  adapt_span: learn spans; False: a fixed span S (no mask: softmax over the window).
  adapt_cache: shrink the cache with the trimmed window (`adapt_span_cache`).
  trim_granularity: trimmed distances come in multiples of it (the authors' 64).
  """
  ramp: int = 32
  span_init: float = 0.0
  span_loss: float = 0.0
  adapt_span: bool = True
  adapt_cache: bool = False
  trim_granularity: int = compute_only(TRIM_GRANULARITY)

  def check(self) -> None:
    super().check()
    boolean("adapt_span", self.adapt_span)
    boolean("adapt_cache", self.adapt_cache)
    if self.adapt_span and (isinstance(self.ramp, bool)
                            or not isinstance(self.ramp, (int, float)) or not self.ramp > 0):
      raise ValueError(f"ramp must be > 0, got {self.ramp!r}")
    if not 0.0 <= self.span_init <= 1.0:
      raise ValueError(f"span_init is z/S and must lie in [0, 1], got {self.span_init!r}")
    nonnegative_number("span_loss", self.span_loss)
    if not self.adapt_span and self.span_loss:
      raise ValueError("span_loss needs adapt_span=True (there is no span to penalise)")
    positive_int("trim_granularity", self.trim_granularity)


class AdaptiveSpanAttention(CacheWindowAttention):
  """The authors' `MultiHeadSeqAttention` + `SeqAttention` + `AdaptiveSpan`.

  The projections, `key_pe`, cache and halo strategy of `CacheWindowAttention`; `span`
  `[heads]` holds z / S (the authors' `current_val`), None without `adapt_span`.

  Static (Python) state: `trim_len`, set by `update_trim_len()` on the host from the
  current spans (an `nnx.jit`ted step then retraces when it changes); `cache_size()`
  follows it with `adapt_cache`.
  """

  family = "adaptive_span"
  Options = AdaptiveSpanOptions
  core = CORE

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    super().build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    o = self.options
    self.span = (nnx.Param(jnp.full((self.num_heads,), o.span_init, param_dtype))
                 if o.adapt_span else None)

  @property
  def adapt_span(self) -> bool:
    return self.options.adapt_span

  @property
  def ramp(self):
    return self.options.ramp

  def core_kwargs(self, q, k, v, *, grid) -> dict[str, Any]:
    return dict(span=self.span[...] if self.adapt_span else None, ramp=self.ramp)

  # -- host-side span bookkeeping (the authors' AdaptiveSpan / AdaptiveMask methods).

  def span_values(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.span[...]), np.float64)

  def compute_trim_len(self) -> int:
    if not self.adapt_span:
      return 0
    return trim_length(self.span_values(), self.max_span, self.ramp,
                       granularity=self.options.trim_granularity)

  def update_trim_len(self) -> int:
    """Sets the static `trim_len` from the current spans (host); returns it."""
    self.trim_len = self.compute_trim_len()
    return self.trim_len

  def cache_size(self) -> int:
    """The authors' `get_cache_size`: S, or with `adapt_cache` the window plus 64."""
    if self.adapt_span and self.options.adapt_cache:
      return min(self.max_span, self.max_span - self.trim_len + 64)
    return self.max_span

  def penalty(self, coeff: float | None = None) -> jax.Array:
    """lambda * S * mean_heads(z/S) (the authors' `get_loss`), differentiable. The mean,
    not the sum, over heads (the authors' code)."""
    coeff = self.options.span_loss if coeff is None else coeff
    if not self.adapt_span:
      return jnp.zeros(())
    return coeff * self.max_span * jnp.mean(self.span[...])

  def clamp_span(self) -> None:
    if self.adapt_span:
      self.span[...] = jnp.clip(self.span[...], 0.0, 1.0)
