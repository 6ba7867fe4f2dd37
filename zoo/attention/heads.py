"""The multi-head projection module that softmax and pointwise attention share.

Parameter names and shapes match Flax Linen's `MultiHeadDotProductAttention` (and so
big_vision's ViT checkpoints): `query`, `key`, `value` kernels `[width, heads, head_dim]`
with biases `[heads, head_dim]`, `out` kernel `[heads, head_dim, width]` with bias
`[width]`; with qk-layernorm, `query_ln` and `key_ln` scales `[head_dim]` (LayerNorm over
head_dim without bias, shared across heads, epsilon 1e-6, applied to the projected q and k
before the 1/sqrt(d) scaling, as ViT-22B, Dehghani et al. 2023).

Options common to every family built on this module:

* `qk_layernorm`: see above.
* `output_gate`: a gating projection `gate` (kernel `[width, heads, head_dim]`) whose
  activation multiplies the attention output before the output projection,
  o = (attn(x) * act(x W_g)) W_o, the gated attention unit of Hua et al. (2022) that the
  ReLU-attention paper (Wortsman et al. 2023, Sec. 4 / Fig. 6) ablates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import masking
from zoo.parallel import mesh as mesh_lib

GATE_ACTIVATIONS = {
    "identity": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
    "swish": jax.nn.swish,
}


class MultiHeadDotProductAttention(nnx.Module):
  """q, k, v projections, optional qk-layernorm and output gate, and an output projection.

  Subclasses implement `attend(q, k, v, *, mask)` on `[batch, length, heads, head_dim]`
  arrays with a family's functional core.
  """

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               qk_layernorm: bool = False, output_gate: bool = False,
               gate_activation: str = "swish", use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if num_heads <= 0 or width % num_heads:
      raise ValueError(
          f"width {width} must be a positive multiple of num_heads {num_heads} "
          f"(head_dim = width / num_heads)")
    if gate_activation not in GATE_ACTIVATIONS:
      raise ValueError(f"gate_activation {gate_activation!r} not in {sorted(GATE_ACTIVATIONS)}")
    self.width, self.num_heads = width, num_heads
    self.head_dim = width // num_heads
    self.causal = causal
    self.dtype = dtype
    self.gate_activation = gate_activation
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform())
    heads = (num_heads, self.head_dim)
    self.query = nnx.LinearGeneral(width, heads, **kw)
    self.key = nnx.LinearGeneral(width, heads, **kw)
    self.value = nnx.LinearGeneral(width, heads, **kw)
    self.out = nnx.LinearGeneral(heads, width, axis=(-2, -1), **kw)
    ln = dict(epsilon=1e-6, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_ln = nnx.LayerNorm(self.head_dim, **ln) if qk_layernorm else None
    self.key_ln = nnx.LayerNorm(self.head_dim, **ln) if qk_layernorm else None
    self.gate = nnx.LinearGeneral(width, heads, **kw) if output_gate else None

  # The name under which `zoo.parallel.sequence` registers this family's strategies.
  sequence_parallel_core: str | None = None

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
             mask: jax.Array | None = None) -> jax.Array:
    raise NotImplementedError

  def core_options(self) -> dict:
    """The functional core's options (passed to sequence-parallel strategies too)."""
    return {}

  def __call__(self, x: jax.Array, *, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, grid=None) -> jax.Array:
    """Self-attention over `x` `[batch, length, width]` (or cross-attention to `inputs_kv`).

    `mask`: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; True = attend.
    `grid`: the ViT's (rows, cols) patch grid, unused by these families.
    """
    del grid
    inputs_kv = x if inputs_kv is None else inputs_kv
    q, k, v = self.query(x), self.key(inputs_kv), self.value(inputs_kv)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    ctx = mesh_lib.active()
    if ctx is not None and ctx.strategy is not None and inputs_kv is x:
      from zoo.parallel import sequence  # pylint: disable=import-outside-toplevel
      if mask is not None:
        raise ValueError("sequence-parallel attention takes no mask")
      y = sequence.run(self.sequence_parallel_core, q, k, v, mesh=ctx.mesh,
                       strategy=ctx.strategy, causal=self.causal, **self.core_options())
    else:
      y = self.attend(q, k, v, mask=masking.check_mask(mask, q, k))
    if self.gate is not None:
      y = y * GATE_ACTIVATIONS[self.gate_activation](self.gate(x))
    return self.out(y)
