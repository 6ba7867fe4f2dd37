"""SOFT: softmax-free attention, Lu et al. (NeurIPS 2021, arXiv 2110.11945).

The zoo follows the authors' code (fudan-zvg/SOFT, `models/softmax_free_transformer.py`,
`SOFT/kernel/inverse.py`) by default; the paper's choices are options. Equation numbers
below are those of the NeurIPS version as we recall them (Sec. 3.2, 3.3); they were not
re-checked against the PDF here.

Attention matrix (Sec. 3.2, Eq. 2): a Gaussian kernel instead of softmax, with the query and
key projections tied (K = Q) so that the matrix is symmetric positive semi-definite,

    S_ij = exp(-|q_i - k_j|^2 / (2 sqrt(d))).

Low rank (Sec. 3.3, Eq. 3, the Nystrom form): with m << n landmarks ("bottleneck tokens")
Q~ = K~ taken from Q,

    S ~= exp(Q (-) K~) . exp(Q~ (-) K~)^+ . exp(Q~ (-) K),      out = S~ V,

where exp(A (-) B) is the Gaussian kernel matrix between the rows of A and B, and the
Moore-Penrose inverse ^+ is approximated by Newton-Raphson iterations (Sec. 3.3,
Algorithm 1): V_0 = alpha A, V_{k+1} = 2 V_k - V_k A V_k.

Exactly what the zoo computes (each difference from the paper is listed at the end):

1. Scaling. Q <- Q / d^{1/4} (d = head_dim), K = Q. Then exp(-|q_i/d^{1/4} - k_j/d^{1/4}|^2 / 2)
   = exp(-|q_i - k_j|^2 / (2 sqrt(d))): Eq. 2's 1/sqrt(d) is entirely in this rescaling,
   and every kernel afterwards is the unit-bandwidth exp(-|x - y|^2 / 2).
2. Landmarks L [m, d] are computed *from the rescaled Q* on the 2-D patch grid, and are
   *not rescaled again* afterwards ("landmarks from Q, not rescaled"):
   * `landmarks="conv"` (authors' code): L = GELU_exact(LayerNorm_d(Conv_kxk,stride k(Q/d^{1/4}))),
     the convolution shared across heads and applied per head on its d channels, no
     bias; LayerNorm over head_dim (epsilon 1e-5, PyTorch's default). Because of the
     LayerNorm, the landmarks' scale does not depend on d, while Q's does.
   * `landmarks="pool"` (paper): L = AvgPool_kxk,stride k(Q/d^{1/4}) = AvgPool(Q) / d^{1/4},
     so K1 is exactly Eq. 2's kernel between the queries and the pooled queries.
   A grid whose sides are not multiples of k is floored (the trailing rows / columns do
   not contribute to any landmark), as PyTorch's unpadded stride-k Conv2d / AvgPool2d.
3. K1 = exp(-|Q/d^{1/4} - L|^2 / 2) [n, m] and K2 = exp(-|L - L|^2 / 2) [m, m], both in the
   expanded form |x|^2 + |y|^2 - 2 x.y clamped at 0 (the authors' `kernel_method='torch'`
   plus the clamp, so rounding cannot give a squared distance below 0 and a kernel above 1).
4. out = K1 . newton_inverse(K2) . (K1^T V), evaluated right to left: K1^T V [m, d], then
   newton_inverse(K2) times that [m, d], then K1 times that [n, d]. No [n, n] array exists
   in the forward or the backward pass: memory O(n m + m^2 + n d).
5. `newton_inverse` (authors' `newton_inv`): per matrix, alpha = 0.9 * 2 / (max row sum
   of K2)^2 (row sums of K2 itself, before the ridge, signed as in the authors' code),
   P = K2 + ridge I (ridge = 0.01), V_0 = alpha P, then `num_iters` = 20 steps of
   V <- 2V - V P V. So V -> (K2 + ridge I)^{-1}. The backward treats V as that exact
   inverse, dK2 = -V^T G V^T (the authors' `_NewtonInverseKernel.backward`);
   `differentiate_iterations=True` differentiates through the iterations instead.
   The iterations and the kernels are computed in at least float32, the Newton matmuls
   at `Precision.HIGHEST` (they are m x m, cheap, and Newton-Schulz amplifies rounding).
6. Module: out_proj(out + DWConv_cxc(V)), the depthwise convolution on V (authors' code,
   `conv_size` = 3; one filter per head shared by that head's d channels, zero padding
   "same", no bias); `conv_size=0` removes it.

Differences from the paper (all defaults follow the code):
* Landmarks: the paper's average pooling is `landmarks="pool"`; the default "conv" adds a
  learned stride-k convolution, LayerNorm and GELU (authors' code).
* Newton start: the paper uses alpha = 2 / |A|_1^2 on A itself; the code (default) uses
  0.9 * 2 / (max row sum)^2 (the same norm for the symmetric non-negative K2, times 0.9)
  and iterates on A + 0.01 I, which converges to (K2 + 0.01 I)^{-1} rather than K2^+.
  `ridge=0` gives the paper's target K2^+ (K2^{-1} when K2 is invertible).
* Backward: the exact-inverse gradient is what the code does (and what the journal
  version, arXiv 2207.03341, describes); plain autodiff through the loop is
  `differentiate_iterations=True`.
* The depthwise convolution on V is in the code, not in the paper's attention equations.
* `ratio=1`: the authors' code then takes a different path (full Gaussian attention among
  linearly transformed tokens, with a class token); here ratio 1 is still the Nystrom form
  with m = n landmarks from a 1x1 convolution (or, for "pool", the queries themselves).

Masks: SOFT has no masked form. The landmarks pool over the whole patch grid, so every
token must be a real patch; a padding mask would need masked pooling that neither the
paper nor the code defines. The module raises ValueError if `mask` is passed. It has no
causal form either (K1^T V mixes all positions): registered with `supports_causal=False`.

Sequence parallelism: under a sharding context with a strategy (`config.sequence_parallel`
with `mesh.seq > 1`), `SoftAttention` runs `zoo.parallel.sequence_soft` (`all_gather`:
landmarks from each shard's own grid rows, gathered; K1^T V psum'd; the convolution on V
gets its neighbours' boundary rows by ppermute; or `gspmd`), passing its landmark and
convolution functions. The rows per shard must be a multiple of `ratio` (see that module).

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

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import registry
from zoo.parallel import mesh as mesh_lib

LANDMARKS = ("conv", "pool")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- options


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_newton_options(num_iters, ridge) -> None:
  """Raises ValueError naming the bad option."""
  if not _is_int(num_iters) or num_iters < 0:
    raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}")
  if (isinstance(ridge, bool) or not isinstance(ridge, numbers.Real)
      or not math.isfinite(ridge) or ridge < 0):
    raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def check_options(*, landmarks, ratio, conv_size, num_iters, ridge) -> None:
  """Raises ValueError naming the bad option."""
  if landmarks not in LANDMARKS:
    raise ValueError(f"landmarks must be one of {list(LANDMARKS)}, got {landmarks!r}")
  if not _is_int(ratio) or ratio < 1:
    raise ValueError(f"ratio (the landmark pooling size k) must be an int >= 1, got {ratio!r}")
  if not _is_int(conv_size) or conv_size < 0 or (conv_size and conv_size % 2 == 0):
    raise ValueError(f"conv_size must be 0 (no convolution on V) or an odd int >= 1, "
                     f"got {conv_size!r}")
  check_newton_options(num_iters, ridge)


def check_grid(grid, length: int, ratio: int) -> tuple[int, int]:
  """Validates the (rows, cols) patch grid against the sequence length and ratio."""
  if grid is None:
    raise ValueError(
        "SOFT attention needs the 2-D patch grid (grid=(rows, cols)) to build its "
        "landmarks; the ViT passes it only when the tokens are exactly the patches, so use "
        "pool_type 'gap', 'map' or '0', not 'tok' (class token), and no LM")
  try:
    rows, cols = (int(g) for g in grid)
  except (TypeError, ValueError):
    raise ValueError(f"grid must be a pair (rows, cols), got {grid!r}") from None
  if rows * cols != length:
    raise ValueError(f"grid {rows}x{cols} = {rows * cols} patches does not match the "
                     f"sequence length {length}")
  if rows < ratio or cols < ratio:
    raise ValueError(f"grid {rows}x{cols} is smaller than the landmark ratio {ratio}: no "
                     f"landmark fits")
  return rows, cols


# ----------------------------------------------------------------------- Newton inverse


def _newton_iterations(a: jax.Array, num_iters: int, ridge: float) -> jax.Array:
  """The authors' `newton_inv` with the ridge as a parameter; see `newton_inverse`."""
  row_sum_max = jnp.max(jnp.sum(a, axis=-1), axis=-1)
  alpha = 0.9 * 2.0 / jnp.square(row_sum_max)
  p = a + ridge * jnp.eye(a.shape[-1], dtype=a.dtype)
  v0 = alpha[..., None, None] * p

  def step(_, v):
    vp = jnp.matmul(v, p, precision=_HIGHEST)
    return 2.0 * v - jnp.matmul(vp, v, precision=_HIGHEST)

  return jax.lax.fori_loop(0, num_iters, step, v0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _newton_inverse_exact_vjp(a, num_iters, ridge):
  return _newton_iterations(a, num_iters, ridge)


def _newton_fwd(a, num_iters, ridge):
  v = _newton_iterations(a, num_iters, ridge)
  return v, v


def _newton_bwd(num_iters, ridge, v, g):
  del num_iters, ridge
  vt = jnp.swapaxes(v, -1, -2)
  return (-jnp.matmul(jnp.matmul(vt, g, precision=_HIGHEST), vt, precision=_HIGHEST),)


_newton_inverse_exact_vjp.defvjp(_newton_fwd, _newton_bwd)


def newton_inverse(a: jax.Array, *, num_iters: int = 20, ridge: float = 0.01,
                   differentiate_iterations: bool = False) -> jax.Array:
  """Newton-Schulz approximation of (a + ridge I)^{-1}, per matrix of `[..., m, m]`.

  The authors' `newton_inv` (SOFT/kernel/inverse.py): alpha = 0.9 * 2 / (max_i sum_j a_ij)^2
  per matrix (row sums of `a`, before the ridge), P = a + ridge I, V_0 = alpha P, then
  `num_iters` steps of V <- 2V - V P V (matmuls at `Precision.HIGHEST`). The paper's
  Algorithm 1 starts from alpha = 2 / |a|_1^2 without a ridge; `ridge=0` targets a^+.

  The authors add the ridge as `0.01 * torch.eye(m)`, a float32 identity, so on float64
  input their ridge is float32(0.01) = 0.0099999998; `ridge=float(np.float32(0.01))`
  reproduces their float64 output to rounding, the default 0.01 to ~1e-9 relative.

  Convergence needs |I - alpha P^2| < 1, which holds for the symmetric positive
  semi-definite Gaussian Gram matrices SOFT inverts (0 < alpha lambda^2 <= 1.8).

  Args:
    a: `[..., m, m]`.
    num_iters: Newton steps (>= 0; 0 returns alpha P).
    ridge: added to the diagonal (a Python number >= 0).
    differentiate_iterations: False (default, the authors' backward): the gradient treats
      the result V as the exact inverse of P, dL/da = -V^T G V^T for cotangent G. True:
      reverse-mode autodiff through alpha and every iteration (exactly the derivative of
      the computed V, at num_iters times the backward cost).

  Returns:
    V, `[..., m, m]`, in a's dtype.
  """
  check_newton_options(num_iters, ridge)
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"newton_inverse needs square matrices [..., m, m], got {a.shape}")
  ridge = float(ridge)
  if differentiate_iterations:
    return _newton_iterations(a, num_iters, ridge)
  return _newton_inverse_exact_vjp(a, num_iters, ridge)


# ---------------------------------------------------------------------- Gaussian kernel


def gaussian_kernel(x: jax.Array, y: jax.Array, *, precision=None) -> jax.Array:
  """exp(-|x_i - y_j|^2 / 2) for x `[..., n, d]`, y `[..., m, d]` -> `[..., n, m]`.

  Expanded form |x|^2 + |y|^2 - 2 x.y, so no `[n, m, d]` difference tensor; the squared
  distance is clamped at 0 (rounding could make it slightly negative, giving values above
  1). Where the clamp binds the true distance is ~0, and so is its true gradient.
  """
  x2 = jnp.sum(jnp.square(x), axis=-1)[..., :, None]
  y2 = jnp.sum(jnp.square(y), axis=-1)[..., None, :]
  xy = jnp.einsum("...nd,...md->...nm", x, y, precision=precision)
  return jnp.exp(-0.5 * jnp.maximum(x2 + y2 - 2.0 * xy, 0.0))


# ---------------------------------------------------------------------- functional core


def query_scale(head_dim: int) -> float:
  """d^{-1/4}: Q <- Q d^{-1/4} puts Eq. 2's 1/(2 sqrt(d)) into a unit-bandwidth kernel."""
  return float(head_dim) ** -0.25


def soft_attention(q: jax.Array, v: jax.Array, landmarks: jax.Array, *,
                   num_iters: int = 20, ridge: float = 0.01,
                   differentiate_iterations: bool = False, precision=None) -> jax.Array:
  """SOFT attention (Eq. 3) with K = Q: K1 . newton_inverse(K2) . (K1^T V).

  Scaling, exactly: this function divides `q` by d^{1/4} (d = head_dim); `landmarks` are
  used as given. So pass landmarks computed from the *rescaled* queries q / d^{1/4}
  (`pool_landmarks(q * query_scale(d), grid, k)`, or the module's conv + LayerNorm +
  GELU on them), never rescaled again; then

    K1 = exp(-|q_i / d^{1/4} - l_j|^2 / 2)  [n, m],   K2 = exp(-|l_i - l_j|^2 / 2)  [m, m],
    out = K1 (newton_inverse(K2) (K1^T v)),

  evaluated right to left, so memory is O(n m), never O(n^2). Kernels and the inverse are
  computed in at least float32.

  Args:
    q: `[batch, n, heads, d]`, the tied query/key projection (not yet rescaled).
    v: `[batch, n, heads, dv]`.
    landmarks: `[batch, m, heads, d]`, in the rescaled-query space.
    num_iters, ridge, differentiate_iterations: see `newton_inverse`.
    precision: for the n x m kernel and attention matmuls (None: the backend default).

  Returns:
    `[batch, n, heads, dv]` in q's dtype.
  """
  check_newton_options(num_iters, ridge)
  for name, x in (("q", q), ("v", v), ("landmarks", landmarks)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim], got shape {x.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q {q.shape} and v {v.shape} must agree on batch, length, heads")
  if (landmarks.shape[0], landmarks.shape[2], landmarks.shape[3]) != (q.shape[0], q.shape[2],
                                                                      q.shape[3]):
    raise ValueError(f"landmarks {landmarks.shape} must be [batch, m, heads, head_dim] "
                     f"matching q {q.shape}")
  return nystrom(q, v, landmarks, num_iters=num_iters, ridge=float(ridge),
                 differentiate_iterations=differentiate_iterations, precision=precision)


def nystrom(q, v, landmarks, *, num_iters, ridge, differentiate_iterations, precision,
            sum_over_tokens=None):
  """`soft_attention` without the argument checks, on (a shard of) the tokens.

  `sum_over_tokens`: applied to K1^T V `[B, H, m, dv]`, the only sum over tokens; the
  sequence-parallel strategy passes a `psum` over the `seq` axis (each shard holds some
  tokens and all the landmarks). None: the tokens are all here.
  """
  compute = jnp.promote_types(q.dtype, jnp.float32)
  qs = (q.astype(compute) * query_scale(q.shape[-1])).transpose(0, 2, 1, 3)  # [B, H, n, d]
  lm = landmarks.astype(compute).transpose(0, 2, 1, 3)  # [B, H, m, d]
  k1 = gaussian_kernel(qs, lm, precision=precision)  # [B, H, n, m]
  k2 = gaussian_kernel(lm, lm, precision=precision)  # [B, H, m, m]
  k2_inv = newton_inverse(k2, num_iters=num_iters, ridge=ridge,
                          differentiate_iterations=differentiate_iterations)
  k1v = jnp.einsum("bhnm,bnhe->bhme", k1, v.astype(compute), precision=precision)
  if sum_over_tokens is not None:
    k1v = sum_over_tokens(k1v)
  w = jnp.matmul(k2_inv, k1v, precision=_HIGHEST)  # [B, H, m, dv]
  out = jnp.einsum("bhnm,bhme->bnhe", k1, w, precision=precision)
  return out.astype(q.dtype)


def pool_landmarks(q: jax.Array, grid: tuple[int, int], ratio: int) -> jax.Array:
  """k x k stride-k average pooling of `[batch, rows*cols, heads, d]` tokens on the grid.

  Returns `[batch, (rows // k) * (cols // k), heads, d]` landmarks in row-major order;
  trailing rows / columns that do not fill a window are dropped (unpadded pooling).
  """
  b, n, h, d = q.shape
  rows, cols = check_grid(grid, n, ratio)
  r, c = rows // ratio, cols // ratio
  x = q.reshape(b, rows, cols, h, d)[:, :r * ratio, :c * ratio]
  x = x.reshape(b, r, ratio, c, ratio, h, d).mean(axis=(2, 4))
  return x.reshape(b, r * c, h, d)


# ------------------------------------------------------------------------------ module


class SoftAttention(nnx.Module):
  """Multi-head SOFT attention over ViT patch tokens (see the module docstring).

  Parameters: `query` (tied q/k, the authors' W_q), `value` (W_v), `out` (ff), and with
  `landmarks="conv"` `landmark_conv` (Qlandmark_op) and `landmark_norm` (Qnorm_act[0]);
  with `conv_size > 0`, `value_conv` (attn.conv).

  Options:
    landmarks: "conv" (authors' code, default) or "pool" (paper).
    ratio: k, the landmark window and stride on the patch grid (m = (rows//k)(cols//k)).
    conv_size: c of the depthwise c x c convolution on V added to the output; 0 disables.
    num_iters, ridge, differentiate_iterations: of `newton_inverse`.
    use_bias: biases of the q/k, v and output projections (the authors' have them).

  Called as `module(x, grid=(rows, cols))` on `[batch, rows*cols, width]` patch tokens in
  row-major order; `mask` must be None (ValueError otherwise); `grid` is required.
  """

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               landmarks: str = "conv", ratio: int = 2, conv_size: int = 3,
               num_iters: int = 20, ridge: float = 0.01,
               differentiate_iterations: bool = False, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if causal:
      raise ValueError("attention 'soft' (SOFT) has no causal form: its landmarks pool the "
                       "whole 2-D patch grid and K1^T V mixes all positions, so it cannot "
                       "be used in a causal language model")
    if not _is_int(num_heads) or not _is_int(width) or num_heads <= 0 or width % num_heads:
      raise ValueError(f"width {width} must be a positive multiple of num_heads {num_heads} "
                       f"(head_dim = width / num_heads)")
    check_options(landmarks=landmarks, ratio=ratio, conv_size=conv_size,
                  num_iters=num_iters, ridge=ridge)
    self.width, self.num_heads = width, num_heads
    self.head_dim = d = width // num_heads
    self.landmarks, self.ratio, self.conv_size = landmarks, ratio, conv_size
    self.num_iters, self.ridge = num_iters, float(ridge)
    self.differentiate_iterations = bool(differentiate_iterations)
    self.dtype = dtype
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.xavier_uniform())
    heads = (num_heads, d)
    self.query = nnx.LinearGeneral(width, heads, **kw)
    self.value = nnx.LinearGeneral(width, heads, **kw)
    self.out = nnx.LinearGeneral(heads, width, axis=(-2, -1), **kw)
    # PyTorch's default Conv2d init, as the authors' model: U(+-1/sqrt(fan_in)).
    conv_kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
    if landmarks == "conv":
      self.landmark_conv = nnx.Conv(d, d, (ratio, ratio), strides=(ratio, ratio),
                                    padding="VALID", **conv_kw)
      self.landmark_norm = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
    else:
      self.landmark_conv = self.landmark_norm = None
    if conv_size:
      self.value_conv = nnx.Conv(num_heads, num_heads, (conv_size, conv_size),
                                 feature_group_count=num_heads, padding="SAME", **conv_kw)
    else:
      self.value_conv = None

  def make_landmarks(self, q_scaled: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Landmarks `[batch, m, heads, d]` from the rescaled queries `[batch, n, heads, d]`."""
    if self.landmarks == "pool":
      return pool_landmarks(q_scaled, grid, self.ratio)
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

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, grid=None) -> jax.Array:
    """`x` `[batch, rows*cols, width]` patch tokens (row-major) -> `[batch, n, width]`."""
    if mask is not None:
      raise ValueError("SOFT attention does not support attention masks: its landmarks "
                       "pool over the whole patch grid, so every token must be a real "
                       "patch (pass mask=None)")
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"SOFT attention expects [batch, length, {self.width}], got {x.shape}")
    grid = check_grid(grid, x.shape[1], self.ratio)
    q, v = self.query(x), self.value(x)  # [B, n, H, d]
    ctx = mesh_lib.active()
    if ctx is not None and ctx.strategy is not None:
      # Sequence parallel (zoo.parallel.sequence_soft): q is passed as the keys (K = Q).
      from zoo.parallel import sequence  # pylint: disable=import-outside-toplevel
      y = sequence.run(self.sequence_parallel_core, q, q, v, mesh=ctx.mesh,
                       strategy=ctx.strategy, causal=False, **self.core_options(grid))
      return self.out(y)
    landmarks = self.make_landmarks(q * jnp.asarray(query_scale(self.head_dim), q.dtype), grid)
    y = soft_attention(q, v, landmarks, num_iters=self.num_iters, ridge=self.ridge,
                       differentiate_iterations=self.differentiate_iterations)
    if self.value_conv is not None:
      y = y + self.conv_values(v, grid).astype(y.dtype)
    return self.out(y)

  # The name under which `zoo.parallel.sequence_soft` registers SOFT's strategies.
  sequence_parallel_core = "soft"

  def core_options(self, grid) -> dict:
    """Options of the sequence-parallel strategies: the grid, the Newton options, and
    this module's landmark and value-convolution functions (they close over its
    parameters, replicated on every shard)."""
    return dict(grid=grid, ratio=self.ratio, conv_size=self.conv_size,
                num_iters=self.num_iters, ridge=self.ridge,
                differentiate_iterations=self.differentiate_iterations,
                landmark_fn=self.make_landmarks,
                value_conv_fn=self.conv_values if self.value_conv is not None else None)


registry.register(
    "soft", SoftAttention, supports_causal=False,
    description="SOFT: Gaussian-kernel Nystrom attention with Newton-iteration inverse and "
                "grid landmarks (ViT without class token only; no causal form, no masks)")
