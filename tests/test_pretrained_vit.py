"""Pretrained ViTs: the publishers' own logits from their files, strict accounting,
loading softmax weights into other attentions, position-table resampling, export.

The fixtures (../shared/fixtures/pretrained/, see its README) were written by big_vision,
timm and Hugging Face transformers themselves, with the logits each library computes on a
fixed input. Tolerance: 1e-5 absolute on logits of magnitude ~1 (float32; the observed
differences are ~1e-6).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import fixture_path
from zoo import checkpoints, models
from zoo.checkpoints import files
from zoo.checkpoints import vit as vit_lib
from zoo.checkpoints.files import CheckpointError
from zoo.models import ViT

TOL = 1e-5
BV = "pretrained/bigvision_vit_mu16d2_{}.npz"
TIMM = "pretrained/timm_vit_tiny_patch16_w32d2_32px.safetensors"
HF = "pretrained/hf_vit_w32d2_32px.safetensors"


def _vit(pool="tok", image_size=32, seed=0, **kw):
  kw = {"variant": "mu/16", "depth": 2, "num_classes": 10, **kw}
  return ViT(kw.pop("variant"), image_size=image_size, pool_type=pool,
             head_zeroinit=False, rngs=nnx.Rngs(seed), **kw)


def _params(model):
  return {k: np.asarray(v.get_value()) for k, v in checkpoints.loading.model_parameters(model).items()}


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


# ----------------------------------------------------------------------------- publishers' logits

@pytest.mark.parametrize("name", ["tok", "map", "gap", "tok_legacy"])
def test_big_vision_logits_and_pre_logits(name):
  path = fixture_path(BV.format(name))
  io = files.read_npz(path)
  model = _vit(pool=name.split("_")[0])
  report = checkpoints.load(str(path), model)
  logits, out = model(jnp.asarray(io["__input__"]))
  np.testing.assert_allclose(logits, io["__logits__"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["pre_logits"], io["__pre_logits__"], atol=TOL, rtol=0)
  assert not report.kept and not report.ignored and not report.warnings
  assert report.sha256 == files.sha256(path)
  if name == "tok_legacy":
    assert any("pre-Linen" in n for n in report.notes)
    assert any("class token's position row" in n for n in report.notes)


def test_big_vision_resample_to_64px_equals_big_visions_own_load():
  path = fixture_path(BV.format("tok"))
  io = files.read_npz(path)
  model = _vit(pool="tok", image_size=64)
  report = checkpoints.load(str(path), model)
  assert report.resampled == {"pos_embedding": "(1, 4, 32) -> (1, 16, 32)"}
  np.testing.assert_allclose(model.pos_embedding[...], io["__pos_embedding_64__"], atol=1e-6)
  np.testing.assert_allclose(model(jnp.asarray(io["__input_64__"]))[0], io["__logits_64__"],
                             atol=TOL, rtol=0)


def _linear_resize_reference(table, old, new):
  """Separable linear interpolation with the corners aligned, one output at a time."""
  grid = table.reshape(old[0], old[1], -1).astype(np.float64)

  def coords(n_in, n_out):
    return [0.0] * n_out if n_out == 1 else [i * (n_in - 1) / (n_out - 1) for i in range(n_out)]

  out = np.zeros((new[0], new[1], grid.shape[-1]))
  for i, y in enumerate(coords(old[0], new[0])):
    for j, x in enumerate(coords(old[1], new[1])):
      y0, x0 = min(int(np.floor(y)), old[0] - 1), min(int(np.floor(x)), old[1] - 1)
      y1, x1 = min(y0 + 1, old[0] - 1), min(x0 + 1, old[1] - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * (1 - fx) * grid[y0, x0] + (1 - fy) * fx * grid[y0, x1]
                   + fy * (1 - fx) * grid[y1, x0] + fy * fx * grid[y1, x1])
  return out.reshape(1, new[0] * new[1], -1)


def test_resample_non_square_grid_against_a_plain_reference():
  table = np.random.RandomState(0).normal(size=(1, 9, 8)).astype(np.float32)
  got = vit_lib.resample_posemb(table, (3, 5))
  np.testing.assert_allclose(got, _linear_resize_reference(table, (3, 3), (3, 5)), atol=1e-5)
  got = vit_lib.resample_posemb(table, (6, 4))
  np.testing.assert_allclose(got, _linear_resize_reference(table, (3, 3), (6, 4)), atol=1e-5)
  # and into a model: a 2x2 table onto a 2x4 grid (32x64 images)
  model = _vit(pool="tok", image_size=(32, 64))
  report = checkpoints.load(str(fixture_path(BV.format("tok"))), model)
  assert report.resampled["pos_embedding"] == "(1, 4, 32) -> (1, 8, 32)"
  with pytest.raises(CheckpointError, match="not a square grid"):
    vit_lib.resample_posemb(table[:, :8], (4, 4))


@pytest.mark.parametrize("activation,key", [("gelu", "__logits__"),
                                            ("gelu_tanh", "__logits_gelu_tanh__")])
def test_timm_logits(activation, key):
  io = files.read_npz(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px_io.npz"))
  model = _vit(pool="tok", mlp_activation=activation, variant=None, width=32, num_heads=2,
               mlp_dim=128, patch_size=16)
  report = checkpoints.load(str(fixture_path(TIMM)), model)
  logits, out = model(_nhwc(io["__input_nchw__"]))
  np.testing.assert_allclose(logits, io[key], atol=TOL, rtol=0)
  if activation == "gelu":
    np.testing.assert_allclose(out["pre_logits"], io["__pre_logits__"], atol=TOL, rtol=0)
    assert not report.warnings
  else:  # loads, but says the publisher used the exact GELU
    assert any("mlp_activation='gelu'" in w for w in report.warnings)
  assert report.format == "timm" and any("fused qkv" in n for n in report.notes)


def test_hugging_face_logits_with_its_epsilon_and_gelu():
  io = files.read_npz(fixture_path("pretrained/hf_vit_w32d2_32px_io.npz"))
  config = checkpoints.describe(str(fixture_path(HF)))
  assert config["layernorm_epsilon"] == 1e-12 and config["mlp_activation"] == "gelu"
  assert config["num_heads"] == 2 and config["pool_type"] == "tok"
  model = models.create(config, nnx.Rngs(0))
  report = checkpoints.load(str(fixture_path(HF)), model)
  assert report.format == "hf_vit" and not report.warnings
  np.testing.assert_allclose(model(_nhwc(io["__input_nchw__"]))[0], io["__logits__"],
                             atol=TOL, rtol=0)
  # the epsilon matters at this tolerance: a 1e-6 model is told, and differs
  model = _vit(pool="tok", variant=None, width=32, num_heads=2, mlp_dim=128, patch_size=16,
               mlp_activation="gelu")
  report = checkpoints.load(str(fixture_path(HF)), model)
  assert any("layernorm_epsilon=1e-12" in w for w in report.warnings)


@pytest.mark.parametrize("name", [BV.format("tok"), BV.format("map"), BV.format("gap"),
                                  BV.format("tok_legacy"), TIMM, HF])
def test_describe_builds_the_model_each_fixture_loads_into_strictly(name):
  config = checkpoints.describe(str(fixture_path(name)))
  model = models.create(config, nnx.Rngs(1))
  checkpoints.load(str(fixture_path(name)), model, strict=True)


# ----------------------------------------------------------------------------- big_vision variants

def test_params_prefix_scan_stacked_blocks_and_subtree(tmp_path):
  fixture = files.read_npz(fixture_path(BV.format("tok")))
  io = {k: v for k, v in fixture.items() if k.startswith("__")}
  flat = vit_lib.without_reserved(fixture)
  stacked = {k: v for k, v in flat.items() if not k.startswith("Transformer/encoderblock_")}
  for name in [k for k in flat if k.startswith("Transformer/encoderblock_0/")]:
    rest = name.split("/", 2)[2]
    stacked[f"Transformer/encoderblock/{rest}"] = np.stack(
        [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
  training_ckpt = {**{f"params/{k}": v for k, v in stacked.items()},
                   "opt/state/count": np.zeros(()), **io}
  path = tmp_path / "train_state.npz"
  files.write_npz(path, training_ckpt)
  model = _vit()
  report = checkpoints.load(str(path), model)
  assert any("scan-stacked" in n for n in report.notes)
  np.testing.assert_allclose(model(jnp.asarray(io["__input__"]))[0], io["__logits__"], atol=TOL)
  two_tower = tmp_path / "two_tower.npz"
  files.write_npz(two_tower, {**{f"img/{k}": v for k, v in flat.items()},
                              "txt/Embed_0/embedding": np.zeros((3, 4), np.float32)})
  model = _vit(seed=3)
  checkpoints.load(f"{two_tower}:img", model)
  np.testing.assert_allclose(model(jnp.asarray(io["__input__"]))[0], io["__logits__"], atol=TOL)
  with pytest.raises(CheckpointError, match="nothing under 'image'"):
    checkpoints.load(f"{two_tower}:image", _vit())


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
  fixture = files.read_npz(fixture_path(BV.format("gap")))
  flat = {k: v.astype(jnp.bfloat16) for k, v in vit_lib.without_reserved(fixture).items()}
  path = tmp_path / "bf16.npz"
  files.write_npz(path, flat)
  model = _vit(pool="gap")
  checkpoints.load(str(path), model)
  params = _params(model)
  assert params["head/kernel"].dtype == np.float32
  np.testing.assert_array_equal(params["head/kernel"],
                                flat["head/kernel"].astype(np.float32))


# ----------------------------------------------------------------------------- strict accounting

def test_dont_load_head_for_another_class_count():
  path = str(fixture_path(BV.format("gap")))
  with pytest.raises(CheckpointError) as error:
    checkpoints.load(path, _vit(pool="gap", num_classes=5))
  assert "head/kernel (checkpoint (32, 10), model (32, 5))" in str(error.value)
  model = _vit(pool="gap", num_classes=5, seed=7)
  initial = _params(model)
  report = checkpoints.load(path, model, dont_load=("head/.*",))
  after = _params(model)
  np.testing.assert_array_equal(after["head/kernel"], initial["head/kernel"])
  np.testing.assert_array_equal(after["head/bias"], initial["head/bias"])
  assert report.kept == {"head/kernel": "dont_load", "head/bias": "dont_load"}
  assert set(report.ignored) == {"head/kernel", "head/bias"}
  fixture = files.read_npz(path)
  np.testing.assert_array_equal(after["embedding/kernel"], fixture["embedding/kernel"])


def test_strict_error_names_every_missing_and_unused_parameter():
  fixture = vit_lib.without_reserved(files.read_npz(fixture_path(BV.format("gap"))))
  flat = dict(fixture)
  del flat["Transformer/encoder_norm/scale"], flat["Transformer/encoderblock_1/LayerNorm_0/bias"]
  flat["extra/kernel"] = np.zeros((2, 2), np.float32)
  flat["Transformer/encoderblock_1/MlpBlock_0/Dense_9/bias"] = np.zeros(3, np.float32)
  model = _vit(pool="gap")
  before = _params(model)
  with pytest.raises(CheckpointError) as error:
    checkpoints.load(flat, model)
  message = str(error.value)
  for name in ("Transformer/encoder_norm/scale", "Transformer/encoderblock_1/LayerNorm_0/bias",
               "extra/kernel", "Transformer/encoderblock_1/MlpBlock_0/Dense_9/bias"):
    assert name in message
  assert "\n" not in message
  for name, value in _params(model).items():  # a refused load changes nothing
    np.testing.assert_array_equal(value, before[name])
  report = checkpoints.load(flat, model, strict=False)
  assert report.kept["Transformer/encoder_norm/scale"] == "not in the checkpoint"
  assert set(report.ignored) == {"extra/kernel", "Transformer/encoderblock_1/MlpBlock_0/Dense_9/bias"}
  np.testing.assert_array_equal(_params(model)["Transformer/encoder_norm/scale"],
                                before["Transformer/encoder_norm/scale"])


# ----------------------------------------------------------------------------- into other attentions

def test_softmax_checkpoint_into_relu_loads_strictly_and_computes_relu():
  path = str(fixture_path(BV.format("gap")))
  io = files.read_npz(path)
  model = _vit(pool="gap", attention="relu")
  report = checkpoints.load(path, model, strict=True)
  assert not report.kept
  softmax = _vit(pool="gap")
  checkpoints.load(path, softmax)
  for name, value in _params(softmax).items():
    np.testing.assert_array_equal(_params(model)[name], value)
  relu_logits = model(jnp.asarray(io["__input__"]))[0]
  assert np.abs(relu_logits - io["__logits__"]).max() > 1e-3  # another function


def test_softmax_into_qk_layernorm_strict_fails_naming_them_and_keeps_them_otherwise():
  path = str(fixture_path(BV.format("gap")))
  options = {"qk_layernorm": True}
  with pytest.raises(CheckpointError) as error:
    checkpoints.load(path, _vit(pool="gap", attention="relu", attention_options=options))
  for i in (0, 1):
    for ln in ("query_ln", "key_ln"):
      assert f"encoderblock_{i}/MultiHeadDotProductAttention_0/{ln}/scale" in str(error.value)
  model = _vit(pool="gap", attention="relu", attention_options=options, seed=5)
  initial = _params(model)
  report = checkpoints.load(path, model, strict=False)
  kept = {k for k in report.kept}
  assert kept == {f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{ln}/scale"
                  for i in (0, 1) for ln in ("query_ln", "key_ln")}
  for name in kept:
    np.testing.assert_array_equal(_params(model)[name], initial[name])
  assert len(report.loaded) == len(initial) - 4


def test_softmax_into_aft_full_reshapes_projections_and_keeps_position_biases():
  path = str(fixture_path(BV.format("gap")))
  fixture = files.read_npz(path)
  model = _vit(pool="gap", attention="aft_full", seed=2)
  initial = _params(model)
  with pytest.raises(CheckpointError, match="pos_bias_u"):
    checkpoints.load(path, model)
  report = checkpoints.load(path, model, strict=False)
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/"
  params = _params(model)
  np.testing.assert_array_equal(params[attn + "query/kernel"],
                                fixture[attn + "query/kernel"].reshape(32, 32))
  np.testing.assert_array_equal(params[attn + "out/kernel"],
                                fixture[attn + "out/kernel"].reshape(32, 32))
  np.testing.assert_array_equal(params[attn + "pos_bias_u"], initial[attn + "pos_bias_u"])
  assert attn + "pos_bias_u" in report.kept and not report.ignored


def test_softmax_into_soft_keeps_landmarks_and_ignores_the_key_projection():
  path = str(fixture_path(BV.format("gap")))
  model = _vit(pool="gap", attention="soft")
  report = checkpoints.load(path, model, strict=False)
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/"
  assert attn + "key/kernel" in report.ignored
  assert attn + "landmark_conv/kernel" in report.kept
  assert attn + "query/kernel" in report.loaded


# ----------------------------------------------------------------------------- timm variants

def _timm_state():
  state, meta = files.read_safetensors(fixture_path(TIMM))
  return dict(state), meta


def _timm_model(seed=0, **kw):
  return _vit(pool="tok", variant=None, width=32, num_heads=2, mlp_dim=128, patch_size=16,
              mlp_activation="gelu", seed=seed, **kw)


def test_timm_wrappers_module_prefix_and_layer_scale_folding():
  io = files.read_npz(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px_io.npz"))
  state, _ = _timm_state()
  rng = np.random.RandomState(0)
  scaled = dict(state)
  for i in (0, 1):  # DeiT-3 form: y = gamma * (x W + b); the same function when W, b / gamma
    for gamma_key, layer in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
      gamma = rng.uniform(0.5, 2.0, size=32).astype(np.float32)
      scaled[f"blocks.{i}.{gamma_key}"] = gamma
      scaled[f"blocks.{i}.{layer}.weight"] = state[f"blocks.{i}.{layer}.weight"] / gamma[:, None]
      scaled[f"blocks.{i}.{layer}.bias"] = state[f"blocks.{i}.{layer}.bias"] / gamma
  wrapped = {"model": {f"module.{k}": v for k, v in scaled.items()}, "epoch": 3}
  flat, notes = vit_lib.from_timm(wrapped, num_heads=2)
  assert any("layer scale" in n for n in notes)
  model = _timm_model()
  checkpoints.load(flat, model)  # a dict in big_vision names
  np.testing.assert_allclose(model(_nhwc(io["__input_nchw__"]))[0], io["__logits__"], atol=TOL)


def test_distilled_deit_token_refused_unless_dropped():
  state, _ = _timm_state()
  distilled = dict(state)
  distilled["dist_token"] = np.ones((1, 1, 32), np.float32)
  distilled["pos_embed"] = np.concatenate(
      [state["pos_embed"][:, :1], np.zeros((1, 1, 32), np.float32), state["pos_embed"][:, 1:]], 1)
  distilled["head_dist.weight"] = np.zeros((10, 32), np.float32)
  distilled["head_dist.bias"] = np.zeros(10, np.float32)
  flat, _ = vit_lib.from_timm(distilled, num_heads=2)
  with pytest.raises(CheckpointError, match="distill"):
    checkpoints.load(flat, _timm_model())
  io = files.read_npz(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px_io.npz"))
  model = _timm_model()
  checkpoints.load(flat, model, dont_load=("dist_token", "dist_pos_embedding", "head_dist/.*"))
  np.testing.assert_allclose(model(_nhwc(io["__input_nchw__"]))[0], io["__logits__"], atol=TOL)


# ----------------------------------------------------------------------------- export

def test_export_big_vision_round_trip_is_the_fixture(tmp_path):
  path = fixture_path(BV.format("map"))
  model = _vit(pool="map")
  checkpoints.load(str(path), model)
  out = tmp_path / "exported.npz"
  checkpoints.export(model, out, format="big_vision")
  fixture = vit_lib.without_reserved(files.read_npz(path))
  exported = files.read_npz(out)
  assert set(exported) == set(fixture)
  for name, value in fixture.items():
    np.testing.assert_array_equal(exported[name], value)


def test_export_timm_round_trip(tmp_path):
  io = files.read_npz(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px_io.npz"))
  model = _timm_model()
  checkpoints.load(str(fixture_path(TIMM)), model)
  out = tmp_path / "exported.safetensors"
  checkpoints.export(model, out, format="timm")
  state, meta = files.read_safetensors(out)
  original, _ = _timm_state()
  assert set(state) == set(original)
  for name, value in original.items():
    if name in ("cls_token", "pos_embed"):
      continue  # the class row is folded into cls_token (timm adds them: same sum)
    np.testing.assert_allclose(state[name], value, atol=1e-7, rtol=0)
  np.testing.assert_allclose(state["cls_token"] + state["pos_embed"][:, :1],
                             original["cls_token"] + original["pos_embed"][:, :1], atol=1e-7)
  kwargs = json.loads(meta["timm_kwargs"])
  assert kwargs["num_heads"] == 2 and kwargs["global_pool"] == "token"
  assert kwargs["act_layer"] == "gelu" and kwargs["img_size"] == [32, 32]
  again = _timm_model(seed=9)
  checkpoints.load(str(out), again)
  np.testing.assert_allclose(again(_nhwc(io["__input_nchw__"]))[0], io["__logits__"], atol=TOL)


@pytest.mark.parametrize("pool", ["gap", "map"])
def test_export_timm_gap_and_map_round_trip(tmp_path, pool):
  path = fixture_path(BV.format(pool))
  io = files.read_npz(path)
  model = _vit(pool=pool)
  checkpoints.load(str(path), model)
  out = tmp_path / "exported.safetensors"
  checkpoints.export(model, out, format="timm")
  again = _vit(pool=pool, seed=4)
  checkpoints.load(str(out), again)
  np.testing.assert_allclose(again(jnp.asarray(io["__input__"]))[0], io["__logits__"], atol=TOL)


def test_export_refuses_what_timm_cannot_run(tmp_path):
  with pytest.raises(CheckpointError, match="only a softmax ViT"):
    checkpoints.export(_vit(attention="relu"), tmp_path / "x.safetensors", format="timm")
  with pytest.raises(CheckpointError, match="format"):
    checkpoints.export(_vit(), tmp_path / "x.bin", format="onnx")
  assert not list(tmp_path.iterdir())


def test_another_head_split_is_refused_not_reshaped(tmp_path):
  two = _vit(pool="gap")
  checkpoints.load(str(fixture_path(BV.format("gap"))), two)
  path = tmp_path / "two_heads.npz"
  checkpoints.export(two, path)
  with pytest.raises(CheckpointError, match=r"query/kernel \(checkpoint \(32, 2, 16\), model "
                                            r"\(32, 4, 8\)\)"):
    checkpoints.load(str(path), _vit(pool="gap", num_heads=4))


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_non_square_grid_round_trip_keeps_its_table(tmp_path, pool):
  """A 5x10 grid has 50 rows; 49 = 7x7 must not be taken for a class row plus a square."""
  model = _vit(pool=pool, image_size=(80, 160), seed=1)
  path = tmp_path / "wide.npz"
  checkpoints.export(model, path)
  again = _vit(pool=pool, image_size=(80, 160), seed=2)
  report = checkpoints.load(str(path), again)
  assert not report.resampled and not any("class token" in n for n in report.notes)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 80, 160, 3)), jnp.float32)
  np.testing.assert_allclose(again(x)[0], model(x)[0], atol=1e-6)


def test_export_timm_sincos_table_and_refusals(tmp_path):
  model = _vit(pool="gap", posemb="sincos2d", seed=3)
  out = tmp_path / "sincos.safetensors"
  checkpoints.export(model, out, format="timm")
  state, _ = files.read_safetensors(out)
  assert state["pos_embed"].shape == (1, 4, 32)  # the fixed table, written out
  again = _vit(pool="gap", posemb="learn", seed=4)
  checkpoints.load(str(out), again)
  x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  np.testing.assert_allclose(again(x)[0], model(x)[0], atol=1e-5)
  with pytest.raises(CheckpointError, match="pool_type='0'"):
    checkpoints.export(_vit(pool="0"), tmp_path / "a.safetensors", format="timm")
  with pytest.raises(CheckpointError, match="epsilon"):
    checkpoints.export(_vit(layernorm_epsilon=1e-12), tmp_path / "b.safetensors",
                       format="timm")


def test_bfloat16_table_resamples(tmp_path):
  fixture = vit_lib.without_reserved(files.read_npz(fixture_path(BV.format("tok"))))
  path = tmp_path / "bf16.npz"
  files.write_npz(path, {k: v.astype(jnp.bfloat16) for k, v in fixture.items()})
  model = _vit(pool="tok", image_size=64)
  report = checkpoints.load(str(path), model)
  assert report.resampled
  expected = vit_lib.resample_posemb(fixture["pos_embedding"].astype(jnp.bfloat16)
                                     .astype(np.float32), (4, 4))
  np.testing.assert_allclose(np.asarray(model.pos_embedding[...]), expected, atol=1e-2)
