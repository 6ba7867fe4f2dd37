"""The one base layer: options, projections, dispatch, gate and output projection.

A family's layer derives from `AttentionLayer` (or from `heads.MultiHeadAttention`, the
shared q/k/v/out projections) and sets three class attributes:

    class PointwiseAttention(MultiHeadAttention):
      family = "pointwise"
      Options = PointwiseOptions          # a frozen dataclass (options.py)
      core = POINTWISE_CORE               # AttentionCore(name, fn, strategies, flops)

      def core_kwargs(self, q, k, v, *, grid):
        return dict(activation=self.options.activation, alpha=self.options.alpha, ...)

`__call__` projects, then `attend` hands q, k, v and `core_kwargs(...)` to
`core.dispatch`, which runs the core or, when the layer was built with a
`zoo.parallel.Sharding` whose `strategy` is set, that sequence-parallel strategy; then
`output` applies the gate (if any) and the output projection. Families override only
what differs (AFT its projections, SOFT its landmarks, adaptive span its cache).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import core as core_lib
from zoo.attention.options import Options, positive_int
from zoo.parallel import Sharding


class AttentionLayer(nnx.Module):
  """Base of every attention layer; see the module docstring.

  Args:
    width: model width (input and output features).
    num_heads: number of heads.
    causal: query i sees keys j <= i only.
    sharding: a `zoo.parallel.Sharding`; with a `strategy` the core runs split along the
      sequence over the mesh's `seq` axis. None: unsplit.
    dtype, param_dtype: computation and parameter dtypes.
    rngs: `nnx.Rngs` for initialisation (and dropout where a family has it).
    **options: the family's options (`Options` dataclass fields).
  """

  family: ClassVar[str] = ""
  Options: ClassVar[type[Options]] = Options
  core: ClassVar[core_lib.AttentionCore]
  causal_forms: ClassVar[tuple[bool, ...]] = (False, True)
  cached: ClassVar[bool] = False  # also runs over a segment cache (TransformerSeq)
  # Why a form is missing, for the error when it is asked for (None: a generic message).
  missing_form_reason: ClassVar[str | None] = None

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               sharding: Sharding | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs, **options: Any):
    if bool(causal) not in self.causal_forms:
      raise ValueError(self.missing_form_reason or f"attention {self.family!r} has no "
                       f"{'causal' if causal else 'non-causal'} form")
    self.options = self.Options.create(self.family or type(self).__name__, options)
    positive_int("width", width)
    positive_int("num_heads", num_heads)
    self.width, self.num_heads, self.causal = width, num_heads, bool(causal)
    self.sharding = sharding
    self.dtype = dtype
    self.build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def per_head(self, features: int, name: str = "width") -> int:
    """`features / num_heads`, or a ValueError when the heads do not divide `features`."""
    if features % self.num_heads:
      raise ValueError(f"{name} {features} must be a positive multiple of num_heads "
                       f"{self.num_heads} ({name} / num_heads per head)")
    return features // self.num_heads

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    """Creates the parameters."""
    raise NotImplementedError

  def project(self, x: jax.Array, inputs_kv: jax.Array) -> tuple[jax.Array, ...]:
    """q from x, k and v from inputs_kv."""
    raise NotImplementedError

  def core_kwargs(self, q: jax.Array, k: jax.Array, v: jax.Array, *, grid) -> dict[str, Any]:
    """The core's (and its strategies') keyword arguments beyond q, k, v, causal, mask:
    option values and arrays derived from parameters (position biases, filters)."""
    return {}

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
             grid, sharding: Sharding | None) -> jax.Array:
    return core_lib.dispatch(self.core, q, k, v, causal=self.causal, mask=mask,
                             sharding=sharding, **self.core_kwargs(q, k, v, grid=grid))

  def output(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """The core's output `y` -> `[batch, length, width]` (gate and output projection)."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, *, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, grid=None) -> jax.Array:
    """Self-attention over `x` `[batch, length, width]` (or cross-attention to `inputs_kv`,
    which always runs unsplit).

    `mask`: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; True = attend.
    `grid`: the ViT's (rows, cols) patch grid (families with 2-D operators use it).
    """
    if x.ndim != 3:
      raise ValueError(f"attention {self.family!r} expects x [batch, length, width], got "
                       f"shape {x.shape}")
    sharding = self.sharding if inputs_kv is None else None
    q, k, v = self.project(x, x if inputs_kv is None else inputs_kv)
    return self.output(x, self.attend(q, k, v, mask=mask, grid=grid, sharding=sharding))

  def core_flops(self, length: int, grid=None) -> float:
    """Forward FLOPs of the core for one example of `length` tokens (self-attention)."""
    if self.core.flops is None:
      raise NotImplementedError(f"attention {self.family!r} declares no FLOPs formula")
    head_dim = self.width // self.num_heads
    kwargs = self.flops_kwargs(length, grid)
    return float(self.core.flops(q_len=length, kv_len=length, heads=self.num_heads,
                                 head_dim=head_dim, causal=self.causal, **kwargs))

  def flops_kwargs(self, length: int, grid=None) -> dict[str, Any]:
    """Options the FLOPs formula reads (families override)."""
    return {}

  def flops(self, length: int, grid=None) -> float:
    """Forward FLOPs of the layer for one example: projections (2 per multiply-add of
    each parameter matrix, per token) plus the core."""
    return self.projection_flops(length) + self.core_flops(length, grid)

  def projection_flops(self, length: int) -> float:
    """2 FLOPs per multiply-add of every matrix parameter with `length` tokens (kernels
    of the Linear layers; families with other matrix products override)."""
    total = 0
    for path, node in nnx.iter_graph(self):
      if isinstance(node, nnx.Param) and path[-1] == "kernel":
        shape = node.get_value().shape  # an array, or a ShapeDtypeStruct (nnx.eval_shape)
        if len(shape) >= 2:
          total += math.prod(shape)
    return 2.0 * length * total


def use_sharding(module: nnx.Module, sharding: Sharding | None) -> nnx.Module:
  """Sets `sharding` on every layer and block of `module` that has one (in place)."""
  for _, m in nnx.iter_modules(module):
    if hasattr(m, "sharding"):
      m.sharding = sharding
  return module
