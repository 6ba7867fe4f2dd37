"""SOFT (Lu et al. 2021): Newton inverse, Gaussian kernel, functional core and module.

* Fixtures (`/work/shared/fixtures`, README section SOFT) from the authors' code: the Newton
  inverse and its backward in float64 (to 1e-8 relative), and a whole
  `SoftmaxFreeAttention` layer in float32 (to 1e-5 relative).
* A naive reference written here from the paper's formulas, with no zoo code: it
  materialises the n x n Nystrom matrix K1 (K2 + ridge I)^{-1} K1^T with an exact inverse
  in float64 (NumPy for values; jax.numpy under x64 for `jax.grad`).
* Memory: no n x n array in the core's jaxpr, forward or backward.
* The module inside the ViT and the LM, and option errors.

"Relative" error below is max |got - ref| / max |ref|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import models
from zoo import parallel
from zoo.attention import registry
from zoo.attention import sequence_parallel_attention, use_sharding
from zoo.attention import soft  # registers "soft"

from tests.helpers import fixture_path
from tests.helpers import x64 as _x64


def _rngs(seed=0):
  # The "rbg" key makes parameter initialisation compile in a fraction of threefry's time
  # on CPU (each new parameter shape compiles its own random-bits kernel).
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _fixture(name):
  return np.load(fixture_path(name))


def _rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------
# (a) Newton inverse against the authors' `newton_inv` and its backward.

_newton = jax.jit(lambda a, n, ridge: soft.newton_inverse(a, num_iters=n, ridge=ridge),
                  static_argnums=(1, 2))


def test_newton_inverse_matches_authors_fixture():
  data = _fixture("soft_newton_inverse.npz")
  assert float(data["ridge"]) == 0.01
  with _x64():
    for i in range(3):
      a = jnp.asarray(data[f"A_{i}"])
      assert a.dtype == jnp.float64
      for n in data["iters"]:
        v = _newton(a, int(n), 0.01)
        assert v.dtype == jnp.float64
        err = _rel(v, data[f"inv_{i}_iters{n}"])
        assert err < 1e-8, (i, int(n), err)


def test_newton_inverse_fixture_used_a_float32_ridge():
  """The authors add 0.01 * torch.eye(m) with a float32 eye, so in float64 their ridge is
  float32(0.01) = 0.0099999998; with that ridge the match is to rounding (1e-13)."""
  data = _fixture("soft_newton_inverse.npz")
  with _x64():
    for i in range(3):
      a = jnp.asarray(data[f"A_{i}"])
      for n in data["iters"]:
        v = _newton(a, int(n), float(np.float32(0.01)))
        assert _rel(v, data[f"inv_{i}_iters{n}"]) < 1e-13


def test_newton_inverse_gradient_matches_authors_fixture():
  data = _fixture("soft_newton_inverse.npz")
  vjp = jax.jit(jax.grad(lambda x, g: jnp.sum(soft.newton_inverse(x, num_iters=20) * g)))
  with _x64():
    for i in range(3):
      a, g = jnp.asarray(data[f"A_{i}"]), jnp.asarray(data[f"G_{i}"])
      grad = vjp(a, g)
      err = _rel(grad, data[f"grad_{i}_iters20"])
      assert err < 1e-8, (i, err)


def test_newton_inverse_differentiate_iterations_is_autodiff():
  """differentiate_iterations=True: the derivative of the computed V (finite differences,
  few iterations, far from convergence), which differs there from -V^T G V^T."""
  rng = np.random.default_rng(0)
  with _x64():
    p = rng.normal(size=(2, 5, 2)) * 0.6
    a = jnp.asarray(np.exp(-0.5 * np.sum((p[:, :, None] - p[:, None]) ** 2, -1)))
    f = jax.jit(lambda x: soft.newton_inverse(x, num_iters=3, differentiate_iterations=True))
    g = jnp.asarray(rng.normal(size=a.shape))
    grad = jax.jit(jax.grad(lambda x, g, n, diff: jnp.sum(soft.newton_inverse(
        x, num_iters=n, differentiate_iterations=diff) * g)), static_argnums=(2, 3))
    through = grad(a, g, 3, True)
    for _ in range(3):  # directional derivatives by central differences
      e = jnp.asarray(rng.normal(size=a.shape))
      eps = 1e-6
      fd = (jnp.sum(f(a + eps * e) * g) - jnp.sum(f(a - eps * e) * g)) / (2 * eps)
      np.testing.assert_allclose(jnp.sum(through * e), fd, rtol=1e-6)
    assert _rel(through, grad(a, g, 3, False)) > 1e-3  # -V^T G V^T is not exact at 3 steps
    # At convergence both are the derivative of (A + ridge I)^{-1}.
    exact, through = grad(a, g, 40, False), grad(a, g, 40, True)
    true = jax.jit(jax.grad(lambda x: jnp.sum(jnp.linalg.inv(x + 0.01 * jnp.eye(5)) * g)))(a)
    assert _rel(exact, true) < 1e-10 and _rel(through, true) < 1e-10


def test_newton_inverse_ridge_zero_converges_to_numpy_inverse():
  data = _fixture("soft_newton_inverse.npz")
  with _x64():
    a = np.asarray(data["A_1"])  # condition numbers up to ~30
    v = _newton(jnp.asarray(a), 40, 0.0)
    assert _rel(v, np.linalg.inv(a)) < 1e-10
    assert _rel(v, np.linalg.pinv(a)) < 1e-10
    v = _newton(jnp.asarray(a), 40, 0.01)
    assert _rel(v, np.linalg.inv(a + 0.01 * np.eye(49))) < 1e-10


# ----------------------------------------------------------------------------------------
# (b) The whole layer against the authors' SoftmaxFreeAttention (conv landmarks, conv 3).


def _load_master(module, data, heads, head_dim, width):
  """Maps the authors' PyTorch state dict into SoftAttention (see the docstring of
  zoo/attention/soft/__init__.py)."""
  t = lambda k: jnp.asarray(data[k])
  mapping = {
      ("query", "kernel"): t("W_q/weight").T.reshape(width, heads, head_dim),
      ("query", "bias"): t("W_q/bias").reshape(heads, head_dim),
      ("value", "kernel"): t("W_v/weight").T.reshape(width, heads, head_dim),
      ("value", "bias"): t("W_v/bias").reshape(heads, head_dim),
      ("out", "kernel"): t("ff/weight").T.reshape(heads, head_dim, width),
      ("out", "bias"): t("ff/bias"),
      ("landmark_conv", "kernel"): t("attn/Qlandmark_op/weight").transpose(2, 3, 1, 0),
      ("landmark_norm", "scale"): t("attn/Qnorm_act/0/weight"),
      ("landmark_norm", "bias"): t("attn/Qnorm_act/0/bias"),
      ("value_conv", "kernel"): t("attn/conv/weight").transpose(2, 3, 1, 0),
  }
  for (layer, name), value in mapping.items():
    param = getattr(getattr(module, layer), name)
    assert param.get_value().shape == value.shape, (layer, name)
    param.set_value(value)


def test_module_matches_authors_fixture():
  data = _fixture("soft_attention_master.npz")
  width, heads = 64, 2
  # Built abstractly (no initialiser runs); every parameter is then set from the fixture,
  # so a parameter the mapping missed would still be a ShapeDtypeStruct and fail below.
  module = nnx.eval_shape(lambda: soft.SoftAttention(
      width, heads, landmarks="conv", ratio=2, conv_size=3, num_iters=20, rngs=_rngs()))
  _load_master(module, data, heads, width // heads, width)
  assert all(isinstance(p, jax.Array) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
  x = jnp.asarray(data["x"])
  assert x.dtype == jnp.float32
  grid = (int(data["H"]), int(data["W"]))
  y = nnx.jit(lambda m, x: m(x, grid=grid))(module, x)
  assert y.dtype == jnp.float32 and y.shape == data["y"].shape
  err = _rel(y, data["y"])
  assert err < 1e-5, err


# ----------------------------------------------------------------------------------------
# (c) The functional core against a naive n x n Nystrom reference.


def _naive(xp, q, v, landmarks, ridge):
  """Paper Eq. 2-3 from the formulas: K1 (K2 + ridge I)^{-1} K1^T V with an exact inverse.

  q `[b, n, h, d]` is the raw (unscaled) tied query/key; landmarks `[b, m, h, d]` are in the
  rescaled space q / d^{1/4}, so the Gaussian between q_i and l_j is
  exp(-|q_i / d^{1/4} - l_j|^2 / 2) and between landmarks exp(-|l_i - l_j|^2 / 2).
  """
  d = q.shape[-1]
  qs = xp.transpose(q, (0, 2, 1, 3)) / d ** 0.25  # [b, h, n, d]
  lm = xp.transpose(landmarks, (0, 2, 1, 3))
  vt = xp.transpose(v, (0, 2, 1, 3))
  sq = lambda a, b: xp.sum((a[..., :, None, :] - b[..., None, :, :]) ** 2, axis=-1)
  k1 = xp.exp(-sq(qs, lm) / 2)  # [b, h, n, m]
  k2 = xp.exp(-sq(lm, lm) / 2)
  m = k2.shape[-1]
  s = k1 @ xp.linalg.inv(k2 + ridge * xp.eye(m)) @ xp.swapaxes(k1, -1, -2)  # [b, h, n, n]
  return xp.transpose(s @ vt, (0, 2, 1, 3))


_core = jax.jit(lambda q, v, l, n, ridge: soft.soft_attention(q, v, l, num_iters=n, ridge=ridge),
                static_argnums=(3, 4))


def _well_conditioned(seed=0, b=2, n=24, m=6, h=2, d=4):
  rng = np.random.default_rng(seed)
  landmarks = rng.normal(size=(b, m, h, d)) * 0.7
  # Queries near the landmarks (in the rescaled space), so K1 is not ~0.
  near = landmarks[:, rng.integers(0, m, size=n)] + rng.normal(size=(b, n, h, d)) * 0.4
  q = near * d ** 0.25
  v = rng.normal(size=(b, n, h, d))
  sq = np.sum((landmarks[:, :, None] - landmarks[:, None]) ** 2, -1)  # [b, m, m, h]
  cond = np.linalg.cond(np.moveaxis(np.exp(-sq / 2), -1, 1))
  assert np.max(cond) < 50, cond
  return q, v, landmarks


@pytest.mark.parametrize("ridge", [0.01, 0.0])
def test_core_matches_naive_nystrom_values(ridge):
  q, v, landmarks = _well_conditioned()
  ref = _naive(np, q, v, landmarks, ridge)
  with _x64():
    out = _core(jnp.asarray(q), jnp.asarray(v), jnp.asarray(landmarks), 40, ridge)
    assert out.dtype == jnp.float64
    assert _rel(out, ref) < 1e-10
  out32 = _core(jnp.asarray(q, jnp.float32), jnp.asarray(v, jnp.float32),
                jnp.asarray(landmarks, jnp.float32), 40, ridge)
  assert out32.dtype == jnp.float32
  assert _rel(out32, ref) < 1e-5


def test_core_matches_naive_nystrom_gradients():
  """Both backward modes give the naive reference's gradient (w.r.t. q, v, landmarks) once
  the iterations have converged: dK2 = -V^T G V^T is then exact."""
  q, v, landmarks = _well_conditioned(seed=1)
  g = np.random.default_rng(2).normal(size=v.shape)
  with _x64():
    args = tuple(jnp.asarray(x) for x in (q, v, landmarks))
    naive = lambda *a: jnp.sum(_naive(jnp, *a, 0.01) * g)
    ref = jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(*args)
    for diff_iters in (False, True):
      core = lambda *a: jnp.sum(soft.soft_attention(
          *a, num_iters=40, differentiate_iterations=diff_iters) * g)
      got = jax.jit(jax.grad(core, argnums=(0, 1, 2)))(*args)
      for name, a, b in zip(("q", "v", "landmarks"), got, ref):
        assert _rel(a, b) < 1e-9, (name, diff_iters)


def test_pool_landmarks_give_the_papers_kernel():
  """With pooled landmarks, K1 is Eq. 2's exp(-|q_i - avgpool(q)_j|^2 / (2 sqrt(d))) on the
  raw queries: pooling the rescaled queries equals rescaling the pooled ones."""
  rng = np.random.default_rng(3)
  b, rows, cols, h, d, k = 1, 4, 6, 2, 4, 2
  q = rng.normal(size=(b, rows * cols, h, d)) * 0.8
  v = rng.normal(size=(b, rows * cols, h, d))
  pooled_raw = q.reshape(b, rows // k, k, cols // k, k, h, d).mean(axis=(2, 4))
  pooled_raw = pooled_raw.reshape(b, -1, h, d)
  with _x64():
    pool = jax.jit(soft.pool_landmarks, static_argnums=(1, 2))
    landmarks = pool(jnp.asarray(q) * soft.query_scale(d), (rows, cols), k)
    assert landmarks.shape == (b, 6, h, d)
    np.testing.assert_allclose(landmarks, pooled_raw / d ** 0.25, rtol=1e-12)
    out = _core(jnp.asarray(q), jnp.asarray(v), landmarks, 40, 0.01)
  # The reference with the paper's 1/(2 sqrt(d)) bandwidth on raw q and raw pooled q.
  sq = lambda a, c: np.sum((a[:, :, None] - c[:, None]) ** 2, -1)  # [b, n, m, h]
  k1 = np.moveaxis(np.exp(-sq(q, pooled_raw) / (2 * np.sqrt(d))), -1, 1)
  k2 = np.moveaxis(np.exp(-sq(pooled_raw, pooled_raw) / (2 * np.sqrt(d))), -1, 1)
  s = k1 @ np.linalg.inv(k2 + 0.01 * np.eye(6)) @ np.swapaxes(k1, -1, -2)
  ref = np.transpose(s @ np.transpose(v, (0, 2, 1, 3)), (0, 2, 1, 3))
  assert _rel(out, ref) < 1e-10


# ----------------------------------------------------------------------------------------
# (d) Gaussian kernel clamp, and no n x n array anywhere in the core.


def test_gaussian_kernel_clamps_negative_squared_distances():
  rng = np.random.default_rng(0)
  x = jnp.asarray(100.0 + rng.normal(size=(64, 16)), jnp.float32)  # large norms: cancellation
  raw = (jnp.sum(x * x, -1)[:, None] + jnp.sum(x * x, -1)[None, :] - 2 * x @ x.T)
  assert float(jnp.min(raw)) < 0  # the expanded form does go negative in float32 here
  k = jax.jit(soft.gaussian_kernel)(x, x)
  assert float(jnp.max(k)) <= 1.0
  assert np.all(np.isfinite(np.asarray(k)))
  np.testing.assert_array_less(0.98, np.diag(np.asarray(k)))
  # And the kernel is exp(-|x - y|^2 / 2) for ordinary inputs.
  a, c = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 7, 4))
  ref = np.exp(-np.sum((a[:, :, None] - c[:, None]) ** 2, -1) / 2)
  with _x64():
    np.testing.assert_allclose(jax.jit(soft.gaussian_kernel)(jnp.asarray(a), jnp.asarray(c)), ref,
                               rtol=1e-12)


def _jaxpr_shapes(jaxpr):
  """Every intermediate shape in a (closed) jaxpr and the jaxprs nested in its equations."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _jaxpr_shapes(sub)


def _has_n_by_n(jaxpr, n):
  return any(sum(dim == n for dim in shape) >= 2 for shape in _jaxpr_shapes(jaxpr))


def test_no_n_by_n_array_in_forward_or_backward():
  b, n, m, h, d = 1, 256, 16, 2, 8
  q = jnp.ones((b, n, h, d))
  landmarks = jnp.ones((b, m, h, d))
  g = jnp.ones((b, n, h, d))
  for diff_iters in (False, True):
    f = lambda q, v, l: jnp.sum(soft.soft_attention(
        q, v, l, differentiate_iterations=diff_iters) * g)
    fwd = jax.make_jaxpr(f)(q, q, landmarks)
    bwd = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, q, landmarks)
    shapes = set(_jaxpr_shapes(bwd))
    assert (b, h, n, m) in shapes  # K1 is there
    assert not _has_n_by_n(fwd, n) and not _has_n_by_n(bwd, n), diff_iters
  # The check would see one: the naive reference materialises [b, h, n, n].
  naive = jax.make_jaxpr(lambda q, v, l: _naive(jnp, q, v, l, 0.01))(q, q, landmarks)
  assert _has_n_by_n(naive, n)


# ----------------------------------------------------------------------------------------
# (e) In the backbones.

_OPTIONS = dict(landmarks="conv", ratio=2, conv_size=3)


def _vit(pool_type="gap", **options):
  return models.ViT(None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=2,
                    image_size=8, in_channels=1, num_classes=10, pool_type=pool_type,
                    attention="soft", attention_options=options, rngs=_rngs())


def test_vit_forward_and_backward():
  model = _vit(**_OPTIONS)
  attn = model.Transformer.encoderblock_0.MultiHeadDotProductAttention_0
  assert isinstance(attn, soft.SoftAttention)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 1)), jnp.float32)

  @nnx.jit
  def forward_backward(model, x):
    def loss(model):
      logits, out = model(x)
      return jnp.sum(out["encoded"] ** 2), (logits, out["encoded"])
    return nnx.grad(loss, has_aux=True)(model)

  grads, (logits, encoded) = forward_backward(model, x)
  assert logits.shape == (3, 10)
  assert np.all(np.isfinite(np.asarray(encoded)))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  a = grads["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  for name in ("query", "value", "out", "landmark_conv", "value_conv"):
    assert float(jnp.abs(a[name]["kernel"][...]).sum()) > 0, name
  assert float(jnp.abs(a["landmark_norm"]["scale"][...]).sum()) > 0


def test_pool_module_is_the_core_on_pooled_rescaled_queries():
  """landmarks="pool": no landmark parameters; the module's output is out(core(q, v,
  avgpool(q / d^{1/4}))) plus, with conv_size, the depthwise convolution of V."""
  module = soft.SoftAttention(32, 2, landmarks="pool", ratio=2, conv_size=0, rngs=_rngs())
  assert module.landmark_conv is None and module.value_conv is None
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)), jnp.float32)

  @nnx.jit
  def both(m, x):
    q, v = m.query(x), m.value(x)
    lm = soft.pool_landmarks(q * soft.query_scale(16), (4, 4), 2)
    return m(x, grid=(4, 4)), m.out(soft.soft_attention(q, v, lm))

  got, want = both(module, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_vit_with_class_token_fails_clearly():
  model = _vit(pool_type="tok", **_OPTIONS)
  with pytest.raises(ValueError, match="SOFT attention needs the 2-D patch grid"):
    model(jnp.zeros((1, 8, 8, 1)))


def test_lm_fails_with_the_causal_message():
  with pytest.raises(ValueError, match="'soft' has no causal form"):
    models.DecoderLM(width=16, depth=1, num_heads=2, max_len=8, attention="soft",
                     rngs=_rngs())
  with pytest.raises(ValueError, match="'soft' has no causal form"):
    models.validate({"name": "lm", "attention": "soft"})
  with pytest.raises(ValueError, match="SOFT.*no causal form"):  # built directly
    soft.SoftAttention(16, 2, causal=True, rngs=_rngs())
  assert not registry.get("soft").supports_causal


def test_module_rejects_masks_and_bad_grids():
  module = soft.SoftAttention(32, 2, rngs=_rngs())  # the ViT test's shapes: cached inits
  x = jnp.zeros((1, 12, 32))
  with pytest.raises(ValueError, match="does not support attention masks"):
    module(x, mask=jnp.ones((1, 1, 1, 12), bool), grid=(3, 4))
  with pytest.raises(ValueError, match="does not match the sequence length"):
    module(x, grid=(3, 5))
  with pytest.raises(ValueError, match="needs the 2-D patch grid"):
    module(x)
  with pytest.raises(ValueError, match="smaller than the landmark ratio"):
    module(jnp.zeros((1, 4, 32)), grid=(1, 4))
  # A grid that is not a multiple of the ratio is floored: 3x5 -> 1x2 landmarks.

  @nnx.jit
  def run(m, x):
    q = m.query(x) * soft.query_scale(16)
    return m(x, grid=(3, 5)), m.make_landmarks(q, (3, 5))

  y, landmarks = run(module, jnp.asarray(np.random.default_rng(0).normal(size=(2, 15, 32)),
                                         jnp.float32))
  assert landmarks.shape == (2, 2, 2, 16)
  assert y.shape == (2, 15, 32) and np.all(np.isfinite(np.asarray(y)))


# ----------------------------------------------------------------------------------------
# (f) Bad options name the option.


@pytest.mark.parametrize("option,value", [
    ("landmarks", "random"), ("ratio", 0), ("ratio", 1.5), ("conv_size", 2),
    ("conv_size", -1), ("num_iters", -1), ("num_iters", 2.0), ("ridge", -0.1),
    ("ridge", float("nan")),
])
def test_bad_options_raise_naming_the_option(option, value):
  with pytest.raises(ValueError, match=option):
    registry.make("soft", width=16, num_heads=2, causal=False, rngs=_rngs(),
                  **{option: value})
  with pytest.raises(ValueError, match=option):
    _vit(**{**_OPTIONS, option: value})


def test_unknown_option_and_bad_newton_arguments():
  with pytest.raises(ValueError, match="unknown option"):
    registry.validate("soft", {"landmark": "conv"}, causal=False)
  with pytest.raises(ValueError, match="num_iters"):
    soft.newton_inverse(jnp.eye(3), num_iters=-2)
  with pytest.raises(ValueError, match="ridge"):
    soft.soft_attention(jnp.ones((1, 4, 1, 2)), jnp.ones((1, 4, 1, 2)),
                        jnp.ones((1, 2, 1, 2)), ridge=-1.0)
  with pytest.raises(ValueError, match="square"):
    soft.newton_inverse(jnp.ones((2, 3)))


# ----------------------------------------------------------------------------------------
# (g) Sequence parallel (zoo.attention.soft.parallel) on 8 simulated CPU devices.


def _rel_tree(got, want):
  """Largest relative error over the leaves; leaves that are zero must be zero in both."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    if not np.any(np.asarray(b)):
      assert not np.any(np.asarray(a))
    else:
      worst = max(worst, _rel(a, b))
  return worst


@pytest.mark.parametrize("strategy", [
    "all_gather", pytest.param("gspmd", marks=pytest.mark.slow)])
def test_sequence_parallel_core_equals_single_device(strategy):
  """Pooled landmarks on an 8x6 grid, ratio 2, mesh data 2 x seq 4 (2 grid rows, one row of
  landmark windows per shard): values and gradients to 1e-5."""
  mesh = parallel.make_mesh({"data": 2, "seq": 4})
  rows, cols, d = 8, 6, 8
  rng = np.random.default_rng(4)
  q, v, g = (jnp.asarray(rng.normal(size=(2, rows * cols, 2, d)) * s, jnp.float32)
             for s in (2.0, 1.0, 1.0))  # spread-out queries: well-conditioned K2

  def split(q, v):
    return sequence_parallel_attention(q, q, v, mesh=mesh, kind="soft", strategy=strategy,
                                       grid=(rows, cols), ratio=2)

  def single(q, v):
    return soft.soft_attention(q, v, soft.pool_landmarks(q * soft.query_scale(d),
                                                         (rows, cols), 2))

  loss = lambda f: lambda q, v: jnp.sum(f(q, v) * g)
  out, grads = jax.jit(lambda q, v: (split(q, v), jax.grad(loss(split), (0, 1))(q, v)))(q, v)
  want, want_grads = jax.jit(lambda q, v: (single(q, v), jax.grad(loss(single), (0, 1))(q, v)))(
      q, v)
  assert out.sharding.spec[1] == "seq"
  assert _rel(out, want) < 1e-5
  assert _rel(grads[0], want_grads[0]) < 1e-5 and _rel(grads[1], want_grads[1]) < 1e-5


def _encoded_and_grads(model, x, g):
  def loss(model):
    _, out = model(x)
    return jnp.sum(out["encoded"] * g), out["encoded"]
  return nnx.grad(loss, has_aux=True)(model)


def test_sequence_parallel_vit_equals_single_device(monkeypatch):
  """The ViT's SOFT layers (conv landmarks, 3x3 convolution on V) with the trainer's
  sharding (strategy all_gather), mesh data 4 x seq 2 (a 4x4 grid: 2 rows per shard): the
  landmarks are gathered, K1^T V is psum'd and the convolution's boundary rows
  ppermuted; encoder output and every parameter's gradient equal one device's."""
  model = _vit(**_OPTIONS)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)
  step = nnx.jit(_encoded_and_grads)
  want_grads, want = step(model, x, g)
  mesh = parallel.make_mesh({"data": 4, "seq": 2})
  implementation, calls = soft.CORE.strategies["all_gather"], []
  monkeypatch.setitem(soft.CORE.strategies, "all_gather",
                      lambda *a, **kw: calls.append(kw["grid"]) or implementation(*a, **kw))
  use_sharding(model, parallel.Sharding(mesh, strategy="all_gather"))
  grads, got = nnx.jit(_encoded_and_grads)(model, x, g)
  assert calls == [(4, 4)]  # the split path ran (traced once; one layer)
  assert _rel(got, want) < 1e-5
  got_grads, want_grads = (nnx.state(t, nnx.Param) for t in (grads, want_grads))
  assert _rel_tree(got_grads, want_grads) < 1e-5
  attn = lambda t: t["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  for name in ("landmark_conv", "value_conv", "query"):
    assert _rel(attn(got_grads)[name]["kernel"][...], attn(want_grads)[name]["kernel"][...]) \
        < 1e-5, name


def test_sequence_parallel_bad_split_fails_clearly():
  model = _vit(**_OPTIONS)  # 4x4 grid, ratio 2
  x = jnp.zeros((4, 8, 8, 1))
  use_sharding(model, parallel.Sharding(parallel.make_mesh({"data": 2, "seq": 4}),
                                        strategy="all_gather"))
  with pytest.raises(ValueError, match=r"4x4 patch grid is split by rows .*\(4 shards\).*"
                                       r"1 rows per shard are not a multiple of the "
                                       r"landmark ratio 2.*work for this grid: \[1, 2\]"):
    model(x)
  use_sharding(model, parallel.Sharding(parallel.make_mesh({"data": 1, "seq": 8}),
                                        strategy="ring"))
  with pytest.raises(ValueError, match="'soft' has no sequence-parallel 'ring' strategy; "
                                       r"available: \['all_gather', 'gspmd'\]"):
    model(x)
  with pytest.raises(ValueError, match="6 rows do not divide by 4"):
    soft.rows_per_shard((6, 4), 4, 1)
  assert soft.rows_per_shard((12, 5), 3, 2) == 4
  assert soft.rows_per_shard((5, 5), 1, 2) == 5  # one shard: floored as unsplit
  with pytest.raises(ValueError, match=r"work for this grid: \[1, 3\]"):
    soft.rows_per_shard((6, 5), 2, 2)
  q = jnp.zeros((4, 16, 2, 8))
  mesh = parallel.make_mesh({"data": 4, "seq": 2})
  with pytest.raises(ValueError, match="needs learned parameters"):
    sequence_parallel_attention(q, q, q, mesh=mesh, kind="soft", strategy="all_gather",
                                grid=(4, 4), landmarks="conv")
  with pytest.raises(ValueError, match="ties keys to queries"):
    sequence_parallel_attention(q, q + 1, q, mesh=mesh, kind="soft", strategy="all_gather",
                                grid=(4, 4))
  with pytest.raises(ValueError, match="needs the depthwise filters"):
    sequence_parallel_attention(q, q, q, mesh=mesh, kind="soft", strategy="gspmd",
                                grid=(4, 4), conv_size=3)


def test_lm_config_with_soft_fails_at_config_validation():
  """`python train.py --config configs/lm_bytes.py:attention=soft` stops in
  `validate_config`, before any data, model or workdir exists."""
  from configs import lm_bytes  # pylint: disable=import-outside-toplevel
  from zoo import training  # pylint: disable=import-outside-toplevel
  config = lm_bytes.get_config("attention=soft")
  assert config.model.attention == "soft"
  with pytest.raises(ValueError, match="attention 'soft' has no causal form, so it cannot be "
                                       "used in a causal language model"):
    training.validate_config(config)
  training.validate_config(lm_bytes.get_config("attention=softmax"))  # the check is SOFT's


# ----------------------------------------------------------------------------------------
# (h) FLOPs.


def test_flops_count_the_matrix_products():
  """Per head 2nm(d + 2dv) + 2m^2(d + dv) + 4 I m^3, plus the learned landmarks'
  convolution 2m k^2 d^2 and the depthwise one on V 2n c^2 dv; the layer adds its q, v and
  out projections. XLA's count of the pooled core (its matmuls and a few elementwise
  ops; it counts a loop body once, so one Newton step) agrees to 10%."""
  n, m, d, h, k, c, iters = 36, 9, 16, 4, 2, 3, 20
  layer = soft.SoftAttention(64, h, rngs=_rngs())  # conv landmarks, conv_size 3
  core = h * (2 * n * m * 3 * d + 2 * m * m * 2 * d + 4 * iters * m**3)
  convs = h * (2 * m * k * k * d * d + 2 * n * c * c * d)
  assert layer.core_flops(n, (6, 6)) == core + convs
  assert layer.flops(n, (6, 6)) == 2 * n * 3 * 64 * 64 + core + convs
  with pytest.raises(ValueError, match="needs the 2-D patch grid"):
    layer.flops(n)
  q = jnp.ones((1, 32 * 32, 2, 32))
  f = jax.jit(lambda q, v: soft.CORE.fn(q, q, v, causal=False, mask=None, grid=(32, 32),
                                        ratio=4, num_iters=1))
  cost = f.lower(q, q).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  want = soft.CORE.flops(q_len=32 * 32, kv_len=32 * 32, heads=2, head_dim=32, causal=False,
                         grid=(32, 32), ratio=4, num_iters=1)
  assert abs(cost["flops"] / want - 1) < 0.1, (cost["flops"], want)
