"""The trainer end to end on tiny configs: resume, interruption, NaN, wrong workdir, eval."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs.tests import tiny_lm, tiny_vit
from zoo import data as data_lib
from zoo import training
from zoo.training import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _vit_config(data_dir, arg=None):
  config = tiny_vit.get_config(arg)
  config.data.data_dir = data_dir
  return config


def _params(workdir, config, step=None):
  model, _ = training.restore_model(config, workdir, step)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """One uninterrupted run of the tiny ViT (12 steps), shared by the tests that read it."""
  config = _vit_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("straight"))
  return config, workdir, training.train(config, workdir, progress=False)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, straight_run):
  config, a, straight = straight_run
  assert straight == {"step": 12, "status": "done", "eval": straight["eval"]}
  first = training.train(config, str(tmp_path / "b"), stop_at_step=7, progress=False)
  assert first["status"] == "interrupted" and first["step"] == 7
  resumed = training.train(config, str(tmp_path / "b"), progress=False)
  assert resumed["step"] == 12
  pa, pb = _params(a, config), _params(str(tmp_path / "b"), config)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)  # bit for bit
  # Each run logged its own steps; together they cover 1..12 once.
  logged = [json.loads(l)["step"] for l in open(tmp_path / "b" / "metrics.jsonl")
            if "train/loss" in l]
  assert logged == [2, 4, 6, 8, 10, 12]
  # The model really learned something in 12 steps at this size? Not required; but eval ran.
  assert 0.0 <= straight["eval"]["accuracy"] <= 1.0


def _wrap_train_iterator(monkeypatch, on_batch):
  """Makes the trainer's train iterator pass each batch through `on_batch(count, batch)`."""
  real = data_lib.make_iterator

  def wrapped(*args, **kwargs):
    it = real(*args, **kwargs)
    if not kwargs.get("train"):
      return it

    class Wrapped:
      count = 0
      def __next__(self):
        Wrapped.count += 1
        return on_batch(Wrapped.count, next(it))
      def get_state(self):
        return it.get_state()
      def set_state(self, s):
        it.set_state(s)
    return Wrapped()

  monkeypatch.setattr(data_lib, "make_iterator", wrapped)


def test_sigint_saves_a_checkpoint_and_stops(tmp_path, data_dir, monkeypatch):
  config = _vit_config(data_dir)

  def interrupt(count, batch):
    if count == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return batch

  _wrap_train_iterator(monkeypatch, interrupt)
  result = training.train(config, str(tmp_path), progress=False)
  assert result["status"] == "interrupted" and result["step"] == 3
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 3


def test_nan_loss_stops_without_overwriting_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
  config = _vit_config(data_dir)
  _wrap_train_iterator(monkeypatch, lambda count, batch: (
      {**batch, "image": batch["image"] * np.nan} if count >= 6 else batch))
  with pytest.raises(training.NonFiniteLossError, match="became nan at step 6"):
    training.train(config, str(tmp_path), progress=False)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [4]
  params = _params(str(tmp_path), config)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_workdir_of_a_different_model_fails_before_training(straight_run, data_dir):
  _, workdir, _ = straight_run
  other = _vit_config(data_dir, "attention=softmax")
  other.total_steps = 16  # past the workdir's newest checkpoint (12): it would train
  with pytest.raises(ValueError, match=r"different model(.|\n)*model.attention: checkpoint 'relu'"):
    training.train(other, workdir, progress=False)
  with pytest.raises(ValueError, match="different model"):
    training.restore_model(other, workdir)
  assert ckpt_lib.Checkpointer(workdir).all_steps() == [4, 8, 12]


def test_bad_configs_fail_with_clear_messages(tmp_path, data_dir):
  config = _vit_config(data_dir)
  config.task = "lm"
  with pytest.raises(ValueError, match="task 'lm' needs model.name='lm'"):
    training.train(config, str(tmp_path), progress=False)
  from configs import lm_bytes
  with pytest.raises(ValueError, match="unknown config argument"):
    lm_bytes.get_config("attention=relu,alpah=0.5")
  with pytest.raises(ValueError, match="must be a int"):
    lm_bytes.get_config("total_steps=ten")
  with pytest.raises(ValueError, match="warmup_steps"):
    cfg = _vit_config(data_dir)
    cfg.optimizer.warmup_steps = 100
    training.train(cfg, str(tmp_path / "w"), progress=False)
  with pytest.raises(training.UserError, match="no checkpoint"):
    training.restore_model(_vit_config(data_dir), str(tmp_path / "empty"))
  assert not (tmp_path / "empty").exists()  # reading creates nothing


def _run(script, *args, cwd=REPO):
  proc = subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_train_and_eval_scripts_on_the_byte_lm(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y"]
  for i in range(40):
    (corpus / f"f{i:02d}.py").write_text(
        "\n".join(" ".join(rng.choice(words, 6)) for _ in range(30)) + "\n")
  workdir = tmp_path / "work"
  flags = [f"--config={REPO}/configs/tests/tiny_lm.py", f"--workdir={workdir}",
           f"--config.data.data_dir={tmp_path / 'tfds'}",
           f"--config.data.source_dir={corpus}"]
  _run("train.py", *flags)
  proc = _run("eval.py", *flags)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 8 and result["split"] == "test"
  assert 0 < result["bits_per_byte"] < 8.5
  assert result["num_bytes"] > 0
  proc = _run("eval.py", *flags, "--step=4")
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4


def test_compatibility_check_fills_option_defaults_and_ignores_compute_only_options():
  """A checkpoint written before an option existed (its meta lacks the key) still matches
  the config with that option at its default; compute-only options (tiles) may change;
  a parameter-changing option may not. AFT-local (no default window) is checked too."""
  lm = {"name": "lm", "width": 16, "depth": 1, "num_heads": 2, "max_len": 16}
  saved = {**lm, "attention": "relu", "attention_options": {"alpha": 1.0}}
  now = {**lm, "attention": "relu",
         "attention_options": {"alpha": 1.0, "qk_layernorm": False, "block_size": 8}}
  ckpt_lib.check_compatible({"model": saved, "task": "lm"}, now, "lm", "w")
  with pytest.raises(ValueError, match="model.attention_options"):
    ckpt_lib.check_compatible({"model": saved, "task": "lm"},
                              {**now, "attention_options": {"qk_layernorm": True}}, "lm", "w")
  local = {**lm, "attention": "aft_local", "attention_options": {"window": 4, "max_len": None}}
  ckpt_lib.check_compatible({"model": local, "task": "lm"}, local, "lm", "w")
  seq = {"name": "transformer_seq", "vocab_size": 256, "width": 16, "num_heads": 2, "depth": 1,
         "max_span": 8, "attention": "adaptive_span", "attention_options": {"ramp": 32}}
  ckpt_lib.check_compatible({"model": seq, "task": "segment_lm"},
                            {**seq, "attention_options": {"ramp": 32, "use_bias": False}},
                            "segment_lm", "w")
