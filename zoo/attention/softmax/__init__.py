"""Softmax attention: the baseline (`core.softmax_attention`, through
`jax.nn.dot_product_attention`), its sequence-parallel strategies (`parallel.py`) and the
layer with the shared projections."""

from __future__ import annotations

import dataclasses

from zoo.attention import core as core_lib
from zoo.attention import registry
from zoo.attention.heads import MultiHeadAttention
from zoo.attention.options import ProjectionOptions, compute_only, one_of
from zoo.attention.softmax import parallel
from zoo.attention.softmax.core import IMPLEMENTATIONS, softmax_attention

CORE = core_lib.AttentionCore(
    name="softmax", fn=softmax_attention, strategies=parallel.STRATEGIES,
    flops=lambda **kw: core_lib.dot_product_flops(**kw))


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions(ProjectionOptions):
  """implementation: None (XLA picks), "xla", or "cudnn" (fused cuDNN kernel, GPU, bf16/fp16)."""
  implementation: str | None = compute_only(None)

  def check(self) -> None:
    super().check()
    one_of("implementation", self.implementation, IMPLEMENTATIONS)


class SoftmaxAttention(MultiHeadAttention):
  """Multi-head softmax attention with the shared projections (see `heads.py`)."""

  family = "softmax"
  Options = SoftmaxOptions
  core = CORE

  def core_kwargs(self, q, k, v, *, grid):
    if self.options.implementation is None:
      return {}
    return {"implementation": self.options.implementation}


registry.register("softmax", SoftmaxAttention,
                  description="softmax(q.k/sqrt(d)) via jax.nn.dot_product_attention")

__all__ = ["CORE", "IMPLEMENTATIONS", "SoftmaxAttention", "SoftmaxOptions",
           "softmax_attention"]
