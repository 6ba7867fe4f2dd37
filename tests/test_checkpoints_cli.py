"""Pretrained weights end to end: `train.py` with `init_from` (a zoo workdir), resume
winning over it, `eval.py` on a pretrained checkpoint, `python -m zoo.checkpoints`, and
the adaptive-span authors' torch checkpoint through `zoo.checkpoints.load`."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tests import tiny_vit
from tests.helpers import fixture_path
from zoo import training
from zoo import checkpoints, models
from zoo.checkpoints import __main__ as checkpoints_cli
from zoo.checkpoints import files
from zoo.checkpoints.files import CheckpointError
from zoo.models import TransformerSeq
from zoo.models.transformer_seq import load_authors_state_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tests/tiny_vit.py"


def _run(*args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  if check and result.returncode:
    raise AssertionError(f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
  return result


def _meta(workdir, step):
  with open(workdir / "checkpoints" / str(step) / "meta" / "metadata") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def softmax_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("softmax")
  _run("train.py", "--config", f"{TINY}:attention=softmax", "--workdir", str(workdir))
  return workdir


def test_train_init_from_a_workdir_into_relu_with_qk_layernorm(softmax_workdir, tmp_path):
  workdir = tmp_path / "relu"
  args = ("train.py", "--config", f"{TINY}:attention=relu,qk_layernorm=True,total_steps=4",
          "--workdir", str(workdir), f"--config.init_from={softmax_workdir}")
  refused = _run(*args, check=False)  # strict by default: the qk-LayerNorm scales are new
  assert refused.returncode == 1 and "query_ln/scale" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1
  assert not (workdir / "checkpoints").exists()
  result = _run(*args, "--config.init_strict=False")
  assert "kept at initialisation" in result.stdout and "key_ln/scale" in result.stdout
  record = _meta(workdir, 4)["init_from"]
  assert record["source"] == str(softmax_workdir) and record["format"] == "zoo"
  assert set(record["kept"]) == {"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/"
                                 f"{ln}/scale" for ln in ("query_ln", "key_ln")}
  # A rerun resumes from the workdir's own checkpoint; init_from is not applied again.
  again = _run(*args[:2], f"{TINY}:attention=relu,qk_layernorm=True,total_steps=8",
               *args[3:], "--config.init_strict=False")
  assert "wins over init_from" in again.stdout and "resuming from step 4" in again.stdout
  assert _meta(workdir, 8)["init_from"] == record


def test_train_init_from_loads_the_workdirs_parameters(softmax_workdir):
  source = checkpoints.read(str(softmax_workdir))
  assert source.format == "zoo" and source.config["step"] == 12
  config = checkpoints.describe(source)
  assert config["attention"] == "softmax" and config["width"] == 16
  model = models.create({**config, "attention": "relu"}, nnx.Rngs(3))
  report = checkpoints.load(str(softmax_workdir), model)
  for name, value in checkpoints.loading.model_parameters(model).items():
    np.testing.assert_array_equal(np.asarray(value.get_value()), source.flat[name])
  assert not report.kept


def test_eval_a_pretrained_checkpoint_without_training(softmax_workdir):
  result = _run("eval.py", "--config", f"{TINY}:attention=softmax",
                f"--config.init_from={softmax_workdir}")
  line = json.loads(result.stdout.strip().splitlines()[-1])
  config = tiny_vit.get_config("attention=softmax")
  model, step = training.restore_model(config, str(softmax_workdir))
  trained = training.evaluate(model, config, "test")
  assert line["step"] is None and line["init_from"] == str(softmax_workdir)
  assert line["accuracy"] == pytest.approx(trained["accuracy"]) and step == 12
  config.init_from = "/nonexistent/x.npz"
  with pytest.raises(CheckpointError, match="no checkpoint file"):
    training.pretrained_model(config)


def test_bad_init_values_fail_before_anything_is_written(tmp_path):
  result = _run("train.py", "--config", TINY, "--workdir", str(tmp_path / "w"),
                f"--config.init_from={tmp_path}", "--config.init_dont_load=head/(", check=False)
  assert result.returncode == 1 and "bad regex" in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()
  config = tiny_vit.get_config("attention=softmax")
  config.init_from = "no_such_checkpoint"
  with pytest.raises(CheckpointError, match="no checkpoint file, workdir or registry name"):
    training.train(config, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_cli_list_inspect_convert(tmp_path, capsys):
  assert checkpoints_cli.main(["list"]) == 0
  listing = capsys.readouterr().out
  for name in ("augreg_s16_i21k", "deit_tiny_patch16_224", "adaptive_span_enwik8"):
    assert name in listing
  timm_file = str(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px.safetensors"))
  assert checkpoints_cli.main(["inspect", timm_file]) == 0
  out = capsys.readouterr().out
  assert "format: timm" in out and '"num_heads": 2' in out
  npz = tmp_path / "converted.npz"
  assert checkpoints_cli.main(["convert", timm_file, str(npz)]) == 0
  io = files.read_npz(fixture_path("pretrained/timm_vit_tiny_patch16_w32d2_32px_io.npz"))
  model = models.create(checkpoints.describe(str(npz)) | {"mlp_activation": "gelu"},
                        nnx.Rngs(0))
  checkpoints.load(str(npz), model)
  np.testing.assert_allclose(model(jnp.asarray(io["__input_nchw__"].transpose(0, 2, 3, 1)))[0],
                             io["__logits__"], atol=1e-5)
  assert checkpoints_cli.main(["inspect", str(tmp_path / "missing.npz")]) == 1
  assert capsys.readouterr().err.startswith("error: ")
  assert checkpoints_cli.main(["fetch", "augreg_s16_i21k"]) == 1  # unpinned, no flag
  assert "--allow-unpinned" in capsys.readouterr().err
  assert checkpoints_cli.main(["fetch", "augreg_s16_i2k"]) == 1
  assert "augreg_s16_i21k" in capsys.readouterr().err  # did you mean


def test_adaptive_span_authors_torch_checkpoint_through_load():
  model = TransformerSeq(vocab_size=12, width=16, num_heads=2, depth=2, max_span=8,
                         inner_size=32, attention="adaptive_span",
                         attention_options=dict(ramp=4, span_init=0.5), rngs=nnx.Rngs(0))
  report = checkpoints.load(str(fixture_path("pretrained/adaspan_toy.pt")), model)
  assert report.format == "adaptive_span" and not report.kept and report.loaded
  reference = TransformerSeq(vocab_size=12, width=16, num_heads=2, depth=2, max_span=8,
                             inner_size=32, attention="adaptive_span",
                             attention_options=dict(ramp=4, span_init=0.5), rngs=nnx.Rngs(1))
  with np.load(fixture_path("pretrained/adaspan_toy_model_state_dict.npz")) as f:
    load_authors_state_dict(reference, {k.removeprefix("module."): f[k] for k in f.files})
  got = checkpoints.loading.model_parameters(model)
  for name, value in checkpoints.loading.model_parameters(reference).items():
    np.testing.assert_array_equal(np.asarray(got[name].get_value()),
                                  np.asarray(value.get_value()))
  with pytest.raises(CheckpointError, match="dont_load"):
    checkpoints.load(str(fixture_path("pretrained/adaspan_toy.pt")), model, dont_load="x")


def test_adaptive_span_strict_refusal_names_everything_and_changes_nothing():
  model = TransformerSeq(vocab_size=12, width=16, num_heads=2, depth=3, max_span=8,
                         inner_size=32, attention="adaptive_span",
                         attention_options=dict(ramp=4, span_init=0.5), rngs=nnx.Rngs(0))
  before = {k: np.asarray(v.get_value())
            for k, v in checkpoints.loading.model_parameters(model).items()}
  with pytest.raises(CheckpointError) as error:
    checkpoints.load(str(fixture_path("pretrained/adaspan_toy.pt")), model)
  for name in ("layers/2/attn/proj_query/weight", "layers/2/ff/fc2/bias", "layers/2/norm2/weight"):
    assert name in str(error.value)
  for name, value in checkpoints.loading.model_parameters(model).items():
    np.testing.assert_array_equal(np.asarray(value.get_value()), before[name])
