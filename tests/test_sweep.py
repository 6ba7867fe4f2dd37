"""Scaling sweeps: the grid helpers, sweep files and run ids, and `sweep.py` running real
tiny runs (configs/tests/tiny_vit.py, train.py and eval.py in subprocesses).

The default suite runs one real two-run sweep (`test_a_two_run_sweep_end_to_end`: rows,
csv, report, then a second invocation that skips both). One study (`study`, built once
for the module, `slow`) carries the longer end-to-end checks: a sweep
of a run that train.py refuses, a 6-step run and a 60-step run is started as `python
sweep.py` in a subprocess and SIGKILLed (with its children) once the 60-step run has a
checkpoint; the same sweep then runs again in this process. From it: the failing run's
row and the sweep going on past it, the killed run resuming from its checkpoint, the
rows and results.csv, a third invocation skipping the finished runs, and an edited
sweep file adding and removing runs. The submitit local executor runs a run through
the real submitit code path (quick: a run whose config does not build; slow: a real
run preempted with the job's signal, requeued and resumed).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

import sweep as sweep_cli
from zoo.scaling import flops as flops_lib
from zoo.scaling import grid
from zoo.scaling import report as report_lib
from zoo.scaling import results
from zoo.scaling import runner
from zoo.scaling import slurm
from zoo.scaling import sweepfile

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tests/tiny_vit.py"
# train.py refuses it after parsing (optim.validate): a failure of the subprocess.
BAD = {"arg.attention": "relu", "config.optimizer.lr": -1.0}
SHORT = {"arg.attention": "relu", "config.total_steps": 6}
# Killed once a checkpoint of step >= KILL_AFTER is complete, with 50 steps to go.
LONG = {"arg.attention": "softmax", "config.total_steps": 60, "config.checkpoint_every": 10}
KILL_AFTER = 10
NO_CONFIG = {"arg.attention": "nope"}  # its config does not build: fails before any process
REQUIRED = ("run", "status", "overrides", "params", "flops", "flops_per_step", "steps",
            "examples", "wall_s", "cpu_s", "eval")


def _write_sweep(path: pathlib.Path, runs: list[dict], **settings) -> str:
  sweep = {"config": TINY, "runs": runs, "metric": "accuracy", **settings}
  path.write_text(f"def get_sweep(arg=None):\n  return {sweep!r}\n")
  return str(path)


def _ids(*runs) -> list[str]:
  return [sweepfile.run_id(r) for r in runs]


def _checkpoints(workdir: pathlib.Path) -> list[int]:
  """Steps of complete Orbax checkpoints (renamed from their tmp name once written)."""
  directory = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: one CPU device, the digits data prepared in a module tmp."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    patch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
    for key in [k for k in os.environ if k.startswith("JAX_")]:
      patch.delenv(key)
    yield dict(os.environ)


@pytest.fixture
def reports(monkeypatch):
  """Calls of zoo.scaling.report.build, which is replaced (the report has its own tests)."""
  calls = []
  monkeypatch.setattr(report_lib, "build", lambda out_dir, *a, **k: calls.append(out_dir))
  return calls


def _cli(*argv) -> int:
  """`python sweep.py ARGV` in this process; its exit status."""
  flags.FLAGS.unparse_flags()
  try:
    sweep_cli.main(sweep_cli.parse_flags(["sweep.py", *argv]))
    return 0
  except SystemExit as e:
    return e.code
  finally:
    flags.FLAGS.unparse_flags()


# ----------------------------------------------------------------------------- grid

def test_grid_helpers_build_exact_lists():
  assert grid.product({"arg.attention": ["relu", "softmax"], "config.seed": [0, 1]}) == [
      {"arg.attention": "relu", "config.seed": 0}, {"arg.attention": "relu", "config.seed": 1},
      {"arg.attention": "softmax", "config.seed": 0},
      {"arg.attention": "softmax", "config.seed": 1}]
  assert grid.product(**{"arg.alpha": [0.5, 1]}) == [{"arg.alpha": 0.5}, {"arg.alpha": 1}]
  assert grid.sweep("config.model.width", [16, 32]) == [{"config.model.width": 16},
                                                        {"config.model.width": 32}]
  assert grid.zip(grid.sweep("config.model.width", [16, 32]),
                  grid.sweep("config.model.depth", [1, 2])) == [
      {"config.model.width": 16, "config.model.depth": 1},
      {"config.model.width": 32, "config.model.depth": 2}]
  assert grid.chain(grid.sweep("arg.attention", ["softmax"]),
                    grid.product({"arg.attention": ["relu"], "arg.alpha": [0.5, 1.0]})) == [
      {"arg.attention": "softmax"}, {"arg.attention": "relu", "arg.alpha": 0.5},
      {"arg.attention": "relu", "arg.alpha": 1.0}]
  # Grids multiply; numpy values become plain Python numbers.
  assert grid.product(grid.sweep("arg.attention", ["relu", "softmax"]),
                      {"config.seed": np.arange(2)}) == [
      {"arg.attention": "relu", "config.seed": 0}, {"arg.attention": "relu", "config.seed": 1},
      {"arg.attention": "softmax", "config.seed": 0},
      {"arg.attention": "softmax", "config.seed": 1}]
  assert type(grid.sweep("arg.alpha", np.linspace(0, 1, 2))[1]["arg.alpha"]) is float


@pytest.mark.parametrize("build, message", [
    (lambda: grid.sweep("seed", [0]), "neither arg.NAME"),
    (lambda: grid.product({"model.width": [1]}), "config.FIELD"),
    (lambda: grid.sweep("arg.alpha", 0.5), "must be a list"),
    (lambda: grid.sweep("arg.alpha", []), "has no values"),
    (lambda: grid.zip(grid.sweep("arg.a", [1, 2]), grid.sweep("arg.b", [1])), "one length"),
    (lambda: grid.zip(grid.sweep("arg.a", [1]), grid.sweep("arg.a", [2])), "set twice"),
    (lambda: grid.chain([{"width": 1}]), "neither arg.NAME"),
])
def test_grid_errors_are_one_line(build, message):
  with pytest.raises(ValueError, match=message) as error:
    build()
  assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- one run

def test_run_id_is_stable_readable_and_distinct():
  run = {"arg.attention": "relu", "config.total_steps": 6}
  # Pinned: a change to the scheme would orphan every existing study's finished runs.
  assert sweepfile.run_id(run) == "attention-relu_total_steps-6-6e184387"
  assert sweepfile.run_id(dict(reversed(list(run.items())))) == sweepfile.run_id(run)
  assert sweepfile.run_id({"arg.attention": "relu", "config.total_steps": np.int64(6)}) == \
      sweepfile.run_id(grid.checked([run], "runs")[0])
  runs = grid.product({"arg.attention": ["relu", "softmax"], "arg.alpha": [0.5, 1.0, 1],
                       "config.seed": [0, 1]})
  ids = [sweepfile.run_id(r) for r in runs]
  assert len(set(ids)) == len(ids)  # 1.0 and 1 differ too: the config sees the types
  assert sweepfile.run_id({"arg.alpha": 0.5, "arg.attention": "relu", "config.seed": 1}) \
      .startswith("alpha-0.5_attention-relu_seed-1-")
  long = sweepfile.run_id({"config.data.data_dir": "/a path/with spaces/" + "x" * 200})
  assert len(long) <= sweepfile.SLUG_LENGTH + 9 and "/" not in long and " " not in long
  assert sweepfile.run_id({}).startswith("default-")


def test_config_arguments_and_flags():
  run = {"arg.attention": "softmax", "arg.qk_layernorm": True, "config.total_steps": 5,
         "config.optimizer.lr": 0.5, "config.skip_nonfinite_updates": True,
         "config.data.name": "digits"}
  assert sweepfile.config_arg(f"{TINY}:attention=relu,lr=0.01", run) == \
      f"{TINY}:attention=softmax,lr=0.01,qk_layernorm=True"
  assert sweepfile.config_arg(TINY, {}) == TINY
  assert sweepfile.config_flags(run) == [
      "--config.total_steps=5", "--config.optimizer.lr=0.5",
      "--config.skip_nonfinite_updates=True", "--config.data.name=digits"]
  config = sweepfile.load_config(f"{TINY}:attention=relu,lr=0.01", run)
  assert config.model.attention == "softmax"
  assert config.model.attention_options.qk_layernorm is True
  assert config.total_steps == 5 and config.optimizer.lr == 0.5
  assert isinstance(config.optimizer.lr, float) and config.skip_nonfinite_updates is True
  for bad, message in [(NO_CONFIG, "unknown attention 'nope'"),
                       ({"config.total_step": 5}, "did you mean --config.total_steps"),
                       ({"config.total_steps": "many"}, "invalid literal"),
                       ({"arg.alpah": 1.0}, "did you mean 'alpha'")]:
    with pytest.raises(ValueError, match=message) as error:
      sweepfile.load_config(TINY, bad)
    assert "\n" not in str(error.value)


def test_sweep_file_validation(tmp_path):
  sweep = sweepfile.load("sweeps/tiny_test.py")
  assert sweep["config"] == TINY and sweep["name"] == "tiny_test" and sweep["arg"] is None
  assert [sweepfile.run_id(r) for r in sweep["runs"]] == [
      "attention-relu_total_steps-6-6e184387", "attention-softmax_total_steps-6-7d6fcfe0"]
  assert sweepfile.load("tiny_test:steps=4")["runs"][0]["config.total_steps"] == 4
  cases = [
      ({"runs": [{}]}, "has no 'config'"),
      ({"config": TINY, "runs": [{"seed": 1}]}, "runs, run 0: run key 'seed' is neither"),
      ({"config": TINY, "runs": [SHORT, dict(SHORT)]}, "runs 0 and 1 are the same run"),
      ({"config": TINY, "runs": [SHORT], "metirc": "accuracy"}, "did you mean 'metric'"),
      ({"config": TINY, "runs": [{"arg.attention": "a,b"}]}, "cannot hold a comma"),
      ({"config": "configs/nope.py", "runs": [SHORT]}, "no config file"),
      ({"config": TINY, "runs": []}, "'runs' is empty"),
  ]
  for i, (value, message) in enumerate(cases):
    path = tmp_path / f"s{i}.py"
    path.write_text(f"def get_sweep(arg=None):\n  return {value!r}\n")
    with pytest.raises(ValueError, match=message) as error:
      sweepfile.load(str(path))
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="did you mean 'tiny_test'"):
    sweepfile.load("tiny_tset")


def test_results_latest_rows_superseded_and_csv(tmp_path):
  out = str(tmp_path)
  for row in [{"run": "a", "status": "done", "eval": {"accuracy": 0.5}},
              {"run": "b", "status": "failed", "error": "boom"},
              {"run": "b", "status": "done", "eval": {"accuracy": 0.7}},
              {"run": "c", "status": "done", "eval": {"accuracy": 0.9}}]:
    results.append(out, {**row, "overrides": {"arg.x": row["run"]}})
  assert results.supersede(out, {"c"}) == 1
  assert [(r["run"], r["eval"]["accuracy"]) for r in results.load_results(out)] == [
      ("a", 0.5), ("b", 0.7)]
  results.write_sweep(out, {"runs": [{"run": "b"}, {"run": "c"}]})
  assert [r["run"] for r in results.load_results(out, current_only=True)] == ["b"]
  assert [r["run"] for r in results.load_results(out)] == ["b", "a"]
  lines = open(results.write_csv(out, current_only=False)).read().splitlines()
  assert lines[0].startswith("run,status,eval.accuracy,arg.x")
  assert lines[1:] == ["b,done,0.7,b", "a,done,0.5,a"]


def test_a_locked_run_is_skipped_and_rerun_moves_the_workdir_aside(tmp_path):
  out = tmp_path / "out"
  run_id = sweepfile.run_id(NO_CONFIG)
  lock = runner.RunLock(runner.run_dir(str(out), run_id))
  assert lock.acquire()
  try:
    row = runner.run_one(str(out), TINY, NO_CONFIG)
    assert row["status"] == "locked" and f"pid {os.getpid()}" in row["holder"]
    assert not (out / results.RESULTS).exists()
  finally:
    lock.release()
  row = runner.run_one(str(out), TINY, NO_CONFIG)
  assert row["status"] == "failed" and row["stage"] == "config"
  (out / "runs" / run_id / "old.txt").write_text("old")
  row = runner.run_one(str(out), TINY, NO_CONFIG, rerun=True)
  assert row["status"] == "failed" and row["superseded_to"].startswith("superseded/")
  assert (out / row["superseded_to"] / "old.txt").read_text() == "old"
  assert not (out / "runs" / run_id / "old.txt").exists()
  assert [r["status"] for r in results.read_rows(str(out))] == ["superseded", "failed"]


# ----------------------------------------------------------------------------- sweep.py

def test_dry_run_lists_the_runs_and_runs_nothing(tmp_path, capsys, reports):
  out = tmp_path / "study"
  assert _cli("--sweep=sweeps/tiny_test.py", f"--out={out}", "--dry-run") == 0
  printed = capsys.readouterr().out
  ids = [sweepfile.run_id(r) for r in sweepfile.load("sweeps/tiny_test.py")["runs"]]
  for run_id in ids:
    assert f"{run_id}  pending  params 2,762  FLOPs 1.14e+07  time unknown" in printed
  assert "python train.py --config=configs/tests/tiny_vit.py:attention=softmax" in printed
  last = json.loads(printed.strip().splitlines()[-1])
  assert last["status"] == "dry_run" and last["runs"] == ids and last["estimated_s"] is None
  assert not out.exists() and not reports


def test_sweep_cli_errors_are_one_line(tmp_path, capsys, env):
  for argv, message in [
      (["--sweep=sweeps/nope.py", f"--out={tmp_path}"], "error: no sweep file 'sweeps/nope.py'"),
      (["--sweep=tiny_test", f"--out={tmp_path}", "--jbos=2"],
       "error: unknown flag --jbos (did you mean 'jobs'?)"),
      (["--sweep=tiny_test"], "error: --out DIR is required"),
      (["report", f"--out={tmp_path}"], "has no results.jsonl"),
      (["--sweep=tiny_test", f"--out={tmp_path}", "--only=("], "not a regular expression"),
      (["--sweep=tiny_test", f"--out={tmp_path}", "--executor=pbs"], "error: flag --executor"),
      (["--sweep=tiny_test", f"--out={tmp_path}", "--jobs=0"], "needs at least 1"),
      (["--sweep=tiny_test", f"--out={tmp_path}", "--executor=slurm-local", "--nodes=2"],
       "runs on one node"),
      (["nonsense", f"--out={tmp_path}"], "unexpected argument"),
  ]:
    assert _cli(*argv) == 1, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], (argv, err)
  # The real command: one line on stderr, exit status 1, nothing written.
  proc = subprocess.run([sys.executable, "sweep.py", "--sweep=tiny_tset", f"--out={tmp_path}/x"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      proc.stderr.strip()] and "did you mean 'tiny_test'" in proc.stderr
  assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory, env):
  """The sweep [BAD, SHORT, LONG] run by `python sweep.py`, SIGKILLed (with its train.py)
  once LONG has a complete checkpoint of step >= KILL_AFTER, then run again here."""
  root = tmp_path_factory.mktemp("study")
  out, sweep_file = root / "out", _write_sweep(root / "sweep_v1.py", [BAD, SHORT, LONG])
  bad, short, long = _ids(BAD, SHORT, LONG)
  long_dir = out / "runs" / long
  with open(root / "first.out", "w") as stdout, open(root / "first.err", "w") as stderr:
    proc = subprocess.Popen([sys.executable, "sweep.py", f"--sweep={sweep_file}", f"--out={out}"],
                            cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                            start_new_session=True)  # its own process group, children too
    try:
      deadline = time.monotonic() + 600
      while not [s for s in _checkpoints(long_dir) if s >= KILL_AFTER]:
        assert proc.poll() is None, (
            f"sweep.py exited ({proc.returncode}) before the kill: "
            f"{(root / 'first.err').read_text()[-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint of the long run within 600 s"
        time.sleep(0.005)
      os.killpg(proc.pid, signal.SIGKILL)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  rows_after_kill = results.read_rows(str(out))
  start = time.monotonic()
  outcome = runner.run_sweep(sweepfile.load(sweep_file), str(out), only="total_steps",
                             progress=False)
  return {"root": root, "out": out, "sweep_file": sweep_file, "ids": (bad, short, long),
          "rows_after_kill": rows_after_kill, "outcome": outcome,
          "resume_s": time.monotonic() - start}


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(study):
  bad, short, long = study["ids"]
  rows = study["rows_after_kill"]
  assert [(r["run"], r["status"]) for r in rows] == [(bad, "failed"), (short, "done")]
  failed = rows[0]
  assert failed["stage"] == "train" and failed["exit_code"] == 1
  assert failed["error"] == "config.optimizer.lr must be > 0, got -1.0"
  assert failed["overrides"] == BAD and failed["params"]["total"] > 0
  log = (study["out"] / "runs" / bad / "log.txt").read_text()
  assert "error: config.optimizer.lr must be > 0" in log


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(study):
  bad, short, long = study["ids"]
  assert study["outcome"]["done"] == [long] and study["outcome"]["skipped"] == [short]
  row = results.load_results(str(study["out"]))[-1]
  assert row["run"] == long and row["status"] == "done"
  assert KILL_AFTER <= row["resumed_from_step"] < 60 and row["steps"] == 60
  log = (study["out"] / "runs" / long / "log.txt").read_text()
  assert log.count("train.py --config=") == 2 and "resuming from step" in log
  assert "done at step 60" in log


@pytest.mark.slow
def test_rows_hold_the_required_fields_and_the_csv(study):
  bad, short, long = study["ids"]
  rows = {r["run"]: r for r in results.load_results(str(study["out"]))}
  assert set(rows) >= {short, long}
  for run, steps in ((SHORT, 6), (LONG, 60)):
    row = rows[sweepfile.run_id(run)]
    assert set(REQUIRED) <= set(row), set(REQUIRED) - set(row)
    costs = flops_lib.costs(sweepfile.load_config(TINY, run))
    assert row["overrides"] == run and row["params"] == costs["params"]
    assert row["steps"] == steps and row["examples"] == 32 * steps
    assert row["flops_per_step"] == costs["flops_per_step"]
    assert row["flops"] == pytest.approx(costs["flops_per_step"] * steps)
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["executor"] == "local"
    assert row["eval"]["step"] == steps and 0 <= row["eval"]["accuracy"] <= 1
    assert row["config"] == f"{TINY}:attention={run['arg.attention']}"
  table = (study["out"] / results.CSV).read_text().splitlines()
  header = table[0].split(",")
  assert header[:4] == ["run", "status", "params.total", "params.non_embedding"]
  assert {"eval.accuracy", "arg.attention", "config.total_steps", "wall_s"} <= set(header)
  by_run = {line.split(",")[0]: line.split(",")[1] for line in table[1:]}
  assert by_run[short] == by_run[long] == "done"
  assert json.loads((study["out"] / results.SWEEP).read_text())["metric"] == "accuracy"


@pytest.mark.slow
def test_running_again_skips_the_finished_runs(study, capsys, reports):
  bad, short, long = study["ids"]
  out = study["out"]
  logs = {run: (out / "runs" / run / "log.txt").stat().st_size for run in (short, long)}
  before = (out / results.RESULTS).read_text()
  start = time.monotonic()
  assert _cli(f"--sweep={study['sweep_file']}", f"--out={out}", "--only=total_steps") == 0
  seconds = time.monotonic() - start
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["status"] == "done" and last["skipped"] == 2 and last["done"] == 0
  assert (out / results.RESULTS).read_text() == before  # no row, no train.py started
  assert {run: (out / "runs" / run / "log.txt").stat().st_size for run in (short, long)} == logs
  assert reports == [str(out)]  # the report is rebuilt after the sweep
  assert seconds < 30
  # --dry-run now estimates pending runs from the finished ones.
  more = sweepfile.validate({"config": TINY, "runs": [SHORT, {**SHORT, "config.seed": 1}]})
  listed = runner.dry_run(more, str(out), say=lambda line: None)
  assert [i["state"] for i in listed] == ["done", "pending"]
  assert listed[1]["estimated_s"] > 0


@pytest.mark.slow
def test_editing_the_sweep_adds_and_removes_runs(study, capsys, reports):
  bad, short, long = study["ids"]
  out = study["out"]
  edited = _write_sweep(study["root"] / "sweep_v2.py", [SHORT, LONG, NO_CONFIG])  # BAD gone
  assert _cli(f"--sweep={edited}", f"--out={out}") == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (last["done"], last["failed"], last["skipped"]) == (0, 1, 2)
  nope = sweepfile.run_id(NO_CONFIG)
  row = {r["run"]: r for r in results.load_results(str(out), status=None)}[nope]
  assert row["status"] == "failed" and row["stage"] == "config"
  assert "unknown attention 'nope'" in row["error"]
  # The removed run keeps its row; the current results are the edited sweep's.
  assert bad in [r["run"] for r in results.read_rows(str(out))]
  assert [r["run"] for r in results.load_results(str(out), current_only=True)] == [short, long]
  assert bad not in (out / results.CSV).read_text()
  assert _cli("report", f"--out={out}", "--all") == 0
  assert bad in (out / results.CSV).read_text() and reports == [str(out), str(out)]


# ----------------------------------------------------------------------------- submitit

def test_coordinator_flags_from_the_job_environment():
  class Env:  # what submitit.JobEnvironment() reports in a 2-node job
    job_id, num_tasks, global_rank, hostnames = "123_4", 2, 1, ["node7", "node8"]

  address, count, rank = slurm.coordinator_flags(Env)
  assert address.startswith("--coordinator_address=node7:") and count == "--num_processes=2"
  assert rank == "--process_id=1"
  assert 20000 <= int(address.rsplit(":", 1)[1]) < 40000
  Env.num_tasks = 1
  assert slurm.coordinator_flags(Env) == []


def test_submitit_local_executor_writes_the_jobs_row(tmp_path, env):
  """The real submitit path (pickled RunJob, a job process, JobEnvironment) on a run
  whose config does not build, so no train.py starts (quick)."""
  out = tmp_path / "out"
  sweep = sweepfile.validate({"config": TINY, "runs": [NO_CONFIG]})
  executor = slurm.SlurmExecutor(str(out / "slurm"), cluster="local", timeout_min=5)
  outcome = slurm.run_sweep(sweep, str(out), executor, progress=False, say=lambda line: None)
  assert len(outcome["jobs"]) == 1 and outcome["jobs"][0] != str(os.getpid())
  [row] = outcome["rows"]
  assert row["status"] == "failed" and row["executor"] == "slurm-local"
  assert results.read_rows(str(out)) == [row]  # written by the job itself
  assert list((out / "slurm").glob("*_result.pkl"))


@pytest.mark.slow
def test_submitit_local_job_is_preempted_requeued_and_resumes(tmp_path, env):
  """A real run as a submitit local job, sent the job's preemption signal (USR2) once it
  has a checkpoint: RunJob.checkpoint stops train.py at a checkpoint, the job requeues,
  resumes from it and writes its row."""
  out = tmp_path / "out"
  run = {"arg.attention": "softmax", "config.total_steps": 300, "config.checkpoint_every": 10}
  executor = slurm.SlurmExecutor(str(out / "slurm"), cluster="local", timeout_min=30)
  jobs = [slurm.RunJob(str(out), TINY, run, executor="slurm-local")]
  submitted = executor.submit(jobs)
  workdir = out / "runs" / sweepfile.run_id(run)
  deadline = time.monotonic() + 300
  while not _checkpoints(workdir):
    assert time.monotonic() < deadline and not submitted[0].done(), "no checkpoint"
    time.sleep(0.05)
  holder = (workdir / runner.RunLock.NAME).read_text().split()
  os.kill(int(holder[1]), signal.SIGUSR2)  # the job process holding the run's lock
  [row] = executor.wait(jobs, submitted, progress=False, say=lambda line: None)
  assert row["status"] == "done" and row["steps"] == 300, row
  assert row["resumed_from_step"] >= 10
  log = (workdir / "log.txt").read_text()
  assert "stopped at step" in log and "resuming from step" in log
  assert results.load_results(str(out)) == [row]


def test_a_two_run_sweep_end_to_end(tmp_path, env, monkeypatch):
  """Two 2-step runs through `sweep.py` (train.py + eval.py each), the rows, the csv and
  the report with its plot; run again, both are skipped and nothing is started."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  runs = [{"arg.attention": a, "config.total_steps": 2, "config.checkpoint_every": 2,
           "config.optimizer.warmup_steps": 0,
           "config.eval_every": 0, "config.log_every": 1} for a in ("relu", "softmax")]
  sweep_file = _write_sweep(tmp_path / "two.py", runs, plot={"kind": "alpha"})
  out = tmp_path / "out"
  assert _cli(f"--sweep={sweep_file}", f"--out={out}") == 0
  rows = results.load_results(str(out))
  assert [r["run"] for r in rows] == _ids(*runs)
  for row in rows:
    assert row["status"] == "done" and row["steps"] == 2
    assert all(key in row for key in REQUIRED), sorted(set(REQUIRED) - set(row))
    assert row["flops"] == 2 * row["flops_per_step"] > 0
    assert 0 <= row["eval"]["accuracy"] <= 1
  assert (out / "results.csv").read_text().count("\n") == 3
  assert "## Alpha sweep" in (out / "report.md").read_text()
  assert (out / "plots" / "alpha.png").stat().st_size > 1000
  logs = {r: (out / "runs" / r / "log.txt").stat().st_size for r in _ids(*runs)}
  assert _cli(f"--sweep={sweep_file}", f"--out={out}") == 0  # nothing left to do
  assert {r: (out / "runs" / r / "log.txt").stat().st_size for r in _ids(*runs)} == logs
  assert len(results.read_rows(str(out))) == 2
