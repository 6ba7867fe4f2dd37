"""Fused GPU kernels for pointwise attention, in Pallas on its Triton backend.

Computes the same as `zoo.attention.pointwise.pointwise_attention`:

    o_i = L_i^-alpha * sum_j h(q_i . k_j * scale) v_j

with three kernels and a `jax.custom_vjp`:

* forward, grid (query blocks, batch, heads): one query block stays in registers while a
  loop visits the key blocks (causal: only those up to the diagonal, and only the diagonal
  ones are masked), accumulating h(s) v in float32. There is no normalisation over keys,
  so no running max or sum: the accumulator is a plain sum, scaled by L^-alpha at the end.
* dq, grid (query blocks, batch, heads): recomputes s per key block;
  dq_i = sum_j h'(s_ij) (g_i . v_j) scale k_j, with g already multiplied by L_i^-alpha.
* dk/dv, grid (key blocks, batch, heads): loops over query blocks (causal: from the
  diagonal on) on transposed tiles s^T = k q^T; dv_j = sum_i h(s_ij) g_i and
  dk_j = sum_i h'(s_ij) (g_i . v_j) scale q_i.

h' comes from `jax.jvp` of the activation inside the kernel, so every activation of
`ACTIVATIONS` works without a hand-written derivative. Matmul operands stay in the input
dtype (bfloat16 tiles go to the tensor cores as bfloat16; h(s) and the score gradient are
cast to it, as flash-attention kernels do) and every matmul accumulates in float32. For
float32 inputs the dots follow `jax.default_matmul_precision` as XLA's do: TF32 on the
tensor cores by default, full float32 under "highest".

Lengths that are not a multiple of the blocks are zero-padded in the wrapper. As in the
blockwise path of core.py, zero padding needs no mask: a zero value row adds nothing
to any output, a zero cotangent row (padded queries) adds nothing to dk or dv, and the
padded rows of dq, dk, dv are sliced off. head_dim is zero-padded to a power of two
(>= 16), which leaves q.k unchanged. Masks: a key-padding mask (`[..., 1, kv_len]`) is
applied by zeroing the hidden keys and values (their dk is then zero and their dv is zeroed
by the `jnp.where`'s own gradient), a query mask (`[..., q_len, 1]`) by zeroing the hidden
queries' outputs; a mask that varies along both axes raises ValueError.

Interpret mode (`interpret=True`) runs the same kernels in the Pallas interpreter on any
backend; the tests use it on the CPU. The API used (`pl.pallas_call`,
`pl.BlockSpec(block_shape, index_map)`, ref indexing with `pl.ds`, the Triton
`CompilerParams`) is the same in jax 0.10 and 0.11; `CompilerParams` is looked up under its
older name `TritonCompilerParams` where the new one is missing. The Triton compiler params
are always passed: they are what selects the Triton backend over Mosaic GPU, which jax
picks by default for a `pallas_call` without them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.attention import masking
from zoo.attention.pointwise.activations import ACTIVATIONS

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_MIN_BLOCK = 16  # Triton's dot wants every matmul dimension >= 16


def _next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _dot(a, b, *, trans_b=False):
  """a @ b (or a @ b^T) with a float32 accumulator; operands must share a dtype."""
  contract_b = 1 if trans_b else 0
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _h_and_derivative(activation, s):
  h = ACTIVATIONS[activation]
  return jax.jvp(h, (s,), (jnp.ones_like(s),))


def _causal_keep(q_start, k_start, rows, cols, *, transposed=False):
  """Key position <= query position, for a (rows, cols) tile of s (or of s^T)."""
  if transposed:  # rows are keys, columns queries
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  else:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return k_pos <= q_pos


def _over_key_blocks(step, carry, i, *, block_q, block_k, num_k_blocks, causal):
  """carry = step(key offset, carry, masked) over the key blocks query block i sees: those
  wholly visible unmasked, then (causal) those straddling the diagonal masked."""
  def body(masked):
    return lambda j, c: step(pl.multiple_of(j * block_k, block_k), c, masked)
  if not causal:
    return lax.fori_loop(0, num_k_blocks, body(False), carry)
  q_start = i * block_q
  full = jnp.minimum(lax.div(q_start, block_k), num_k_blocks)  # last key < q_start
  end = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), num_k_blocks)
  carry = lax.fori_loop(0, full, body(False), carry)
  return lax.fori_loop(full, end, body(True), carry)


def _query_block_range(j, block_q, block_k, num_q_blocks, causal):
  """(start, first unmasked) query blocks for key block j: blocks [start, first unmasked)
  straddle the diagonal, [first unmasked, num_q_blocks) see the whole key block."""
  if not causal:
    return 0, 0
  k_start = j * block_k
  start = jnp.minimum(lax.div(k_start, block_q), num_q_blocks)
  # first query block whose first query is >= the key block's last key
  unmasked = lax.div(k_start + block_k - 1 + block_q - 1, block_q)
  return start, jnp.clip(unmasked, start, num_q_blocks)


# --------------------------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, ls_ref, o_ref, *, activation, scale, causal,
                    block_q, block_k, num_k_blocks):
  i = pl.program_id(0)
  q = q_ref[...]
  h = ACTIVATIONS[activation]

  def step(start, acc, masked):
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    w = h(_dot(q, k, trans_b=True) * scale)
    if masked:
      w = jnp.where(_causal_keep(i * block_q, start, block_q, block_k), w, 0.0)
    return acc + _dot(w.astype(v.dtype), v)

  acc = _over_key_blocks(step, jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32), i,
                         block_q=block_q, block_k=block_k, num_k_blocks=num_k_blocks,
                         causal=causal)
  o_ref[...] = (acc * ls_ref[...][:, None]).astype(o_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, ls_ref, g_ref, dq_ref, *, activation, scale, causal,
               block_q, block_k, num_k_blocks):
  i = pl.program_id(0)
  q = q_ref[...]
  # dL/d(sum_j h(s_ij) v_j) = g_i * L_i^-alpha, in the matmul dtype
  g = (g_ref[...].astype(jnp.float32) * ls_ref[...][:, None]).astype(v_ref.dtype)

  def step(start, dq, masked):
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    _, dh = _h_and_derivative(activation, _dot(q, k, trans_b=True) * scale)
    ds = _dot(g, v, trans_b=True) * dh * scale
    if masked:
      ds = jnp.where(_causal_keep(i * block_q, start, block_q, block_k), ds, 0.0)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _over_key_blocks(step, jnp.zeros((block_q, dq_ref.shape[-1]), jnp.float32), i,
                        block_q=block_q, block_k=block_k, num_k_blocks=num_k_blocks,
                        causal=causal)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, ls_ref, g_ref, dk_ref, dv_ref, *, activation, scale,
                 causal, block_q, block_k, num_q_blocks):
  # Here block_k is the size of this program's key block and block_q that of the query
  # blocks the loop visits.
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]

  def body(i, carry, masked):
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    ls = ls_ref[pl.ds(start, block_q)]
    g = (g_ref[pl.ds(start, block_q), :].astype(jnp.float32) * ls[:, None]).astype(v.dtype)
    ht, dht = _h_and_derivative(activation, _dot(k, q, trans_b=True) * scale)  # [bk, bq]
    dst = _dot(v, g, trans_b=True) * dht * scale
    if masked:
      keep = _causal_keep(start, j * block_k, block_k, block_q, transposed=True)
      ht, dst = jnp.where(keep, ht, 0.0), jnp.where(keep, dst, 0.0)
    dv = dv + _dot(ht.astype(g.dtype), g)
    dk = dk + _dot(dst.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros((block_k, dk_ref.shape[-1]), jnp.float32),
           jnp.zeros((block_k, dv_ref.shape[-1]), jnp.float32))
  start, unmasked = _query_block_range(j, block_q, block_k, num_q_blocks, causal)
  if causal:
    carry = lax.fori_loop(start, unmasked, functools.partial(body, masked=True), carry)
  dk, dv = lax.fori_loop(unmasked, num_q_blocks, functools.partial(body, masked=False),
                         carry)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas_calls


def _blocked(block, length, dim):
  """BlockSpec of a `[B, L, H, D]` array: `block` rows (or all `length`) of one (b, h)."""
  if block is None:
    return pl.BlockSpec((None, length, None, dim), lambda n, b, h: (b, 0, h, 0))
  return pl.BlockSpec((None, block, None, dim), lambda n, b, h: (b, n, h, 0))


def _scale_spec(block, length):
  """BlockSpec of the `[B, H, Lq]` length scale."""
  if block is None:
    return pl.BlockSpec((None, None, length), lambda n, b, h: (b, h, 0))
  return pl.BlockSpec((None, None, block), lambda n, b, h: (b, h, n))


def _params(cfg):
  return _CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _forward_call(q, k, v, ls, cfg):
  b, lq, heads, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  bq, bk = cfg["block_outer"], cfg["block_inner"]
  kernel = functools.partial(
      _forward_kernel, activation=cfg["activation"], scale=cfg["scale"],
      causal=cfg["causal"], block_q=bq, block_k=bk, num_k_blocks=lk // bk)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, lq, heads, dv), q.dtype),
      grid=(lq // bq, b, heads),
      in_specs=[_blocked(bq, lq, d), _blocked(None, lk, d), _blocked(None, lk, dv),
                _scale_spec(bq, lq)],
      out_specs=_blocked(bq, lq, dv),
      compiler_params=_params(cfg), interpret=cfg["interpret"],
      name="pointwise_attention_fwd")(q, k, v, ls)


def _backward_calls(q, k, v, ls, g, cfg):
  b, lq, heads, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  outer, inner = cfg["block_outer"], cfg["block_inner"]
  common = dict(activation=cfg["activation"], scale=cfg["scale"], causal=cfg["causal"])
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=outer, block_k=inner, num_k_blocks=lk // inner,
                        **common),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(lq // outer, b, heads),
      in_specs=[_blocked(outer, lq, d), _blocked(None, lk, d), _blocked(None, lk, dv),
                _scale_spec(outer, lq), _blocked(outer, lq, dv)],
      out_specs=_blocked(outer, lq, d),
      compiler_params=_params(cfg), interpret=cfg["interpret"],
      name="pointwise_attention_dq")(q, k, v, ls, g)
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=inner, block_k=outer,
                        num_q_blocks=lq // inner, **common),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(lk // outer, b, heads),
      in_specs=[_blocked(None, lq, d), _blocked(outer, lk, d), _blocked(outer, lk, dv),
                _scale_spec(None, lq), _blocked(None, lq, dv)],
      out_specs=[_blocked(outer, lk, d), _blocked(outer, lk, dv)],
      compiler_params=_params(cfg), interpret=cfg["interpret"],
      name="pointwise_attention_dkdv")(q, k, v, ls, g)
  return dq, dk, dv_


# `cfg` is a hashable tuple of (name, value) pairs: a static argument of the custom VJP.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, ls, cfg):
  return _forward_call(q, k, v, ls, dict(cfg))


def _fused_fwd(q, k, v, ls, cfg):
  return _forward_call(q, k, v, ls, dict(cfg)), (q, k, v, ls)


def _fused_bwd(cfg, residuals, g):
  q, k, v, ls = residuals
  dq, dk, dv = _backward_calls(q, k, v, ls, g, dict(cfg))
  return dq, dk, dv, jnp.zeros_like(ls)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------- wrapper


def _on_gpu() -> bool:
  return jax.default_backend() in GPU_PLATFORMS


def _pad_to(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _check_block(name, block):
  if not isinstance(block, int) or block < _MIN_BLOCK or block & (block - 1):
    raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK} (Triton tiles), "
                     f"got {block!r}")


def _split_mask(mask, q, k):
  """(keys kept `[B', kv_len, H', 1]` or None, queries kept `[B', q_len, H', 1]` or None)."""
  mask = masking.check_mask(mask, q, k)
  key_keep, query_keep, general = masking.split_mask(mask, q.shape[1], k.shape[1])
  if general is not None:
    raise ValueError(
        f"the pallas pointwise kernel takes key-padding masks [..., 1, kv_len] and query "
        f"masks [..., q_len, 1]; this mask {mask.shape} varies along both axes: use the "
        f"dense or blockwise path (implementation=None)")
  return key_keep, query_keep


def pointwise_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array,
                               length_scale: jax.Array | None = None, *,
                               activation: str = "relu", scale: float | None = None,
                               causal: bool = False, mask: jax.Array | None = None,
                               block_q: int = 128, block_k: int = 64,
                               num_warps: int | None = None, num_stages: int = 2,
                               interpret: bool = False) -> jax.Array:
  """o_i = length_scale_i * sum_j h(q_i . k_j * scale) v_j, fused (Pallas, Triton backend).

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, heads, head_dim(_v)]`;
      float32, bfloat16 or float16 (one dtype; accumulation is float32).
    length_scale: L^-alpha per query, broadcastable to `[batch, heads, q_len, 1]` (as
      `core.length_scale` makes it); None for 1. Not differentiated.
    activation: a key of `pointwise.ACTIVATIONS`.
    scale: the score scale; None for 1/sqrt(head_dim).
    causal: query i sees keys j <= i (positions aligned at the start).
    mask: None, a key-padding mask broadcastable to `[batch, heads, 1, kv_len]`, or a query
      mask broadcastable to `[batch, heads, q_len, 1]` (True = attend). Other masks raise
      ValueError. The length scale is not derived from it: pass the matching one.
    block_q, block_k: tile sizes, powers of two >= 16: the forward and dq kernels hold
      block_q queries and loop over block_k keys; the dk/dv kernel holds block_q keys and
      loops over block_k queries. Lowered to the lengths when those are shorter.
    num_warps: Triton warps per program (None: 4 for head_dim <= 64, else 8).
    num_stages: Triton software-pipelining stages.
    interpret: run in the Pallas interpreter (any backend; slow; for tests).

  Returns:
    `[batch, q_len, heads, head_dim_v]` in q's dtype.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  masking.check_qkv(q, k, v)
  dtype = jnp.result_type(q, k, v)
  if dtype not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
    raise ValueError(f"the pallas pointwise kernel takes float32, bfloat16 or float16 "
                     f"inputs, got {dtype}")
  if not interpret and not _on_gpu():
    raise ValueError(
        f"the pallas pointwise kernel runs on GPUs (Pallas' Triton backend); JAX's "
        f"backend here is {jax.default_backend()!r}. Use interpret=True "
        f"(implementation='pallas_interpret') to run it in the Pallas interpreter.")
  b, q_len, heads, d = q.shape
  kv_len, dv = k.shape[1], v.shape[-1]
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  out_dtype = q.dtype
  if q_len == 0 or kv_len == 0:  # a query that sees no key outputs 0
    return jnp.zeros((b, q_len, heads, dv), out_dtype)

  key_keep, query_keep = _split_mask(mask, q, k)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  if key_keep is not None:
    k = jnp.where(key_keep, k, jnp.zeros((), dtype))
    v = jnp.where(key_keep, v, jnp.zeros((), dtype))

  # Tiles: powers of two, no larger than the longer length needs. Both lengths are padded
  # to a multiple of the larger tile: each axis is cut in outer tiles by one kernel and in
  # inner tiles by another.
  cap = max(_MIN_BLOCK, _next_power_of_2(max(q_len, kv_len)))
  outer, inner = min(block_q, cap), min(block_k, cap)
  multiple = max(outer, inner)
  q_pad = -(-q_len // multiple) * multiple
  kv_pad = -(-kv_len // multiple) * multiple
  d_pad = max(_MIN_BLOCK, _next_power_of_2(d))
  dv_pad = max(_MIN_BLOCK, _next_power_of_2(dv))
  qp = _pad_to(_pad_to(q, 1, q_pad), 3, d_pad)
  kp = _pad_to(_pad_to(k, 1, kv_pad), 3, d_pad)
  vp = _pad_to(_pad_to(v, 1, kv_pad), 3, dv_pad)
  if length_scale is None:
    ls = jnp.ones((b, heads, q_len), jnp.float32)
  else:
    ls = jnp.asarray(length_scale, jnp.float32)
    ls = ls.reshape((1,) * (4 - ls.ndim) + ls.shape)
    ls = jnp.broadcast_to(ls, (b, heads, q_len, 1))[..., 0]
  ls = _pad_to(lax.stop_gradient(ls), 2, q_pad)

  cfg = dict(activation=activation, scale=float(scale), causal=bool(causal),
             block_outer=outer, block_inner=inner,
             num_warps=num_warps if num_warps is not None else (4 if d_pad <= 64 else 8),
             num_stages=num_stages, interpret=interpret)
  out = _fused(qp, kp, vp, ls, tuple(sorted(cfg.items())))[:, :q_len, :, :dv]
  if query_keep is not None:
    out = jnp.where(query_keep, out, jnp.zeros((), out.dtype))
  return out.astype(out_dtype)
