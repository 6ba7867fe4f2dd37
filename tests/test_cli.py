"""What a user meets on the command line: `train.py`, `eval.py`, `python -m zoo.plot` and
`python -m zoo.attention` as subprocesses. Bad input fails with exit status 1 and one line
naming the key (and the nearest valid names), no traceback, and leaves the workdir as it
was; the eval and plot tests share one tiny training run."""

import json
import os
import subprocess
import sys

import pytest

from configs.tests import tiny_lm
from zoo import attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = os.path.join(REPO, "configs", "tests", "tiny_vit.py")
# One CPU device: the conftest's 8 simulated devices would only slow the tiny runs down.
_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run(*args, cwd=REPO):
  """`python ARGS...` in `cwd`; a script path or `-m module` first."""
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=_ENV)


def _snapshot(path) -> dict:
  """{relative file path: (size, mtime)} of everything under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), path)] = (st.st_size, st.st_mtime_ns)
  return out


def _assert_one_line_error(proc, *words):
  assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  for word in words:
    assert word in lines[0], (word, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny ViT run (12 steps), with `data.download` set as a user might."""
  root = tmp_path_factory.mktemp("cli")
  workdir = root / "run"
  proc = _run("train.py", f"--config={TINY_VIT}", f"--workdir={workdir}",
              f"--config.data.data_dir={root / 'tfds'}", "--config.data.download=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_train_last_line_is_json_and_preparation_says_local(trained):
  _, proc = trained
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["status"] == "done" and result["step"] == 12
  assert 0.0 <= result["eval"]["accuracy"] <= 1.0
  assert "Preparing dataset digits from local files" in proc.stdout
  assert "Downloading" not in proc.stdout + proc.stderr
  assert "\x1b[A" not in proc.stderr  # no nested progress bars when stderr is a file


def test_eval_uses_the_workdirs_config(trained):
  workdir, train = trained
  proc = _run("eval.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 12 and result["split"] == "test"
  trained_eval = json.loads(train.stdout.strip().splitlines()[-1])["eval"]
  assert result["accuracy"] == pytest.approx(trained_eval["accuracy"])


def test_eval_refuses_a_config_of_another_model(trained):
  workdir, _ = trained
  before = _snapshot(workdir)
  proc = _run("eval.py", f"--workdir={workdir}", f"--config={TINY_VIT}:attention=softmax")
  _assert_one_line_error(proc, "model.attention", "config.json")
  assert _snapshot(workdir) == before


def test_eval_on_a_missing_workdir_creates_nothing(tmp_path):
  proc = _run("eval.py", f"--workdir={tmp_path / 'nope'}")
  _assert_one_line_error(proc, str(tmp_path / "nope"), "does not exist")
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, words", [
    ([f"--config={TINY_VIT}:atention=relu"], ["'atention'", "did you mean 'attention'"]),
    (["--config.optimizer.learning_rate=0.1"],
     ["--config.optimizer.learning_rate", "did you mean --config.optimizer.lr"]),
    ([f"--config={TINY_VIT}:attention=rleu"], ["'rleu'", "relu", "softmax"]),
    (["--wokdir=x"], ["--wokdir", "did you mean --workdir"]),
    (["--config=configs/no_such_config.py"], ["no_such_config.py"]),
    ([f"--config={TINY_VIT}:batch_size=0"], ["batch_size"]),
    (["--config.total_steps=20"], ["--config.optimizer.warmup_steps=2", "(100)"]),
], ids=["args_key", "override_key", "attention", "flag", "config_file", "batch_size_0",
        "warmup"])
def test_train_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
  proc = _run(os.path.join(REPO, "train.py"), *args, f"--workdir={tmp_path / 'w'}",
              f"--config.data.data_dir={tmp_path / 'tfds'}", cwd=tmp_path)
  _assert_one_line_error(proc, *words)
  assert not any(tmp_path.iterdir())


def test_tiny_configs_take_their_arguments():
  config = tiny_lm.get_config("seq_len=8,width=32,depth=2,num_heads=4,batch_size=4,"
                              "total_steps=3")
  assert (config.data.seq_len, config.model.max_len) == (8, 8)
  assert (config.model.width, config.model.depth, config.model.num_heads) == (32, 2, 4)
  assert (config.batch_size, config.total_steps) == (4, 3)


@pytest.mark.parametrize("script, names", [
    ("train.py", ["--config", "--workdir", "--coordinator_address", "--num_processes",
                  "--process_id"]),
    ("eval.py", ["--config", "--workdir", "--step", "--split", "--coordinator_address",
                 "--num_processes", "--process_id"]),
])
def test_help_lists_the_flags(script, names):
  proc = _run(script, "--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in names:
    assert f"  {name}:" in proc.stdout, (name, proc.stdout)


def test_plot_writes_a_png(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / "curves.png"
  proc = _run("-m", "zoo.plot", str(workdir), "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "loss, accuracy, lr" in proc.stdout
  proc = _run("-m", "zoo.plot", str(tmp_path / "nope"))
  _assert_one_line_error(proc, str(tmp_path / "nope"))


def test_attention_listing_names_every_attention_and_config():
  proc = _run("-m", "zoo.attention")
  assert proc.returncode == 0, proc.stderr[-3000:]
  listed = {line.split(":")[0] for line in proc.stdout.splitlines() if line[:1].isalnum()}
  # Names the package registers (tests may register examples of their own in this process).
  shipped = {n for n in attention.names() if attention.get(n).layer.__module__.startswith("zoo.")}
  assert shipped <= listed and len(shipped) == 16  # 7 pointwise presets, pointwise, softmax, 4 AFT, SOFT, span, persistent
  assert {"configs/vit_digits.py", "configs/lm_bytes.py", "configs/tests/tiny_vit.py"} <= listed
  assert "alpha=1.0" in proc.stdout and "total_steps=1500" in proc.stdout
