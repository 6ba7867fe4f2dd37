"""Run a scaling study: `python sweep.py --sweep sweeps/NAME.py[:ARG] --out DIR`.

    python sweep.py --sweep sweeps/tiny_test.py --out studies/tiny            # run it
    python sweep.py --sweep sweeps/tiny_test.py --out studies/tiny --dry-run  # list it
    python sweep.py report --out studies/tiny                     # table, fits and plots

A sweep file (`sweeps/*.py`) defines `get_sweep(arg=None)` returning a dict with `config`
(a config path with optional :args, as train.py --config takes) and `runs` (a list of
dicts; key `arg.NAME` goes into the config's argument string, `config.FIELD` becomes
--config.FIELD=VALUE; `zoo.scaling.grid`'s product, sweep, zip and chain build them),
and optional `name`, `metric`, `x`, `plot` and `fit` settings for the report.

Each run is `train.py` then `eval.py` in subprocesses, in DIR/runs/<slug>-<hash of its
overrides>/ (their output in log.txt there). A finished run adds a row to
DIR/results.jsonl (its overrides, parameters, FLOPs, steps, examples or tokens, wall and
CPU seconds, the eval metrics) and DIR/results.csv is rewritten; a failing run (a bad
option, a NaN) gets a row with status "failed" and its error, and the sweep goes on.
Running the same command again skips the finished runs and resumes an interrupted one
from its checkpoint; runs added to the sweep file run, removed ones keep their rows. A
lock per run keeps two runners (or SLURM jobs) off the same run. When the runs are done
(and by `report`), `zoo.scaling.report.build(DIR)` writes the tables, fits and plots.

--jobs N runs N at once (their train.py processes share the cores). --executor slurm
submits the runs as a SLURM job array through submitit (pip install
'attention-zoo[slurm]'), requeued on timeout or preemption and resuming from their
checkpoints; --executor slurm-local runs the same submitit path as local processes.

The last line on stdout is one JSON object (the counts of runs done, failed, skipped);
bad flags and sweep files fail with one line `error: ...` on stderr (exit status 1).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags

from zoo import cli
from zoo import config as config_lib
from zoo.scaling import report as report_lib
from zoo.scaling import results as results_lib
from zoo.scaling import runner as runner_lib
from zoo.scaling import slurm as slurm_lib
from zoo.scaling import sweepfile

COMMANDS = ("run", "report")
EXECUTORS = ("local", "slurm", "slurm-local")

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, optionally with an argument: "
                             "sweeps/NAME.py[:ARG] (or just NAME for sweeps/NAME.py).")
_OUT = flags.DEFINE_string("out", None, "Output folder: results.jsonl, results.csv, "
                           "sweep.json, runs/<run id>/ (the workdirs), plots/.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Local executor: runs at once (they share the "
                             "machine's cores).")
_EXECUTOR = flags.DEFINE_enum("executor", "local", EXECUTORS,
                              "local: subprocesses here; slurm: a SLURM job array through "
                              "submitit; slurm-local: submitit's local executor (tests).")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "List the runs (--dry-run) with their "
                                "parameters, FLOPs and estimated time; run nothing.")
_ONLY = flags.DEFINE_string("only", None, "Only the runs whose id matches this regex.")
_RERUN = flags.DEFINE_string("rerun", None, "Run again from scratch the runs whose id "
                             "matches this regex (their rows become 'superseded', their "
                             "workdirs move to DIR/superseded/).")
_ALL = flags.DEFINE_boolean("all", False, "report: include runs no longer in the sweep.")
_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM partition.")
_NODES = flags.DEFINE_integer("nodes", 1, "SLURM: nodes per run (one JAX process each).")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "SLURM: GPUs per node.")
_TIMEOUT = flags.DEFINE_integer("timeout_min", 60, "SLURM: minutes per job; a run that "
                                "needs longer is requeued and resumes.")
_PARALLELISM = flags.DEFINE_integer("array_parallelism", 8, "SLURM: jobs of the array "
                                    "running at once.")
_WAIT = flags.DEFINE_boolean("wait", True, "SLURM: wait for the jobs (Ctrl-C stops "
                             "waiting, not the jobs), then build the report.")
_OURS = ("sweep", "out", "jobs", "executor", "dry_run", "only", "rerun", "all",
         "slurm_partition", "nodes", "gpus_per_node", "timeout_min", "array_parallelism",
         "wait")


def _normalise(argv: list[str]) -> list[str]:
  """`--dry-run` as `--dry_run` (any of our flags may be spelt with dashes)."""
  out = [argv[0]]
  for arg in argv[1:]:
    match = re.fullmatch(r"(--?)(no)?([A-Za-z][A-Za-z0-9_-]*)(=.*)?", arg, re.DOTALL)
    if match and match.group(3).replace("-", "_") in _OURS:
      arg = (match.group(1) + (match.group(2) or "") + match.group(3).replace("-", "_")
             + (match.group(4) or ""))
    out.append(arg)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors and dashes allowed in our flag names."""
  if any(arg in ("-h", "-help", "--help", "-?", "--helpshort") for arg in argv[1:]):
    cli.print_help()
    sys.exit(0)
  argv = _normalise(argv)
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    hint = config_lib.did_you_mean([e.flagname.replace("-", "_")], _OURS)
    cli.fail(f"unknown flag --{e.flagname}{hint}; see --help")
  except flags.Error as e:
    cli.fail(e)


def _report(out_dir: str, all_runs: bool = False) -> None:
  try:
    report_lib.build(out_dir, all_runs=all_runs)
  except (ValueError, OSError) as e:
    cli.fail(f"the report of {out_dir}: {e}")


def _run(out_dir: str) -> dict:
  try:
    sweep = sweepfile.load(_SWEEP.value)
    if _DRY_RUN.value:
      listed = runner_lib.dry_run(sweep, out_dir, only=_ONLY.value, rerun=_RERUN.value,
                                  jobs=_JOBS.value)
      estimated = [i.get("estimated_s") for i in listed if i["state"] != "done"]
      return {"status": "dry_run", "out": out_dir, "runs": [i["run"] for i in listed],
              "errors": sum("error" in i for i in listed),
              "estimated_s": (None if not estimated or None in estimated
                              else round(sum(estimated), 1))}
    if _EXECUTOR.value == "local":
      if _NODES.value != 1 or _GPUS.value or _PARTITION.value:
        cli.fail("--nodes, --gpus_per_node and --slurm_partition are for --executor slurm")
      outcome = runner_lib.run_sweep(sweep, out_dir, jobs=_JOBS.value, only=_ONLY.value,
                                     rerun=_RERUN.value)
      counts = {k: len(outcome[k]) for k in ("done", "failed", "skipped", "locked",
                                             "interrupted")}
      stopped = outcome["stopped"]
    else:
      executor = slurm_lib.SlurmExecutor(
          os.path.join(out_dir, "slurm"), array_parallelism=_PARALLELISM.value,
          nodes=_NODES.value, gpus_per_node=_GPUS.value, timeout_min=_TIMEOUT.value,
          partition=_PARTITION.value,
          cluster="local" if _EXECUTOR.value == "slurm-local" else "slurm")
      outcome = slurm_lib.run_sweep(sweep, out_dir, executor, only=_ONLY.value,
                                    rerun=_RERUN.value, wait=_WAIT.value)
      statuses = [row["status"] for row in outcome["rows"]]
      counts = {k: statuses.count(k) for k in ("done", "failed", "locked", "error")}
      counts.update(skipped=len(outcome["skipped"]), jobs=len(outcome["jobs"]))
      stopped = outcome.get("stopped", False)
      if not _WAIT.value:
        return {"status": "submitted", "out": out_dir, **counts}
  except ValueError as e:
    cli.fail(e)
  if not stopped:
    _report(out_dir)
  return {"status": "interrupted" if stopped else "done", "out": out_dir, **counts,
          "results": os.path.join(out_dir, results_lib.RESULTS)}


def main(argv: list[str]) -> None:
  args = argv[1:]
  command = args[0] if args else "run"
  if command not in COMMANDS or len(args) > 1:
    cli.fail(f"unexpected argument(s) {args}: the command is `sweep.py [report] --flags`; "
             f"see --help")
  if not _OUT.value:
    cli.fail("--out DIR is required (the sweep's output folder)")
  out_dir = os.path.abspath(os.path.expanduser(_OUT.value))
  if command == "report":
    if _SWEEP.value or _DRY_RUN.value:
      cli.fail("report takes --out (and --all) only")
    if not os.path.exists(os.path.join(out_dir, results_lib.RESULTS)):
      cli.fail(f"{out_dir} has no {results_lib.RESULTS} (run the sweep first)")
    results_lib.write_csv(out_dir, current_only=not _ALL.value)
    _report(out_dir, all_runs=_ALL.value)
    rows = results_lib.load_results(out_dir, current_only=not _ALL.value)
    print(json.dumps({"status": "report", "out": out_dir, "runs": len(rows),
                      "results": os.path.join(out_dir, results_lib.CSV)}), flush=True)
    return
  if not _SWEEP.value:
    cli.fail("--sweep sweeps/NAME.py[:ARG] is required (or: sweep.py report --out DIR)")
  result = _run(out_dir)
  print(json.dumps(result), flush=True)
  if result["status"] == "interrupted" and _EXECUTOR.value == "local":
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
