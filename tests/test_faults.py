"""Faults and bad input, as a user meets them: `train.py` subprocesses on
configs/tests/tiny_vit.py (12 steps, checkpoints at 4, 8, 12) in temporary workdirs.

Each scenario asserts the exit code, that an error is one line on stderr (no traceback),
and what the workdir holds afterwards (checkpoints, metrics, the bytes of every file when
a command is refused). One uninterrupted run (`first_run`, which also meets a second run
on its locked workdir) is the reference the others are compared with.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs.tests import tiny_vit
from tests.test_training import _wrap_train_iterator
from zoo import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tests", "tiny_vit.py")


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _command(workdir, data_dir, *overrides, script="train.py"):
  return [sys.executable, script, f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *overrides]


def _run(workdir, data_dir, *overrides, code=0, script="train.py"):
  proc = subprocess.run(_command(workdir, data_dir, *overrides, script=script), cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc


def _error_line(proc, *phrases) -> str:
  """The one stderr line that holds the error: it holds every phrase, and no other line
  holds the first."""
  lines = [line for line in proc.stderr.splitlines() if phrases[0] in line]
  assert len(lines) == 1, proc.stderr[-3000:]
  for phrase in phrases[1:]:
    assert phrase in lines[0], (phrase, lines[0])
  return lines[0]


def _tree(workdir) -> dict:
  """Every file under `workdir` and the hash of its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _rows(workdir) -> dict:
  """metrics.jsonl keyed by (step, train | eval), each at most once, without wall-clock
  scalars."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      key = (row.pop("step"), "eval" if any(k.startswith("eval/") for k in row) else "train")
      assert key not in rows, f"{key} logged twice"
      rows[key] = {k: v for k, v in row.items() if not k.endswith("per_sec")}
  return rows


def _config(data_dir, **overrides):
  config = tiny_vit.get_config()
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _params(workdir, data_dir, step=None):
  model, _ = training.restore_model(_config(data_dir), str(workdir), step)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_equal_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))  # bit for bit


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _wait_for(predicate, proc, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}"
    assert time.monotonic() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.002)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_dir):
  """An uninterrupted run (the reference), stopped (SIGSTOP) once it holds the workdir's
  lock while a second train.py on the same workdir is tried, then let go to finish."""
  workdir = str(tmp_path_factory.mktemp("first"))
  logs = tmp_path_factory.mktemp("first_logs")
  lock = os.path.join(workdir, ".lock")
  with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
    proc = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=_env(), stdout=out,
                            stderr=err)

  def holds_lock():
    try:
      with open(lock) as f:
        return f"pid {proc.pid} " in f.read()
    except FileNotFoundError:
      return False

  try:
    _wait_for(holds_lock, proc, "the lock")
    proc.send_signal(signal.SIGSTOP)
    before = _tree(workdir)
    second = _run(workdir, data_dir, code=1)
    after = _tree(workdir)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=300)
  finally:
    proc.kill()
    proc.wait()
  first = types.SimpleNamespace(returncode=proc.returncode, stdout=(logs / "out").read_text(),
                                stderr=(logs / "err").read_text())
  assert first.returncode == 0, first.stderr[-3000:]
  return types.SimpleNamespace(workdir=workdir, pid=proc.pid, first=first, second=second,
                               before=before, after=after)


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_first(first_run):
  _error_line(first_run.second, "is in use by another training run",
              f"(pid {first_run.pid} on ", "--workdir")
  assert first_run.after == first_run.before  # the refused run touched nothing
  # The first run, unharmed, finished: every checkpoint, each step logged once.
  assert "Traceback" not in first_run.first.stderr
  assert _steps(first_run.workdir) == [4, 8, 12]
  rows = _rows(first_run.workdir)
  assert sorted(rows) == [(2, "train"), (4, "train"), (6, "eval"), (6, "train"), (8, "train"),
                          (10, "train"), (12, "eval"), (12, "train")]


@pytest.mark.parametrize("key,value", [("keep_checkpoints", 0), ("checkpoint_every", 0),
                                       ("log_every", 0), ("eval_every", -1)])
def test_every_knob_is_validated(data_dir, key, value):
  with pytest.raises(training.UserError, match=f"config.{key} must be an int >= "):
    training.validate_config(_config(data_dir, **{key: value}))


def test_keep_checkpoints_0_is_refused_before_anything_is_written(first_run, data_dir):
  before = _tree(first_run.workdir)
  proc = _run(first_run.workdir, data_dir, "--config.keep_checkpoints=0", code=1)
  _error_line(proc, "config.keep_checkpoints must be an int >= 1, got 0")
  assert _tree(first_run.workdir) == before
  assert _steps(first_run.workdir) == [4, 8, 12]


def test_checkpoints_of_other_data_are_refused_naming_the_key(first_run, data_dir):
  before = _tree(first_run.workdir)
  proc = _run(first_run.workdir, data_dir, "--config.data.name=mnist",
              "--config.total_steps=16", code=1)
  line = _error_line(proc, "different model or data",
                     "data.name: checkpoint 'digits', config 'mnist'", "fresh --workdir")
  assert "model." not in line  # only what differs
  assert _tree(first_run.workdir) == before


def test_a_finished_run_rerun_does_nothing(first_run, data_dir, capsys):
  before = _tree(first_run.workdir)
  result = training.train(_config(data_dir), first_run.workdir, progress=False)
  assert result == {"step": 12, "status": "already_finished", "eval": {}}
  assert "already finished at step 12; nothing to do" in capsys.readouterr().out
  assert _tree(first_run.workdir) == before


def test_a_compute_only_option_may_change_and_is_recorded(first_run, data_dir, tmp_path):
  workdir = _copy(first_run.workdir, tmp_path / "w")
  proc = _run(workdir, data_dir, "--config.model.attention_options.block_size=4",
              "--config.total_steps=16")
  assert "resuming from step 12 of 16" in proc.stdout
  assert "model.attention_options.block_size: checkpoint None, config 4" in proc.stdout
  assert _steps(workdir) == [4, 8, 12, 16]
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert [h["until_step"] for h in history] == [12]
  assert history[0]["config"]["model"]["attention_options"]["block_size"] is None
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["attention_options"]["block_size"] == 4
  assert max(step for step, _ in _rows(workdir)) == 16


def test_garbage_in_the_newest_checkpoint_resumes_from_the_previous_one(
    first_run, data_dir, tmp_path, capfd):
  workdir = _copy(first_run.workdir, tmp_path / "w")
  rng = np.random.default_rng(0)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "12")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(rng.bytes(64))
  # Reading (eval.py's restore_model) walks back past it, naming it, and moves nothing.
  capfd.readouterr()
  model, step = training.restore_model(_config(data_dir), workdir)
  assert step == 8
  _error_line(types.SimpleNamespace(stderr=capfd.readouterr().err),
              "checkpoint 12 in", "cannot be read (", "using step 8")
  with pytest.raises(training.UserError, match="checkpoint 12 in .* cannot be read"):
    training.restore_model(_config(data_dir), workdir, 12)  # that step, or an error
  assert _steps(workdir) == [4, 8, 12]
  del model

  proc = _run(workdir, data_dir)
  _error_line(proc, "checkpoint 12 in", "cannot be read (", "moved it to ",
              "corrupt-12 and resuming from step 8")
  assert "resuming from step 8 of 12" in proc.stdout
  assert _steps(workdir) == [4, 8, 12]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt-12"))  # kept
  _assert_equal_params(_params(workdir, data_dir), _params(first_run.workdir, data_dir))
  # Rows past step 8 were dropped and logged again: each once, as the reference's.
  assert _rows(workdir) == _rows(first_run.workdir)


def test_eval_walks_back_past_a_truncated_manifest(first_run, data_dir, tmp_path):
  """eval.py reads the newest checkpoint it can, names the one it skipped in one line,
  moves nothing, and prints no traceback (not even Orbax's "Event loop is closed")."""
  workdir = _copy(first_run.workdir, tmp_path / "w")
  open(os.path.join(workdir, "checkpoints", "12", "state", "manifest.ocdbt"), "w").close()
  proc = _run(workdir, data_dir, script="eval.py")
  _error_line(proc, "checkpoint 12 in", "cannot be read (", "using step 8")
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 8
  assert _steps(workdir) == [4, 8, 12]


def test_divergence_right_after_a_checkpoint_never_poisons_one(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  proc = _run(workdir, data_dir, "--config.optimizer.lr=1e6", "--config.checkpoint_every=1",
              code=1)
  line = _error_line(proc, "the training loss became nan at step ", "were not checkpointed",
                     "the newest checkpoint, step ", "skip_nonfinite_updates")
  nan_step = int(line.split("became nan at step ")[1].split(",")[0])
  steps = _steps(workdir)
  # The parameters before the NaN step gave the NaN: saved is only the step before them.
  assert steps and max(steps) == nan_step - 2, (steps, line)
  assert f"the newest checkpoint, step {max(steps)} in" in line
  assert max(step for step, _ in _rows(workdir)) < nan_step

  proc = _run(workdir, data_dir, "--config.checkpoint_every=1")  # the normal lr
  assert f"resuming from step {max(steps)} of 12" in proc.stdout
  rows = _rows(workdir)
  assert np.isfinite(rows[(12, "train")]["train/loss"])
  for step in _steps(workdir):
    params = _params(workdir, data_dir, step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step


def test_skip_nonfinite_updates_skips_and_counts_them(data_dir, tmp_path, monkeypatch):
  """With config.skip_nonfinite_updates, NaN batches leave the state alone; the run goes
  on, counts them, and checkpoints only finite parameters."""
  _wrap_train_iterator(monkeypatch, lambda count, batch: (
      {**batch, "image": batch["image"] * np.nan} if count in (6, 7) else batch))
  config = _config(data_dir, skip_nonfinite_updates=True)
  result = training.train(config, str(tmp_path), progress=False)
  assert result["status"] == "done" and result["skipped_steps"] == 2
  rows = _rows(tmp_path)
  assert {step: row["train/skipped_steps"] for (step, kind), row in rows.items()
          if kind == "train"} == {2: 0, 4: 0, 6: 1, 8: 1, 10: 0, 12: 0}
  assert _steps(tmp_path) == [4, 8, 12]
  for step in _steps(tmp_path):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_params(tmp_path, data_dir, step)))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_rerun_finishes(first_run, data_dir, tmp_path):
  """Killed while Orbax writes a checkpoint (its temporary directory has content), the
  rerun resumes from the newest complete one and ends as the uninterrupted run."""
  workdir = str(tmp_path / "w")
  checkpoints = os.path.join(workdir, "checkpoints")

  def writing():
    try:
      return any(
          "orbax-checkpoint-tmp" in e.name and int(e.name.split(".")[0]) >= 3
          and any(os.scandir(e.path)) for e in os.scandir(checkpoints))
    except (FileNotFoundError, ValueError):
      return False

  proc = subprocess.Popen(_command(workdir, data_dir, "--config.checkpoint_every=1"),
                          cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for(writing, proc, "a checkpoint write")
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  restored = max(_steps(workdir))
  assert restored < 12

  proc = _run(workdir, data_dir, "--config.checkpoint_every=1")
  assert f"resuming from step {restored} of 12" in proc.stdout
  assert not [n for n in os.listdir(checkpoints) if "tmp" in n]  # the torn write cleaned up
  _assert_equal_params(_params(workdir, data_dir), _params(first_run.workdir, data_dir))
  assert _rows(workdir) == _rows(first_run.workdir)

