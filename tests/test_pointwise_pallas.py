"""The fused Pallas pointwise-attention kernel (`zoo/attention/pointwise/pallas.py`).

On the CPU the kernels run in Pallas interpret mode (same kernel code, the interpreter
instead of Triton), against a naive einsum reference written here from the formula

    o_i = ls_i * sum_{j visible to i} h(q_i . k_j / sqrt(d)) v_j

(no zoo code; `jax.vjp` of it gives the reference gradients). The Triton lowering itself
(every activation, causal, bfloat16, and float32 with head_dim 128) is checked by
lowering for CUDA from the CPU, which builds the Triton IR without a GPU.

Tiles: every kernel (forward, dq, dk/dv) gets its own tiles and launch parameters from
the tuning table (`pallas.kernel_config`), `config=` or the explicit arguments; the
cases below give each kernel different query and key tiles (query tile != key tile,
lengths no tile divides, causal and not, the split and the atomic backward), check the
causal loop bounds against a brute-force count of the visible (query, key) pairs, and
check that the table's parameters reach the pallas_calls. `benchmarks/tune_pallas.py` is
run as a dry run in the interpreter, and its selection logic with stand-in timings.
The shape and activation sweep is marked slow.

Tolerances: kernel and reference both in float32 (reference matmuls at "highest"
precision), so values and gradients agree within atol = 2e-5 * max(1, max |reference|)
(sums of <= 72 products of O(1) terms). bfloat16 inputs: finite, and within
3e-2 * max(1, max |float32 result|) of the kernel's float32 result on the same
(bfloat16-rounded) inputs. Interpret mode compiles slowly (~2-3 s a kernel on 2 cores), so
the shapes are small and the blocks 16 and 32 (which Triton accepts too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.attention import registry
from zoo.attention.pointwise import pallas as pointwise_pallas
from zoo.attention.pointwise import ACTIVATIONS, PointwiseAttention, pointwise_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------ per-kernel tiles, causal


def _launch(bq, bk, warps=4, stages=2):
  return {"block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages}


def _check_against_reference(config, *, activation, causal, q_len, kv_len, d=32, seed=0):
  q, k, v, g = _inputs(1, q_len, kv_len, 2, d, seed=seed)
  ls = (1.0 + jnp.arange(2 * q_len, dtype=jnp.float32).reshape(1, 2, q_len, 1)) ** -0.5
  got = _value_and_grads(
      lambda q, k, v: pointwise_pallas.pointwise_attention_pallas(
          q, k, v, ls, activation=activation, causal=causal, config=config, interpret=True),
      q, k, v, g)
  want = _value_and_grads(
      lambda q, k, v: _reference(q, k, v, ls, activation=activation, causal=causal),
      q, k, v, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(a, b, ATOL)


# (causal, q_len, kv_len, config): each kernel with its own tiles, query tile != key tile,
# lengths no tile divides (padded to the largest tile of each axis), both backwards.
TILE_CASES = [
    (False, 72, 56, {"fwd": _launch(32, 16), "dq": _launch(16, 32), "dkdv": _launch(16, 64),
                     "backward": "split"}),
    (True, 88, 88, {"fwd": _launch(16, 32), "dq": _launch(32, 16), "dkdv": _launch(32, 16),
                    "backward": "split"}),
    (True, 88, 72, {"fwd": _launch(64, 16), "dkdv": _launch(16, 32), "backward": "atomic"}),
    (False, 40, 72, {"fwd": _launch(16, 16), "dkdv": _launch(32, 16), "backward": "atomic"}),
]


@pytest.mark.parametrize("causal,q_len,kv_len,config", TILE_CASES)
def test_per_kernel_tiles_match_reference(causal, q_len, kv_len, config):
  _check_against_reference(config, activation="relu", causal=causal, q_len=q_len,
                           kv_len=kv_len)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 64), (64, 16), (32, 128),
                                             (128, 32)])
def test_causal_loop_bounds_visit_exactly_the_visible_tiles(block_q, block_k):
  """Forward / dq: key blocks [0, full) wholly visible, [full, end) partly, the rest not
  at all; dk/dv: query blocks [0, start) see nothing of the key block, [start, unmasked)
  part, [unmasked, n) all. Brute force over every (query, key) pair of each tile."""
  for q_len, kv_len in ((256, 256), (192, 320), (320, 192)):
    nq, nk = q_len // block_q, kv_len // block_k

    def seen(i, j):  # how many of tile (i, j)'s pairs have key <= query
      qs = np.arange(i * block_q, (i + 1) * block_q)[:, None]
      ks = np.arange(j * block_k, (j + 1) * block_k)[None, :]
      return int((ks <= qs).sum())

    whole = block_q * block_k
    for i in range(nq):
      full, end = (int(x) for x in pointwise_pallas.causal_key_block_range(
          i, block_q, block_k, nk))
      kinds = ["all" if seen(i, j) == whole else "some" if seen(i, j) else "none"
               for j in range(nk)]
      assert kinds == ["all"] * full + ["some"] * (end - full) + ["none"] * (nk - end)
    for j in range(nk):
      start, unmasked = (int(x) for x in pointwise_pallas.causal_query_block_range(
          j, block_q, block_k, nq))
      kinds = ["all" if seen(i, j) == whole else "some" if seen(i, j) else "none"
               for i in range(nq)]
      assert kinds == (["none"] * start + ["some"] * (unmasked - start)
                       + ["all"] * (nq - unmasked))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "relu2", "gelu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", ["split", "atomic"])
def test_tile_sweep_matches_reference(activation, causal, backward):
  """Square and rectangular tiles of every kernel, lengths around the tiles."""
  tiles = [(16, 16), (16, 32), (32, 16), (64, 16), (16, 64), (32, 32)]
  for n, (bq, bk) in enumerate(tiles):
    config = {"fwd": _launch(bq, bk), "dq": _launch(bk, bq), "dkdv": _launch(bq, bk),
              "backward": backward}
    for q_len, kv_len in ((2 * max(bq, bk) + 8, 2 * max(bq, bk) + 8), (50, 97)):
      _check_against_reference(config, activation=activation, causal=causal, q_len=q_len,
                               kv_len=kv_len, seed=n)


# ------------------------------------------------------------------------------ tuning table


def _entry(length, *, dtype="bfloat16", causal=False, head_dim=64, fwd=(64, 32), dq=(32, 64),
           dkdv=(16, 64), backward="split"):
  return {"length": length, "head_dim": head_dim, "dtype": dtype, "causal": causal,
          "fwd": _launch(*fwd, 8, 3), "dq": _launch(*dq, 4, 4), "dkdv": _launch(*dkdv, 4, 5),
          "backward": backward}


def test_kernel_config_nearest_entry_and_default():
  table = {"entries": [_entry(1024, fwd=(16, 16)), _entry(16384, fwd=(128, 128)),
                       _entry(4096, causal=True, fwd=(32, 32), backward="atomic")]}
  pointwise_pallas.check_table(table)

  def fwd(length, **kw):
    cfg = pointwise_pallas.kernel_config(length, kw.pop("head_dim", 64),
                                         kw.pop("dtype", jnp.bfloat16), kw.pop("causal", False),
                                         table=table)
    return cfg["fwd"]["block_q"], cfg["backward"], cfg["source"]

  # nearest in log2 length: 3000 (11.55) -> 1024, 5000 (12.29) -> 16384, 4096 (12, a tie)
  # -> the longer; past the largest entry, the largest
  assert fwd(1024)[0] == 16 and fwd(700)[0] == 16 and fwd(3000)[0] == 16
  assert fwd(5000)[0] == 128 and fwd(4096)[0] == 128 and fwd(65536)[0] == 128
  assert fwd(4096, causal=True)[:2] == (32, "atomic")  # causal entries for causal calls only
  assert fwd(1024, head_dim=48)[0] == 16  # head_dim is padded to 64 before the look-up
  for other in (dict(dtype=jnp.float32), dict(head_dim=128)):
    default = fwd(1024, **other)
    assert default[0] == 128 and default[2].startswith("default")
  untuned = pointwise_pallas.kernel_config(4096, 64, jnp.bfloat16, False, table={"entries": []})
  assert untuned["fwd"] == _launch(128, 64, 4, 2) and untuned["dq"] == _launch(128, 64, 4, 2)
  assert untuned["dkdv"] == _launch(64, 128, 4, 2) and untuned["backward"] == "split"
  assert pointwise_pallas.kernel_config(4096, 128, jnp.bfloat16, False,
                                        table={"entries": []})["fwd"]["num_warps"] == 8


def _pallas_calls(fn, *args):
  """{kernel name: (grid, num_warps, num_stages)} of the pallas_calls in fn's jaxpr."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        params = eqn.params["compiler_params"]
        params = next(iter(params.values())) if isinstance(params, dict) else params
        name = str(eqn.params.get("name_and_src_info", eqn.params.get("name"))).split()[0]
        found[name] = (tuple(eqn.params["grid_mapping"].grid), params.num_warps,
                       params.num_stages)
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (list, tuple)) else [value]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_table_from_environment_reaches_the_kernels(tmp_path, monkeypatch):
  """ZOO_PALLAS_TUNING names a JSON table; its entry's tiles and Triton parameters set
  the three pallas_calls; config= and the explicit arguments override it."""
  table = {"format": 1, "source": "test", "measured_on": "test",
           "entries": [_entry(128, dtype="float32", causal=True)]}
  path = tmp_path / "table.json"
  path.write_text(json.dumps(table))
  monkeypatch.setenv(pointwise_pallas.TUNING_ENV, str(path))
  q, k, v, g = _inputs(1, 100, 100, 2, 64)

  def grads(**kw):
    return lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(
        pointwise_pallas.pointwise_attention_pallas(q, k, v, causal=True, interpret=True, **kw)
        * g), argnums=(0, 1, 2))(q, k, v)

  calls = _pallas_calls(grads(), q, k, v)
  # 100 queries and keys padded to 128 (the largest tiles: 64 queries, 64 keys... of dq,
  # dkdv); fwd holds 64 queries, dq 32, dk/dv 64 keys
  assert calls["pointwise_attention_fwd"] == ((2, 1, 2), 8, 3)
  assert calls["pointwise_attention_dq"] == ((4, 1, 2), 4, 4)
  assert calls["pointwise_attention_dkdv"] == ((2, 1, 2), 4, 5)
  calls = _pallas_calls(grads(config={"dkdv": {"block_k": 16}, "backward": "atomic"}), q, k, v)
  assert set(calls) == {"pointwise_attention_fwd", "pointwise_attention_dkdv"}
  assert calls["pointwise_attention_dkdv"] == ((8, 1, 2), 4, 5)
  calls = _pallas_calls(grads(block_q=32, block_k=16, num_warps=2), q, k, v)
  assert calls["pointwise_attention_fwd"] == ((4, 1, 2), 2, 3)
  assert calls["pointwise_attention_dkdv"] == ((4, 1, 2), 2, 5)  # holds block_q keys
  # the table's tiles give the right values too
  _check_against_reference(None, activation="relu", causal=True, q_len=100, kv_len=100,
                           d=64)
  assert pointwise_pallas.resolve_config(100, 100, 64, jnp.float32, True)["source"].startswith(
      "tuning table entry length=128")


def test_check_table_refusals(tmp_path, monkeypatch):
  good = _entry(1024)
  for bad, match in [
      ({**good, "fwd": _launch(24, 64)}, "power of two"),
      ({**good, "backward": "fused"}, "backward"),
      ({**good, "head_dim": 48}, "head_dim"),
      ({**good, "dtype": "int8"}, "dtype"),
      ({**good, "dq": {"block_q": 64}}, "missing"),
      ({**good, "dkdv": {**good["dkdv"], "num_warps": 3}}, "num_warps"),
      ({k: v for k, v in good.items() if k != "causal"}, "causal"),
  ]:
    with pytest.raises(ValueError, match=match):
      pointwise_pallas.check_table({"entries": [bad]})
  with pytest.raises(ValueError, match="repeats"):
    pointwise_pallas.check_table({"entries": [good, dict(good)]})
  path = tmp_path / "broken.json"
  path.write_text("{not json")
  monkeypatch.setenv(pointwise_pallas.TUNING_ENV, str(path))
  with pytest.raises(ValueError, match="ZOO_PALLAS_TUNING"):
    pointwise_pallas.tuning_table()
  with pytest.raises(ValueError, match="num_stages"):
    monkeypatch.delenv(pointwise_pallas.TUNING_ENV)
    pointwise_pallas.pointwise_attention_pallas(*_inputs(1, 8, 8, 1, 16)[:3], interpret=True,
                                                config={"fwd": {"num_stages": 0}})


def test_committed_table_is_valid_and_honest():
  """No GPU measured it (measured_on None): then it has no entries and says so; a
  measured one names the GPU and keeps each entry's timings."""
  table = pointwise_pallas.pallas_tuning.TABLE
  pointwise_pallas.check_table(table)
  if table["measured_on"] is None:
    assert table["entries"] == [] and "untuned" in table["source"]
  else:
    assert table["jax_version"] and table["date"]
    assert all(e["ms"]["fwd_bwd"] > 0 and e["ms"]["fwd_bwd_default"] > 0
               for e in table["entries"])


def test_atomic_backward_lowers_to_triton(monkeypatch):
  monkeypatch.setattr(pointwise_pallas, "_on_gpu", lambda: True)
  x = jnp.ones((1, 200, 2, 64), jnp.bfloat16)
  for causal in (False, True):
    def loss(q, k, v):
      return jnp.sum(pointwise_pallas.pointwise_attention_pallas(
          q, k, v, causal=causal, config={"backward": "atomic"}).astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("triton") >= 2  # the fwd and the dk/dv(+dq) kernels


# ------------------------------------------------------------------------------ the tuner


def _tuner():
  spec = importlib.util.spec_from_file_location("bench_tune_pallas",
                                                ROOT / "benchmarks" / "tune_pallas.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tuner_refuses_the_cpu_and_dry_runs_in_the_interpreter(tmp_path, capsys):
  tune = _tuner()
  if jax.default_backend() == "cpu":
    assert tune.main(["--out", str(tmp_path / "no.json")]) == 1
    assert "no GPU here" in capsys.readouterr().out
    assert not (tmp_path / "no.json").exists()
  with pytest.raises(SystemExit):
    tune.main(["--interpret"])  # only with --dry-run
  out = tmp_path / "dry.json"
  assert tune.main(["--interpret", "--dry-run", "--lengths", "32", "--max-candidates", "2",
                    "--causal", "true", "--out", str(out)]) == 0
  table = json.loads(out.read_text())
  pointwise_pallas.check_table(table)
  assert table["measured_on"] is None and table["entries"] == []
  assert table["settings"]["dry_run"] and "dry run" in table["source"]
  trials = table["trials"]
  assert {t["phase"] for t in trials} == {"fwd", "dq", "dkdv", "atomic"}
  assert all(t["ok"] and t["max_rel_error"] < 3e-2 and "ms" not in t for t in trials)
  assert any(t["config"]["backward"] == "atomic" for t in trials)
  assert tune.install(out, tmp_path / "module.py") == 1  # a dry run is never installed


def test_tuner_candidates_and_selection(tmp_path, monkeypatch):
  """Candidates: the default first, tiles capped to the length, no duplicates. Selection,
  with stand-in timings: the fastest per kernel, the atomic backward only when > 3%
  faster, and the entry installs into a module that the kernel reads back."""
  tune = _tuner()
  for phase in tune.PHASES:
    cands = tune.candidates(phase, 4096, 64)
    assert cands[0] == tune.default_config(4096, 64)["dkdv" if phase == "atomic" else phase]
    assert len(cands) == len({json.dumps(c, sort_keys=True) for c in cands})
    assert all(max(c["block_q"], c["block_k"]) <= 32 for c in tune.candidates(phase, 20, 64))
  assert tune.default_config(4096, 64) == {
      k: v for k, v in pointwise_pallas.kernel_config(
          4096, 64, jnp.bfloat16, False, table={"entries": []}).items() if k != "source"}

  def fake_ms(config, forward_only):
    # fwd: 128x128 w8 s2 is best; dq: 128x32 best; dk/dv: 32x128 best; atomic 2% or 10% off
    f = config["fwd"]
    ms = 1.0 - 0.3 * (f["block_k"] == 128 and f["num_warps"] == 8 and f["num_stages"] == 2)
    if forward_only:
      return ms
    ms += 2.0 - 0.5 * (config["dq"]["block_k"] == 32) - 0.4 * (config["dkdv"]["block_q"] == 32)
    return ms * (atomic_factor if config["backward"] == "atomic" else 1.0)

  def fake_trial(self, phase, config, *, forward_only=False):
    record = {**self._key(), "phase": phase, "config": config, "ok": True,
              "max_rel_error": 0.0, "error": None, "ms": fake_ms(config, forward_only)}
    self.trials.append(record)
    return record

  compile_s, seconds = tune.time_call(lambda x: x * 2.0, (jnp.ones(8),), repeats=2)
  assert compile_s > 0 and 0 < seconds < 1
  monkeypatch.setattr(tune.Bucket, "trial", fake_trial)
  args = argparse.Namespace(interpret=False, dry_run=False, max_candidates=100,
                            no_atomic=False, batch=1, heads=8, repeats=1)
  for atomic_factor, backward in ((0.98, "split"), (0.90, "atomic")):
    bucket = tune.Bucket(4096, 64, "bfloat16", True, args, {}, lambda s: None)
    entry = bucket.run(deadline=math.inf)
    assert entry["backward"] == backward
    assert (entry["fwd"]["block_q"], entry["fwd"]["block_k"]) == (128, 128)
    assert entry["dq"]["block_k"] == 32 and entry["dkdv"]["block_q"] == 32
    assert entry["ms"]["fwd"] == pytest.approx(0.7) and entry["ms"]["fwd_default"] == 1.0
    assert entry["ms"]["fwd_bwd_default"] == pytest.approx(3.0)
    assert entry["ms"]["fwd_bwd"] == pytest.approx((0.7 + 1.1) * (1 if backward == "split"
                                                                  else 0.9))
    assert any(t["phase"] == "base" for t in bucket.trials)  # the all-default baseline
  # an out-of-time bucket tries nothing and writes no entry
  bucket = tune.Bucket(4096, 64, "bfloat16", True, args, {}, lambda s: None)
  assert bucket.run(deadline=0.0) is None and not bucket.trials

  table = {"format": 1, "source": "test", "measured_on": "Test GPU", "jax_version": "0",
           "date": "today", "settings": {"dry_run": False}, "entries": [entry], "trials": []}
  path = tmp_path / "table.json"
  path.write_text(json.dumps(table))
  module = tmp_path / "pallas_tuning.py"
  module.write_text(tune.TABLE_MODULE.read_text())
  assert tune.install(path, module) == 0
  installed = runpy.run_path(str(module))["TABLE"]
  assert installed["measured_on"] == "Test GPU" and "trials" not in installed
  assert installed["entries"] == [entry]
  assert installed.keys() >= {"format", "source", "jax_version", "date"}
