"""Reproduces `shared/fixtures/relu_attention_flax.npz` (see the fixtures README, section
"Pointwise (ReLU) attention"): Flax Linen `MultiHeadDotProductAttention(num_heads=4,
normalize_qk=True)` in float64 with an attention function L^-alpha * h(q.k/sqrt(d)) @ v.

The zoo's `PointwiseAttention(64, 4, qk_layernorm=True, ...)` (and `SoftmaxAttention` for
`y_softmax_0.0`) is built in float64, the fixture's parameters are loaded into it, and every
`y_*` is compared to 1e-10 (the README's float64 tolerance).

float64 inputs run in float64 end to end (the cores accumulate in promote(dtype, float32)
and softmax's float64 path avoids jax.nn.dot_product_attention's float32 softmax).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.attention.pointwise import PointwiseAttention
from zoo.attention.softmax import SoftmaxAttention

FIXTURE = "relu_attention_flax.npz"
OUTPUTS = ["y_softmax_0.0", "y_relu_1.0", "y_relu_0.5", "y_relu2_1.0", "y_gelu_1.0",
           "y_sigmoid_1.0"]
TOL = 1e-10

from tests.helpers import fixture_path
from tests.helpers import x64 as _x64


@pytest.fixture(scope="module")
def data():
  with np.load(fixture_path(FIXTURE)) as f:
    return {k: f[k] for k in f.files}


def _module(name, data, block_size=None):
  """The zoo module for output `name`, in float64, with the fixture's parameters."""
  activation, alpha = name[len("y_"):].rsplit("_", 1)
  common = dict(qk_layernorm=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  if activation == "softmax":
    module = SoftmaxAttention(64, 4, **common)
  else:
    module = PointwiseAttention(64, 4, activation=activation, alpha=float(alpha),
                                block_size=block_size, **common)
  for key, value in data.items():
    if key.startswith("params/"):
      _, layer, param = key.split("/")
      variable = getattr(getattr(module, layer), param)
      assert variable.get_value().shape == value.shape, key
      variable.set_value(jnp.asarray(value))
  return module


def _np_attention(q, k, v, kind):
  """Float64 NumPy attention from the formula; q, k, v `[b, l, h, d]`, kind e.g. relu_0.5."""
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  act, alpha = kind.rsplit("_", 1)
  if act == "softmax":
    e = np.exp(s - s.max(-1, keepdims=True))
    w = e / e.sum(-1, keepdims=True)
  else:
    h = {"relu": lambda x: np.maximum(x, 0.0),
         "relu2": lambda x: np.maximum(x, 0.0) ** 2,
         "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
         "sigmoid": lambda x: 1 / (1 + np.exp(-x))}[act]
    w = h(s) * k.shape[1] ** -float(alpha)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_projections_and_formula_match_to_1e_10(data):
  """The module's projections and qk-layernorm with a float64 attention: exact to 1e-10."""
  with _x64():
    x = jnp.asarray(data["x"])
    for name in OUTPUTS:
      m = _module(name, data)
      q, k, v = m.query(x), m.key(x), m.value(x)
      q, k = m.query_ln(q), m.key_ln(k)
      assert q.dtype == jnp.float64
      y = _np_attention(*(np.asarray(t) for t in (q, k, v)), name[len("y_"):])
      y = np.asarray(m.out(jnp.asarray(y)))
      np.testing.assert_allclose(y, data[name], rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("name", OUTPUTS)
def test_module_matches_to_float32_precision(data, name, block_size):
  if block_size is not None and name.startswith("y_softmax"):
    pytest.skip("softmax has no blockwise path")
  with _x64():
    y = _module(name, data, block_size)(jnp.asarray(data["x"]))
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), data[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("name", OUTPUTS)
def test_module_matches_to_1e_10(data, name, block_size):
  if block_size is not None and name.startswith("y_softmax"):
    pytest.skip("softmax has no blockwise path")
  with _x64():
    y = _module(name, data, block_size)(jnp.asarray(data["x"]))
    np.testing.assert_allclose(np.asarray(y), data[name], rtol=0, atol=TOL, err_msg=name)
