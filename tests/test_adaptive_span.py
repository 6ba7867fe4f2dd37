"""Adaptive span (arXiv 1905.07799) and persistent memory (arXiv 1907.01470).

* The authors' fixtures (facebookresearch/adaptive-span, float64) to 1e-10: the
  `SeqAttention` output and its gradient in z/S, the persistent-memory layer, and two whole
  `TransformerSeq` models loaded from the authors' state dicts.
* A naive reference written here with loops in numpy (no zoo code), float64: values, and
  gradients as central differences of the reference against `jax.grad` of the zoo core.
* Trimming (compute follows the span) equals the untrimmed result to 1e-6.
* Penalty, span statistics, clamping, the span mask's gradient, the cache carried across
  blocks, the registry entries (the registry's cached layers are TransformerSeq's
  attention table), TransformerSeq's trainer hooks, the FLOPs formula, and the `halo`
  strategy on 8 simulated devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention
from zoo import parallel
from zoo.attention import adaptive_span as span_lib
from zoo.attention import cache_window
from zoo.attention import persistent as pers_lib
from zoo.attention import registry
from zoo.attention.pointwise import ACTIVATIONS
from zoo.models import transformer_seq as ts
from zoo.models.transformer_seq import TransformerSeq, load_authors_state_dict

from tests.helpers import fixture_path
from tests.helpers import x64 as _x64

TOL = 1e-10


def _fixture(name):
  with np.load(fixture_path(name)) as f:
    return {k: f[k] for k in f.files}


def _to_zoo(x, heads):
  """Authors' [batch*heads, L, D] (index = b * H + h) -> [batch, L, heads, D]."""
  bh, length, d = x.shape
  return jnp.asarray(x.reshape(bh // heads, heads, length, d).transpose(0, 2, 1, 3))


def _from_zoo(x):
  b, length, h, d = x.shape
  return np.asarray(x).transpose(0, 2, 1, 3).reshape(b * h, length, d)


# ----------------------------------------------------------------------------------------
# The naive reference: loops over batch, head, query; written from the authors' semantics.


def _naive(q, k, v, key_pe, span_frac, ramp, pers_key=None, pers_val=None, eps=1e-8):
  """q [B, M, H, D]; k, v [B, C + M, H, D]; key_pe [D, S]; span_frac [H] or None.

  Query i (index C + i) attends to distances x = S..1 (positions C + i - x; a position
  before 0 is a zero key and value). Logits (q.k + q.key_pe[:, S - x]) / sqrt(D), softmax
  (jointly with the N persistent logits q.(sqrt(D) pk) / sqrt(D)), mask
  clamp((R + z - (x - 1)) / R, 0, 1) on the context part, renormalise by sum + eps,
  out = sum w v (+ sum w_pers sqrt(N) pv).
  """
  b_size, m, heads, d = q.shape
  c = k.shape[1] - m
  s = key_pe.shape[1]
  dist = np.arange(s, 0, -1)  # the S distances, farthest first (key_pe column S - x)
  rows = []
  for b in range(b_size):
    per_head = []
    for h in range(heads):
      per_query = []
      for i in range(m):
        pos = c + i - dist  # positions in cat(cache, block); < 0: a zero key and value
        valid = (pos >= 0)[:, None]
        keys = np.where(valid, k[b, np.maximum(pos, 0), h], 0.0)
        vals = np.where(valid, v[b, np.maximum(pos, 0), h], 0.0)
        pes = key_pe[:, s - dist].T
        qi = q[b, i, h]
        logits = keys @ qi + pes @ qi
        if pers_key is not None:
          n = pers_key.shape[0]
          logits = np.concatenate([logits, (pers_key[:, h] * math.sqrt(d)) @ qi])
        e = np.exp(logits / math.sqrt(d) - np.max(logits / math.sqrt(d)))
        w = e / np.sum(e)
        if span_frac is not None:
          r = (ramp + span_frac[h] * s - (dist - 1)) / ramp
          mask = np.minimum(np.maximum(r, 0.0), 1.0)
          if pers_key is not None:
            mask = np.concatenate([mask, np.ones(pers_key.shape[0], dtype=mask.dtype)])
          w = w * mask
          w = w / (np.sum(w) + eps)
        o = w[:s] @ vals
        if pers_key is not None:
          o = o + w[s:] @ (pers_val[:, h] * math.sqrt(n))
        per_query.append(o)
      per_head.append(np.stack(per_query))
    rows.append(np.stack(per_head, axis=1))
  return np.stack(rows)


def _random_inputs(rng, b=2, m=5, cache=8, heads=2, d=4, s=8, n=0):
  arr = lambda *shape: rng.standard_normal(shape)
  out = dict(q=arr(b, m, heads, d), k=arr(b, cache + m, heads, d), v=arr(b, cache + m, heads, d),
             key_pe=arr(d, s))
  if n:
    out["pers_key"] = arr(n, heads, d) / math.sqrt(d)
    out["pers_val"] = arr(n, heads, d) / math.sqrt(n)
  return out


# Jitted once at module level, so tests with equal shapes share compilations.
_seq = jax.jit(span_lib.seq_attention, static_argnames=("ramp", "trim_len"))
_pers = jax.jit(pers_lib.persistent_seq_attention, static_argnames=("ramp", "trim_len"))
_forward = nnx.jit(lambda model, tokens, caches: model(tokens, caches))


def _core(a, *, span=None, ramp=None, trim_len=0):
  """seq_attention or persistent_seq_attention on a dict of inputs."""
  args = (a["q"], a["k"], a["v"], a["key_pe"])
  if "pers_key" in a:
    return _pers(*args, a["pers_key"], a["pers_val"], span=span, ramp=ramp, trim_len=trim_len)
  return _seq(*args, span=span, ramp=ramp, trim_len=trim_len)


def _abstract(ctor):
  """Builds a module without running its initialisers (fast): values are filled later."""
  return nnx.eval_shape(ctor)


def _fill(module, seed=0, span=None, scale=0.2):
  """Sets every variable of an `nnx.eval_shape` module: N(0, scale^2) params, spans `span`."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(module):
    if not isinstance(var, nnx.Variable):
      continue
    sds = var.get_value()
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.key(seed))
    elif not isinstance(var, nnx.Param):
      var.set_value(jnp.zeros(sds.shape, sds.dtype))
    elif path[-1] == "span":
      var.set_value(jnp.asarray(np.broadcast_to(span, sds.shape), sds.dtype))
    else:
      var.set_value(jnp.asarray(scale * rng.standard_normal(sds.shape), sds.dtype))
  return module


def _fixture_model(persistent_size, dtype=jnp.float64, **kw):
  options = dict(ramp=4, span_init=0.5, **kw)
  if persistent_size:
    options["persistent_size"] = persistent_size
  return _abstract(lambda: TransformerSeq(
      vocab_size=11, width=16, num_heads=2, depth=2, max_span=16, inner_size=32,
      attention="persistent_memory" if persistent_size else "adaptive_span",
      attention_options=options, param_dtype=dtype, rngs=nnx.Rngs(0)))


def _loaded_fixture_model(name, persistent_size):
  model = _fixture_model(persistent_size)
  loaded = load_authors_state_dict(model, fixture_path(name))
  model.eval()
  return model, loaded


# ----------------------------------------------------------------------------------------
# The authors' fixtures.


def test_fixture_seq_attention_output():
  f = _fixture("adaptive_span_seqattn.npz")
  with _x64():
    h = f["z_frac"].shape[0]
    a = {n: _to_zoo(f[n], h) for n in ("q", "k", "v")}
    a["key_pe"] = jnp.asarray(f["key_pe"])  # the authors' [1, head_dim, S]
    out = _core(a, span=jnp.asarray(f["z_frac"]), ramp=int(f["R"]))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(_from_zoo(out), f["out"], rtol=0, atol=TOL)


def test_fixture_seq_attention_span_gradient():
  f = _fixture("adaptive_span_seqattn.npz")
  g = _fixture("adaptive_span_grad.npz")
  with _x64():
    h = f["z_frac"].shape[0]
    q, k, v = (_to_zoo(f[n], h) for n in ("q", "k", "v"))
    cot = _to_zoo(g["G"], h)
    loss = lambda z: jnp.sum(span_lib.seq_attention(q, k, v, f["key_pe"], span=z,
                                                    ramp=int(f["R"])) * cot)
    grad = jax.jit(jax.grad(loss))(jnp.asarray(f["z_frac"]))
    np.testing.assert_allclose(np.asarray(grad), g["grad_current_val"], rtol=0, atol=TOL)


def test_fixture_persistent_memory():
  f = _fixture("persistent_memory_seqattn.npz")
  for x64 in (True, False):  # float64 to 1e-10, float32 to 1e-5
    with _x64() if x64 else jax.default_device(jax.devices("cpu")[0]):
      dt = jnp.float64 if x64 else jnp.float32
      h = f["z_frac"].shape[0]
      a = {n: _to_zoo(f[n], h).astype(dt) for n in ("q", "k", "v")}
      a["key_pe"] = jnp.asarray(f["key_pe"], dt)
      a["pers_key"] = jnp.asarray(f["pers_key"], dt).transpose(2, 0, 1)  # [H, D, N] -> [N, H, D]
      a["pers_val"] = jnp.asarray(f["pers_val"], dt).transpose(1, 0, 2)  # [H, N, D] -> [N, H, D]
      out = _core(a, span=jnp.asarray(f["z_frac"], dt), ramp=int(f["R"]))
      assert out.dtype == dt
      tol = dict(rtol=0, atol=TOL) if x64 else dict(rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(_from_zoo(out), f["out"], **tol)


@pytest.mark.parametrize("name,persistent_size", [("transformerseq_adaspan.npz", 0),
                                                  ("transformerseq_allattn.npz", 4)])
def test_fixture_transformer_seq(name, persistent_size):
  f = _fixture(name)
  with _x64():
    model, loaded = _loaded_fixture_model(name, persistent_size)
    assert len(loaded) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    if persistent_size:  # all-attention: no feed-forward sublayer, no norm2
      assert all(l.ff is None and l.norm2 is None for l in model.layers())
    caches = [jnp.asarray(f["cache0"]), jnp.asarray(f["cache1"])]
    logp, next_caches = _forward(model, jnp.asarray(f["x"]), caches)
    assert logp.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(logp), f["logp"], rtol=0, atol=TOL)
    # Layer 0's next cache is the last S of cat(cache0, the block's embeddings).
    emb = f["in_emb/weight"][f["x"]]
    np.testing.assert_allclose(np.asarray(next_caches[0]),
                               np.concatenate([f["cache0"], emb], 1)[:, -16:], rtol=0, atol=0)
    if not persistent_size:
      return
    # Trimmed (granularity 4 here, S = 16 < 64) equals untrimmed on the whole model.
    for layer in model.layers():
      layer.attn.options = dataclasses.replace(layer.attn.options, trim_granularity=4)
    assert span_lib.update_trim_lengths(model) == [4, 4]  # size = 8 + 4 = 12 of S = 16
    logp_t, _ = _forward(model, jnp.asarray(f["x"]), caches)
    np.testing.assert_allclose(np.asarray(logp_t), f["logp"], rtol=0, atol=1e-6)


def test_loader_rejects_mismatches():
  f = _fixture("transformerseq_adaspan.npz")
  with _x64():
    with pytest.raises(KeyError, match="persistent_memory/key"):
      load_authors_state_dict(_fixture_model(4), f)
    extra = {**f, "layers.2.norm1.weight": np.ones(16)}  # "." keys too; a third layer
    with pytest.raises(ValueError, match="not used"):
      load_authors_state_dict(_fixture_model(0), extra)
    bad = {**f, "layers/0/attn/attn/adaptive_span/_mask/mask_template": np.zeros(16)}
    with pytest.raises(ValueError, match="mask_template"):
      load_authors_state_dict(_fixture_model(0), bad)
    with pytest.raises(KeyError, match="key_pe"):
      load_authors_state_dict(_fixture_model(0), {k: v for k, v in f.items() if k != "key_pe"})
    with pytest.raises(ValueError, match="shape"):
      load_authors_state_dict(_fixture_model(0), {**f, "key_pe": np.zeros((1, 8, 12))})


# ----------------------------------------------------------------------------------------
# The naive reference: values and gradients.


@pytest.mark.parametrize("cache,m,s,n", [(8, 5, 8, 0), (3, 6, 4, 0), (12, 4, 8, 3),
                                         (8, 5, 8, 2)])
def test_matches_naive_reference_values(cache, m, s, n):
  """Cache = S, a block longer than S with a short cache, a cache longer than S."""
  rng = np.random.default_rng(cache + 10 * m + 100 * n)
  x = _random_inputs(rng, m=m, cache=cache, s=s, n=n)
  span, ramp = np.array([0.23, 0.61]), 2.5
  pk, pv = x.get("pers_key"), x.get("pers_val")
  ref = _naive(x["q"], x["k"], x["v"], x["key_pe"], span, ramp, pk, pv)
  ref_fixed = _naive(x["q"], x["k"], x["v"], x["key_pe"], None, None, pk, pv, eps=0.0)
  with _x64():
    a = {k: jnp.asarray(v) for k, v in x.items()}
    out = _core(a, span=jnp.asarray(span), ramp=ramp)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-12)
    if cache == 8:  # without a span: a plain softmax over the S positions, no renormalising
      np.testing.assert_allclose(np.asarray(_core(a)), ref_fixed, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [0, 3])
def test_matches_naive_reference_gradients(n):
  """jax.grad of the zoo core against central differences of the numpy loop reference."""
  rng = np.random.default_rng(7 + n)
  x = _random_inputs(rng, b=1, m=4, cache=6, s=6, n=n)
  x["span"] = np.array([0.27, 0.58])  # z = 1.62, 3.48: no ramp end on an integer distance
  ramp = 2.0
  cot = rng.standard_normal(x["q"].shape)

  def ref_loss(p):
    return float(np.sum(_naive(p["q"], p["k"], p["v"], p["key_pe"], p["span"], ramp,
                               p.get("pers_key"), p.get("pers_val")) * cot))

  with _x64():
    def zoo_loss(p):
      args = (p["q"], p["k"], p["v"], p["key_pe"])
      if n:
        out = pers_lib.persistent_seq_attention(*args, p["pers_key"], p["pers_val"],
                                                span=p["span"], ramp=ramp)
      else:
        out = span_lib.seq_attention(*args, span=p["span"], ramp=ramp)
      return jnp.sum(out * cot)

    g_zoo = jax.jit(jax.grad(zoo_loss))({k: jnp.asarray(v) for k, v in x.items()})
  step = 1e-6
  for name, value in x.items():
    fd = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
      plus, minus = dict(x), dict(x)
      plus[name], minus[name] = value.copy(), value.copy()
      plus[name][idx] += step
      minus[name][idx] -= step
      fd[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * step)
    np.testing.assert_allclose(np.asarray(g_zoo[name]), fd, rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert np.abs(np.asarray(g_zoo["span"])).min() > 1e-3  # the span does get a gradient


# ----------------------------------------------------------------------------------------
# The span mask.


def test_span_mask_values_and_gradient():
  with _x64():
    ramp, z = 4.0, 5.3
    x = jnp.arange(0.0, 14.0, 0.25)
    m = jax.jit(span_lib.span_mask)(x, z, ramp)
    np.testing.assert_allclose(np.asarray(m), np.clip((ramp + z - np.asarray(x)) / ramp, 0, 1),
                               rtol=0, atol=1e-15)
    grads = jax.jit(jax.vmap(jax.grad(span_lib.span_mask, argnums=(0, 1)), (0, None, None)))
    dx, dz = grads(x, z, ramp)
    inside = (np.asarray(x) >= z) & (np.asarray(x) <= z + ramp)
    np.testing.assert_allclose(np.asarray(dz), np.where(inside, 1 / ramp, 0.0), atol=1e-15)
    np.testing.assert_allclose(np.asarray(dx), np.where(inside, -1 / ramp, 0.0), atol=1e-15)
    # Exactly at the ramp's ends the slope passes through (as torch's clamp).
    ends = grads(jnp.asarray([3.0, 5.0]), 3.0, 2.0)[1]
    np.testing.assert_array_equal(np.asarray(ends), [0.5, 0.5])


# ----------------------------------------------------------------------------------------
# Trimming: compute follows the span.


def test_trim_length_formula():
  s, r = 256, 32
  # size = clip(ceil(max z/S * S) + R, 0, S); trim = floor(min(S-1, S-size) / 64) * 64.
  assert span_lib.trim_length([0.05, 0.2], s, r) == 128         # size 84 -> W = 128
  assert span_lib.trim_length([0.0, 0.0], s, r) == 192          # size 32 -> W = 64
  assert span_lib.trim_length([0.0, 1.0], s, r) == 0            # size S
  assert span_lib.trim_length([0.0, 0.0], 256, 0) == 192        # min(S - 1, S) = 255 -> 192
  assert span_lib.trim_length([0.0, 0.0], 8, 3) == 0            # S < 64: never trims
  assert span_lib.trim_length([0.3, 0.1], 16, 2, granularity=4) == 8  # size 7 -> 9 -> 8
  for frac in np.random.default_rng(0).uniform(0, 1, size=(50, 3)):
    trim = span_lib.trim_length(frac, s, r)
    assert trim % 64 == 0 and 0 <= trim < s
    assert s - trim >= min(s, math.ceil(frac.max() * s) + r)  # every m > 0 is kept


@pytest.mark.parametrize("n", [0, 4])
def test_trimmed_equals_untrimmed(n):
  rng = np.random.default_rng(3)
  s, ramp = 128, 16
  x = _random_inputs(rng, b=2, m=8, cache=s, heads=2, d=4, s=s, n=n)
  span = np.array([0.05, 0.2])
  trim = span_lib.trim_length(span, s, ramp)
  assert trim == 64  # size ceil(25.6) + 16 = 42 -> window 64 of 128
  with _x64():  # (float32 trimming: test_layer_trim_is_static_under_jit)
    a = {k: jnp.asarray(v) for k, v in x.items()}
    z = jnp.asarray(span)
    full, trimmed = _core(a, span=z, ramp=ramp), _core(a, span=z, ramp=ramp, trim_len=trim)
    np.testing.assert_allclose(np.asarray(trimmed), np.asarray(full), rtol=0, atol=1e-6)
    if not n:  # a cache already cut to the window gives the same too
      cut = {**a, "k": a["k"][:, trim:], "v": a["v"][:, trim:]}
      np.testing.assert_allclose(np.asarray(_core(cut, span=z, ramp=ramp, trim_len=trim)),
                                 np.asarray(full), rtol=0, atol=1e-6)


def test_layer_trim_is_static_under_jit():
  layer = _fill(_abstract(lambda: span_lib.AdaptiveSpanAttention(
      16, 2, max_span=32, ramp=4, trim_granularity=8, rngs=nnx.Rngs(0))), span=[0.1, 0.25])
  rng = np.random.default_rng(1)  # (numpy: jax.random's first compile is slow on CPU)
  x = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
  cache = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32)
  # A loss of the output and its gradient in every parameter, the span included.
  run = nnx.jit(lambda mod: nnx.value_and_grad(lambda m: jnp.sum(m(x, cache=cache) * x))(mod))
  loss_full, g_full = run(layer)
  assert layer.trim_len == 0
  assert span_lib.update_trim_lengths(layer) == [16]  # size 8 + 4 = 12 -> window 16 of 32
  loss_trim, g_trim = run(layer)  # the static trim_len changed: nnx.jit retraces
  np.testing.assert_allclose(float(loss_trim), float(loss_full), rtol=1e-6)
  for (path, gf), (_, gt) in zip(nnx.to_flat_state(g_full), nnx.to_flat_state(g_trim)):
    np.testing.assert_allclose(np.asarray(gt.get_value()), np.asarray(gf.get_value()),
                               rtol=1e-5, atol=1e-6, err_msg=str(path))
  assert np.abs(np.asarray(g_full["span"].get_value())).min() > 0


# ----------------------------------------------------------------------------------------
# Penalty, statistics, clamping, cache sizes.


def _three_layer_model(**kw):
  return _abstract(lambda: TransformerSeq(vocab_size=7, width=16, num_heads=2, depth=3,
                                          max_span=16, attention_options=dict(ramp=4, **kw),
                                          rngs=nnx.Rngs(0)))


def test_penalty_stats_and_clamp():
  model = _fill(_three_layer_model(span_loss=0.5), span=0.0)
  fracs = [np.array([0.3, 0.7]), np.array([0.0, 0.05]), np.array([1.0, 0.9])]
  for layer, f in zip(model.layers(), fracs):
    layer.attn.span.set_value(jnp.asarray(f, jnp.float32))
  f32 = [f.astype(np.float32).astype(np.float64) for f in fracs]
  want = sum(0.5 * np.mean(f * 16) for f in f32)  # sum over layers of lambda * mean_h z
  np.testing.assert_allclose(float(span_lib.span_penalty(model)), want, rtol=1e-6)
  np.testing.assert_allclose(float(span_lib.span_penalty(model, coeff=2.0)), want * 4,
                             rtol=1e-6)
  grads = nnx.grad(lambda m: span_lib.span_penalty(m))(model)
  np.testing.assert_allclose(np.asarray(grads["layers_1"]["attn"]["span"].get_value()),
                             [0.5 * 16 / 2] * 2, rtol=1e-6)
  stats = span_lib.span_stats(model)
  # avg: clip(ceil(mean_h(z/S) * S) + R, 0, S); max: clip(ceil(max_h(z/S) * S) + R, 0, S).
  assert stats["avg"] == [12, 5, 16] and stats["max"] == [16, 5, 16]
  assert stats["span_avg"] == pytest.approx(11.0) and stats["span_max"] == 16
  np.testing.assert_allclose(stats["z_mean"], [8.0, 0.4, 15.2], rtol=1e-6)
  np.testing.assert_allclose(stats["z_max"], [11.2, 0.8, 16.0], rtol=1e-6)
  # Clamping to [0, 1], also inside nnx.jit (the trainer clamps after each update).
  for layer in model.layers():
    layer.attn.span.set_value(jnp.asarray([-0.2, 1.3], jnp.float32))
  nnx.jit(span_lib.clamp_spans)(model)
  for layer in model.layers():
    np.testing.assert_array_equal(np.asarray(layer.attn.span[...]), [0.0, 1.0])
  assert span_lib.update_trim_lengths(model) == [0, 0, 0]  # S = 16 < 64


def test_adaptive_cache_size():
  model = _abstract(lambda: TransformerSeq(vocab_size=5, width=8, num_heads=2, depth=2,
                                           max_span=512,
                                           attention_options=dict(ramp=32, adapt_cache=True),
                                           rngs=nnx.Rngs(0)))
  _fill(model, span=0.01)
  assert model.cache_sizes() == [512, 512]  # not trimmed yet
  assert span_lib.update_trim_lengths(model) == [448, 448]  # size 6 + 32 = 38 -> W = 64
  assert model.cache_sizes() == [128, 128]  # the window + 64 (the authors' get_cache_size)
  assert [c.shape for c in model.init_caches(3)] == [(3, 128, 8)] * 2


def test_transformer_seq_trainer_hooks():
  """The trainer's model hooks: penalty, clamping, trimming, checkpoint state, metrics."""
  model = _fill(_three_layer_model(span_loss=0.5), span=0.0)
  fracs = [np.array([0.3, 0.7]), np.array([0.0, 0.05]), np.array([1.0, 0.9])]
  for layer, f in zip(model.layers(), fracs):
    layer.attn.span.set_value(jnp.asarray(f, jnp.float32))
  reg = model.regularization_loss()
  assert reg.dtype == jnp.float32 and reg.shape == ()
  np.testing.assert_allclose(float(reg), float(span_lib.span_penalty(model)), rtol=1e-7)
  assert model.host_metrics() == {
      "span_avg": 11.0, "span_max": 16.0, "span_avg/layer_0": 12.0, "span_max/layer_0": 16.0,
      "span_avg/layer_1": 5.0, "span_max/layer_1": 5.0, "span_avg/layer_2": 16.0,
      "span_max/layer_2": 16.0}
  assert model.eval_report() == {"spans": [[4.8, 11.2], [0.0, 0.8], [16.0, 14.4]]}
  for layer in model.layers():
    layer.attn.span.set_value(jnp.asarray([-0.2, 1.3], jnp.float32))
  nnx.jit(lambda m: m.after_update())(model)
  for layer in model.layers():
    np.testing.assert_array_equal(np.asarray(layer.attn.span[...]), [0.0, 1.0])
  # before_step: the static windows (and adaptive caches) follow the spans; the
  # checkpoint state carries them.
  big = _fill(_abstract(lambda: TransformerSeq(
      vocab_size=5, width=8, num_heads=2, depth=2, max_span=512,
      attention_options=dict(ramp=32, adapt_cache=True), rngs=nnx.Rngs(0))), span=0.01)
  assert big.checkpoint_state() == {"trim_lengths": [0, 0]}
  big.before_step()
  assert big.checkpoint_state() == {"trim_lengths": [448, 448]}
  assert big.cache_sizes() == [128, 128]
  big.restore_checkpoint_state({"trim_lengths": [384, 0]})
  assert big.cache_sizes() == [192, 512]
  big.restore_checkpoint_state({})  # nothing saved: unchanged
  assert big.checkpoint_state() == {"trim_lengths": [384, 0]}
  # Without learned spans the hooks add nothing.
  soft = _abstract(lambda: TransformerSeq(vocab_size=7, width=16, num_heads=2, depth=2,
                                          max_span=16, attention="softmax", rngs=nnx.Rngs(0)))
  assert float(soft.regularization_loss()) == 0.0
  assert soft.host_metrics() == {} and soft.eval_report() == {}
  assert soft.checkpoint_state() == {"trim_lengths": []}


# ----------------------------------------------------------------------------------------
# The cache carries context across blocks.


@pytest.mark.parametrize("name,persistent_size", [("transformerseq_adaspan.npz", 0),
                                                  ("transformerseq_allattn.npz", 4)])
def test_cache_carries_context_across_blocks(name, persistent_size):
  """Three blocks of 8 with carried caches == one block of 24 from zero caches."""
  _fixture(name)
  with _x64():
    model, _ = _loaded_fixture_model(name, persistent_size)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 24)))
    whole, _ = _forward(model, tokens, model.init_caches(2))
    caches, parts = model.init_caches(2), []
    for i in range(3):
      logp, caches = _forward(model, tokens[:, 8 * i:8 * (i + 1)], caches)
      parts.append(logp)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(parts, 1)), np.asarray(whole),
                               rtol=0, atol=1e-12)
    assert [c.shape for c in caches] == [(2, 16, 16)] * 2


# ----------------------------------------------------------------------------------------
# Registry and layer plumbing.


@pytest.mark.parametrize("name", ["adaptive_span", "persistent_memory"])
def test_registry_layer_is_causal(name):
  layer = _fill(_abstract(lambda: registry.make(
      name, width=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), max_span=8, ramp=2)),
      span=0.5)
  assert layer.key_pe is not None  # standalone: the layer owns its key_pe
  fwd = nnx.jit(lambda mod, x: mod(x))
  x_np = np.random.default_rng(0).standard_normal((2, 12, 16)).astype(np.float32)
  x = jnp.asarray(x_np)
  y = fwd(layer, x)
  assert y.shape == x.shape
  x_np[:, 8:] = 0.0
  y2 = fwd(layer, jnp.asarray(x_np))  # changing tokens 8.. leaves outputs 0..7 unchanged
  np.testing.assert_allclose(np.asarray(y2[:, :8]), np.asarray(y[:, :8]), rtol=0, atol=1e-6)
  assert not np.allclose(np.asarray(y2[:, 9]), np.asarray(y[:, 9]))
  with pytest.raises(ValueError, match="causal"):
    registry.validate(name, {}, causal=False)
  with pytest.raises(ValueError, match="mask"):
    layer(x, mask=jnp.ones((12, 12), bool))


def test_registry_is_the_transformer_seq_attention_table():
  """TransformerSeq's names are the registry's cached names; presets apply to the cached
  layer; options that do not apply over the cache (or that the model sets) are refused."""
  assert set(registry.names(cached=True)) == {"adaptive_span", "persistent_memory",
                                              "softmax", "pointwise", *ACTIVATIONS}
  assert registry.get("softmax").cached_layer is cache_window.SoftmaxCacheAttention
  assert registry.get("relu").cached_layer is cache_window.PointwiseCacheAttention
  assert registry.get("adaptive_span").cached_layer is span_lib.AdaptiveSpanAttention
  assert registry.get("persistent_memory").cached_layer is pers_lib.PersistentMemoryAttention
  assert registry.get("relu2").options(cached=True).activation == "relu2"
  assert registry.get("relu2").option_defaults(cached=True) == {
      "activation": "relu2", "alpha": 1.0, "use_bias": False, "qk_layernorm": False,
      "output_gate": False, "gate_activation": "swish"}
  for name in registry.names(cached=True):  # the model sets these from its own keys
    assert not {"max_span", "attn_dropout", "shared_key_pe"} & set(
        registry.get(name).option_defaults(cached=True))
  for name, bad in [("softmax", {"implementation": "xla"}), ("softmax", {"ramp": 4}),
                    ("relu", {"block_size": 64}), ("adaptive_span", {"persistent_size": 4})]:
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{list(bad)[0]}'\]"):
      registry.get(name).options(bad, cached=True)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_span'\] for attention "
                                       r"'softmax' in transformer_seq"):
    ts.attention_options_for("softmax", {"max_span": 8}, max_span=16)
  for name in registry.names(cached=False):
    with pytest.raises(ValueError, match="does not run over a segment cache"):
      registry.get(name).options(cached=True)
  assert cache_window.SoftmaxCacheAttention.cached and not registry.get("softmax").layer.cached


def test_bad_inputs_raise():
  q = np.zeros((1, 4, 2, 3))
  k = np.zeros((1, 10, 2, 3))
  pe = np.zeros((1, 3, 6))
  with pytest.raises(ValueError, match="key_pe"):
    span_lib.seq_attention(q, k, k, np.zeros((1, 4, 6)))
  with pytest.raises(ValueError, match="trim_len"):
    span_lib.seq_attention(q, k, k, pe, trim_len=6)
  with pytest.raises(ValueError, match="span"):
    span_lib.seq_attention(q, k, k, pe, span=np.zeros(3), ramp=1)
  with pytest.raises(ValueError, match="ramp"):
    span_lib.seq_attention(q, k, k, pe, span=np.zeros(2))
  with pytest.raises(ValueError, match="pers_key"):
    pers_lib.persistent_seq_attention(q, k, k, pe, np.zeros((2, 2, 4)), np.zeros((2, 2, 3)))
  with pytest.raises(ValueError, match="block length"):
    span_lib.seq_attention(q, k[:, :3], k[:, :3], pe)


# ----------------------------------------------------------------------------------------
# Compute follows the span: only the trimmed window (and per chunk of queries) is computed.


def _dots(fn, *args):
  """(shapes [lhs, rhs, out], FLOPs) of every dot_general in fn's jaxpr, sub-jaxprs included."""
  dots = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs, out = (tuple(x.aval.shape) for x in (*eqn.invars, *eqn.outvars))
        (contract, _), _ = eqn.params["dimension_numbers"]
        dots.append(([lhs, rhs, out], 2 * math.prod(out) * math.prod(lhs[i] for i in contract)))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return dots


def test_trimmed_layer_computes_only_the_window():
  """Forward + backward of the layer with a cache of S = 1024: with span ~51 (+ ramp 32 ->
  W = 128) no matmul touches S keys or inputs, the matmul FLOPs are those of the window
  (q . k per chunk of 64 queries: M (W + 64)), and the untrimmed layer is S/W x dearer."""
  s, m, width, heads = 1024, 256, 32, 2
  layer = _fill(_abstract(lambda: span_lib.AdaptiveSpanAttention(
      width, heads, max_span=s, ramp=32, rngs=nnx.Rngs(0))), span=[0.05, 0.03])
  assert span_lib.update_trim_lengths(layer) == [896]  # ceil(51.2) + 32 = 84 -> W = 128
  x = jax.ShapeDtypeStruct((1, m, width), jnp.float32)
  cache = jax.ShapeDtypeStruct((1, s, width), jnp.float32)
  graphdef, state = nnx.split(layer)

  def step(trim_len):
    def loss(state, x, cache):
      mod = nnx.merge(graphdef, state)
      return jnp.sum(mod(x, cache=cache, trim_len=trim_len) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  trimmed = _dots(step(None), state, x, cache)
  full = _dots(step(0), state, x, cache)
  dims = lambda dots: {n for shapes, _ in dots for shape in shapes for n in shape}
  assert max(dims(trimmed)) < s  # nothing of S keys or inputs is computed
  assert max(dims(full)) >= s + m
  # Scores per chunk of 64 queries, [.., 64, 64 + W]; no [.., M, W + M] block.
  outs = [shapes[-1] for shapes, _ in trimmed]
  assert (1, 2, m // 64, 64, 64 + 128) in outs
  assert not [o for o in outs if m in o and 128 + m in o], outs
  w = 128
  d = width // heads
  attn = 2 * heads * m * (w + 64) * d * 2 + 2 * heads * m * w * d  # qk, wv; q.key_pe
  proj = 2 * (w + m) * width * width * 2 + 2 * m * width * width * 2  # k, v; q, out
  want = 3 * (attn + proj)  # forward + backward (2x)
  got = sum(f for _, f in trimmed)
  assert 0.9 * want <= got <= 1.1 * want, (got, want)
  assert sum(f for _, f in full) > 5 * got


def test_flops_formula_counts_the_trimmed_window():
  """`layer.flops(M)`: projections (k, v over the W + M rows of the window and block, q and
  out over M) plus the core formula 2 H M W 3 D (q.k, q.key_pe, w.v over the trimmed
  window; persistent slots add 2 H M N 2 D). The forward's matmuls add exactly the chunk's
  extra 64 keys per query of the banded q.k and w.v."""
  s, m, width, heads = 1024, 256, 32, 2
  d, w = width // heads, 128
  layer = _fill(_abstract(lambda: span_lib.AdaptiveSpanAttention(
      width, heads, max_span=s, ramp=32, rngs=nnx.Rngs(0))), span=[0.05, 0.03])
  assert span_lib.update_trim_lengths(layer) == [s - w]
  assert layer.core_flops(m) == 2 * heads * m * w * 3 * d
  assert layer.projection_flops(m) == 2 * (w + m) * width * width * 2 + 2 * m * width ** 2 * 2
  graphdef, state = nnx.split(layer)
  forward = lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache)
  got = sum(f for _, f in _dots(forward, state, jax.ShapeDtypeStruct((1, m, width), jnp.float32),
                               jax.ShapeDtypeStruct((1, s, width), jnp.float32)))
  assert got == layer.flops(m) + 2 * heads * m * 64 * d * 2
  pers = _abstract(lambda: pers_lib.PersistentMemoryAttention(
      width, heads, max_span=s, persistent_size=8, rngs=nnx.Rngs(0)))
  assert pers.core_flops(m) == 2 * heads * m * (s * 3 * d + 8 * 2 * d)  # untrimmed: W = S
  soft = _abstract(lambda: cache_window.SoftmaxCacheAttention(width, heads, max_span=64,
                                                              rngs=nnx.Rngs(0)))
  assert soft.core_flops(m) == 2 * heads * m * 64 * 3 * d


def test_query_chunks_equal_the_whole_block():
  """The banded (chunked) computation equals one block in values and gradients (float64),
  with and without persistent memory, for chunks that do not divide M (padded queries)."""
  rng = np.random.default_rng(11)
  x = _random_inputs(rng, b=2, m=20, cache=16, heads=2, d=4, s=16, n=3)
  x["span"] = np.array([0.2, 0.45])
  cot = jnp.asarray(rng.standard_normal(x["q"].shape))
  with _x64():
    p = {k: jnp.asarray(v) for k, v in x.items()}

    def loss(p, chunk, persistent):
      args = (p["q"], p["k"], p["v"], p["key_pe"])
      kw = dict(span=p["span"], ramp=2.0, trim_len=6, query_chunk=chunk)  # W = 10 < M
      out = (pers_lib.persistent_seq_attention(*args, p["pers_key"], p["pers_val"], **kw)
             if persistent else span_lib.seq_attention(*args, **kw))
      return jnp.sum(out * cot)

    grads = jax.jit(lambda p: {(c, n): jax.value_and_grad(loss)(p, c, n)
                               for c in (20, 7) for n in (False, True)})(p)
  for persistent in (False, True):
    (base, g_base), (val, g) = grads[(20, persistent)], grads[(7, persistent)]
    np.testing.assert_allclose(float(val), float(base), rtol=1e-12)
    for name in p:
      np.testing.assert_allclose(np.asarray(g[name]), np.asarray(g_base[name]), rtol=0,
                                 atol=1e-12, err_msg=f"{name} persistent={persistent}")
  assert np.abs(np.asarray(grads[(7, False)][1]["k"])).max() > 1e-3
  assert cache_window.query_chunk(512, 256) == 64
  assert cache_window.query_chunk(512, 8192) == 512
  assert cache_window.query_chunk(40, 8) == 40


# ----------------------------------------------------------------------------------------
# Sequence parallelism: the halo strategy on 8 simulated devices.


def _reference(kind, q, k, v, *, key_pe, k_cache=None, v_cache=None, **options):
  """The single-device equivalent of the halo strategy: the core on cat(cache, block)."""
  if k_cache is not None:
    k, v = jnp.concatenate([k_cache, k], axis=1), jnp.concatenate([v_cache, v], axis=1)
  if kind == "persistent_memory":
    return pers_lib.persistent_seq_attention(q, k, v, key_pe, **options)
  return span_lib.seq_attention(q, k, v, key_pe, **options)


def _halo_inputs(rng, b, length, s, n, cache):
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape))
  x = dict(q=arr(b, length, 2, 4), k=arr(b, length, 2, 4), v=arr(b, length, 2, 4),
           key_pe=arr(1, 4, s), span=jnp.asarray([0.3, 0.55]))
  if cache:
    x["k_cache"], x["v_cache"] = arr(b, cache, 2, 4), arr(b, cache, 2, 4)
  if n:
    x["pers_key"], x["pers_val"] = arr(n, 2, 4) / 2, arr(n, 2, 4) / math.sqrt(n)
  return x


@pytest.mark.parametrize("mesh_shape,length,s,trim,cache,n", [
    ({"data": 2, "seq": 4}, 32, 24, 3, 20, 0),   # W = 21 over shards of 8: 3 hops, cache
    pytest.param({"data": 1, "seq": 8}, 16, 24, 0, 0, 3,  # W = 24 > 7 shards of 2: the
                 marks=pytest.mark.slow),                 # zero cache; persistent memory
])
def test_halo_equals_single_device(mesh_shape, length, s, trim, cache, n):
  kind = "persistent_memory" if n else "adaptive_span"
  assert registry.strategies(kind) == ("halo",)
  mesh = parallel.make_mesh(mesh_shape)
  rng = np.random.default_rng(length + n)
  with _x64():
    x = _halo_inputs(rng, 2, length, s, n, cache)
    cot = jnp.asarray(rng.standard_normal(x["q"].shape))

    def loss(p, split):
      p = dict(p)
      q, k, v = p.pop("q"), p.pop("k"), p.pop("v")
      if split:
        out = zoo.attention.sequence_parallel_attention(
            q, k, v, mesh=mesh, kind=kind, strategy="halo", causal=True, ramp=2.0,
            trim_len=trim, **p)
      else:
        out = _reference(kind, q, k, v, ramp=2.0, trim_len=trim, **p)
      return jnp.sum(out * cot)

    run = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (val, g), (ref, g_ref) = run(x, True), run(x, False)
  np.testing.assert_allclose(float(val), float(ref), rtol=1e-12)
  for name in x:
    np.testing.assert_allclose(np.asarray(g[name]), np.asarray(g_ref[name]), rtol=0,
                               atol=1e-12, err_msg=name)
  assert np.abs(np.asarray(g["span"])).min() > 1e-6
  if cache:  # the cache matters: it reaches the first shards' queries
    assert np.abs(np.asarray(g["k_cache"])[:, -(s - trim):]).max() > 1e-6


@pytest.mark.parametrize("name", ["persistent_memory", "relu",
                                  pytest.param("adaptive_span", marks=pytest.mark.slow),
                                  pytest.param("softmax", marks=pytest.mark.slow)])
def test_layer_routes_to_halo_with_a_halo_sharding(name):
  """The cached layer of `name` (a span layer, persistent or not, or softmax / pointwise
  over the cache) built with `Sharding(mesh, strategy="halo")` with a cache equals the
  unsplit layer, values and gradients; other strategies are refused."""
  mesh = parallel.make_mesh({"data": 2, "seq": 4})
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)
  cache = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
  family = registry.get(name)
  spans = isinstance(family.cached_layer, type) and issubclass(
      family.cached_layer, span_lib.AdaptiveSpanAttention)
  kw = dict(ramp=4, trim_granularity=4) if spans else dict(alpha=0.5) if name == "relu" else {}
  if name == "persistent_memory":
    kw["persistent_size"] = 3
  options = family.options(dict(max_span=24, **kw), cached=True).as_dict()
  layer = _fill(_abstract(lambda: family.cached_layer(16, 2, rngs=nnx.Rngs(0), **options)),
                span=[0.2, 0.4])
  if spans:
    assert span_lib.update_trim_lengths(layer) == [8]  # size 10 + 4 = 14 -> W = 16 > 4

  def loss(mod):
    return jnp.sum(mod(x, cache=cache) * x)

  want, g_want = nnx.jit(lambda mod: nnx.value_and_grad(loss)(mod))(layer)
  zoo.attention.use_sharding(layer, parallel.Sharding(mesh, strategy="halo"))
  got, g_got = nnx.jit(lambda mod: nnx.value_and_grad(loss)(mod))(layer)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  flat_got, flat_want = nnx.to_flat_state(g_got), nnx.to_flat_state(g_want)
  assert len(flat_got) == len(flat_want) >= (6 if spans else 5)
  for (path, a), (_, b) in zip(flat_got, flat_want):
    np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()),
                               rtol=1e-4, atol=1e-5, err_msg=str(path))
  zoo.attention.use_sharding(layer, parallel.Sharding(mesh, strategy="ring"))
  with pytest.raises(ValueError, match="halo"):
    layer(x, cache=cache)
