"""SOFT's functional core: Gaussian kernel, Nystrom form, Newton-Schulz inverse, landmarks.

Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity" (NeurIPS 2021, arXiv
2110.11945). The zoo follows the authors' code (fudan-zvg/SOFT,
`models/softmax_free_transformer.py`, `SOFT/kernel/inverse.py`) by default; the paper's
choices are options. Equation numbers below are those of the NeurIPS version as we recall
them (Sec. 3.2, 3.3); they were not re-checked against the PDF here.

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
     LayerNorm, the landmarks' scale does not depend on d, while Q's does. The layer
     (`SoftAttention.make_landmarks`) holds its parameters.
   * `landmarks="pool"` (paper): L = AvgPool_kxk,stride k(Q/d^{1/4}) = AvgPool(Q) / d^{1/4}
     (`pool_landmarks`), so K1 is exactly Eq. 2's kernel between the queries and the
     pooled queries.
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
6. The layer adds a depthwise convolution on V: out + DWConv_cxc(V) (authors' code,
   `conv_size` = 3; one filter per head shared by that head's d channels, zero padding
   "same", no bias); `conv_size=0` removes it. `soft_core` takes it as `value_conv_fn`.

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
paper nor the code defines (`check_no_mask`). It has no causal form either (K1^T V mixes
all positions).
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from zoo.attention.options import nonnegative_number

LANDMARKS = ("conv", "pool")
_HIGHEST = jax.lax.Precision.HIGHEST

NO_CAUSAL_FORM = ("attention 'soft' (SOFT) has no causal form: its landmarks pool the whole "
                  "2-D patch grid and K1^T V mixes all positions, so it cannot be used in a "
                  "causal language model")
NO_MASKS = ("SOFT attention does not support attention masks: its landmarks pool over the "
            "whole patch grid, so every token must be a real patch (pass mask=None)")


# ----------------------------------------------------------------------------- options


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_newton_options(num_iters, ridge) -> None:
  """Raises ValueError naming the bad option."""
  if not _is_int(num_iters) or num_iters < 0:
    raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}")
  nonnegative_number("ridge", ridge)


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


def check_no_mask(mask) -> None:
  if mask is not None:
    raise ValueError(NO_MASKS)


def check_tied(q, k) -> None:
  if k is not q:
    raise ValueError("SOFT ties keys to queries (K = Q): pass the same array as q and k")


def check_call(q, k, *, causal, grid, ratio, landmarks, landmark_fn, conv_size,
               value_conv_fn) -> tuple[int, int]:
  """The checks `soft_core` and its sequence-parallel strategies share; returns the grid.

  K = Q: the keys must be the very array passed as the queries (the layer and
  `zoo.attention.sequence_parallel_attention(q, q, v, ...)` do so)."""
  if causal:
    raise ValueError("attention 'soft' (SOFT) has no causal form")
  check_tied(q, k)
  if landmark_fn is None and landmarks != "pool":
    raise ValueError(f"landmarks={landmarks!r} needs learned parameters: pass landmark_fn "
                     f"(SoftAttention does), or use landmarks='pool'")
  if value_conv_fn is None and conv_size:
    raise ValueError("conv_size > 0 needs the depthwise filters: pass value_conv_fn "
                     "(SoftAttention does), or conv_size=0")
  if value_conv_fn is not None and not conv_size:
    raise ValueError("value_conv_fn needs conv_size, its kernel size (the halo is "
                     "conv_size // 2 rows)")
  return check_grid(grid, q.shape[1], ratio)


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
  (`pool_landmarks(q * query_scale(d), grid, k)`, or the layer's conv + LayerNorm +
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


def landmark_maker(landmark_fn: Callable | None, ratio: int) -> Callable:
  """`landmark_fn(q_scaled, grid)`, or the paper's pooled landmarks when it is None."""
  if landmark_fn is not None:
    return landmark_fn
  return lambda q_scaled, grid: pool_landmarks(q_scaled, grid, ratio)


def scaled_queries(q: jax.Array) -> jax.Array:
  """q / d^{1/4} in q's dtype: what the landmarks are computed from."""
  return q * jnp.asarray(query_scale(q.shape[-1]), q.dtype)


def soft_core(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              mask: jax.Array | None = None, grid=None, ratio: int = 2,
              landmarks: str = "pool", conv_size: int = 0, num_iters: int = 20,
              ridge: float = 0.01, differentiate_iterations: bool = False,
              landmark_fn: Callable | None = None, value_conv_fn: Callable | None = None,
              precision=None) -> jax.Array:
  """SOFT as an attention core, `fn(q, k, v, *, causal, mask, **options)`, on one device.

  out = soft_attention(q, v, L) (+ value_conv_fn(v, grid)), with the landmarks
  L = landmark_fn(q / d^{1/4}, grid), or the paper's k x k average pooling of q / d^{1/4}
  (`landmarks="pool"`, k = `ratio`) when `landmark_fn` is None.

  Args:
    q: `[batch, rows*cols, heads, d]`, the tied query/key projection, tokens in row-major
      grid order.
    k: must be `q` itself (SOFT ties K = Q; a different array raises ValueError).
    v: `[batch, rows*cols, heads, dv]`.
    causal, mask: SOFT has neither form (ValueError unless False / None).
    grid: (rows, cols), required.
    ratio: k, the landmark window and stride (m = (rows // k) (cols // k)).
    landmarks: "pool", or "conv" with `landmark_fn` (learned parameters).
    conv_size, value_conv_fn: c and the depthwise c x c convolution on V added to the
      output (`value_conv_fn(v, grid)`), or 0 and None.
    num_iters, ridge, differentiate_iterations: see `newton_inverse`.
    precision: see `soft_attention`.

  Returns:
    `[batch, rows*cols, heads, dv]` in q's dtype.
  """
  check_no_mask(mask)
  grid = check_call(q, k, causal=causal, grid=grid, ratio=ratio, landmarks=landmarks,
                    landmark_fn=landmark_fn, conv_size=conv_size, value_conv_fn=value_conv_fn)
  lm = landmark_maker(landmark_fn, ratio)(scaled_queries(q), grid)
  y = soft_attention(q, v, lm, num_iters=num_iters, ridge=ridge,
                     differentiate_iterations=differentiate_iterations, precision=precision)
  if value_conv_fn is not None:
    y = y + value_conv_fn(v, grid).astype(y.dtype)
  return y


def soft_flops(*, q_len: int, kv_len: int, heads: int, head_dim: int, causal: bool,
               grid=None, ratio: int = 2, landmarks: str = "pool", conv_size: int = 0,
               num_iters: int = 20, value_dim: int | None = None) -> float:
  """Forward FLOPs of `soft_core` for one example (2 per multiply-add of matrix products).

  With n = q_len tokens, m = (rows // k) (cols // k) landmarks, d = head_dim,
  dv = value_dim (default d), I = num_iters, per head:

      2 n m d           K1's cross term Q L^T (n x m x d)
    + 2 m^2 d           K2's cross term L L^T (m x m x d)
    + 4 I m^3           I Newton steps, each two m x m x m products (V P, then (V P) V)
    + 2 n m dv          K1^T V
    + 2 m^2 dv          newton_inverse(K2) (K1^T V)
    + 2 n m dv          K1 (...)
    + 2 m k^2 d^2       landmarks="conv": the stride-k k x k convolution (d -> d channels)
    + 2 n c^2 dv        conv_size c > 0: the depthwise c x c convolution on V

  = heads [2 n m (d + 2 dv) + 2 m^2 (d + dv) + 4 I m^3 (+ 2 m k^2 d^2) (+ 2 n c^2 dv)].
  Norms, exponentials, the pooling and the LayerNorm (elementwise or O(n d)) are not
  counted; nor the q/v/out projections (`SoftAttention.projection_flops`).
  """
  if causal:
    raise ValueError(NO_CAUSAL_FORM)
  if kv_len != q_len:
    raise ValueError(f"SOFT is self-attention (K = Q): kv_len {kv_len} != q_len {q_len}")
  rows, cols = check_grid(grid, q_len, ratio)
  n, d, dv = q_len, head_dim, value_dim or head_dim
  m = (rows // ratio) * (cols // ratio)
  total = 2 * n * m * (d + 2 * dv) + 2 * m * m * (d + dv) + 4 * num_iters * m ** 3
  if landmarks == "conv":
    total += 2 * m * ratio * ratio * d * d
  total += 2 * n * conv_size * conv_size * dv
  return float(heads * total)
