"""The wiring: one-way imports, one registry, and a new family added in a few lines.

`CosineAttention` below is the README's example of adding a family: cosine-similarity
attention, softmax(tau * cos(q_i, k_j)) v, with its options dataclass, core, one
sequence-parallel strategy built from the generic blocks, and one registry line. It runs
in both backbones and split over 8 simulated devices, checked against a NumPy reference.
"""

import ast
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_adaptive_span, lm_bytes, vit_digits
from zoo import attention, models, parallel
from zoo import config as config_lib
from zoo.attention import core, registry
from zoo.attention.heads import MultiHeadAttention
from zoo.attention.options import ProjectionOptions, nonnegative_number
from zoo.parallel import sequence

ZOO = pathlib.Path(__file__).resolve().parents[1] / "zoo"


# ----------------------------------------------------------------------------- example family

def cosine_attention(q, k, v, *, causal=False, mask=None, temperature=10.0):
  """softmax_j(tau * q_i.k_j / (|q_i| |k_j|)) v_j."""
  qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  s = temperature * jnp.einsum("bqhd,bkhd->bhqk", qn, kn)
  if causal:
    s = jnp.where(sequence.causal_block_mask(q.shape[1], k.shape[1])[None, None], s, -1e30)
  if mask is not None:
    s = jnp.where(mask, s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@dataclasses.dataclass(frozen=True)
class CosineOptions(ProjectionOptions):
  temperature: float = 10.0

  def check(self):
    super().check()
    nonnegative_number("temperature", self.temperature)


class CosineAttention(MultiHeadAttention):
  family = "cosine_example"
  Options = CosineOptions
  core = core.AttentionCore(
      "cosine_example", cosine_attention,
      strategies={"all_gather": lambda q, k, v, *, mesh, causal, layout, **kw:
                  sequence.all_gather_attention(cosine_attention, q, k, v, mesh=mesh,
                                                causal=causal, **kw)},
      flops=core.dot_product_flops)

  def core_kwargs(self, q, k, v, *, grid):
    return {"temperature": self.options.temperature}


if "cosine_example" not in registry.names():
  registry.register("cosine_example", CosineAttention, description="cosine-similarity attention")


def _reference(q, k, v, causal, temperature):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  s = temperature * np.einsum("bqhd,bkhd->bhqk", qn, kn)
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("causal", [False, True])
def test_example_family_core_matches_reference(causal):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 2, 8)) for i in range(3))
  np.testing.assert_allclose(cosine_attention(q, k, v, causal=causal, temperature=3.0),
                             _reference(q, k, v, causal, 3.0), rtol=1e-5, atol=1e-6)


def test_example_family_in_both_backbones_and_options_checked():
  vit = models.create({"name": "vit", "variant": None, "width": 16, "depth": 2, "mlp_dim": 32,
                       "num_heads": 2, "patch_size": 2, "image_size": 8, "in_channels": 1,
                       "num_classes": 10, "attention": "cosine_example",
                       "attention_options": {"temperature": 5.0}}, nnx.Rngs(0))
  logits, _ = vit(jnp.ones((2, 8, 8, 1)))
  assert logits.shape == (2, 10)
  layer = vit.Transformer.encoderblock_0.MultiHeadDotProductAttention_0
  assert isinstance(layer, CosineAttention) and layer.options.temperature == 5.0
  lm = models.create({"name": "lm", "width": 16, "depth": 1, "num_heads": 2, "max_len": 8,
                      "attention": "cosine_example"}, nnx.Rngs(0))
  tokens = jnp.arange(8)[None]
  changed = tokens.at[0, 4:].set(100)
  a, b = lm(tokens)[0], lm(changed)[0]
  # Causal: changing tokens 4..7 leaves the logits of positions 0..3 unchanged.
  np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(a[0, 4:] - b[0, 4:])).max() > 1e-3
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\] .*temperature"):
    registry.validate("cosine_example", {"temprature": 1.0}, causal=False)
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
    registry.validate("cosine_example", {"temperature": -1.0}, causal=False)
  with pytest.raises(ValueError, match="no sequence-parallel 'ring' strategy"):
    attention.sequence_parallel_attention(*(jnp.ones((1, 8, 2, 4)),) * 3,
                                          mesh=parallel.make_mesh({"seq": 8}),
                                          kind="cosine_example", strategy="ring")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_example_family_sequence_parallel_layer_equals_one_device():
  sharding = parallel.Sharding(parallel.make_mesh({"data": 2, "seq": 4}), strategy="all_gather")
  layer = registry.make("cosine_example", width=16, num_heads=2, causal=True,
                        rngs=nnx.Rngs(0), temperature=4.0)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  expected = layer(x)
  attention.use_sharding(layer, sharding)
  got = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- registry, FLOPs

def test_registry_is_the_one_option_table():
  """Configs, TransformerSeq and the checkpoint check read their options from the
  registry's dataclasses; no module walks signatures for options any more."""
  for name in attention.names():
    family = attention.get(name)
    assert config_lib.attention_option_defaults(name) == family.option_defaults()
    required = {"window": 4} if name == "aft_local" else {}  # AFT-local has no default window
    family.options(required)  # the defaults with the preset validate
  for name in ("softmax", "relu", "aft_simple"):
    assert dict(lm_bytes.get_config(f"attention={name}").model.attention_options) == (
        attention.get(name).option_defaults())
  assert dict(vit_digits.get_config("attention=relu,alpha=0.5").model.attention_options) == {
      **attention.get("relu").option_defaults(), "alpha": 0.5}
  for name in attention.names(cached=True):
    options = dict(lm_adaptive_span.get_config(f"attention={name}").model.attention_options)
    assert set(options) == set(attention.get(name).option_defaults(cached=True))
  assert attention.names(cached=True) == sorted(
      ["adaptive_span", "persistent_memory", "softmax", "pointwise", "relu", "relu2", "gelu",
       "softplus", "identity", "relu6", "sigmoid"])
  assert attention.get("relu").option_defaults()["activation"] == "relu"
  assert {"block_size", "query_block_size", "implementation"} <= (
      attention.get("relu").options_class.compute_only_names())
  with pytest.raises(ValueError, match="attention 'relu' fixes activation='relu'"):
    registry.validate("relu", {"activation": "gelu"}, causal=True)
  for path in ZOO.rglob("*.py"):  # (zoo.models reads its constructors' default attention)
    if path != ZOO / "models" / "__init__.py":
      assert not re.search(r"import inspect|inspect\.signature", path.read_text()), \
          f"{path} inspects signatures"


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_dot_product_flops_match_xla_cost_analysis(kind):
  """Non-causal dense paths: the formula (matmuls only) within 5% of XLA's count (which
  adds the elementwise work); causal counts only the visible pairs, (L + 1) / (2L) of it."""
  length, heads, head_dim = 256, 4, 32
  fn = attention.get(kind).layer.core.fn
  q = jnp.ones((1, length, heads, head_dim))
  cost = jax.jit(lambda q, k, v: fn(q, k, v, causal=False, mask=None)).lower(
      q, q, q).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = attention.get(kind).layer.core.flops
  full = flops(q_len=length, kv_len=length, heads=heads, head_dim=head_dim, causal=False)
  assert full == pytest.approx(cost["flops"], rel=0.05)
  causal = flops(q_len=length, kv_len=length, heads=heads, head_dim=head_dim, causal=True)
  assert causal == pytest.approx(full * (length + 1) / (2 * length))
  layer = registry.make(kind, width=heads * head_dim, num_heads=heads, causal=False,
                        rngs=nnx.Rngs(0))
  x = jnp.ones((1, length, heads * head_dim))
  layer_cost = nnx.jit(lambda m, x: m(x)).lower(layer, x).compile().cost_analysis()
  layer_cost = layer_cost[0] if isinstance(layer_cost, (list, tuple)) else layer_cost
  assert layer.flops(length) == pytest.approx(full + 2 * length * 4 * (heads * head_dim) ** 2)
  assert layer.flops(length) == pytest.approx(layer_cost["flops"], rel=0.05)


# ----------------------------------------------------------------------------- imports

def _imports(path: pathlib.Path):
  """(module imported, inside a function?) for every import in a file."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module:
        found.append((child.module, in_function))
        found.extend((f"{child.module}.{a.name}", in_function) for a in child.names)
      visit(child, inner)

  visit(tree, False)
  return found


def test_parallel_is_a_leaf_and_training_knows_no_family():
  for path in (ZOO / "parallel").rglob("*.py"):
    bad = [m for m, _ in _imports(path) if m.startswith("zoo.") and not m.startswith("zoo.parallel")]
    assert not bad, f"{path} imports {bad}"
  families = {p.name if p.is_dir() else p.stem for p in (ZOO / "attention").iterdir()
              if not p.name.startswith("_")} - {"registry", "options", "core", "base",
                                                   "masking", "logspace", "heads"}
  for path in (ZOO / "training").rglob("*.py"):
    bad = [m for m, _ in _imports(path)
           if m.startswith("zoo.attention.") and m.split(".")[2] in families]
    assert not bad, f"{path} imports attention families {bad}"


def test_checkpoints_sit_below_training():
  """zoo.checkpoints reads files and fills models; the trainer calls it, never the reverse."""
  for path in (ZOO / "checkpoints").rglob("*.py"):
    bad = [m for m, _ in _imports(path) if m.startswith("zoo.training")]
    assert not bad, f"{path} imports {bad}"


def test_no_imports_inside_functions():
  optional = {"PIL", "torch", "submitit", "safetensors"}  # optional dependencies only
  for path in ZOO.rglob("*.py"):
    late = [m for m, inside in _imports(path) if inside and m.split(".")[0] not in optional]
    assert not late, f"{path} imports inside a function: {late}"
