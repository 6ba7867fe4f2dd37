"""Scaling studies: sweeps over attention variants, sizes and options, run costs, fits
and plots.

* `grid`: `product`, `sweep`, `zip`, `chain` build a sweep file's `runs`.
* `sweepfile`: loading `sweeps/NAME.py[:ARG]`, run ids, the train.py command of a run.
* `runner` (local, `--jobs N`) and `slurm` (submitit): each run is `train.py` then
  `eval.py` in its own workdir `DIR/runs/<id>`; resumable, locked, failures recorded.
* `flops`: parameters and training FLOPs of a config (each family's own formula).
* `results`: `DIR/results.jsonl` / `results.csv`, `load_results(DIR)`.
* `fit`: `fit_power_law` (y = E + A x^-alpha, Huber on log y, L-BFGS-B, bootstrap),
  `fit_shared_E`, `compute_multiplier(_ci)`; `plots`; `report.build(DIR)`.

The command line is `python sweep.py` (see its --help).
"""

from zoo.scaling import fit, flops, grid, plots, report, results, runner, sweepfile
from zoo.scaling.fit import compute_multiplier, compute_multiplier_ci, fit_power_law, fit_shared_E
from zoo.scaling.grid import chain, product, sweep, zip  # pylint: disable=redefined-builtin
from zoo.scaling.results import load_results

__all__ = ["chain", "compute_multiplier", "compute_multiplier_ci", "fit", "fit_power_law",
           "fit_shared_E", "flops", "grid", "load_results", "plots", "product", "report",
           "results", "runner", "sweep", "sweepfile", "zip"]
