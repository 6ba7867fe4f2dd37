"""Adaptive attention span, Sukhbaatar et al. 2019 (arXiv 1905.07799), as the authors' code
(facebookresearch/adaptive-span).

* `core.py`: the span mask, the trim length and `seq_attention` (the authors'
  `SeqAttention` with `AdaptiveSpan`) over the window of `zoo.attention.cache_window`.
* `layer.py`: `AdaptiveSpanAttention` (`AdaptiveSpanOptions`; the `CORE` record with the
  `halo` strategy of `cache_window.parallel` and the window FLOPs formula).
* `model.py`: the model-level helpers a trainer needs (`span_layers`, `clamp_spans`,
  `update_trim_lengths`, `span_penalty`, `span_stats`, ...).

Registered as `adaptive_span` (causal; it runs over a segment cache in `TransformerSeq`).
"""

from __future__ import annotations

from zoo.attention import registry
from zoo.attention.adaptive_span.core import (RENORM_EPS, TRIM_GRANULARITY, check_span,
                                              current_size, seq_attention, span_mask,
                                              trim_length, window_mask)
from zoo.attention.adaptive_span.layer import CORE, AdaptiveSpanAttention, AdaptiveSpanOptions
from zoo.attention.adaptive_span.model import (clamp_spans, set_trim_lengths, span_layers,
                                               span_penalty, span_scalars, span_stats,
                                               spans_per_head, trim_lengths,
                                               update_trim_lengths)

registry.register(
    "adaptive_span", AdaptiveSpanAttention,
    description="sequential attention over the S previous tokens with a learned soft span "
                "per head (Sukhbaatar et al. 2019, authors' code)")

__all__ = ["AdaptiveSpanAttention", "AdaptiveSpanOptions", "CORE", "RENORM_EPS",
           "TRIM_GRANULARITY", "check_span", "clamp_spans", "current_size", "seq_attention",
           "set_trim_lengths", "span_layers", "span_mask", "span_penalty", "span_scalars",
           "span_stats", "spans_per_head", "trim_length", "trim_lengths",
           "update_trim_lengths", "window_mask"]
