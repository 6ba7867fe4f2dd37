"""Pointwise (ReLU and friends) attention, Wortsman et al. 2023 (arXiv 2309.08586).

`core.pointwise_attention` (Eq. 1 with phi = L^-alpha h: dense, blockwise with a custom
VJP, or the fused Pallas kernel of `pallas.py`), its sequence-parallel strategies
(`parallel.py`), and the layer with the shared projections, registered as `pointwise`
and under each activation's name (`relu`, `relu2`, `gelu`, ...).
"""

from __future__ import annotations

import dataclasses

from zoo.attention import core as core_lib
from zoo.attention import registry
from zoo.attention.heads import MultiHeadAttention
from zoo.attention.options import ProjectionOptions, compute_only
from zoo.attention.pointwise import pallas, parallel
from zoo.attention.pointwise.activations import ACTIVATIONS
from zoo.attention.pointwise.core import (AUTO_TILE_MACS, IMPLEMENTATIONS, check_options,
                                          length_scale, pointwise_attention, tile_sizes,
                                          visible_key_counts)

CORE = core_lib.AttentionCore(
    name="pointwise", fn=pointwise_attention, strategies=parallel.STRATEGIES,
    flops=lambda **kw: core_lib.dot_product_flops(**kw))


@dataclasses.dataclass(frozen=True)
class PointwiseOptions(ProjectionOptions):
  """activation: h; alpha: the exponent of L^-alpha; block_size / query_block_size: the
  blockwise path's key and query tiles (None: dense); implementation: None (XLA),
  "pallas" (fused GPU kernel) or "pallas_interpret". See `core.pointwise_attention`."""
  activation: str = "relu"
  alpha: float = 1.0
  block_size: int | None = compute_only(None)
  query_block_size: int | None = compute_only(None)
  implementation: str | None = compute_only(None)

  def check(self) -> None:
    super().check()
    check_options(self.activation, self.alpha, self.block_size, self.implementation,
                  self.query_block_size)


class PointwiseAttention(MultiHeadAttention):
  """Multi-head pointwise attention: the shared projections around `pointwise_attention`."""

  family = "pointwise"
  Options = PointwiseOptions
  core = CORE

  def core_kwargs(self, q, k, v, *, grid):
    o = self.options
    kwargs = dict(activation=o.activation, alpha=float(o.alpha), block_size=o.block_size)
    if o.query_block_size is not None:
      kwargs["query_block_size"] = o.query_block_size
    if o.implementation is not None:  # sequence-parallel strategies refuse it
      kwargs["implementation"] = o.implementation
    return kwargs


registry.register(
    "pointwise", PointwiseAttention,
    description="L^-alpha * h(q.k/sqrt(d)), any activation h; no normalisation over keys")
for _name in ACTIVATIONS:
  registry.register(
      _name, PointwiseAttention, preset={"activation": _name},
      description=f"pointwise attention with h = {_name} (alpha = 1 unless set)")

__all__ = ["ACTIVATIONS", "AUTO_TILE_MACS", "CORE", "IMPLEMENTATIONS", "PointwiseAttention",
           "PointwiseOptions", "check_options", "length_scale", "pallas", "pointwise_attention",
           "tile_sizes", "visible_key_counts"]
