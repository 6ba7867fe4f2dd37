"""Model-level span helpers: what a trainer does with the adaptive-span layers of a model
(the authors' `trainer.py`): penalty, clamping, trimming, statistics.

`TransformerSeq`'s trainer hooks (`regularization_loss`, `after_update`, `before_step`,
`checkpoint_state`, `host_metrics`, `eval_report`) are built from these, so the trainer
knows no attention family.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention.adaptive_span.core import current_size
from zoo.attention.adaptive_span.layer import AdaptiveSpanAttention


def _natural_key(path) -> tuple:
  parts = []
  for p in path:
    for piece in re.split(r"(\d+)", str(p)):
      if piece:
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
  return tuple(parts)


def span_layers(model) -> list[AdaptiveSpanAttention]:
  """Every adaptive-span layer in `model` (persistent memory included), ordered by path
  (layers_2 before layers_10)."""
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


def trim_lengths(model) -> list[int]:
  """Every span layer's static `trim_len` in force."""
  return [int(layer.trim_len) for layer in span_layers(model)]


def set_trim_lengths(model, lengths: Sequence[int]) -> None:
  """Sets the static `trim_len` of every span layer (e.g. from a checkpoint)."""
  layers = span_layers(model)
  if len(lengths) != len(layers):
    raise ValueError(f"{len(lengths)} trim lengths for {len(layers)} layers")
  for layer, n in zip(layers, lengths):
    layer.trim_len = int(n)


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


def span_scalars(model) -> dict[str, float]:
  """Host: the authors' span_avg / span_max (ramp included) and the same per layer, to
  log with the train metrics; {} without learned spans."""
  stats = span_stats(model)
  if not stats["avg"]:
    return {}
  out = {"span_avg": stats["span_avg"], "span_max": stats["span_max"]}
  for i, (a, m) in enumerate(zip(stats["avg"], stats["max"])):
    out[f"span_avg/layer_{i}"] = float(a)
    out[f"span_max/layer_{i}"] = float(m)
  return out


def spans_per_head(model) -> list[list[float]]:
  """Host: learned spans z (tokens, = z/S * S) per layer and head; [] without them."""
  return [[round(float(v) * layer.max_span, 2) for v in layer.span_values()]
          for layer in span_layers(model) if layer.adapt_span]
