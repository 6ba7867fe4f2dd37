"""The AFT layers (Zhai et al. 2021): typed options, projections, cores and registration.

`AFTFull`, `AFTLocal`, `AFTSimple`, `AFTConv`, registered as `aft_full`, `aft_local`,
`aft_simple`, `aft_conv`: `query`, `key`, `value` projections width -> `hidden_dim`
(default width; `nnx.Linear`, kernel `[in, out]` = PyTorch weight^T) and `out` hidden_dim
-> width around the variant's core. Position bias (full and local, Sec. 3.3): `pos_bias_u`,
`pos_bias_v` `[max_len, bias_rank]` (Eq. 7: w = u v^T, init N(0, 1e-2)), or with
`bias_rank=None` one table `pos_bias` `[max_len, max_len]` (zeros at init), sliced to the
sequence length. `max_len` is required for full and local (the backbones fill it with
their token count: the ViT's (image_size / patch_size)^2, +1 with pool_type='tok'; the
LM's `max_len`). AFT-conv: `kernel_size` s, `conv_dims` (None: 1 when causal, 2 otherwise;
2-D needs the ViT's patch grid, i.e. no class token), `conv_kernel` `[heads, s(, s)]`,
`conv_gain` and `conv_bias` `[heads]` (Eq. 8). The backbone's `num_heads` sets AFT-conv's
heads and is unused by the other variants.

Masks: key padding only (broadcastable to `[batch, 1, 1, length]`, True = attend); other
masks raise. With a `zoo.parallel.Sharding` whose `strategy` is set, the core runs split
along the sequence (`parallel.py`), which takes no mask.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import core as core_lib
from zoo.attention import registry
from zoo.attention.aft import parallel
from zoo.attention.aft.common import key_padding_mask
from zoo.attention.aft.conv import aft_conv_kernel, conv_attention
from zoo.attention.aft.full_local import full_attention, local_attention
from zoo.attention.aft.simple import simple_attention
from zoo.attention.base import AttentionLayer
from zoo.attention.options import Options, boolean, compute_only, positive_int


# ----------------------------------------------------------------------------- FLOPs
# Forward FLOPs of one example, 2 per multiply-add; elementwise work (exp, the sigmoid gate,
# the ratio, the running-max rescaling) is not counted. `heads * head_dim` is AFT's
# hidden_dim (full, local and simple have one "head" of hidden_dim features). Each formula
# counts the multiply-adds of the key sums, numerator (exp(.) * V) and denominator (exp(.))
# alike, as the cores compute them.

def full_flops(*, q_len, kv_len, heads, head_dim, causal, **_) -> float:
  """AFT-full and AFT-local (full with the windowed bias): the two [L_q, L_k] x [L_k, dim]
  matmuls exp(w) @ (exp(K) * V) and exp(w) @ exp(K): 2 * 2 * pairs * dim, pairs = L_q L_k
  (causal: the visible pairs)."""
  return 2.0 * 2.0 * core_lib.visible_pairs(q_len, kv_len, causal) * heads * head_dim


def simple_flops(*, q_len, kv_len, heads, head_dim, causal, **_) -> float:
  """AFT-simple: the key sums shared by all queries (causal: one running sum), each key
  and feature once: 2 * 2 * L_k * dim."""
  del q_len, causal
  return 2.0 * 2.0 * kv_len * heads * head_dim


def conv_flops(*, q_len, kv_len, heads, head_dim, causal, kernel_size, conv_dims,
               key_per_head, **_) -> float:
  """AFT-conv: per query, the window's taps (s in 1-D, s^2 in 2-D) of the two depthwise
  convolutions plus the keys outside the window summed once (cumulative sums), over the
  dim value channels (numerator) and the key channels (heads, or dim; denominator):
  2 * L * (taps + 1) * (dim + key_channels)."""
  del kv_len, causal
  dim = heads * head_dim
  taps = kernel_size ** conv_dims
  return 2.0 * q_len * (taps + 1) * (dim + (heads if key_per_head else dim))


FULL_CORE = core_lib.AttentionCore("aft_full", full_attention, parallel.STRATEGIES["aft_full"],
                                   full_flops)
LOCAL_CORE = core_lib.AttentionCore("aft_local", local_attention,
                                    parallel.STRATEGIES["aft_local"], full_flops)
SIMPLE_CORE = core_lib.AttentionCore("aft_simple", simple_attention,
                                     parallel.STRATEGIES["aft_simple"], simple_flops)
CONV_CORE = core_lib.AttentionCore("aft_conv", conv_attention, parallel.STRATEGIES["aft_conv"],
                                   conv_flops)


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass(frozen=True)
class AFTOptions(Options):
  """Every AFT variant's (and AFT-simple's only) options.

  hidden_dim: features of q, k, v (None: the width). use_bias: biases of the four
  projections.
  """
  hidden_dim: int | None = None
  use_bias: bool = True

  def check(self) -> None:
    super().check()
    positive_int("hidden_dim", self.hidden_dim, allow_none=True)
    boolean("use_bias", self.use_bias)


@dataclasses.dataclass(frozen=True)
class AFTFullOptions(AFTOptions):
  """max_len: the longest sequence (sizes the position bias; the backbones fill it).
  bias_rank: d' of w = u v^T (Eq. 7), None for a full `[max_len, max_len]` table.
  block_size: causal only: queries per block sharing one running max of K (`aft_full`)."""
  max_len: int | None = None
  bias_rank: int | None = 128
  block_size: int | None = compute_only(None)

  def check(self) -> None:
    super().check()
    positive_int("max_len", self.max_len, allow_none=True)
    positive_int("bias_rank", self.bias_rank, allow_none=True)
    positive_int("block_size", self.block_size, allow_none=True)


@dataclasses.dataclass(frozen=True)
class AFTLocalOptions(AFTFullOptions):
  """window: the local span s of Eq. 4 (the bias is kept where |t - t'| < window)."""
  window: int | None = None

  def check(self) -> None:
    super().check()
    if self.window is None:
      raise ValueError("aft_local needs window (the local span s: the bias is kept where "
                       "|t - t'| < window)")
    positive_int("window", self.window)


@dataclasses.dataclass(frozen=True)
class AFTConvOptions(AFTOptions):
  """kernel_size: s (odd unless causal). conv_dims: 1 (over the token sequence; causal uses
  past taps only) or 2 (over the ViT's patch grid, non-causal); None: 1 when causal, else
  2. key_per_head: K has one channel per head (True) or hidden_dim channels."""
  kernel_size: int = 3
  conv_dims: int | None = None
  key_per_head: bool = True

  def check(self) -> None:
    super().check()
    positive_int("kernel_size", self.kernel_size)
    if self.conv_dims not in (1, 2, None) or isinstance(self.conv_dims, bool):
      raise ValueError(f"conv_dims must be 1, 2 or None, got {self.conv_dims!r}")
    boolean("key_per_head", self.key_per_head)


# ----------------------------------------------------------------------------- layers

class AFTLayer(AttentionLayer):
  """query/key/value projections width -> hidden_dim, a core on `[batch, length,
  hidden_dim]`, and `out` hidden_dim -> width."""

  Options: ClassVar[type[AFTOptions]] = AFTOptions

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    self.hidden_dim = hidden = self.options.hidden_dim or self.width
    kw = dict(use_bias=self.options.use_bias, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs, kernel_init=nnx.initializers.xavier_uniform())
    self.query = nnx.Linear(self.width, hidden, **kw)
    self.key = nnx.Linear(self.width, self.key_features(), **kw)
    self.value = nnx.Linear(self.width, hidden, **kw)
    self.out = nnx.Linear(hidden, self.width, **kw)

  def key_features(self) -> int:
    return self.hidden_dim

  def project(self, x: jax.Array, inputs_kv: jax.Array):
    return self.query(x), self.key(inputs_kv), self.value(inputs_kv)

  def attend(self, q, k, v, *, mask, grid, sharding):
    if mask is not None and (sharding is None or sharding.strategy is None):
      # A mask AFT cannot honour fails first, before the options are derived (the core
      # converts it again: `key_padding_mask` is cheap and runs at trace time).
      key_padding_mask(mask, q.shape[0], k.shape[1])
    return super().attend(q, k, v, mask=mask, grid=grid, sharding=sharding)

  def output(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.out(y)

  def core_heads(self) -> int:
    """The heads the core splits hidden_dim into (1: no heads)."""
    return 1

  def core_flops(self, length: int, grid=None) -> float:
    """Forward FLOPs of the core over `hidden_dim` features (see the formulas above)."""
    heads = self.core_heads()
    return float(self.core.flops(q_len=length, kv_len=length, heads=heads,
                                 head_dim=self.hidden_dim // heads, causal=self.causal,
                                 **self.flops_kwargs(length, grid)))


class AFTFull(AFTLayer):
  """AFT-full (Eq. 2) with a factorised (Eq. 7) or full position bias."""

  family = "aft_full"
  Options = AFTFullOptions
  core = FULL_CORE

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    o = self.options
    if o.max_len is None:
      raise ValueError(
          f"{self.family} needs max_len (the longest sequence, which sizes the position bias);"
          f" set attention_options={{'max_len': ...}}: the LM's max_len, or the ViT's token "
          f"count (image_size / patch_size) ** 2 (+1 with a class token)")
    super().build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.max_len, self.bias_rank = o.max_len, o.bias_rank
    if o.bias_rank is None:
      self.pos_bias = nnx.Param(jnp.zeros((o.max_len, o.max_len), param_dtype))
    else:
      init = nnx.initializers.normal(stddev=1e-2)
      self.pos_bias_u = nnx.Param(init(rngs.params(), (o.max_len, o.bias_rank), param_dtype))
      self.pos_bias_v = nnx.Param(init(rngs.params(), (o.max_len, o.bias_rank), param_dtype))

  def position_bias(self, q_len: int, kv_len: int) -> jax.Array:
    """w `[q_len, kv_len]` (float32 or the param dtype)."""
    if max(q_len, kv_len) > self.max_len:
      raise ValueError(f"sequence length {max(q_len, kv_len)} exceeds {self.family}'s "
                       f"max_len {self.max_len}")
    if self.bias_rank is None:
      return self.pos_bias[:q_len, :kv_len]
    return self.pos_bias_u[:q_len] @ self.pos_bias_v[:kv_len].T

  def core_kwargs(self, q, k, v, *, grid):
    return {"pos_bias": self.position_bias(q.shape[1], k.shape[1]),
            "block_size": self.options.block_size}

  def projection_flops(self, length: int) -> float:
    """The Linear kernels, plus u v^T (2 * L^2 * bias_rank, once per forward)."""
    extra = 0.0 if self.bias_rank is None else 2.0 * length * length * self.bias_rank
    return super().projection_flops(length) + extra


class AFTLocal(AFTFull):
  """AFT-local (Eq. 4): AFT-full with the bias zeroed outside |t - t'| < window."""

  family = "aft_local"
  Options = AFTLocalOptions
  core = LOCAL_CORE

  @property
  def window(self) -> int:
    return self.options.window

  def core_kwargs(self, q, k, v, *, grid):
    return {**super().core_kwargs(q, k, v, grid=grid), "window": self.window}


class AFTSimple(AFTLayer):
  """AFT-simple (Eq. 5): no position bias, linear in length."""

  family = "aft_simple"
  Options = AFTOptions
  core = SIMPLE_CORE


class AFTConv(AFTLayer):
  """AFT-conv (Eq. 6, 8): `num_heads` heads, a depthwise s (x s) filter per head.

  conv_dims: 1 (over the token sequence; causal uses past taps only) or 2 (over the ViT's
  patch grid, non-causal); None picks 1 when causal, else 2. key_per_head: K has one channel
  per head (default) or hidden_dim channels.
  """

  family = "aft_conv"
  Options = AFTConvOptions
  core = CONV_CORE

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    o = self.options
    conv_dims = o.conv_dims or (1 if self.causal else 2)
    if self.causal and conv_dims == 2:
      raise ValueError("conv_dims=2 has no causal form; use conv_dims=1 in a causal model")
    if not self.causal and o.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size must be odd for a centred (non-causal) conv, got "
                       f"{o.kernel_size}")
    self.per_head(o.hidden_dim or self.width, "hidden_dim")
    self.kernel_size, self.conv_dims, self.key_per_head = o.kernel_size, conv_dims, o.key_per_head
    super().build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    shape = (self.num_heads,) + (o.kernel_size,) * conv_dims
    # The raw filter's scale is irrelevant after Eq. 8's standardisation; gain and bias 0.
    self.conv_kernel = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), shape, param_dtype))
    self.conv_gain = nnx.Param(jnp.zeros((self.num_heads,), param_dtype))
    self.conv_bias = nnx.Param(jnp.zeros((self.num_heads,), param_dtype))

  def key_features(self) -> int:
    return self.num_heads if self.key_per_head else self.hidden_dim

  def kernel(self) -> jax.Array:
    """The reparameterised filter w (Eq. 8), `[heads, s(, s)]`."""
    return aft_conv_kernel(self.conv_kernel[...], self.conv_gain[...], self.conv_bias[...])

  def core_kwargs(self, q, k, v, *, grid):
    if self.conv_dims == 2 and grid is None:
      raise ValueError(
          "aft_conv with conv_dims=2 needs the patch grid: in the ViT use a pool_type other "
          "than 'tok' (no class token), or set attention_options={'conv_dims': 1}")
    return {"kernel": self.kernel(), "grid": grid if self.conv_dims == 2 else None}

  def core_heads(self) -> int:
    return self.num_heads

  def flops_kwargs(self, length: int, grid=None):
    return {"kernel_size": self.kernel_size, "conv_dims": self.conv_dims,
            "key_per_head": self.key_per_head}


registry.register(
    "aft_full", AFTFull,
    description="AFT-full (Zhai et al. 2021, Eq. 2): exp(K + w)-weighted average of V per "
                "feature, gated by sigmoid(Q); needs max_len")
registry.register(
    "aft_local", AFTLocal,
    description="AFT-local (Eq. 4): AFT-full with the position bias only within |t - t'| < "
                "window; needs max_len and window")
registry.register(
    "aft_simple", AFTSimple,
    description="AFT-simple (Eq. 5): softmax over keys per feature, no position bias, linear")
registry.register(
    "aft_conv", AFTConv,
    description="AFT-conv (Eq. 6): per-head depthwise-conv position bias (1-D causal or 2-D "
                "over the ViT patch grid), starts as per-head AFT-simple")
