"""A `train.py` run killed with SIGKILL right after an interval checkpoint, then rerun with
the same command, ends exactly where an uninterrupted run of that command ends.

Everything goes through the command line, as a user would run it; only the final
checkpoints are read in this process (`zoo.training.restore_model`).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from configs.tests import tiny_vit
from zoo import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoint 8 is finalised in the background while steps 9-12 run (the save at 12 waits
# for it), so the kill lands near step 12 and the run still has 28 steps (about a second)
# to go: room for a slow poll on a loaded machine.
TOTAL_STEPS = 40
KILL_AFTER = 8  # kill once the checkpoint of a step >= this is complete
# `--config.FIELD=VALUE` overrides of configs/tests/tiny_vit.py (restore_model gets the same).
# log_every divides checkpoint_every, so a resumed run's loss windows are the reference's.
OVERRIDES = {"total_steps": TOTAL_STEPS, "checkpoint_every": 4, "log_every": 2,
             "eval_every": 6}


def _config(data_dir):
  config = tiny_vit.get_config()
  config.data.data_dir = data_dir
  for key, value in OVERRIDES.items():
    setattr(config, key, value)
  return config


def _command(workdir, data_dir):
  return [sys.executable, "train.py", f"--config={REPO}/configs/tests/tiny_vit.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _run(workdir, data_dir):
  proc = subprocess.run(_command(workdir, data_dir), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"done at step {TOTAL_STEPS}" in proc.stdout, proc.stdout[-2000:]
  return proc


def _finished_steps(workdir) -> list[int]:
  """Steps with a complete Orbax checkpoint: Orbax writes `<step>.orbax-checkpoint-tmp-*`
  and renames it to `<step>` (after `commit_success.txt`) only once everything is on disk."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _rows(text: str) -> dict:
  """metrics.jsonl rows keyed by (step, "train" | "eval"), without wall-clock scalars."""
  rows = {}
  for line in text.splitlines():
    row = json.loads(line)
    kind = "eval" if any(k.startswith("eval/") for k in row) else "train"
    key = (row.pop("step"), kind)
    assert key not in rows, f"{key} logged twice in one run"
    rows[key] = {k: v for k, v in row.items() if not k.endswith("per_sec")}
  return rows


def _params(config, workdir):
  model, step = training.restore_model(config, str(workdir))
  assert step == TOTAL_STEPS
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_sigkill_after_a_checkpoint_then_rerun_equals_uninterrupted(tmp_path):
  data_dir = str(tmp_path / "tfds")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The uninterrupted reference (it also prepares the data, so the killed run only trains).
  _run(straight, data_dir)

  # The same command, killed as soon as a checkpoint of step >= KILL_AFTER is complete.
  killed.mkdir()
  with open(killed / "first.out", "w") as out, open(killed / "first.err", "w") as err:
    proc = subprocess.Popen(_command(killed, data_dir), cwd=REPO, env=_env(), stdout=out,
                            stderr=err)
    try:
      deadline = time.monotonic() + 300
      while not [s for s in _finished_steps(killed) if s >= KILL_AFTER]:
        assert proc.poll() is None, (
            f"train.py exited ({proc.returncode}) before a checkpoint of step >= {KILL_AFTER}: "
            f"{(killed / 'first.err').read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no checkpoint of step >= {KILL_AFTER} within 300 s"
        time.sleep(0.005)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  # The kill landed mid-run: the process died of it, short of the last step.
  assert proc.returncode == -signal.SIGKILL
  assert "done at step" not in (killed / "first.out").read_text()
  metrics = killed / "metrics.jsonl"
  before = metrics.read_text()
  restored = max(_finished_steps(killed))  # the step the rerun resumes from
  last_logged = max(step for step, _ in _rows(before))
  assert KILL_AFTER <= restored < TOTAL_STEPS and last_logged < TOTAL_STEPS, (
      restored, last_logged)

  _run(killed, data_dir)  # the same command again: resumes from `restored`

  # (b) The rerun dropped the killed run's rows past the restored step and logged exactly
  # the rows after it, equal to the reference's (losses, learning rates, eval metrics;
  # wall-clock throughput left out): each step once.
  reference = _rows((straight / "metrics.jsonl").read_text())
  after = metrics.read_text()
  kept = "".join(line + "\n" for line in before.splitlines()
                 if json.loads(line)["step"] <= restored)
  assert after.startswith(kept)
  resumed = _rows(after[len(kept):])
  assert resumed, "the rerun logged nothing"
  assert min(step for step, _ in resumed) > restored
  assert resumed == {k: v for k, v in reference.items() if k[0] > restored}
  assert (TOTAL_STEPS, "train") in resumed and (TOTAL_STEPS, "eval") in resumed
  # The killed run's own rows up to the restored step match too.
  first = _rows(before)
  assert {k: v for k, v in first.items() if k[0] <= restored} == {
      k: v for k, v in reference.items() if k[0] <= restored}

  # (a) The final parameters are bit-for-bit equal.
  config = _config(data_dir)
  a, b = _params(config, straight), _params(config, killed)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))

  # (c) ... and they are trained ones, not both the initialisation.
  init = nnx.to_pure_dict(nnx.state(training.trainer.create_model(config), nnx.Param))
  assert jax.tree.structure(init) == jax.tree.structure(a)
  changed = [not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(init))]
  assert all(changed), [jax.tree_util.keystr(p) for (p, _), c in
                        zip(jax.tree_util.tree_leaves_with_path(a), changed) if not c]
