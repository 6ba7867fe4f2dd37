"""Training curves of one or more runs as a PNG, from their `metrics.jsonl`:

    python -m zoo.plot WORKDIR [WORKDIR ...] [--out FILE.png]

One panel per quantity against the step: the loss, accuracy (classification) or bits per
byte (byte LMs), and the learning rate; the training values (logged every `log_every`
steps, averaged over the window) as solid lines, the evaluations as dashed lines with
markers, one colour per run. The default output is WORKDIR/metrics.png for one run and
runs.png in the current directory for several. Drawn with matplotlib's Agg backend (no
display needed). Errors (a missing workdir, no metrics yet) are one line on stderr, exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (metric, panel title): the panels, in order, drawn when some run logged the metric.
PANELS = (("loss", "loss"), ("accuracy", "accuracy"), ("bits_per_byte", "bits per byte"),
          ("lr", "learning rate"))


class PlotError(Exception):
  """A run that cannot be plotted; the message is one line."""


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """{"train/loss": {step: value}, "eval/accuracy": ...} from WORKDIR/metrics.jsonl; a
  step logged twice (a resumed run) keeps its last value."""
  if not os.path.isdir(workdir):
    raise PlotError(f"workdir {workdir} does not exist")
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"{path} does not exist: no metrics logged yet (train.py writes them "
                    f"every config.log_every steps)")
  series: dict[str, dict[int, float]] = {}
  unreadable = 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        unreadable += line.strip() != ""
        continue
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          series.setdefault(key, {})[step] = float(value)
  if unreadable:
    print(f"warning: skipped {unreadable} unreadable line(s) of {path}", file=sys.stderr)
  if not series:
    raise PlotError(f"{path} holds no metrics yet")
  return series


def plot(runs: dict[str, dict[str, dict[int, float]]], out: str) -> list[str]:
  """Draws `runs` ({label: read_metrics(...)}) into the PNG `out`; returns the panels."""
  panels = [(m, title) for m, title in PANELS
            if any(f"{split}/{m}" in s for s in runs.values() for split in ("train", "eval"))]
  fig = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  colours = [f"C{i % 10}" for i in range(len(runs))]
  for ax, (metric, title) in zip(axes, panels):
    for colour, (label, series) in zip(colours, runs.items()):
      for split, style in (("train", dict(linestyle="-")),
                           ("eval", dict(linestyle="--", marker="o", markersize=3))):
        points = sorted(series.get(f"{split}/{metric}", {}).items())
        if points:
          steps, values = zip(*points)
          ax.plot(steps, values, color=colour, label=f"{label} {split}", **style)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.savefig(out, dpi=100)
  return [m for m, _ in panels]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m zoo.plot", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                      help="run directories holding metrics.jsonl")
  parser.add_argument("--out", default=None,
                      help="PNG to write (default: WORKDIR/metrics.png for one run, "
                           "runs.png for several)")
  args = parser.parse_args(argv)
  out = args.out or (os.path.join(args.workdirs[0], "metrics.png") if len(args.workdirs) == 1
                     else "runs.png")
  try:
    runs = {workdir: read_metrics(workdir) for workdir in args.workdirs}
    if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
      raise PlotError(f"--out {out}: folder {os.path.dirname(out)} does not exist")
    panels = plot(runs, out)
  except PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {out} ({', '.join(panels)} against step for {len(runs)} run(s))")


if __name__ == "__main__":
  main()
