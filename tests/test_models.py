"""Backbones: every registered attention in the ViT and the LM, big_vision names and sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import attention, models
from zoo.models import DecoderLM, ViT


def _num_params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _param_paths(module) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param).to_pure_dict())[0]
  return {"/".join(str(k.key) for k in path) for path, _ in flat}


# Options some families cannot default. (AFT-full's and AFT-local's `max_len` is filled
# from the backbone: see test_max_len_from_the_backbone.)
REQUIRED_OPTIONS = {"aft_local": {"window": 3}}


def _tiny_vit(name, **kw):
  return ViT(None, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=2, image_size=8,
             in_channels=1, num_classes=10, attention=name,
             attention_options=REQUIRED_OPTIONS.get(name), rngs=nnx.Rngs(0), **kw)


# Families whose backbone run is slow to compile and is repeated in their own test file
# (test_aft.py::test_in_vit / test_in_lm_causal, test_soft.py::test_vit_forward_and_backward,
# test_adaptive_span.py / test_segment_lm.py): here only under `-m slow`.
HEAVY = {"aft_conv", "soft", "adaptive_span"}


def _names(supports):
  return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
          for n in attention.names() if supports(attention.get(n))]


@pytest.mark.parametrize("name", _names(lambda family: family.supports_noncausal))
def test_every_attention_in_vit(name):
  model = _tiny_vit(name)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  logits, out = model(x)
  assert logits.shape == (3, 10)
  assert np.all(np.isfinite(np.asarray(out["encoded"])))
  # Gradients reach every parameter (head is zero-initialised, so look below it).
  grads = nnx.grad(lambda m: jnp.sum(m(x)[1]["encoded"] ** 2))(model)
  qk = grads["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["value"]["kernel"]
  assert float(jnp.abs(qk[...]).sum()) > 0


@pytest.mark.parametrize("name", _names(lambda family: family.supports_causal))
def test_every_causal_attention_in_lm(name):
  lm = DecoderLM(width=16, depth=2, num_heads=2, max_len=12, attention=name,
                 attention_options=REQUIRED_OPTIONS.get(name), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  logits, _ = lm(tokens)
  assert logits.shape == (2, 12, 256)
  # Causality through the whole model: changing a later token leaves earlier logits alone.
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  logits2, _ = lm(changed)
  np.testing.assert_allclose(logits[:, :7], logits2[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:, 7:], logits2[:, 7:])


def _attention(model, i=0):
  return getattr(model.Transformer, f"encoderblock_{i}").MultiHeadDotProductAttention_0


@pytest.mark.parametrize("name", ["aft_full", "aft_local"])
def test_max_len_from_the_backbone(name):
  """Unset (or None, as configs leave it) max_len = the backbone's token count: the ViT's
  patches (+1 with a class token), the LM's max_len; a given one is kept."""
  for pool, tokens in (("gap", 16), ("tok", 17)):
    for opts in ({}, {"max_len": None}):
      vit = nnx.eval_shape(lambda: ViT(None, width=16, depth=2, mlp_dim=32, num_heads=2,
                                       patch_size=2, image_size=8, in_channels=1,
                                       pool_type=pool, attention=name, rngs=nnx.Rngs(0),
                                       attention_options={"window": 3, **opts}
                                       if name == "aft_local" else opts))
      assert [_attention(vit, i).max_len for i in range(2)] == [tokens] * 2
      assert _attention(vit).pos_bias_u.shape == (tokens, 128)
  lm = nnx.eval_shape(lambda: DecoderLM(width=16, depth=1, num_heads=2, max_len=12,
                                        attention=name, rngs=nnx.Rngs(0),
                                        attention_options=REQUIRED_OPTIONS.get(name)))
  assert _attention(lm).max_len == 12
  given = {**REQUIRED_OPTIONS.get(name, {}), "max_len": 40}
  lm = nnx.eval_shape(lambda: DecoderLM(width=16, depth=1, num_heads=2, max_len=12,
                                        attention=name, attention_options=given,
                                        rngs=nnx.Rngs(0)))
  assert _attention(lm).max_len == 40
  # Families without a max_len option get none.
  lm = DecoderLM(width=16, depth=1, num_heads=2, max_len=12, attention="aft_simple",
                 rngs=nnx.Rngs(0))
  assert not hasattr(_attention(lm), "max_len")


def test_vit_posemb_none():
  model = ViT(None, width=16, depth=1, mlp_dim=16, num_heads=2, patch_size=4, image_size=8,
              num_classes=5, posemb="none", rngs=nnx.Rngs(0))
  assert "pos_embedding" not in _param_paths(model)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  _, out = nnx.jit(lambda m, x: m(x))(model, x)
  # Without a position embedding the tokens enter the encoder as the patch embedding.
  np.testing.assert_array_equal(np.asarray(out["with_posemb"]),
                                np.asarray(out["stem"]).reshape(2, 4, 16))


def test_vit_parameter_names_match_big_vision():
  model = ViT("mu/4", num_classes=10, image_size=16, pool_type="tok", rngs=nnx.Rngs(0))
  expected = {"embedding/kernel", "embedding/bias", "pos_embedding", "cls", "head/kernel",
              "head/bias", "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
  block = "Transformer/encoderblock_0/"
  expected |= {block + f"LayerNorm_{i}/{p}" for i in (0, 1) for p in ("scale", "bias")}
  expected |= {block + f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")}
  expected |= {block + f"MultiHeadDotProductAttention_0/{n}/{p}"
               for n in ("query", "key", "value", "out") for p in ("kernel", "bias")}
  assert _param_paths(model) == expected
  mha = model.Transformer.encoderblock_0.MultiHeadDotProductAttention_0
  assert mha.query.kernel.shape == (32, 2, 16) and mha.out.kernel.shape == (2, 16, 32)
  assert model.embedding.kernel.shape == (4, 4, 3, 32)
  map_model = ViT("mu/4", num_classes=10, image_size=16, pool_type="map", rngs=nnx.Rngs(0))
  assert {"MAPHead_0/probe", "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel",
          "MAPHead_0/LayerNorm_0/scale", "MAPHead_0/MlpBlock_0/Dense_1/bias"} <= _param_paths(map_model)


# DeiT (Touvron et al. 2021) Table 1 and ViT (Dosovitskiy et al. 2021) Table 1, at 224 px,
# 1000 classes, class token. timm's counts are exactly `width` higher because timm's
# position table has a slot for the class token; big_vision (and this zoo) add the position
# embedding before the class token is prepended.
@pytest.mark.parametrize("variant,params,paper", [
    ("Ti/16", 5_717_416, "5M (DeiT-Ti)"),
    ("S/16", 22_050_664, "22M (DeiT-S)"),
    ("B/16", 86_567_656, "86M (ViT-B, DeiT-B)"),
])
def test_vit_parameter_counts(variant, params, paper):
  model = nnx.eval_shape(lambda: ViT(variant, pool_type="tok", rngs=nnx.Rngs(0)))
  width = models.decode_variant(variant)["width"]
  assert _num_params(model) == params - width, paper


def test_causal_only_and_noncausal_only_families_fail_clearly():
  causal_only = [n for n in attention.names() if not attention.get(n).supports_noncausal]
  noncausal_only = [n for n in attention.names() if not attention.get(n).supports_causal]
  for name in causal_only:
    with pytest.raises(ValueError, match="causal-only"):
      _tiny_vit(name)
  for name in noncausal_only:
    with pytest.raises(ValueError, match="no causal form"):
      DecoderLM(width=16, depth=1, num_heads=2, max_len=8, attention=name, rngs=nnx.Rngs(0))


def test_vit_options_and_bad_inputs():
  for pool in ("gap", "tok", "map", "0"):
    for posemb in ("learn", "sincos2d"):
      model = ViT("mu/4", num_classes=5, image_size=8, pool_type=pool, posemb=posemb,
                  rngs=nnx.Rngs(0))
      assert model(jnp.zeros((2, 8, 8, 3)))[0].shape == (2, 5)
  with pytest.raises(ValueError, match="variant"):
    ViT("Q/16", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pool_type"):
    ViT("mu/4", pool_type="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="posemb"):
    ViT("mu/4", posemb="sincos", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible"):
    ViT("mu/5", image_size=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expects images"):
    ViT("mu/4", image_size=8, rngs=nnx.Rngs(0))(jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="unknown attention"):
    ViT("mu/4", attention="nope", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="activation"):
    ViT("mu/4", attention="pointwise", attention_options={"activation": "tanh"}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="alpha"):
    ViT("mu/4", attention="relu", attention_options={"alpha": -1.0}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown option"):
    ViT("mu/4", attention="softmax", attention_options={"alpha": 1.0}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of num_heads"):
    ViT(None, width=10, depth=1, mlp_dim=8, num_heads=3, patch_size=4, rngs=nnx.Rngs(0))


def test_lm_options_and_bad_inputs():
  for posemb in ("learn", "sincos"):
    for tied in (True, False):
      lm = DecoderLM(width=16, depth=1, num_heads=2, max_len=8, posemb=posemb,
                     tied_embedding=tied, rngs=nnx.Rngs(0))
      assert lm(jnp.zeros((1, 8), jnp.int32))[0].shape == (1, 8, 256)
      assert ("head/kernel" in _param_paths(lm)) == (not tied)
  with pytest.raises(ValueError, match="max_len"):
    lm(jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="posemb"):
    DecoderLM(posemb="rope", rngs=nnx.Rngs(0))


def test_create_from_config_and_bfloat16():
  cfg = dict(name="vit", variant=None, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2,
             image_size=8, in_channels=1, num_classes=10, attention="relu",
             attention_options={"alpha": 1.0}, dtype="bfloat16")
  model = models.create(cfg, nnx.Rngs(0))
  logits, _ = model(jnp.ones((2, 8, 8, 1)))
  assert logits.dtype == jnp.bfloat16
  assert model.head.kernel[...].dtype == jnp.float32  # float32 params, bf16 compute
  with pytest.raises(ValueError, match="model.name"):
    models.create({"name": "resnet"}, nnx.Rngs(0))
  with pytest.raises(ValueError, match="bad model config"):
    models.create({"name": "lm", "widht": 3}, nnx.Rngs(0))
