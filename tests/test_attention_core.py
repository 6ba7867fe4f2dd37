"""The functional attention cores against references written here from the formulas.

The references do not use any zoo code. `_reference` is written once against an array
module `xp`: with NumPy in float64 it gives the values, with jax.numpy in float64 (x64
enabled only inside `_x64()`) it is differentiated with `jax.grad` for the gradients.

Pointwise attention (Wortsman et al. 2023, Eq. 1):
    o_i = L_i^-alpha * sum_{j visible to i} h(q_i . k_j / sqrt(d)) v_j
with L_i the number of keys query i sees after causal and mask (or `kv_length`); a query
that sees no key outputs 0. Softmax attention: o_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j
over the visible keys.

Tolerances: the zoo runs in float32 and the references in float64, so values and gradients
are compared with rtol = 1e-5 and atol = 1e-5 * max(1, max |reference|) (sums of up to ~100
terms of size ~1 lose a few float32 ulps). bfloat16 inputs: within 3e-2 * max |float32 out|.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.attention import pointwise
from zoo.attention.pointwise import ACTIVATIONS, PointwiseAttention, pointwise_attention
from zoo.attention.softmax import softmax_attention

from tests.helpers import x64 as _x64

RTOL = 1e-5
ATOL = 1e-5  # times max(1, max |reference|)
ALL_ACTIVATIONS = ["relu", "relu2", "gelu", "softplus", "identity", "relu6", "sigmoid"]


# ----------------------------------------------------------------------------------------
# References, from the formulas.


def _h(xp, name, x):
  if name == "relu":
    return xp.maximum(x, 0.0)
  if name == "relu2":
    return xp.maximum(x, 0.0) ** 2
  if name == "gelu":  # tanh approximation (Hendrycks & Gimpel 2016)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  if name == "softplus":
    return xp.logaddexp(0.0, x)
  if name == "identity":
    return x
  if name == "relu6":
    return xp.minimum(xp.maximum(x, 0.0), 6.0)
  if name == "sigmoid":
    return 1.0 / (1.0 + xp.exp(-x))
  raise AssertionError(name)


def _visible(b, h, lq, lk, causal, mask):
  """[b, h, lq, lk] boolean (NumPy): which keys each query sees."""
  allowed = np.ones((b, h, lq, lk), dtype=bool)
  if causal:
    allowed &= np.arange(lk)[None, :] <= np.arange(lq)[:, None]
  if mask is not None:
    allowed &= np.asarray(mask)
  return allowed


def _counts(allowed, kv_length):
  """L per query, [b, h, lq, 1] float64 (NumPy): visible keys, or the kv_length override."""
  b, h, lq, _ = allowed.shape
  if kv_length is None:
    return allowed.sum(axis=-1, keepdims=True).astype(np.float64)
  n = np.asarray(kv_length, np.float64)
  n = n.reshape((1,) * (3 - n.ndim) + n.shape)[..., None]
  return np.broadcast_to(n, (b, h, lq, 1)).astype(np.float64)


def _reference(xp, q, k, v, allowed, counts, alpha, *, kind, activation):
  """q [b, lq, h, d], k, v [b, lk, h, d] -> [b, lq, h, d], all in q's dtype."""
  d = q.shape[-1]
  s = xp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
  if kind == "softmax":
    s = xp.where(allowed, s, -xp.inf)
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    w = e / xp.sum(e, axis=-1, keepdims=True)
  else:
    w = xp.where(allowed, _h(xp, activation, s), 0.0)
    n_safe = xp.where(counts > 0, counts, 1.0)  # no visible key: w is all zero anyway
    w = w * n_safe ** (-alpha)
  return xp.einsum("bhqk,bkhd->bqhd", w, v)


def _reference_inputs(q, k, causal=False, mask=None, kv_length=None):
  b, lq, h, _ = q.shape
  allowed = _visible(b, h, lq, k.shape[1], causal, mask)
  return allowed, _counts(allowed, kv_length)


def _np_reference(q, k, v, *, kind, activation="relu", alpha=1.0, **kw):
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  allowed, counts = _reference_inputs(q, k, **kw)
  return _reference(np, f64(q), f64(k), f64(v), allowed, counts, alpha, kind=kind,
                    activation=activation)


@functools.lru_cache(maxsize=None)
def _jitted_reference_grads(kind, activation):
  def loss(q, k, v, g, allowed, counts, alpha):
    out = _reference(jnp, q, k, v, allowed, counts, alpha, kind=kind, activation=activation)
    return jnp.sum(out * g)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _reference_grads(q, k, v, g, *, kind, activation="relu", alpha=1.0, **kw):
  """d sum(ref(q, k, v) * g) / d(q, k, v) in float64: jax.grad of the jnp reference."""
  allowed, counts = _reference_inputs(q, k, **kw)
  with _x64():
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, g)]
    grads = _jitted_reference_grads(kind, activation)(
        *args, jnp.asarray(allowed), jnp.asarray(counts), jnp.asarray(alpha, jnp.float64))
    return [np.asarray(x) for x in grads]


def _zoo_grads(fn, q, k, v, g):
  """Eager gradients: quick for the dense path, whose small ops compile once per shape."""
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
  return [np.asarray(x) for x in jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]


def _zoo_value_and_grads(cases):
  """[(fn, (q, k, v, g))] -> [(out, [dq, dk, dv])], all cases in one jit.

  XLA:CPU spends about a second on any compile, small or not, so each test compiles once.
  """
  fns = [fn for fn, _ in cases]

  def run(args):
    results = []
    for fn, (q, k, v, g) in zip(fns, args):
      out, vjp = jax.vjp(fn, q, k, v)
      results.append((out, list(vjp(g.astype(out.dtype)))))
    return results

  results = jax.jit(run)([a for _, a in cases])
  return [(np.asarray(o), [np.asarray(x) for x in gr]) for o, gr in results]


def _reference_grads_batch(cases):
  """[((q, k, v, g), reference kwargs)] -> [[dq, dk, dv]] in float64, one jit."""
  statics, arrays = [], []
  for (q, k, v, g), kw in cases:
    kw = dict(kw)
    kind, activation, alpha = kw.pop("kind"), kw.pop("activation", "relu"), kw.pop("alpha", 1.0)
    statics.append((kind, activation))
    allowed, counts = _reference_inputs(q, k, **kw)
    arrays.append([np.asarray(x, np.float64) for x in (q, k, v, g)] + [allowed, counts,
                                                                       np.float64(alpha)])

  def run(arrays):
    grads = []
    for (kind, activation), (q, k, v, g, allowed, counts, alpha) in zip(statics, arrays):
      def loss(q, k, v):
        out = _reference(jnp, q, k, v, allowed, counts, alpha, kind=kind, activation=activation)
        return jnp.sum(out * g)
      grads.append(list(jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
    return grads

  with _x64():
    return [[np.asarray(x) for x in gr] for gr in jax.jit(run)(arrays)]


def _check_against_reference(cases):
  """[(fn, (q, k, v, g), reference kwargs incl. kind, label)]: values and gradients of each
  fn against the float64 references (two compiles in all)."""
  results = _zoo_value_and_grads([(fn, args) for fn, args, _, _ in cases])
  ref_grads = _reference_grads_batch([(args, kw) for _, args, kw, _ in cases])
  for (fn, (q, k, v, _), kw, label), (out, grads), rgrads in zip(cases, results, ref_grads):
    _close(out, _np_reference(q, k, v, **kw), f"values {label}")
    for name, a, r in zip("qkv", grads, rgrads):
      _close(a, r, f"d{name} {label}")


def _close(actual, desired, what=""):
  desired = np.asarray(desired)
  atol = ATOL * max(1.0, float(np.max(np.abs(desired))) if desired.size else 1.0)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=RTOL, atol=atol,
                             err_msg=what)


# ----------------------------------------------------------------------------------------
# Inputs.


def _qkv(b=2, lq=9, lk=9, h=2, d=8, dtype=jnp.float32, seed=0):
  """Standard normal q, k, v (in dtype) and a float32 cotangent g. NumPy's generator: jax's
  would compile its sampler afresh for every shape."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  q, k, v = normal(b, lq, h, d), normal(b, lk, h, d), normal(b, lk, h, d)
  return (*(jnp.asarray(x).astype(dtype) for x in (q, k, v)), jnp.asarray(normal(b, lq, h, d)))


def _padding_mask(b, lk, seed=1):
  """[b, 1, 1, lk]; the last batch element has every key masked out."""
  valid = np.random.default_rng(seed).random((b, lk)) < 0.7
  valid[0, 0] = True
  valid[-1] = False
  return jnp.asarray(valid[:, None, None, :])


def _query_mask(b, h, lq, lk, seed=2):
  """[b, h, lq, lk] varying per query; query 1 of batch 0 sees nothing."""
  m = np.random.default_rng(seed).random((b, h, lq, lk)) < 0.6
  m[0, :, min(1, lq - 1), :] = False
  return jnp.asarray(m)


MASKS = ["none", "padding", "per_query"]


def _mask(which, b, h, lq, lk):
  if which == "none":
    return None
  return _padding_mask(b, lk) if which == "padding" else _query_mask(b, h, lq, lk)


# ----------------------------------------------------------------------------------------
# Pointwise attention (dense path) against the references.


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_pointwise_dense_matches_reference(activation, alpha, causal):
  q, k, v, g = _qkv()
  b, lq, h, _ = q.shape
  for which in MASKS:  # eager: after the first case every op is already compiled
    mask = _mask(which, b, h, lq, k.shape[1])
    kw = dict(activation=activation, alpha=alpha, causal=causal, mask=mask)
    fn = lambda q, k, v: pointwise_attention(q, k, v, **kw)  # noqa: E731
    _close(fn(q, k, v), _np_reference(q, k, v, kind="pointwise", **kw), f"values {which}")
    for name, a, r in zip("qkv", _zoo_grads(fn, q, k, v, g),
                          _reference_grads(q, k, v, g, kind="pointwise", **kw)):
      _close(a, r, f"d{name} {which}")


def test_pointwise_cross_attention_and_kv_length():
  """q_len != kv_len (both ways), causal included, and the kv_length override."""
  cases = []
  for lq, lk in [(5, 11), (11, 5)]:
    q, k, v, g = _qkv(lq=lq, lk=lk)
    b = q.shape[0]
    for causal in (False, True):
      for kv_length in (None, 100, np.arange(1, b * lq + 1, dtype=np.float32).reshape(b, 1, lq)):
        mask = _padding_mask(b, lk) if kv_length is None else None
        kw = dict(activation="gelu", alpha=0.5, causal=causal, mask=mask, kv_length=kv_length)
        fn = functools.partial(pointwise_attention, **kw)
        cases.append((fn, (q, k, v, g), dict(kind="pointwise", **kw),
                      f"lq={lq} lk={lk} causal={causal} kv_length={kv_length is not None}"))
  _check_against_reference(cases)


def test_query_without_keys_outputs_zero():
  q, k, v, _ = _qkv()
  b, lq, h, _ = q.shape
  pad, per_query = _padding_mask(b, k.shape[1]), _query_mask(b, h, lq, k.shape[1])

  @jax.jit
  def outputs(q, k, v):
    return [(pointwise_attention(q, k, v, mask=pad, block_size=bs),
             pointwise_attention(q, k, v, mask=per_query, block_size=bs)) for bs in (None, 4)]

  for out_pad, out_query in outputs(q, k, v):
    out_pad, out_query = np.asarray(out_pad), np.asarray(out_query)
    assert np.all(out_pad[-1] == 0)  # the last batch element has no valid key
    assert np.any(out_pad[0] != 0)
    assert np.all(out_query[0, 1] == 0)  # query 1 of batch 0 sees no key
    assert np.any(out_query[0, 0] != 0)


# ----------------------------------------------------------------------------------------
# Blockwise == dense, values and gradients. The cases cycle through the activations (those
# with h(0) != 0, softplus and sigmoid, check that padded tiles contribute nothing),
# causal or not, and the kinds of mask; tiles larger than, equal to and not dividing the
# length.


@pytest.mark.parametrize("length,tiles,causal,which,activation,alpha", [
    (1, (None, 1), True, "padding", "relu", 1.0),
    (1, (None, 7), False, "per_query", "sigmoid", 0.5),
    (13, (None, 1), False, "padding", "softplus", 0.0),
    (13, (None, 7), True, "per_query", "gelu", 1.0),
    (13, (None, 16), True, "none", "relu2", 0.5),
    (37, (None, 7), True, "padding", "sigmoid", 1.0),
    (37, (None, 16), False, "per_query", "identity", 1.0),
    (37, (None, 100), True, "per_query", "relu6", 0.0),
    (64, (None, 16), True, "padding", "softplus", 1.0),
    (64, (None, 100), False, "none", "relu", 1.0),
    # Rectangular tiles (query tile, key tile): wider, narrower, not multiples, 1 x n.
    (37, (16, 4), True, "none", "relu", 1.0),
    (37, (5, 8), True, "padding", "gelu", 0.5),
    (37, (7, 3), True, "per_query", "softplus", 1.0),
    (37, (3, 7), False, "padding", "sigmoid", 1.0),
    (37, (1, 5), True, "none", "relu2", 1.0),
    (37, (6, 1), True, "none", "relu6", 0.0),
    (64, (32, 16), True, "per_query", "identity", 1.0),
])
def test_blockwise_equals_dense(length, tiles, causal, which, activation, alpha):
  """`tiles` is (query_block_size, block_size); None is the automatic query tile (the
  whole length at these sizes)."""
  q, k, v, g = _qkv(b=2, lq=length, lk=length, h=2, d=8, seed=length)
  kw = dict(activation=activation, alpha=alpha, causal=causal,
            mask=_mask(which, 2, 2, length, length))
  block = functools.partial(pointwise_attention, query_block_size=tiles[0],
                            block_size=tiles[1], **kw)
  dense = functools.partial(pointwise_attention, **kw)
  (out, grads), (dense_out, dense_grads) = _zoo_value_and_grads(
      [(block, (q, k, v, g)), (dense, (q, k, v, g))])
  _close(out, dense_out, "values")
  for name, a, r in zip("qkv", grads, dense_grads):
    _close(a, r, f"d{name}")
  _close(out, _np_reference(q, k, v, kind="pointwise", **kw), "values vs reference")


def test_automatic_query_tile():
  """The default query tile makes one tile GEMM about AUTO_TILE_MACS multiply-adds (so that
  XLA:CPU threads it), is a power of two, never below the key tile, never above q_len; an
  explicit query_block_size wins."""
  work = pointwise.AUTO_TILE_MACS
  for batch_heads, tk, d in [(8, 256, 64), (1, 256, 64), (64, 128, 32), (8, 512, 128)]:
    tq, got_tk = pointwise.tile_sizes(tk, None, 1 << 20, 1 << 20, batch_heads, d)
    assert got_tk == tk and tq >= tk and tq & (tq - 1) == 0
    assert batch_heads * tq * tk * d >= work or tq == tk
    assert tq == tk or batch_heads * (tq // 2) * tk * d < work
  assert pointwise.tile_sizes(256, None, 4096, 4096, 8, 64) == (512, 256)
  assert pointwise.tile_sizes(256, None, 100, 4096, 8, 64) == (100, 256)
  assert pointwise.tile_sizes(256, None, 4096, 40, 8, 64)[1] == 40
  assert pointwise.tile_sizes(256, 24, 4096, 4096, 8, 64) == (24, 256)


def test_blockwise_cross_attention_against_reference():
  cases = []
  for lq, lk, causal, which in [(5, 11, True, "kv_length"), (11, 5, True, "padding"),
                                (11, 5, False, "per_query")]:
    q, k, v, g = _qkv(lq=lq, lk=lk, seed=lq)
    b, _, h, _ = q.shape
    kw = dict(activation="gelu", alpha=0.5, causal=causal)
    if which == "kv_length":
      kw["kv_length"] = np.arange(1, b * lq + 1, dtype=np.float32).reshape(b, 1, lq)
    else:
      kw["mask"] = _mask(which, b, h, lq, lk)
    for tiles in [(None, 4), (3, 4), (4, 3)]:
      fn = functools.partial(pointwise_attention, query_block_size=tiles[0],
                             block_size=tiles[1], **kw)
      cases.append((fn, (q, k, v, g), dict(kind="pointwise", **kw),
                    f"lq={lq} lk={lk} causal={causal} {which} tiles={tiles}"))
  _check_against_reference(cases)


def test_blockwise_under_vmap():
  q, k, v, _ = _qkv(b=2, lq=20, lk=20, seed=4)
  fn = functools.partial(pointwise_attention, causal=True, block_size=6, query_block_size=8)
  batched = jax.jit(jax.vmap(fn))(q[None], k[None], v[None])[0]
  _close(batched, _np_reference(q, k, v, kind="pointwise", causal=True))


# ----------------------------------------------------------------------------------------
# Properties that separate the L^-alpha scalings.


@pytest.mark.parametrize("block_size", [None, 3])
def test_duplicated_keys(block_size):
  """Every key/value twice: L doubles and so does the sum, so alpha = 1 is unchanged,
  alpha = 0.5 grows by sqrt(2) and alpha = 0 by 2."""
  q, k, v, _ = _qkv(lq=7, lk=7, seed=5)
  k2, v2 = jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1)
  mask = _padding_mask(2, 7)
  mask2 = jnp.concatenate([mask, mask], axis=-1)
  alphas = (1.0, 0.5, 0.0)

  @jax.jit
  def outputs(q, k, v, k2, v2):
    kw = dict(activation="relu", block_size=block_size)
    return [(pointwise_attention(q, k, v, mask=mask, alpha=a, **kw),
             pointwise_attention(q, k2, v2, mask=mask2, alpha=a, **kw)) for a in alphas]

  for alpha, factor, (once, twice) in zip(alphas, (1.0, math.sqrt(2.0), 2.0),
                                          outputs(q, k, v, k2, v2)):
    once, twice = np.asarray(once), np.asarray(twice)
    assert np.abs(once).max() > 0.1
    _close(twice, factor * once, f"alpha={alpha}")
    if factor != 1.0:
      assert not np.allclose(twice, once, rtol=1e-3, atol=1e-3)


def test_bfloat16_inputs():
  """Dense and blockwise on bfloat16 inputs: finite, and within 3e-2 * max |float32 result|
  of the float32 dense path (values and gradients)."""
  q, k, v, g = _qkv(lq=16, lk=16, dtype=jnp.bfloat16, seed=6)
  kw = dict(activation="relu", causal=True, mask=_padding_mask(2, 16))
  f32 = tuple(x.astype(jnp.float32) for x in (q, k, v)) + (g,)
  (out32, grads32), *results = _zoo_value_and_grads(
      [(functools.partial(pointwise_attention, **kw), f32)]
      + [(functools.partial(pointwise_attention, block_size=bs, **kw), (q, k, v, g))
         for bs in (None, 4)])
  for out, grads in results:
    for a, r in zip([out] + grads, [out32] + grads32):
      assert a.dtype == jnp.bfloat16
      a = a.astype(np.float32)
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, r, rtol=0, atol=3e-2 * np.abs(r).max())


# ----------------------------------------------------------------------------------------
# Softmax core.


def test_softmax_matches_reference():
  q, k, v, g = _qkv(lq=9, lk=12, seed=7)
  b, lq, h, _ = q.shape
  valid = np.random.default_rng(0).random((b, 12)) < 0.6
  valid[:, 0] = True  # every query sees key 0 (a softmax over nothing is undefined)
  per_query = np.random.default_rng(0).random((b, h, lq, 12)) < 0.6
  per_query[..., 0] = True
  masks = {"none": None, "padding": jnp.asarray(valid[:, None, None, :]),
           "per_query": jnp.asarray(per_query)}
  cases = [(functools.partial(softmax_attention, causal=causal, mask=mask), (q, k, v, g),
            dict(kind="softmax", causal=causal, mask=mask), f"causal={causal} {which}")
           for causal in (False, True) for which, mask in masks.items()]
  _check_against_reference(cases)


def test_softmax_implementation_option():
  q, k, v, _ = _qkv(lq=9, lk=12, seed=7)
  np.testing.assert_allclose(softmax_attention(q, k, v, implementation="xla"),
                             softmax_attention(q, k, v), rtol=0, atol=0)
  with pytest.raises(ValueError, match="implementation must be one of"):
    softmax_attention(q, k, v, implementation="flash")


# ----------------------------------------------------------------------------------------
# Bad options.


def test_bad_options_raise():
  q, k, v, _ = _qkv(lq=4, lk=4)
  cases = [
      (dict(activation="tanh"), "activation"),
      (dict(alpha=-0.5), "alpha"),
      (dict(alpha=float("nan")), "alpha"),
      (dict(block_size=0), "block_size"),
      (dict(block_size=-3), "block_size"),
      (dict(block_size=2.5), "block_size"),
      (dict(block_size=4, query_block_size=0), "query_block_size"),
      (dict(query_block_size=4), "query_block_size"),
      (dict(mask=jnp.ones((2, 1, 1, 4), jnp.int32)), "mask"),
      (dict(mask=jnp.ones((2, 1, 1, 5), bool)), "mask"),
      (dict(mask=jnp.ones((1, 2, 1, 4, 4), bool)), "mask"),
  ]
  for kw, name in cases:
    with pytest.raises(ValueError, match=name):
      pointwise_attention(q, k, v, **kw)
  with pytest.raises(ValueError, match="head_dim"):
    pointwise_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="head_dim"):
    softmax_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="mask"):
    softmax_attention(q, k, v, mask=jnp.ones((2, 1, 1, 4), jnp.float32))


def test_bad_module_options_raise():
  rngs = nnx.Rngs(0)
  for kw, name in [(dict(activation="swish"), "activation"), (dict(alpha=-1.0), "alpha"),
                   (dict(block_size=0), "block_size"),
                   (dict(block_size=4, query_block_size=-1), "query_block_size")]:
    with pytest.raises(ValueError, match=name):
      PointwiseAttention(16, 2, rngs=rngs, **kw)
  with pytest.raises(ValueError, match="num_heads"):
    PointwiseAttention(10, 3, rngs=rngs)
  m = PointwiseAttention(16, 2, block_size=4, causal=True, rngs=rngs)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 16), dtype=np.float32))
  with pytest.raises(ValueError, match="mask"):
    m(x, mask=jnp.ones((2, 1, 1, 7), bool))
  assert m(x).shape == (2, 6, 16)


def test_activation_table_is_covered():
  assert sorted(ACTIVATIONS) == sorted(ALL_ACTIVATIONS)
