"""A sweep's output folder: `results.jsonl`, `results.csv` and `sweep.json`.

    DIR/results.jsonl   one JSON object per finished or failed run, appended (under a lock)
    DIR/results.csv     the table: the latest row of each run, flattened (`write_csv`)
    DIR/sweep.json      the sweep last run into DIR: its file, config, settings and runs
    DIR/runs/<run id>/  each run's workdir (train.py's checkpoints, metrics) and log.txt

A row of a finished run (`status` "done") holds at least `run` (its id), `overrides` (the
run's dict from the sweep), `params` ({"total", "non_embedding"}), `flops` (training
FLOPs), `flops_per_step`, `steps`, `examples` (and `tokens` for language models),
`wall_s`, `cpu_s` and `eval` (the metrics eval.py printed). A failed run's row has
`status` "failed" and `error` (one line). `--rerun` turns earlier rows of a run into
`status` "superseded" (kept as history, never read as results).

`load_results(DIR)` returns the latest "done" row of each run; `current_only=True` keeps
only the runs of the sweep in `sweep.json` (a run removed from the sweep file keeps its
row in results.jsonl).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
from typing import Any, Iterator

from zoo.training.workdir import atomic_write

RESULTS = "results.jsonl"
CSV = "results.csv"
SWEEP = "sweep.json"
LOCK = ".results.lock"
RUNS = "runs"
# The table's first columns, in this order (then eval.*, the overrides, the rest).
FIRST_COLUMNS = ("run", "status", "params.total", "params.non_embedding", "flops",
                 "flops_per_step", "flops_per_example", "steps", "examples", "tokens",
                 "wall_s", "cpu_s")


@contextlib.contextmanager
def locked(out_dir: str) -> Iterator[None]:
  """An exclusive lock on DIR's results (`DIR/.results.lock`, fcntl.flock, blocking)."""
  os.makedirs(out_dir, exist_ok=True)
  fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def read_rows(out_dir: str) -> list[dict[str, Any]]:
  """Every row of DIR/results.jsonl in file order (a torn or foreign line is skipped)."""
  path = os.path.join(out_dir, RESULTS)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("run"), str):
        rows.append(row)
  return rows


def append(out_dir: str, row: dict[str, Any]) -> None:
  """Appends one row to DIR/results.jsonl under the lock."""
  line = json.dumps(row, default=str) + "\n"
  with locked(out_dir):
    with open(os.path.join(out_dir, RESULTS), "a") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())


def supersede(out_dir: str, run_ids: set[str]) -> int:
  """Marks the done and failed rows of `run_ids` "superseded" (keeping their old status
  as `superseded_status`); returns how many rows changed."""
  path = os.path.join(out_dir, RESULTS)
  with locked(out_dir):
    if not os.path.exists(path):
      return 0
    with open(path) as f:
      lines = f.readlines()
    changed, out = 0, []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        out.append(line)
        continue
      if (isinstance(row, dict) and row.get("run") in run_ids
          and row.get("status") in ("done", "failed")):
        row["superseded_status"], row["status"] = row["status"], "superseded"
        line = json.dumps(row, default=str) + "\n"
        changed += 1
      out.append(line if line.endswith("\n") else line + "\n")
    if changed:
      atomic_write(path, "".join(out))
  return changed


def read_sweep(out_dir: str) -> dict[str, Any] | None:
  """DIR/sweep.json (the sweep last run into DIR), or None."""
  path = os.path.join(out_dir, SWEEP)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_sweep(out_dir: str, sweep: dict[str, Any]) -> None:
  """Writes DIR/sweep.json atomically."""
  os.makedirs(out_dir, exist_ok=True)
  atomic_write(os.path.join(out_dir, SWEEP),
                           json.dumps(sweep, indent=1, default=str) + "\n")


def current_runs(out_dir: str) -> list[str] | None:
  """The run ids of the sweep in DIR/sweep.json, in its order (None without one)."""
  sweep = read_sweep(out_dir)
  return None if sweep is None else [r["run"] for r in sweep.get("runs", [])]


def latest_rows(out_dir: str, *, current_only: bool = False) -> list[dict[str, Any]]:
  """The latest row that is not "superseded" of each run: the current sweep's runs first,
  in its order, then the others by first appearance (those only without
  `current_only`)."""
  latest: dict[str, dict[str, Any]] = {}
  for row in read_rows(out_dir):
    if row.get("status") != "superseded":
      latest.pop(row["run"], None)
      latest[row["run"]] = row
  order = current_runs(out_dir)
  if order is None:
    return list(latest.values())
  ordered = [latest[r] for r in order if r in latest]
  if not current_only:
    ordered += [row for run, row in latest.items() if run not in set(order)]
  return ordered


def load_results(out_dir: str, *, current_only: bool = False,
                 status: str | None = "done") -> list[dict[str, Any]]:
  """The latest row of each run whose status is `status` ("done"; None: any), see
  `latest_rows`."""
  return [row for row in latest_rows(out_dir, current_only=current_only)
          if status is None or row.get("status") == status]


def flatten(row: dict[str, Any]) -> dict[str, Any]:
  """A row as one level: nested dicts joined with '.', the overrides under their own
  keys (`arg.attention`, `config.seed`), lists as JSON."""
  out: dict[str, Any] = {}

  def visit(value, prefix):
    if isinstance(value, dict) and value:
      for key, inner in value.items():
        visit(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple, dict)):
      out[prefix] = json.dumps(value)
    else:
      out[prefix] = value

  for key, value in row.items():
    visit(value, "" if key == "overrides" else key)
  return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
  seen = list(dict.fromkeys(k for row in rows for k in row))
  first = [c for c in FIRST_COLUMNS if c in seen]
  metrics = [c for c in seen if c.startswith("eval.")]
  overrides = [c for c in seen if c.startswith(("arg.", "config."))]
  rest = [c for c in seen if c not in set(first + metrics + overrides)]
  return first + metrics + overrides + rest


def write_csv(out_dir: str, *, current_only: bool = True) -> str:
  """Writes DIR/results.csv: the latest row of each run (done and failed), flattened;
  returns its path."""
  rows = [flatten(row) for row in latest_rows(out_dir, current_only=current_only)]
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=_columns(rows), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  path = os.path.join(out_dir, CSV)
  os.makedirs(out_dir, exist_ok=True)
  atomic_write(path, text.getvalue())
  return path
