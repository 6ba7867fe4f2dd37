"""Running a sweep: each run is `train.py` then `eval.py` in subprocesses.

`run_one` does one run (the local runner and the SLURM jobs both call it):

1. takes the run's lock, `DIR/runs/<id>/.sweep.lock` (fcntl.flock, non-blocking: a run
   another runner holds is skipped and said so);
2. skips a run that has a "done" row in `DIR/results.jsonl` (with `rerun`: marks its rows
   "superseded" and moves its workdir's contents to `DIR/superseded/<id>-<time>/`);
3. builds the run's config in this process (`sweepfile.load_config`) and counts its
   parameters and FLOPs (`zoo.scaling.flops.costs`); a config that does not build fails
   the run without starting anything;
4. runs `python train.py --config=... --workdir=DIR/runs/<id>` and then `python eval.py
   --workdir=DIR/runs/<id>` (working directory: the repository), their stdout and stderr
   appended to `DIR/runs/<id>/log.txt`, timing wall clock and the children's CPU time
   (`os.wait4`); train.py resumes from the workdir's newest checkpoint, so an
   interrupted run just runs again;
5. appends its row to `DIR/results.jsonl` (see `zoo.scaling.results`): status "done", or
   "failed" with the last line the failing command printed on stderr. A command stopped
   by SIGINT / SIGTERM (train.py saves a checkpoint and exits 130) writes no row.

`run_sweep` runs the sweep's pending runs on a thread pool of `jobs` workers (the N
train.py processes share the machine's cores: XLA's threads are not limited here, so
on a small machine `jobs` > 1 mostly helps when the runs are short and start-up bound),
with a progress bar over the runs and its ETA. Ctrl-C stops every run at a checkpoint
(train.py's own handling of SIGINT) and the runner after them; SIGTERM to the runner is
passed on to the runs. `dry_run` lists the runs with parameters, FLOPs and estimated time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from zoo import cli
from zoo.scaling import flops as flops_lib
from zoo.scaling import results as results_lib
from zoo.scaling import sweepfile

INTERRUPTED = 130  # train.py's exit status after SIGINT / SIGTERM (a checkpoint was saved)
_PREPARE_LOCK = threading.Lock()  # config loading (sys.modules) one thread at a time


# ----------------------------------------------------------------------------- locks

class RunLock:
  """An exclusive, non-blocking lock on one run: `DIR/runs/<id>/.sweep.lock` holds the
  holder's pid and host. The kernel releases it when the holder exits (no stale locks)."""

  NAME = ".sweep.lock"

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, self.NAME)
    self._fd: int | None = None

  def acquire(self) -> bool:
    """True when this process now holds the lock; False when another one does."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    me = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
    os.pwrite(fd, me, 0)
    os.ftruncate(fd, len(me))
    self._fd = fd
    return True

  def holder(self) -> str:
    """Who holds the lock, as its file says ('pid N on HOST')."""
    try:
      with open(self.path) as f:
        return f.read().strip() or "pid unknown"
    except OSError:
      return "pid unknown"

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class Children:
  """The live child processes of a runner, so a signal can be passed on to them."""

  def __init__(self):
    self._pids: set[int] = set()
    self._lock = threading.Lock()

  def add(self, pid: int) -> None:
    with self._lock:
      self._pids.add(pid)

  def discard(self, pid: int) -> None:
    with self._lock:
      self._pids.discard(pid)

  def pids(self) -> list[int]:
    with self._lock:
      return sorted(self._pids)

  def signal(self, signum: int) -> None:
    for pid in self.pids():
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)

  def stop(self, grace_s: float = 60.0) -> None:
    """SIGTERM to every child (train.py saves a checkpoint and exits), then waits up to
    `grace_s` for them to end and SIGKILLs what is left. Reaps them, so only for a caller
    that does not wait for them itself (a signal handler about to exit)."""
    self.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in self.pids():
      while True:
        try:
          done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
          break
        if done:
          break
        if time.monotonic() > deadline:
          with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
          with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
          break
        time.sleep(0.2)
      self.discard(pid)


# ----------------------------------------------------------------------------- one command

class _Command:
  """A finished child: exit code, wall and CPU seconds, the last JSON line on stdout,
  the last line on stderr (an `error: ...` line when there is one)."""

  def __init__(self, code, wall_s, cpu_s, stdout_json, error, resumed_from):
    self.code, self.wall_s, self.cpu_s = code, wall_s, cpu_s
    self.json, self.error, self.resumed_from = stdout_json, error, resumed_from

  @property
  def interrupted(self) -> bool:
    return self.code in (INTERRUPTED, -signal.SIGINT, -signal.SIGTERM)


def _execute(args: list[str], log_path: str, children: Children | None) -> _Command:
  """Runs `python ARGS` in the repository, appending its output to `log_path`."""
  command = [sys.executable, *args]
  stamp = datetime.datetime.now().isoformat(timespec="seconds")
  log_lock = threading.Lock()
  state = {"json": None, "stderr": [], "resumed": None}
  with open(log_path, "ab") as log:
    log.write(f"\n=== {stamp} {' '.join(command)}\n".encode())
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cli.REPO_ROOT, stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if children is not None:
      children.add(proc.pid)

    def pump(stream, is_stdout):
      for raw in iter(stream.readline, b""):
        with log_lock:
          log.write(raw)
          log.flush()
        line = raw.decode(errors="replace").rsplit("\r", 1)[-1].strip()
        if not line:
          continue
        if is_stdout:
          if line.startswith("{"):
            state["json"] = line
          match = re.search(r"resuming from step (\d+)", line)
          if match:
            state["resumed"] = int(match.group(1))
        else:
          state["stderr"] = (state["stderr"] + [line])[-50:]
      stream.close()

    pumps = [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, False), daemon=True)]
    for t in pumps:
      t.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
      proc.returncode = os.waitstatus_to_exitcode(status)
      cpu_s = usage.ru_utime + usage.ru_stime
    except ChildProcessError:  # reaped by a signal handler (Children.stop)
      proc.returncode, cpu_s = -signal.SIGTERM, 0.0
    finally:
      if children is not None:
        children.discard(proc.pid)
      if proc.returncode is None:  # leaving on an exception (a SLURM job being requeued)
        with log_lock:
          log.write(f"=== stopped after {time.monotonic() - start:.1f} s\n".encode())
    wall_s = time.monotonic() - start
    for t in pumps:
      t.join()
    log.write(f"=== exit {proc.returncode} after {wall_s:.1f} s\n".encode())
  parsed = None
  if state["json"]:
    with contextlib.suppress(ValueError):
      parsed = json.loads(state["json"])
  errors = [line for line in state["stderr"] if line.startswith("error:")]
  error = (errors or state["stderr"] or [""])[-1]
  error = error[len("error:"):].strip() if error.startswith("error:") else error
  if proc.returncode < 0 and not error:
    error = f"killed by signal {signal.Signals(-proc.returncode).name}"
  return _Command(proc.returncode, wall_s, cpu_s, parsed, error, state["resumed"])


# ----------------------------------------------------------------------------- one run

def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_dir(out_dir: str, run_id: str) -> str:
  return os.path.join(out_dir, results_lib.RUNS, run_id)


def done_ids(out_dir: str) -> set[str]:
  return {row["run"] for row in results_lib.load_results(out_dir, status="done")}


def prepare(sweep_config: str, run: dict[str, Any]) -> dict[str, Any]:
  """The run's parameters and FLOPs: {"params", "flops_per_example", "flops_per_step",
  "steps", "flops", "examples_per_step", "tokens_per_step"} (flops.costs), or {"error":
  one line} when its config does not build, or {"costs_error": ...} when only the
  counting fails."""
  with _PREPARE_LOCK:
    try:
      config = sweepfile.load_config(sweep_config, run)
    except ValueError as e:
      return {"error": str(e)}
    try:
      return dict(flops_lib.costs(config))
    except Exception as e:  # pylint: disable=broad-except  (the run can still train)
      return {"costs_error": cli.one_line(f"{type(e).__name__}: {e}")}


def _start_over(out_dir: str, run_id: str) -> str | None:
  """For --rerun: marks the run's rows superseded and moves its workdir's contents
  (all but the lock) to DIR/superseded/<id>-<time>/; returns where, or None."""
  results_lib.supersede(out_dir, {run_id})
  directory = run_dir(out_dir, run_id)
  entries = [n for n in os.listdir(directory) if n != RunLock.NAME]
  if not entries:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  target = os.path.join(out_dir, "superseded", f"{run_id}-{stamp}")
  os.makedirs(target, exist_ok=True)
  for name in entries:
    shutil.move(os.path.join(directory, name), os.path.join(target, name))
  return target


def run_one(out_dir: str, sweep_config: str, run: dict[str, Any], *,
            rerun: bool = False, executor: str = "local",
            process_flags: Iterable[str] = (), process_id: int = 0,
            children: Children | None = None,
            stop: threading.Event | None = None) -> dict[str, Any]:
  """Does one run (see the module docstring) and returns its row, or {"run", "status":
  "skipped" | "locked" | "interrupted" | "stopped"} when it wrote none.

  `process_flags` (--coordinator_address, --num_processes, --process_id) go to both
  commands of a multi-process run; only `process_id` 0 takes the lock and writes the row
  (the others log to `log.rank<k>.txt`).
  """
  out_dir = os.path.abspath(out_dir)
  run_id = sweepfile.run_id(run)
  directory = run_dir(out_dir, run_id)
  main = process_id == 0
  base = {"run": run_id}
  if stop is not None and stop.is_set():
    return {**base, "status": "stopped"}
  os.makedirs(directory, exist_ok=True)
  lock = RunLock(directory)
  if main and not lock.acquire():
    return {**base, "status": "locked", "holder": lock.holder()}
  try:
    moved = None
    if main and rerun:
      moved = _start_over(out_dir, run_id)
    elif run_id in done_ids(out_dir):
      return {**base, "status": "skipped"}
    costs = prepare(sweep_config, run)
    row = {"run": run_id, "status": "done", "overrides": run,
           "config": sweepfile.config_arg(sweep_config, run),
           "flags": sweepfile.config_flags(run),
           "workdir": os.path.relpath(directory, out_dir)}
    if moved:
      row["superseded_to"] = os.path.relpath(moved, out_dir)

    def finish(extra: dict[str, Any]) -> dict[str, Any]:
      row.update(extra, executor=executor, host=socket.gethostname(), finished=_now())
      if main:
        results_lib.append(out_dir, row)
      return row

    if "error" in costs:
      return finish({"status": "failed", "stage": "config", "error": costs["error"],
                     "wall_s": 0.0, "cpu_s": 0.0})
    log = os.path.join(directory, "log.txt" if main else f"log.rank{process_id}.txt")
    extra_flags = list(process_flags)
    train = _execute(sweepfile.train_command(sweep_config, run, directory) + extra_flags,
                     log, children)
    wall, cpu = train.wall_s, train.cpu_s
    if train.interrupted:
      return {**base, "status": "interrupted"}
    if train.code != 0:
      return finish({"status": "failed", "stage": "train", "exit_code": train.code,
                     "error": train.error or f"train.py exited with status {train.code}",
                     "wall_s": wall, "cpu_s": cpu, **_counts(costs, None)})
    if stop is not None and stop.is_set():
      return {**base, "status": "interrupted"}
    evaluation = _execute(sweepfile.eval_command(directory) + extra_flags, log, children)
    wall, cpu = wall + evaluation.wall_s, cpu + evaluation.cpu_s
    if evaluation.interrupted:
      return {**base, "status": "interrupted"}
    if evaluation.code != 0 or not isinstance(evaluation.json, dict):
      error = evaluation.error or ("eval.py printed no JSON line" if evaluation.code == 0 else
                                   f"eval.py exited with status {evaluation.code}")
      return finish({"status": "failed", "stage": "eval", "exit_code": evaluation.code,
                     "error": error, "wall_s": wall, "cpu_s": cpu, **_counts(costs, None)})
    step = evaluation.json.get("step")
    counts = _counts(costs, step if isinstance(step, int) else None)
    integrated = _span_integrated_flops(sweep_config, run, directory, counts.get("steps"))
    if integrated is not None:  # learned spans: the trimmed windows, not the full S
      counts["flops_window_bound"], counts["flops"] = counts["flops"], integrated
    return finish({**counts,
                   "wall_s": wall, "cpu_s": cpu,
                   "train_wall_s": train.wall_s, "eval_wall_s": evaluation.wall_s,
                   "train": {k: train.json.get(k) for k in ("status", "step")
                             if isinstance(train.json, dict) and k in train.json},
                   "resumed_from_step": train.resumed_from,
                   "eval": evaluation.json})
  finally:
    lock.release()


def _span_integrated_flops(sweep_config: str, run: dict[str, Any], directory: str,
                           steps: int | None) -> float | None:
  """`flops.span_integrated_flops` of a finished run (None for other models, or when
  it cannot be counted)."""
  if not steps:
    return None
  try:
    with _PREPARE_LOCK:
      config = sweepfile.load_config(sweep_config, run)
    return flops_lib.span_integrated_flops(config, directory, int(steps))
  except Exception:  # pylint: disable=broad-except  (the full-window count stands)
    return None


def _counts(costs: dict[str, Any], step: int | None) -> dict[str, Any]:
  """The row's params and FLOPs fields from flops.costs, for `step` steps (the
  evaluated checkpoint's; default: the config's total_steps)."""
  if "params" not in costs:
    return {"costs_error": costs.get("costs_error")} if costs.get("costs_error") else {}
  steps = step if step is not None else int(costs["steps"])
  out = {"params": costs["params"], "flops": costs["flops_per_step"] * steps,
         "flops_per_step": costs["flops_per_step"],
         "flops_per_example": costs["flops_per_example"], "steps": steps,
         "examples_per_step": costs["examples_per_step"],
         "examples": costs["examples_per_step"] * steps}
  if costs.get("tokens_per_step") is not None:
    out["tokens_per_step"] = costs["tokens_per_step"]
    out["tokens"] = costs["tokens_per_step"] * steps
  return out


# ----------------------------------------------------------------------------- the sweep

def plan(sweep: dict[str, Any], only: str | None = None) -> list[tuple[str, dict[str, Any]]]:
  """(run id, run) of the sweep's runs whose id matches the regex `only` (re.search)."""
  pattern = compile_regex(only, "--only")
  runs = [(sweepfile.run_id(run), run) for run in sweep["runs"]]
  return [(i, r) for i, r in runs if pattern is None or pattern.search(i)]


def compile_regex(text: str | None, flag: str) -> re.Pattern | None:
  if text is None:
    return None
  try:
    return re.compile(text)
  except re.error as e:
    raise ValueError(f"{flag}={text!r} is not a regular expression: {e}") from None


def sweep_record(sweep: dict[str, Any]) -> dict[str, Any]:
  """DIR/sweep.json: the sweep's file, config and settings and, per run, its id,
  overrides and train.py arguments."""
  record = {k: v for k, v in sweep.items() if k != "runs"}
  record["runs"] = [{"run": sweepfile.run_id(run), "overrides": run,
                     "config": sweepfile.config_arg(sweep["config"], run),
                     "flags": sweepfile.config_flags(run)} for run in sweep["runs"]]
  record["updated"] = _now()
  return record


def summary_line(row: dict[str, Any]) -> str:
  """One line about a run's outcome for the console."""
  run, status = row["run"], row["status"]
  if status == "done":
    metrics = " ".join(f"{k}={v:.4g}" for k, v in (row.get("eval") or {}).items()
                       if isinstance(v, float))
    resumed = (f", resumed from step {row['resumed_from_step']}"
               if row.get("resumed_from_step") else "")
    return f"done    {run}  {metrics}  ({row.get('wall_s', 0):.0f} s{resumed})"
  if status == "failed":
    return f"failed  {run} ({row.get('stage')}): {row.get('error')}"
  if status == "locked":
    return f"skipped {run}: another sweep runner holds it ({row.get('holder')})"
  if status == "skipped":
    return f"skipped {run}: done meanwhile"
  return f"{status} {run}"


def run_sweep(sweep: dict[str, Any], out_dir: str, *, jobs: int = 1, only: str | None = None,
              rerun: str | None = None, progress: bool = True,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs the sweep's pending runs (those without a done row, and those matching
  `rerun`) into `out_dir`; returns {"done", "failed", "skipped", "locked", "interrupted":
  lists of run ids, "rows": the rows written, "stopped": bool}."""
  if jobs < 1:
    raise ValueError(f"--jobs={jobs}: needs at least 1")
  out_dir = os.path.abspath(out_dir)
  rerun_pattern = compile_regex(rerun, "--rerun")
  selected = plan(sweep, only)
  results_lib.write_sweep(out_dir, sweep_record(sweep))
  finished = done_ids(out_dir)
  todo = [(i, r) for i, r in selected
          if i not in finished or (rerun_pattern is not None and rerun_pattern.search(i))]
  todo_ids = {i for i, _ in todo}
  outcome = {"done": [], "failed": [], "skipped": [i for i, _ in selected if i not in todo_ids],
             "locked": [], "interrupted": [], "rows": [], "stopped": False}
  write = say or (lambda line: tqdm.write(line, file=sys.stderr))
  if outcome["skipped"]:
    write(f"{len(outcome['skipped'])} of {len(selected)} runs already done (skipped); "
          f"{len(todo)} to run")
  if not todo:
    results_lib.write_csv(out_dir)
    return outcome
  stop, children = threading.Event(), Children()

  def on_term(signum, frame):  # pylint: disable=unused-argument
    stop.set()
    children.signal(signal.SIGTERM)  # train.py saves a checkpoint and exits

  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
  bar = tqdm(total=len(todo), unit="run", desc="sweep", disable=not progress, file=sys.stderr,
             dynamic_ncols=True)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      futures = {pool.submit(run_one, out_dir, sweep["config"], run,
                             rerun=bool(rerun_pattern and rerun_pattern.search(i)),
                             children=children, stop=stop): i for i, run in todo}
      pending = set(futures)
      try:
        while pending:
          finished_now, pending = concurrent.futures.wait(
              pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
          for future in finished_now:
            row = future.result()
            status = row["status"]
            outcome.setdefault(status if status != "stopped" else "interrupted", []).append(
                row["run"])
            if status in ("done", "failed"):
              outcome["rows"].append(row)
              results_lib.write_csv(out_dir)
            if status not in ("stopped", "interrupted"):
              write(summary_line(row))
            bar.update()
      except KeyboardInterrupt:
        # Ctrl-C reached the runs too (one process group): they save and exit 130.
        stop.set()
        write("interrupted: the running runs stop at a checkpoint; run the same command "
              "again to resume")
        for future in pending:
          future.cancel()
        concurrent.futures.wait(pending)
        outcome["stopped"] = True
  finally:
    bar.close()
    if in_main:
      signal.signal(signal.SIGTERM, previous)
  if stop.is_set() and not outcome["stopped"]:
    write("stopped (SIGTERM): the runs saved a checkpoint; run the same command again to "
          "resume")
  outcome["stopped"] = outcome["stopped"] or stop.is_set()
  results_lib.write_csv(out_dir)
  return outcome


# ----------------------------------------------------------------------------- dry run

def seconds_per_flop(rows: list[dict[str, Any]]) -> Callable[[float], float] | None:
  """Estimated seconds for a run of F FLOPs from finished runs: a least-squares line
  wall_s = a + b·F (start-up plus compute) when two or more runs differ in FLOPs and
  the fit is sensible, else wall_s/FLOP of their totals; None without finished runs."""
  points = [(float(r["flops"]), float(r["wall_s"])) for r in rows
            if isinstance(r.get("flops"), (int, float))
            and isinstance(r.get("wall_s"), (int, float)) and r["flops"] > 0]
  if not points:
    return None
  x, y = np.array(points).T
  if len(set(x)) >= 2:
    slope, intercept = np.polyfit(x, y, 1)
    if slope > 0 and intercept >= 0:
      return lambda f: float(intercept + slope * f)
  rate = y.sum() / x.sum()
  return lambda f: float(rate * f)


def duration(seconds: float | None) -> str:
  if seconds is None:
    return "unknown"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def dry_run(sweep: dict[str, Any], out_dir: str, *, only: str | None = None,
            rerun: str | None = None, jobs: int = 1,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Lists the runs (id, state, parameters, FLOPs, estimated time, train.py command) and
  runs nothing, writes nothing; returns one dict per run."""
  rerun_pattern = compile_regex(rerun, "--rerun")
  selected = plan(sweep, only)
  rows = {row["run"]: row for row in results_lib.latest_rows(out_dir)}
  estimate = seconds_per_flop([r for r in rows.values() if r.get("status") == "done"])
  listed, total = [], 0.0
  say(f"sweep {sweep.get('name')}: {len(selected)} of {len(sweep['runs'])} runs "
      f"(config {sweep['config']}, out {out_dir})")
  for run_id, run in selected:
    costs = prepare(sweep["config"], run)
    previous = rows.get(run_id, {})
    state = previous.get("status", "pending")
    if rerun_pattern is not None and rerun_pattern.search(run_id):
      state = "rerun"
    elif state == "failed":
      state = "failed (runs again)"
    item = {"run": run_id, "state": state, "overrides": run, **costs}
    if "error" in costs:
      say(f"{run_id}  {state}  error: {costs['error']}")
    else:
      seconds = None
      if state == "done":
        seconds = previous.get("wall_s")
      elif estimate is not None and "flops" in costs:
        seconds = estimate(costs["flops"])
        total += seconds
      item["estimated_s"] = seconds
      if "params" in costs:
        say(f"{run_id}  {state}  params {costs['params']['total']:,}  FLOPs "
            f"{costs['flops']:.3g}  time {duration(seconds)}")
      else:
        say(f"{run_id}  {state}  params and FLOPs unknown ({costs.get('costs_error')})  "
            f"time {duration(seconds)}")
    say("    python " + " ".join(sweepfile.train_command(
        sweep["config"], run, run_dir(out_dir, run_id))))
    listed.append(item)
  pending = [i for i in listed if i["state"] != "done"]
  if estimate is None:
    say(f"{len(pending)} runs to do; estimated time unknown (no finished runs in {out_dir})")
  else:
    say(f"{len(pending)} runs to do; estimated {duration(total)} in all"
        + (f", about {duration(total / jobs)} with --jobs={jobs}" if jobs > 1 else ""))
  return listed
