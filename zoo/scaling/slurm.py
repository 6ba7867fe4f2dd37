"""The SLURM executor: one job per run through `submitit` (the optional extra `slurm`:
`pip install 'attention-zoo[slurm]'`).

    python sweep.py --sweep sweeps/lm_compute.py --out studies/lm --executor slurm \\
        --slurm_partition gpu --nodes 1 --gpus_per_node 8 --timeout_min 240 \\
        --array_parallelism 16

The pending runs are submitted as one job array (at most `array_parallelism` running at
once). Each job is a `RunJob`, a `submitit.helpers.Checkpointable` callable that does the
run exactly as the local runner does (`zoo.scaling.runner.run_one`: lock, train.py,
eval.py, its row appended to DIR/results.jsonl by the job itself). On a timeout or a
preemption SLURM signals the job; `RunJob.checkpoint` stops train.py with SIGTERM (it
saves a checkpoint), and returns the job itself for requeueing, which resumes from that
checkpoint.

Multi-node runs (`nodes` > 1) start one task per node; each passes train.py and eval.py
`--coordinator_address=<first node>:<port> --num_processes=<tasks> --process_id=<rank>`
from `submitit.JobEnvironment()`; rank 0 holds the lock and writes the row.

`cluster="local"` uses submitit's local executor (the same submitit code path, as
processes on this machine; `--executor slurm-local`) for tests; at most
`array_parallelism` jobs run at once there too.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any, Callable

from tqdm import tqdm

from zoo.scaling import results as results_lib
from zoo.scaling import runner as runner_lib
from zoo.scaling import sweepfile

try:  # the optional extra
  import submitit
  _Checkpointable = submitit.helpers.Checkpointable
except ImportError:  # pragma: no cover  (sweep.py says how to install it when asked for)
  submitit = None
  _Checkpointable = object

PORT_BASE, PORT_RANGE = 20000, 20000  # the coordinator's port: from the job id, in this range


def coordinator_flags(env) -> list[str]:
  """train.py / eval.py flags of a multi-process job from a submitit JobEnvironment (its
  hostnames, num_tasks, global_rank, job_id); none for a single task."""
  if env.num_tasks <= 1:
    return []
  port = int(os.environ.get("ZOO_COORDINATOR_PORT") or
             PORT_BASE + zlib.crc32(str(env.job_id).encode()) % PORT_RANGE)
  return [f"--coordinator_address={env.hostnames[0]}:{port}",
          f"--num_processes={env.num_tasks}", f"--process_id={env.global_rank}"]


class RunJob(_Checkpointable):
  """One run as a submitit job: `__call__` does it (`runner.run_one`) and returns its row;
  `checkpoint` (called by submitit on timeout / preemption) stops train.py at a
  checkpoint and requeues the job."""

  def __init__(self, out_dir: str, sweep_config: str, run: dict[str, Any], *,
               rerun: bool = False, executor: str = "slurm", grace_s: float = 60.0):
    self.out_dir = os.path.abspath(out_dir)
    self.sweep_config = sweep_config
    self.run = run
    self.rerun = rerun
    self.executor = executor
    self.grace_s = grace_s
    self._children = runner_lib.Children()

  @property
  def run_id(self) -> str:
    return sweepfile.run_id(self.run)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state.pop("_children", None)  # live processes stay behind
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._children = runner_lib.Children()

  def __call__(self) -> dict[str, Any]:
    env = submitit.JobEnvironment()
    rerun, self.rerun = self.rerun, False  # a requeued job resumes; it does not start over
    return runner_lib.run_one(self.out_dir, self.sweep_config, self.run, rerun=rerun,
                              executor=self.executor, process_flags=coordinator_flags(env),
                              process_id=env.global_rank, children=self._children)

  def checkpoint(self, *args: Any, **kwargs: Any):
    """Stops train.py (SIGTERM: it saves a checkpoint and exits; SIGKILL after
    `grace_s`) and resubmits this job, which resumes from that checkpoint."""
    self._children.stop(self.grace_s)
    return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor:
  """Submits runs as SLURM jobs (or submitit local jobs with `cluster="local"`) and waits
  for them.

  Args:
    folder: submitit's folder (job scripts, pickles, logs), e.g. DIR/slurm.
    array_parallelism: at most this many jobs of the array run at once.
    nodes: nodes per run (one task per node).
    gpus_per_node: GPUs per node.
    timeout_min: each job's time limit; a run that needs longer is requeued and resumes.
    partition: the SLURM partition (None: the cluster's default).
    cluster: None or "slurm" for SLURM, "local" for submitit's local executor.
    extra: more submitit parameters, e.g. {"slurm_account": "abc", "cpus_per_task": 8}.
  """

  def __init__(self, folder: str, *, array_parallelism: int = 8, nodes: int = 1,
               gpus_per_node: int = 0, timeout_min: float = 60, partition: str | None = None,
               cluster: str | None = None, extra: dict[str, Any] | None = None):
    if submitit is None:
      raise ValueError("the SLURM executor needs submitit: pip install 'attention-zoo[slurm]' "
                       "(or pip install submitit)")
    for name, value in (("array_parallelism", array_parallelism), ("nodes", nodes),
                        ("timeout_min", timeout_min)):
      if value < 1:
        raise ValueError(f"--{name}={value}: needs at least 1")
    if gpus_per_node < 0:
      raise ValueError(f"--gpus_per_node={gpus_per_node}: cannot be negative")
    self.local = cluster == "local"
    if self.local and nodes > 1:
      raise ValueError(f"--nodes={nodes}: the local executor runs on one node")
    self.cluster = "local" if self.local else "slurm"
    self.array_parallelism = array_parallelism
    try:
      self.executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
    except Exception as e:  # pylint: disable=broad-except  (e.g. no SLURM on this machine)
      raise ValueError(f"--executor={'slurm-local' if self.local else 'slurm'}: "
                       f"{type(e).__name__}: {e}") from None
    parameters = dict(timeout_min=int(timeout_min), nodes=nodes, tasks_per_node=1,
                      gpus_per_node=gpus_per_node, name="zoo-sweep")
    if not self.local:
      parameters.update(slurm_array_parallelism=array_parallelism)
      if partition:
        parameters.update(slurm_partition=partition)
    parameters.update(extra or {})
    try:
      self.executor.update_parameters(**parameters)
    except Exception as e:  # pylint: disable=broad-except  (submitit's parameter checks)
      raise ValueError(f"submitit parameters: {type(e).__name__}: {e}") from None

  def submit(self, jobs: list[RunJob]) -> list:
    """Submits the jobs as one array (SLURM) or the first `array_parallelism` of them
    (local; `wait` submits the rest as they finish); returns submitit's Job objects."""
    if self.local:
      return [self.executor.submit(job) for job in jobs[:self.array_parallelism]]
    return self.executor.submit_array(jobs)

  def wait(self, jobs: list[RunJob], submitted: list, *, progress: bool = True,
           say: Callable[[str], None] = print, poll_s: float = 1.0) -> list[dict[str, Any]]:
    """Waits for every job (submitting the local executor's remaining ones as slots
    free up); returns their rows (or {"run", "status": "error", "error"} for a job that
    raised)."""
    waiting = list(jobs[len(submitted):])
    running = list(zip(jobs[:len(submitted)], submitted))
    rows = []
    bar = tqdm(total=len(jobs), unit="run", desc="jobs", disable=not progress, dynamic_ncols=True)
    try:
      while running:
        still = []
        for job, handle in running:
          if not handle.done():
            still.append((job, handle))
            continue
          try:
            row = handle.result()
          except Exception as e:  # pylint: disable=broad-except  (the job's own failure)
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            row = {"run": job.run_id, "status": "error",
                   "error": (lines or [type(e).__name__])[-1].strip(),
                   "job_id": handle.job_id}
          rows.append(row)
          bar.update()
          tqdm.write(runner_lib.summary_line(row) if row["status"] != "error" else
                     f"error   {row['run']}: job {row['job_id']} failed: {row['error']}")
          if waiting:
            nxt = waiting.pop(0)
            still.append((nxt, self.executor.submit(nxt)))
        running = still
        if running:
          time.sleep(poll_s)
    finally:
      bar.close()
    return rows


def run_sweep(sweep: dict[str, Any], out_dir: str, executor: SlurmExecutor, *,
              only: str | None = None, rerun: str | None = None, progress: bool = True,
              wait: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
  """Submits the sweep's pending runs as jobs and (with `wait`) waits for them; returns
  {"jobs": job ids, "rows": the jobs' rows, "skipped": run ids already done}."""
  out_dir = os.path.abspath(out_dir)
  rerun_pattern = runner_lib.compile_regex(rerun, "--rerun")
  selected = runner_lib.plan(sweep, only)
  results_lib.write_sweep(out_dir, runner_lib.sweep_record(sweep))
  finished = runner_lib.done_ids(out_dir)
  jobs = [RunJob(out_dir, sweep["config"], run,
                 rerun=bool(rerun_pattern and rerun_pattern.search(i)),
                 executor="slurm-local" if executor.local else "slurm")
          for i, run in selected
          if i not in finished or (rerun_pattern is not None and rerun_pattern.search(i))]
  skipped = [i for i, _ in selected if i in finished and all(j.run_id != i for j in jobs)]
  if skipped:
    say(f"{len(skipped)} of {len(selected)} runs already done (skipped); {len(jobs)} to run")
  outcome = {"jobs": [], "rows": [], "skipped": skipped}
  if not jobs:
    results_lib.write_csv(out_dir)
    return outcome
  submitted = executor.submit(jobs)
  outcome["jobs"] = [handle.job_id for handle in submitted]
  say(f"submitted {len(submitted)} job(s) to {executor.cluster}"
      + (f" ({len(jobs) - len(submitted)} more as these finish)" if executor.local and
         len(jobs) > len(submitted) else "")
      + f": {', '.join(outcome['jobs'][:5])}{' ...' if len(submitted) > 5 else ''}")
  if wait:
    try:
      outcome["rows"] = executor.wait(jobs, submitted, progress=progress, say=say)
    except KeyboardInterrupt:
      unsubmitted = (f" ({len(jobs) - len(submitted)} local runs were not started: run the "
                     f"same command again for them)" if executor.local and
                     len(jobs) > len(submitted) else "")
      say(f"stopped waiting; the submitted jobs keep running{unsubmitted}. `python sweep.py "
          f"report --out {out_dir}` when they are done")
      outcome["stopped"] = True
  results_lib.write_csv(out_dir)
  return outcome
