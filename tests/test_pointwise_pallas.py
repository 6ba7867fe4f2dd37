"""The fused Pallas pointwise-attention kernel (`zoo/attention/pointwise/pallas.py`).

On the CPU the kernels run in Pallas interpret mode (same kernel code, the interpreter
instead of Triton), against a naive einsum reference written here from the formula

    o_i = ls_i * sum_{j visible to i} h(q_i . k_j / sqrt(d)) v_j

(no zoo code; `jax.vjp` of it gives the reference gradients). The Triton lowering itself
(every activation, causal, bfloat16, and float32 with head_dim 128) is checked by
lowering for CUDA from the CPU, which builds the Triton IR without a GPU.

Tolerances: kernel and reference both in float32 (reference matmuls at "highest"
precision), so values and gradients agree within atol = 2e-5 * max(1, max |reference|)
(sums of <= 72 products of O(1) terms). bfloat16 inputs: finite, and within
3e-2 * max(1, max |float32 result|) of the kernel's float32 result on the same
(bfloat16-rounded) inputs. Interpret mode compiles slowly (~2-3 s a kernel on 2 cores), so
the shapes are small and the blocks 16 and 32 (which Triton accepts too).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.attention import registry
from zoo.attention.pointwise import pallas as pointwise_pallas
from zoo.attention.pointwise import ACTIVATIONS, PointwiseAttention, pointwise_attention

ATOL = 2e-5  # times max(1, max |reference|)
BF16_TOL = 3e-2  # times max(1, max |float32 result|)


def _h(name, x):
  if name == "relu":
    return jnp.maximum(x, 0.0)
  if name == "relu2":
    return jnp.maximum(x, 0.0) ** 2
  if name == "gelu":  # tanh approximation
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  raise AssertionError(name)


def _reference(q, k, v, ls, *, activation, causal):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
  w = _h(activation, s)
  if causal:
    visible = np.arange(k.shape[1])[None, :] <= np.arange(q.shape[1])[:, None]
    w = jnp.where(visible, w, 0.0)
  o = jnp.einsum("bhqk,bkhd->bhqd", w, v, precision="highest") * ls
  return o.transpose(0, 2, 1, 3)


def _inputs(b, q_len, kv_len, heads, d, dtype=jnp.float32, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kq, (b, q_len, heads, d), dtype),
          jax.random.normal(kk, (b, kv_len, heads, d), dtype),
          jax.random.normal(kv, (b, kv_len, heads, d), dtype),
          jax.random.normal(kg, (b, q_len, heads, d), dtype))


def _value_and_grads(fn, q, k, v, g):
  """fn's output and the cotangent g pulled back to (dq, dk, dv), in one jit."""
  def run(q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(g.astype(out.dtype))
  return jax.jit(run)(q, k, v, g)


def _assert_close(got, want, atol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol * max(1.0, np.abs(want).max()))


# (activation, causal, q_len, kv_len, block_q, block_k): lengths not multiples of the
# blocks; causal with more queries than keys (the last ones see every key) and
# block_q < block_k (diagonal tiles of both kernels' shapes).
CASES = [
    ("relu", False, 40, 56, 32, 16),
    ("gelu", True, 56, 40, 16, 32),
]


@pytest.mark.parametrize("activation,causal,q_len,kv_len,block_q,block_k", CASES)
def test_matches_reference(activation, causal, q_len, kv_len, block_q, block_k):
  q, k, v, g = _inputs(1, q_len, kv_len, 2, 32)
  # a per-(batch, head, query) length scale, as L^-alpha with a causal count would be
  ls = (1.0 + jnp.arange(2 * q_len, dtype=jnp.float32).reshape(1, 2, q_len, 1)) ** -0.5
  got = _value_and_grads(
      lambda q, k, v: pointwise_pallas.pointwise_attention_pallas(
          q, k, v, ls, activation=activation, causal=causal, block_q=block_q,
          block_k=block_k, interpret=True), q, k, v, g)
  want = _value_and_grads(
      lambda q, k, v: _reference(q, k, v, ls, activation=activation, causal=causal),
      q, k, v, g)
  for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(a, b, ATOL), name


def test_bfloat16_close_to_float32():
  """bfloat16 inputs against the float32 reference on the same (rounded) inputs (the
  float32 kernel matches that reference to float32 precision, test above)."""
  q, k, v, g = _inputs(1, 40, 40, 2, 32, dtype=jnp.bfloat16, seed=1)
  low = _value_and_grads(
      lambda q, k, v: pointwise_pallas.pointwise_attention_pallas(
          q, k, v, 1.0 / 40, activation="relu", causal=True, block_q=32, block_k=16,
          interpret=True), q, k, v, g)
  high = _value_and_grads(
      lambda q, k, v: _reference(q, k, v, 1.0 / 40, activation="relu", causal=True),
      *(x.astype(jnp.float32) for x in (q, k, v, g)))
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
    assert a.dtype == jnp.bfloat16
    _assert_close(a, b, BF16_TOL)


def test_hook_masks_and_length_scale_match_the_dense_path():
  """pointwise_attention(implementation="pallas_interpret"): a key-padding mask (and its
  L), a query mask, kv_length and alpha, against the dense path."""
  q, k, v, _ = _inputs(2, 24, 40, 2, 32, seed=2)
  key_mask = (jnp.arange(40) < jnp.array([40, 29])[:, None])[:, None, None, :]
  query_mask = (jnp.arange(24) % 5 != 3)[None, None, :, None]

  def both(implementation):
    return (pointwise_attention(q, k, v, activation="gelu", alpha=0.5, mask=key_mask,
                                implementation=implementation),
            pointwise_attention(q, k, v, causal=True, mask=query_mask, kv_length=64,
                                implementation=implementation))
  got = jax.jit(lambda: both("pallas_interpret"))()
  want = jax.jit(lambda: both(None))()
  for a, b in zip(got, want):
    _assert_close(a, b, ATOL)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_lowers_to_triton(activation, monkeypatch):
  """Forward and both backward kernels build as Triton IR (lowered for CUDA, no GPU
  needed): causal, bfloat16 for every activation, float32 with head_dim 128 for relu."""
  monkeypatch.setattr(pointwise_pallas, "_on_gpu", lambda: True)
  configs = [(jnp.bfloat16, 64)] + ([(jnp.float32, 128)] if activation == "relu" else [])
  for dtype, d in configs:
    x = jnp.ones((1, 200, 2, d), dtype)

    def loss(q, k, v):
      out = pointwise_pallas.pointwise_attention_pallas(q, k, v, activation=activation,
                                                        causal=True)
      return jnp.sum(out.astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 3  # the fwd, dq and dk/dv kernels


def test_refusals():
  q, k, v, _ = _inputs(1, 8, 8, 1, 16)
  general = jnp.tril(jnp.ones((8, 8), bool))
  with pytest.raises(ValueError, match="varies along both axes"):
    pointwise_attention(q, k, v, mask=general, implementation="pallas_interpret")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="pallas_interpret"):
      pointwise_attention(q, k, v, implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    pointwise_attention(q, k, v, implementation="triton")
  with pytest.raises(ValueError, match="block_size"):
    pointwise_attention(q, k, v, block_size=4, implementation="pallas_interpret")
  with pytest.raises(ValueError, match="power of two"):
    pointwise_pallas.pointwise_attention_pallas(q, k, v, block_q=24, interpret=True)
  with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
    pointwise_pallas.pointwise_attention_pallas(*(x.astype(jnp.int32) for x in (q, k, v)),
                                                interpret=True)


def test_module_option():
  module = registry.make("relu", width=32, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                         implementation="pallas_interpret")
  assert isinstance(module, PointwiseAttention)
  assert module.options.implementation == "pallas_interpret"
  assert module.core_kwargs(None, None, None, grid=None)["implementation"] == "pallas_interpret"
  plain = registry.make("relu", width=32, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  assert "implementation" not in plain.core_kwargs(None, None, None, grid=None)
  with pytest.raises(ValueError, match="implementation must be one of"):
    registry.make("gelu", width=32, num_heads=2, causal=False, rngs=nnx.Rngs(0),
                  implementation="cuda")
