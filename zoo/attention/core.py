"""An attention family's functional description and the one dispatch function.

`AttentionCore(name, fn, strategies, flops)` describes a family once:

* `fn(q, k, v, *, causal, mask, **kwargs)`: the single-device core on arrays.
* `strategies`: sequence-parallel implementations by name (`gspmd`, `all_gather`,
  `ring`, `halo`), each `fn(q, k, v, *, mesh, causal, layout, **kwargs)` taking global
  arrays sharded along length over the mesh's `seq` axis and equal to `fn` in values and
  gradients. A family builds them from `zoo.parallel.sequence` in its own package.
* `flops(*, q_len, kv_len, heads, head_dim, causal, **kwargs)`: forward FLOPs of the core
  for one example, counting 2 FLOPs per multiply-add of its matrix products (elementwise
  work is not counted); with `causal`, the keys each query sees. A training step costs
  about 3x forward. The layers add their projections (`AttentionLayer.flops`).

`dispatch(core, q, k, v, causal=..., mask=..., sharding=..., **kwargs)` runs `fn`, or the
strategy named by `sharding.strategy` when the layer was built with one: the choice is an
explicit argument, never ambient state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from zoo.attention import masking
from zoo.attention import registry
from zoo.parallel import Sharding
from zoo.parallel import sequence as seq_lib


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCore:
  name: str
  fn: Callable[..., jax.Array]
  strategies: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(default_factory=dict)
  flops: Callable[..., float] | None = None


def dot_product_flops(*, q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool,
                      value_dim: int | None = None) -> float:
  """2 (q.k) + 2 (weights.v) FLOPs per head and (query, visible key) pair."""
  pairs = visible_pairs(q_len, kv_len, causal)
  return 2.0 * heads * pairs * (head_dim + (value_dim or head_dim))


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
  """(query, key) pairs a causal or full attention computes (queries and keys aligned at
  the start, as `jax.nn.dot_product_attention(is_causal=True)`)."""
  if not causal:
    return q_len * kv_len
  full = min(q_len, kv_len)  # query i sees min(i + 1, kv_len) keys
  return full * (full + 1) // 2 + max(0, q_len - kv_len) * kv_len


def dispatch(core: AttentionCore, q: jax.Array, k: jax.Array, v: jax.Array, *,
             causal: bool, mask: jax.Array | None = None, sharding: Sharding | None = None,
             layout: str = "natural", **kwargs: Any) -> jax.Array:
  """The single-device core, or with `sharding.strategy` the core split along the sequence."""
  if sharding is None or sharding.strategy is None:
    return core.fn(q, k, v, causal=causal, mask=mask, **kwargs)
  strategy = sharding.strategy
  if strategy not in core.strategies:
    raise ValueError(f"attention core {core.name!r} has no sequence-parallel {strategy!r} "
                     f"strategy; available: {sorted(core.strategies) or 'none'}")
  if mask is not None:
    raise ValueError("sequence-parallel attention takes no mask (causal=True is supported); "
                     "pad sequences to the mesh-divisible length and mask the loss instead")
  if kwargs.get("implementation") is not None:
    raise ValueError(f"implementation={kwargs['implementation']!r} selects a single-device "
                     f"kernel; sequence-parallel strategies run the XLA paths: drop the "
                     f"option or config.sequence_parallel")
  if q.ndim == 4:
    masking.check_qkv(q, k, v)
  seq_lib.check_split(q, k, mesh=sharding.mesh, strategy=strategy, causal=causal,
                      layout=layout)
  return core.strategies[strategy](q, k, v, mesh=sharding.mesh, causal=causal, layout=layout,
                                   **kwargs)


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, kind: str,
                                strategy: str, causal: bool = False, layout: str = "natural",
                                mask: jax.Array | None = None, **options: Any) -> jax.Array:
  """Self-attention of the registered `kind` with the sequence split over the mesh's `seq`.

  Args:
    q, k, v: global `[batch, length, heads, head_dim]` arrays (sharded or not; the result
      is sharded along length over `seq` and batch over `data`/`fsdp`).
    mesh: a `jax.sharding.Mesh` with a `seq` axis (see `zoo.parallel.make_mesh`).
    kind: a registered attention name (`softmax`, `relu`, `pointwise`, ...).
    strategy: one of the family's strategies (`gspmd`, `all_gather`, `ring`, `halo`).
    causal: query i sees keys j <= i.
    layout: `natural`, or `zigzag` when the caller already holds the sequence in the
      load-balanced order (causal ring only).
    **options: the family's core options (e.g. `activation`, `alpha`, `block_size`).

  Returns:
    The same values as the family's single-device core, `[batch, length, heads, head_dim]`.
  """
  family = registry.get(kind)
  return dispatch(family.layer.core, q, k, v, causal=causal, mask=mask,
                  sharding=Sharding(mesh, strategy=strategy), layout=layout,
                  **{**family.preset, **options})
