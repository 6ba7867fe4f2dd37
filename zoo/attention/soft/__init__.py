"""SOFT: softmax-free attention, Lu et al. (NeurIPS 2021, arXiv 2110.11945).

out = K1 . (K2 + ridge I)^{-1} . (K1^T V) with Gaussian kernels K1 = exp(Q (-) L) and
K2 = exp(L (-) L) between the (tied, K = Q) queries and m landmarks L taken from the patch
grid (the paper's Eq. 2-3, the inverse by Newton-Raphson iterations, Algorithm 1).
`core.py` holds the numerics and the list of differences from the paper (the defaults
follow the authors' code, fudan-zvg/SOFT); `parallel.py` the sequence-parallel
strategies (`all_gather`, `gspmd`); this module the options, the `CORE` record and the
layer, registered as `soft`.

SOFT runs on ViT patch tokens only: the layer needs the (rows, cols) grid, which the ViT
passes when the tokens are exactly the patches (no class token), and has neither a causal
form nor masks (ValueError).

Parameter mapping to the authors' `SoftmaxFreeAttention` (PyTorch `Linear.weight` is
[out, in], `Conv2d.weight` is [out, in, kh, kw]):

    query/kernel [width, H, d]       = W_q.weight.T.reshape(width, H, d)   (tied q and k)
    query/bias [H, d]                = W_q.bias.reshape(H, d)
    value/kernel, value/bias         = W_v, the same way
    out/kernel [H, d, width]         = ff.weight.T.reshape(H, d, width)
    out/bias [width]                 = ff.bias
    landmark_conv/kernel [k, k, d, d] = attn.Qlandmark_op.weight.transpose(2, 3, 1, 0)
    landmark_norm/scale, /bias [d]   = attn.Qnorm_act[0].weight, .bias
    value_conv/kernel [c, c, 1, H]   = attn.conv.weight.transpose(2, 3, 1, 0)
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from zoo.attention import core as core_lib
from zoo.attention import registry
from zoo.attention.base import AttentionLayer
from zoo.attention.options import Options, boolean, compute_only
from zoo.attention.soft import parallel
from zoo.attention.soft.core import (LANDMARKS, NO_CAUSAL_FORM, check_grid,
                                     check_newton_options, check_no_mask, check_options,
                                     gaussian_kernel, newton_inverse, nystrom, pool_landmarks,
                                     query_scale, scaled_queries, soft_attention, soft_core,
                                     soft_flops)
from zoo.attention.soft.parallel import rows_per_shard

CORE = core_lib.AttentionCore(name="soft", fn=soft_core, strategies=parallel.STRATEGIES,
                              flops=soft_flops)


@dataclasses.dataclass(frozen=True)
class SoftOptions(Options):
  """landmarks: "conv" (authors' code: learned stride-k conv + LayerNorm + GELU) or "pool"
  (paper: k x k average pooling); ratio: k, the landmark window and stride on the patch
  grid (m = (rows // k) (cols // k)); conv_size: c of the depthwise c x c convolution on V
  added to the output (0: none); num_iters, ridge, differentiate_iterations: of
  `newton_inverse`; use_bias: biases of the q/k, v and output projections."""
  landmarks: str = "conv"
  ratio: int = 2
  conv_size: int = 3
  num_iters: int = compute_only(20)
  ridge: float = compute_only(0.01)
  differentiate_iterations: bool = compute_only(False)
  use_bias: bool = True

  def check(self) -> None:
    super().check()
    check_options(landmarks=self.landmarks, ratio=self.ratio, conv_size=self.conv_size,
                  num_iters=self.num_iters, ridge=self.ridge)
    boolean("differentiate_iterations", self.differentiate_iterations)
    boolean("use_bias", self.use_bias)


class SoftAttention(AttentionLayer):
  """Multi-head SOFT attention over ViT patch tokens (see the package docstring).

  Parameters: `query` (tied q/k, the authors' W_q), `value` (W_v), `out` (ff), and with
  `landmarks="conv"` `landmark_conv` (Qlandmark_op) and `landmark_norm` (Qnorm_act[0]);
  with `conv_size > 0`, `value_conv` (attn.conv). Options: `SoftOptions`.

  Called as `layer(x, grid=(rows, cols))` on `[batch, rows*cols, width]` patch tokens in
  row-major order; `mask` must be None (ValueError otherwise); `grid` is required. Built
  with a `zoo.parallel.Sharding` whose strategy is set, it runs `parallel.py`'s strategy
  of that name, passing its landmark and convolution functions (`core_kwargs`).
  """

  family = "soft"
  Options = SoftOptions
  core = CORE
  causal_forms = (False,)
  missing_form_reason = NO_CAUSAL_FORM

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    width, num_heads, o = self.width, self.num_heads, self.options
    self.head_dim = d = self.per_head(width)
    kw = dict(use_bias=o.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform())
    heads = (num_heads, d)
    self.query = nnx.LinearGeneral(width, heads, **kw)
    self.value = nnx.LinearGeneral(width, heads, **kw)
    self.out = nnx.LinearGeneral(heads, width, axis=(-2, -1), **kw)
    # PyTorch's default Conv2d init, as the authors' model: U(+-1/sqrt(fan_in)).
    conv_kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
    if o.landmarks == "conv":
      self.landmark_conv = nnx.Conv(d, d, (o.ratio, o.ratio), strides=(o.ratio, o.ratio),
                                    padding="VALID", **conv_kw)
      self.landmark_norm = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
    else:
      self.landmark_conv = self.landmark_norm = None
    if o.conv_size:
      self.value_conv = nnx.Conv(num_heads, num_heads, (o.conv_size, o.conv_size),
                                 feature_group_count=num_heads, padding="SAME", **conv_kw)
    else:
      self.value_conv = None

  def make_landmarks(self, q_scaled: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Landmarks `[batch, m, heads, d]` from the rescaled queries `[batch, n, heads, d]`."""
    if self.options.landmarks == "pool":
      return pool_landmarks(q_scaled, grid, self.options.ratio)
    b, n, h, d = q_scaled.shape
    rows, cols = grid
    x = q_scaled.reshape(b, rows, cols, h, d).transpose(0, 3, 1, 2, 4)
    x = self.landmark_conv(x.reshape(b * h, rows, cols, d))  # [B*H, rows//k, cols//k, d]
    x = jax.nn.gelu(self.landmark_norm(x), approximate=False)
    return x.reshape(b, h, -1, d).transpose(0, 2, 1, 3)

  def conv_values(self, v: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Depthwise conv of V `[batch, n, heads, d]` on the grid, one filter per head."""
    b, n, h, d = v.shape
    rows, cols = grid
    x = v.reshape(b, rows, cols, h, d).transpose(0, 4, 1, 2, 3).reshape(b * d, rows, cols, h)
    x = self.value_conv(x)  # channels = heads, groups = heads: the filter is per head
    return x.reshape(b, d, rows, cols, h).transpose(0, 2, 3, 4, 1).reshape(b, n, h, d)

  def project(self, x: jax.Array, inputs_kv: jax.Array):
    """(q, q, v): the keys are the queries (K = Q)."""
    if inputs_kv is not x:
      raise ValueError("SOFT attention is self-attention only (K = Q): inputs_kv is not "
                       "supported")
    if x.shape[-1] != self.width:
      raise ValueError(f"SOFT attention expects [batch, length, {self.width}], got {x.shape}")
    q = self.query(x)  # [B, n, H, d]
    return q, q, self.value(x)

  def attend(self, q, k, v, *, mask, grid, sharding):
    check_no_mask(mask)
    return super().attend(q, k, v, mask=None, grid=grid, sharding=sharding)

  def core_kwargs(self, q, k, v, *, grid):
    """The grid, the options, and this layer's landmark and value-convolution functions
    (they close over its parameters, replicated on every shard when split)."""
    o = self.options
    return dict(grid=check_grid(grid, q.shape[1], o.ratio), ratio=o.ratio,
                landmarks=o.landmarks, conv_size=o.conv_size, num_iters=o.num_iters,
                ridge=float(o.ridge), differentiate_iterations=o.differentiate_iterations,
                landmark_fn=self.make_landmarks,
                value_conv_fn=self.conv_values if self.value_conv is not None else None)

  def output(self, x: jax.Array, y: jax.Array) -> jax.Array:
    return self.out(y)

  def flops_kwargs(self, length: int, grid=None):
    o = self.options
    return dict(grid=grid, ratio=o.ratio, landmarks=o.landmarks, conv_size=o.conv_size,
                num_iters=o.num_iters)

  def projection_flops(self, length: int) -> float:
    """The q (= k), v and output projections; the convolutions are in `soft_flops`."""
    return 2.0 * length * sum(p.kernel.get_value().size for p in (self.query, self.value, self.out))


registry.register(
    "soft", SoftAttention,
    description="SOFT: Gaussian-kernel Nystrom attention with Newton-iteration inverse and "
                "grid landmarks (ViT without class token only; no causal form, no masks)")

__all__ = ["CORE", "LANDMARKS", "SoftAttention", "SoftOptions", "check_grid",
           "check_newton_options", "check_options", "gaussian_kernel", "newton_inverse",
           "nystrom", "parallel", "pool_landmarks", "query_scale", "rows_per_shard",
           "scaled_queries", "soft_attention", "soft_core", "soft_flops"]
