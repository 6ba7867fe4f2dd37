"""Multi-process training (two local processes, gloo collectives) and resharding restore.

Runs `train.py` / `eval.py` as a new user would: one process with 8 CPU devices, then two
processes with 4 devices each on the same (data 2, seq 4) mesh; the loss curves must agree,
and checkpoints written on 8 devices or 2 processes must restore on 1 device. A few-step
version of the comparison runs in the default suite; the longer runs are marked `slow`.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir) -> list[float]:
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["train/loss"] for r in rows if "train/loss" in r]


def _train_one_process(flags, workdir, devices=8) -> subprocess.CompletedProcess:
  """`train.py` in one process with `devices` CPU devices; asserts it exits with 0."""
  proc = subprocess.run([sys.executable, "train.py", *flags, f"--workdir={workdir}"],
                        cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _train_two_processes(flags, workdir, timeout=600) -> list[str]:
  """`train.py` as two local processes (4 CPU devices each, gloo collectives) on one
  workdir; asserts both exit with 0 and returns their stdouts."""
  port = _free_port()
  logs = [f"{workdir}.process{i}" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
      procs.append(subprocess.Popen(
          [sys.executable, "train.py", *flags, f"--workdir={workdir}",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
          cwd=REPO, env=_env(4), stdout=out, stderr=err))
  deadline = time.monotonic() + timeout
  try:
    # A process that fails leaves the other waiting at its next collective: stop both then.
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and not any(p.returncode for p in procs)):
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  failed = [f"process {i} exited with {p.returncode}: "
            f"{pathlib.Path(log + '.err').read_text()[-3000:]}"
            for i, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
  assert not failed, "\n".join(failed)
  return [pathlib.Path(log + ".out").read_text() for log in logs]


@pytest.fixture(scope="module")
def corpus_flags(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  corpus = root / "corpus"
  corpus.mkdir()
  rng = np.random.default_rng(1)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "x", "y", "(", ")"]
  for i in range(40):
    (corpus / f"m{i:02d}.py").write_text(
        "\n".join(" ".join(rng.choice(words, 8)) for _ in range(40)) + "\n")
  flags = [f"--config={REPO}/configs/tests/tiny_lm.py",
           f"--config.data.data_dir={root / 'tfds'}", f"--config.data.source_dir={corpus}",
           "--config.mesh.data=2", "--config.mesh.seq=4", "--config.sequence_parallel=ring",
           "--config.data.seq_len=32", "--config.model.max_len=32"]
  # Prepare the data once, so the two processes never race to build it.
  subprocess.run([sys.executable, "-c", "from configs.tests import tiny_lm; from zoo import data; "
                  f"c = tiny_lm.get_config(); c.data.data_dir = {str(root / 'tfds')!r}; "
                  f"c.data.source_dir = {str(corpus)!r}; c.data.seq_len = 32; "
                  "data.get_builder(c.data)"], cwd=REPO, check=True, env=_env(1), timeout=300)
  return root, flags


def test_two_processes_match_one_for_a_few_steps(corpus_flags, tmp_path):
  """4 steps, loss logged every step, no periodic eval: the default suite's multi-host run.

  The two sides reduce in different orders (gloo across processes vs. in-process), so the
  losses agree to float32 rounding: rtol 1e-5.
  """
  _, flags = corpus_flags
  few = flags + ["--config.total_steps=4", "--config.log_every=1", "--config.eval_every=0"]
  _train_one_process(few, tmp_path / "single")
  outs = _train_two_processes(few, tmp_path / "multi")
  assert all("done at step 4" in out for out in outs), outs
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(a) == len(b) == 4
  np.testing.assert_allclose(b, a, rtol=1e-5)


@pytest.mark.slow  # minutes of subprocesses; run with `pytest -m slow`
def test_two_processes_match_one_and_checkpoints_reshard(corpus_flags):
  root, flags = corpus_flags
  single = root / "single"
  _train_one_process(flags, single)
  multi = root / "multi"
  _train_two_processes(flags, multi)

  a, b = _losses(single), _losses(multi)
  assert len(a) == len(b) == 4  # 8 steps, logged every 2
  np.testing.assert_allclose(b, a, rtol=1e-5)

  # Checkpoints of the 8-device and the 2-process runs restore on a single device.
  results = []
  for workdir in (single, multi):
    proc = subprocess.run([sys.executable, "eval.py", *flags[:3], "--config.data.seq_len=32",
                           "--config.model.max_len=32", f"--workdir={workdir}"],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert results[0]["step"] == results[1]["step"] == 8
  np.testing.assert_allclose(results[1]["bits_per_byte"], results[0]["bits_per_byte"], rtol=1e-5)


@pytest.mark.slow
def test_resume_on_a_different_mesh(corpus_flags, tmp_path):
  """Train 4 steps on 8 devices (2 x 4, ring), resume to 8 on one device."""
  _, flags = corpus_flags
  first = flags + [f"--workdir={tmp_path}", "--config.total_steps=8"]
  proc = subprocess.run([sys.executable, "-c",
                         "import sys; sys.argv = ['train.py'] + sys.argv[1:]; "
                         "import runpy; import zoo.training as t; "
                         "orig = t.train; t.train = lambda c, w, **k: orig(c, w, stop_at_step=4, **k); "
                         "runpy.run_path('train.py', run_name='__main__')", *first],
                        cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 130, proc.stderr[-3000:]  # "interrupted" at step 4
  resumed = flags[:3] + ["--config.data.seq_len=32", "--config.model.max_len=32",
                         f"--workdir={tmp_path}"]
  proc = subprocess.run([sys.executable, "train.py", *resumed], cwd=REPO, env=_env(1),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done at step 8" in proc.stdout
