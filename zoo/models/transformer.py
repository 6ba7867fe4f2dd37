"""The one pre-LayerNorm transformer block that both backbones use, with any attention.

Attribute names follow big_vision's ViT (`Transformer/encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0/Dense_{0,1}`,
`Transformer/encoder_norm`) so that state paths equal the public checkpoints' names. The
attention slot keeps the name `MultiHeadDotProductAttention_0` whatever family fills it.
"""

from __future__ import annotations

from typing import Any, Mapping

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import attention as attention_lib
from zoo import parallel


# The MLP's nonlinearity: big_vision uses flax's default, the tanh approximation of GELU;
# timm, DeiT and Hugging Face use the exact (erf) form.
MLP_ACTIVATIONS = {"gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
                   "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def check_block_options(mlp_activation: str, layernorm_epsilon: float) -> None:
  """Refuses an unknown MLP activation or a LayerNorm epsilon that is not a positive number."""
  if mlp_activation not in MLP_ACTIVATIONS:
    raise ValueError(f"mlp_activation must be one of {sorted(MLP_ACTIVATIONS)}, "
                     f"got {mlp_activation!r}")
  if (isinstance(layernorm_epsilon, bool) or not isinstance(layernorm_epsilon, (int, float))
      or not layernorm_epsilon > 0):
    raise ValueError(f"layernorm_epsilon must be a positive number, got {layernorm_epsilon!r}")


class MlpBlock(nnx.Module):
  """Dense -> GELU -> dropout -> Dense, as big_vision (xavier kernels, N(0, 1e-6) biases).

  `activation`: "gelu_tanh" (big_vision, the default) or "gelu" (exact, erf).
  """

  def __init__(self, width: int, mlp_dim: int, *, dropout: float = 0.0,
               activation: str = "gelu_tanh", dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    check_block_options(activation, 1.0)
    self.activation = activation
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform(),
              bias_init=nnx.initializers.normal(stddev=1e-6))
    self.Dense_0 = nnx.Linear(width, mlp_dim, **kw)
    self.Dense_1 = nnx.Linear(mlp_dim, width, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = MLP_ACTIVATIONS[self.activation](self.Dense_0(x))
    return self.Dense_1(self.dropout(x))


def fill_max_len(attention: str, options: Mapping[str, Any] | None,
                 max_len: int | None) -> dict[str, Any]:
  """The attention options with `max_len` set to the backbone's longest token sequence
  when the family takes a `max_len` (AFT-full, AFT-local) and none is given."""
  options = dict(options or {})
  if (max_len is not None and options.get("max_len") is None
      and "max_len" in attention_lib.get(attention).options_class.names()):
    options["max_len"] = max_len
  return options


class Encoder1DBlock(nnx.Module):
  """x + attn(LN(x)), then x + mlp(LN(x)); returns the output and its intermediates.

  `max_len`: the longest token sequence the backbone feeds the block; it fills the
  attention's `max_len` option when the family has one and it is unset. `sharding`: a
  `zoo.parallel.Sharding` (activations constrained to their logical axes; with a
  strategy, the attention split along the sequence), or None. `mlp_activation`:
  "gelu_tanh" or "gelu" (see `MLP_ACTIVATIONS`); `layernorm_epsilon`: both LayerNorms'.
  """

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *, attention: str,
               attention_options: Mapping[str, Any] | None = None, causal: bool = False,
               dropout: float = 0.0, max_len: int | None = None,
               mlp_activation: str = "gelu_tanh", layernorm_epsilon: float = 1e-6,
               sharding: parallel.Sharding | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    check_block_options(mlp_activation, layernorm_epsilon)
    self.sharding = sharding
    ln = dict(epsilon=layernorm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.LayerNorm_0 = nnx.LayerNorm(width, **ln)
    self.MultiHeadDotProductAttention_0 = attention_lib.make(
        attention, width=width, num_heads=num_heads, causal=causal, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype, sharding=sharding,
        **fill_max_len(attention, attention_options, max_len))
    self.LayerNorm_1 = nnx.LayerNorm(width, **ln)
    self.MlpBlock_0 = MlpBlock(width, mlp_dim, dropout=dropout, activation=mlp_activation,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               grid: tuple[int, int] | None = None):
    out = {}
    x = parallel.constrain(x, ("batch", "seq", "embed"), self.sharding)
    y = self.LayerNorm_0(x)
    y = out["sa"] = self.MultiHeadDotProductAttention_0(y, mask=mask, grid=grid)
    x = out["+sa"] = x + self.dropout(y)
    y = out["mlp"] = self.MlpBlock_0(self.LayerNorm_1(x))
    x = out["+mlp"] = x + self.dropout(y)
    return x, out


class Encoder(nnx.Module):
  """`depth` blocks (`encoderblock_{i}`) and a final LayerNorm (`encoder_norm`)."""

  def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, *,
               attention: str, attention_options: Mapping[str, Any] | None = None,
               causal: bool = False, dropout: float = 0.0, max_len: int | None = None,
               mlp_activation: str = "gelu_tanh", layernorm_epsilon: float = 1e-6,
               sharding: parallel.Sharding | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.depth = depth
    for i in range(depth):
      setattr(self, f"encoderblock_{i}", Encoder1DBlock(
          width, mlp_dim, num_heads, attention=attention, attention_options=attention_options,
          causal=causal, dropout=dropout, max_len=max_len, mlp_activation=mlp_activation,
          layernorm_epsilon=layernorm_epsilon, sharding=sharding, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs))
    self.encoder_norm = nnx.LayerNorm(width, epsilon=layernorm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

  def blocks(self) -> list[Encoder1DBlock]:
    return [getattr(self, f"encoderblock_{i}") for i in range(self.depth)]

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               grid: tuple[int, int] | None = None):
    """`grid`: the (rows, cols) patch grid when x holds exactly the ViT's patch tokens in
    row-major order (families with 2-D operators use it); None otherwise."""
    out = {}
    for i, block in enumerate(self.blocks()):
      x, out[f"block{i:02d}"] = block(x, mask=mask, grid=grid)
    out["pre_ln"] = x
    return self.encoder_norm(x), out
