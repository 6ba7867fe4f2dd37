"""`zoo.scaling.report.build` on synthetic results: the fits, the compute multiplier
against the baseline, the alpha table, and the plots it writes."""

import json

import numpy as np
import pytest

from zoo.scaling import report, results, sweepfile


def _write(out, sweep, rows):
  out.mkdir(parents=True, exist_ok=True)
  sweep = dict(sweep)
  sweep["runs"] = [{"run": r["run"], "overrides": r["overrides"]} for r in rows]
  results.write_sweep(str(out), sweep)
  for row in rows:
    results.append(str(out), row)


def test_compute_report_fits_each_variant_and_the_multiplier(tmp_path):
  """Two variants on y = E + A (x / m)^-alpha: the second needs m = 2x the compute."""
  E, A, alpha = 1.5, 3e3, 0.35
  rows = []
  for name, m in (("softmax", 1.0), ("relu", 2.0)):
    for i, x in enumerate(np.geomspace(1e9, 1e12, 7)):
      overrides = {"arg.attention": name, "arg.width": 16 * (i + 1)}
      y = E + A * (x / m) ** -alpha
      rows.append({"run": sweepfile.run_id(overrides), "status": "done", "overrides": overrides,
                   "flops": float(x), "params": {"total": 1000 * (i + 1)},
                   "eval": {"bits_per_byte": y}, "wall_s": 1.0})
  _write(tmp_path, {"name": "synthetic", "config": "configs/tests/tiny_lm.py",
                    "metric": "bits_per_byte",
                    "plot": {"kind": "compute", "size_keys": ["arg.width"],
                             "baseline": "attention=softmax"},
                    "fit": {"bootstrap": 20}}, rows)
  built = report.build(str(tmp_path))
  assert built["rows"] == 14 and built["baseline"] == "attention=softmax"
  assert built["multipliers"]["attention=relu"] == pytest.approx(2.0, rel=0.02)
  fits = json.loads((tmp_path / "fits.json").read_text())["fits"]
  assert fits["attention=softmax"]["alpha"] == pytest.approx(alpha, rel=0.02)
  text = (tmp_path / "report.md").read_text()
  assert "| attention=relu | 7 |" in text and "1 (baseline)" in text
  assert (tmp_path / "plots" / "compute.png").stat().st_size > 1000
  assert (tmp_path / "plots" / "compute.svg").exists()


def test_alpha_report_table_best_alpha_and_plot(tmp_path):
  rows = []
  for seed in (0, 1):
    for a in (0.0, 0.5, 1.0, 1.5):
      overrides = {"arg.attention": "relu", "arg.alpha": a, "config.seed": seed}
      rows.append({"run": sweepfile.run_id(overrides), "status": "done",
                   "overrides": overrides, "flops": 1e9,
                   "eval": {"accuracy": 0.9 - 0.1 * abs(a - 1.0) + 0.01 * seed}})
    overrides = {"arg.attention": "softmax", "config.seed": seed}
    rows.append({"run": sweepfile.run_id(overrides), "status": "done", "overrides": overrides,
                 "flops": 1e9, "eval": {"accuracy": 0.92}})
  failed = {"arg.attention": "relu", "arg.alpha": 2.0, "config.seed": 0}
  rows.append({"run": sweepfile.run_id(failed), "status": "failed", "overrides": failed})
  _write(tmp_path, {"name": "alpha", "config": "configs/tests/tiny_vit.py",
                    "metric": "accuracy", "plot": {"kind": "alpha"}}, rows)
  built = report.build(str(tmp_path))
  assert built["rows"] == 10  # the failed run is not in the table
  assert built["best_alpha"] == {"4": 1.0}  # tiny_vit: 8x8 digits, patch 4 -> 4 tokens
  text = (tmp_path / "report.md").read_text()
  assert "| relu | 1.0 | 4 | False | False | 0.9050 (0.9000 / 0.9100) |" in text
  assert "| softmax | - | 4 | - | - |" in text
  assert (tmp_path / "plots" / "alpha.png").stat().st_size > 1000
