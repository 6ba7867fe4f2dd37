"""The multi-head projection layer that softmax, pointwise and the cache families share.

Parameter names and shapes match Flax Linen's `MultiHeadDotProductAttention` (and so
big_vision's ViT checkpoints): `query`, `key`, `value` kernels `[width, heads, head_dim]`
with biases `[heads, head_dim]`, `out` kernel `[heads, head_dim, width]` with bias
`[width]`; with qk-layernorm, `query_ln` and `key_ln` scales `[head_dim]` (LayerNorm over
head_dim without bias, shared across heads, epsilon 1e-6, applied to the projected q and k
before the 1/sqrt(d) scaling, as ViT-22B, Dehghani et al. 2023).

Options (`options.ProjectionOptions`) common to every family built on this layer:

* `qk_layernorm`: see above.
* `output_gate`: a gating projection `gate` (kernel `[width, heads, head_dim]`) whose
  activation multiplies the attention output before the output projection,
  o = (attn(x) * act(x W_g)) W_o, the gated attention unit of Hua et al. (2022) that the
  ReLU-attention paper (Wortsman et al. 2023, Sec. 4 / Fig. 6) ablates.
* `use_bias`: biases of the four projections.
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from zoo.attention import masking
from zoo.attention.base import AttentionLayer
from zoo.attention.options import GATE_ACTIVATIONS, ProjectionOptions


class MultiHeadAttention(AttentionLayer):
  """q, k, v projections, optional qk-layernorm and output gate, and an output projection;
  the core works on `[batch, length, heads, head_dim]` arrays."""

  Options: ClassVar[type[ProjectionOptions]] = ProjectionOptions

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    self.head_dim = self.per_head(self.width)
    o = self.options
    kw = dict(use_bias=o.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform())
    heads = (self.num_heads, self.head_dim)
    self.query = nnx.LinearGeneral(self.width, heads, **kw)
    self.key = nnx.LinearGeneral(self.width, heads, **kw)
    self.value = nnx.LinearGeneral(self.width, heads, **kw)
    self.out = nnx.LinearGeneral(heads, self.width, axis=(-2, -1), **kw)
    ln = dict(epsilon=1e-6, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_ln = nnx.LayerNorm(self.head_dim, **ln) if o.qk_layernorm else None
    self.key_ln = nnx.LayerNorm(self.head_dim, **ln) if o.qk_layernorm else None
    self.gate = nnx.LinearGeneral(self.width, heads, **kw) if o.output_gate else None

  def project(self, x: jax.Array, inputs_kv: jax.Array):
    q, k, v = self.query(x), self.key(inputs_kv), self.value(inputs_kv)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    return q, k, v

  def attend(self, q, k, v, *, mask, grid, sharding):
    return super().attend(q, k, v, mask=masking.check_mask(mask, q, k), grid=grid,
                          sharding=sharding)

  def output(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.gate is not None:
      y = y * GATE_ACTIVATIONS[self.options.gate_activation](self.gate(x))
    return self.out(y)
