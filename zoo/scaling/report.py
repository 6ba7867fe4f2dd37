"""The table, fits and plots of a finished (or partly finished) sweep: `build(out_dir)`.

Reads `DIR/results.jsonl` (the runs that finished) and the sweep's settings that the runner
saved in `DIR/sweep.json` (the sweep file's `metric`, `lower_is_better`, `plot`, `fit`
and `config`), and writes

* `DIR/report.md`: every run (its overrides, parameters, training FLOPs, the metric,
  wall time) and, per plot kind, the summary below;
* `DIR/fits.json` and `DIR/plots/*.png|svg`.

Plot kinds (`plot: {"kind": ...}` in the sweep file):

* `"compute"`: the metric (or the error rate 1 - accuracy when higher is better) against
  training FLOPs per variant, a power law y = E + A·FLOPs^(-alpha) fitted to each variant
  (`fit.fit_power_law`, bootstrap confidence intervals), and each variant's compute
  multiplier against `plot.baseline` at equal loss (`fit.compute_multiplier_ci`; > 1: the
  variant needs more compute). Variants are the runs' override values except the keys in
  `plot.size_keys` and `config.seed`.
* `"alpha"`: the ReLU paper's Fig. 2: metric against alpha per activation and sequence
  length, softmax as a band; sequence length = the ViT's token count.
* `"facets"`: the same with one panel per combination of `plot.facet_keys` (e.g.
  qk-LayerNorm and the gate on or off).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from zoo.scaling import fit as fit_lib
from zoo.scaling import plots, results, sweepfile

SEED_KEYS = ("config.seed", "arg.seed")


def _metric_value(row: dict, metric: str) -> float | None:
  value = (row.get("eval") or {}).get(metric)
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _tokens(config) -> int | None:
  """A ViT config's token count (patches, +1 with a class token)."""
  model = config.model
  if model.get("name") != "vit":
    return int(config.data.get("seq_len") or 0) or None
  size = model.get("image_size")
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  patch = model.get("patch_size")
  if not patch:
    return None
  return (h // patch) * (w // patch) + (model.get("pool_type") == "tok")


def _label(overrides: dict, skip: tuple[str, ...]) -> str:
  parts = [f"{k.split('.', 1)[1]}={v}" for k, v in sorted(overrides.items()) if k not in skip]
  return ",".join(parts) or "default"


def _fmt(x: float | None, digits: int = 4) -> str:
  if x is None:
    return "-"
  return f"{x:.3g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}"


def _run_table(rows: list[dict], metric: str) -> list[str]:
  lines = [f"| run | params | training FLOPs | {metric} | wall s |", "|---|---|---|---|---|"]
  for row in rows:
    params = (row.get("params") or {}).get("total")
    lines.append(f"| {row['run']} | {params if params is not None else '-'} | "
                 f"{_fmt(row.get('flops'))} | {_fmt(_metric_value(row, metric))} | "
                 f"{_fmt(row.get('wall_s'), 0)} |")
  return lines


def _compute_report(rows, settings, out_dir, metric, lower) -> tuple[list[str], dict]:
  plot = settings.get("plot") or {}
  skip = tuple(plot.get("size_keys", ())) + SEED_KEYS
  transform = (lambda v: v) if lower else (lambda v: 1.0 - v)
  ylabel = metric if lower else f"1 - {metric}"
  points: dict[str, list[tuple[float, float]]] = {}
  for row in rows:
    value = _metric_value(row, metric)
    if value is None or not row.get("flops"):
      continue
    y = transform(value)
    if y > 0:
      points.setdefault(_label(row["overrides"], skip), []).append((float(row["flops"]), y))
  bootstrap = int((settings.get("fit") or {}).get("bootstrap", 200))
  fits, lines = {}, []
  for name, pts in sorted(points.items()):
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if len(set(x)) < 3:
      lines.append(f"- {name}: {len(set(x))} sizes, too few to fit")
      continue
    fits[name] = fit_lib.fit_power_law(x, y, bootstrap=bootstrap, seed=0)
  baseline = plot.get("baseline")
  if baseline is not None and baseline not in fits:
    lines.append(f"- baseline {baseline!r} has no fit (variants: {sorted(points)})")
    baseline = None
  multipliers = {}
  table = [f"| variant | points | E | A | alpha | compute x vs {baseline or '-'} (95% CI) |",
           "|---|---|---|---|---|---|"]
  for name, f in fits.items():
    cell = "-"
    if baseline and name != baseline:
      try:
        estimate, lo, hi = fit_lib.compute_multiplier_ci(f, fits[baseline])
        multipliers[name] = estimate
        cell = f"{estimate:.2f} ({lo:.2f}-{hi:.2f})"
      except ValueError as e:
        cell = f"n/a ({e})"
    elif name == baseline:
      cell = "1 (baseline)"
    ci = lambda key: (f" ({f[key + '_ci'][0]:.3g}-{f[key + '_ci'][1]:.3g})"  # noqa: E731
                      if key + "_ci" in f else "")
    table.append(f"| {name} | {f['n']} | {f['E']:.3g}{ci('E')} | {f['A']:.3g}{ci('A')} | "
                 f"{f['alpha']:.3g}{ci('alpha')} | {cell} |")
    for warning in f.get("warnings", []):
      lines.append(f"- {name}: {warning}")
  written = plots.plot_compute(points, fits, os.path.join(out_dir, "plots", "compute"),
                               ylabel=ylabel, baseline=baseline, multipliers=multipliers)
  summary = ([f"## Fits: {ylabel} = E + A * FLOPs^(-alpha)", ""] + table + [""] + lines
             + [""] + [f"![compute]({os.path.relpath(p, out_dir)})" for p in written
                       if p.endswith(".png")])
  serialisable = {name: {k: v for k, v in f.items() if k != "bootstrap"}
                  for name, f in fits.items()}
  return summary, {"fits": serialisable, "multipliers": multipliers, "baseline": baseline}


def _alpha_rows(rows, settings, metric) -> list[dict]:
  out = []
  for row in rows:
    value = _metric_value(row, metric)
    config = sweepfile.load_config(settings["config"], row["overrides"])
    options = dict(config.model.get("attention_options") or {})
    attention = config.model.get("attention")
    entry = {"alpha": options.get("alpha") if attention != "softmax" else None,
             "attention": attention if attention == "softmax" else
             options.get("activation", attention),
             "seq_len": _tokens(config),
             "seed": row["overrides"].get("config.seed", 0),
             metric: value if value is not None else float("nan")}
    if attention != "softmax":  # the reference has no such switches: drawn in every panel
      entry.update(qk_layernorm=options.get("qk_layernorm"), gate=options.get("output_gate"))
    out.append(entry)
  return out


def _alpha_report(rows, settings, out_dir, metric, lower, kind) -> tuple[list[str], dict]:
  table_rows = _alpha_rows(rows, settings, metric)
  plot = settings.get("plot") or {}
  if kind == "facets":
    written = plots.plot_facets(table_rows, os.path.join(out_dir, "plots", "facets"),
                                facet_keys=tuple(plot.get("facet_keys", ("qk_layernorm", "gate"))),
                                metric=metric, lower_is_better=lower)
  else:
    written = plots.plot_alpha_sweep(table_rows, os.path.join(out_dir, "plots", "alpha"),
                                     metric=metric, lower_is_better=lower)
  groups: dict[tuple, list[float]] = {}
  for r in table_rows:
    key = (r["attention"], r["alpha"], r["seq_len"], r.get("qk_layernorm"), r.get("gate"))
    groups.setdefault(key, []).append(r[metric])
  table = [f"| attention | alpha | tokens | qk-LN | gate | {metric}: mean (each seed) |",
           "|---|---|---|---|---|---|"]
  for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
    values = groups[key]
    finite = [v for v in values if math.isfinite(v)]
    mean = f"{np.mean(finite):.4f}" if finite else "failed"
    each = " / ".join(f"{v:.4f}" for v in values)
    table.append("| " + " | ".join("-" if v is None else str(v) for v in key) +
                 f" | {mean} ({each}) |")
  best = {}
  for tokens in sorted({r["seq_len"] for r in table_rows if r["seq_len"]}):
    scored = [(np.mean(v), k[1]) for k, v in groups.items()
              if k[2] == tokens and k[1] is not None and all(map(math.isfinite, v))]
    if scored:
      best[tokens] = (min(scored) if lower else max(scored))[1]
  lines = [f"- best alpha at {t} tokens: {a}" for t, a in best.items()]
  title = "## Ablation: accuracy against alpha per switch" if kind == "facets" else \
      "## Alpha sweep"
  summary = ([title, ""] + table + [""] + lines + [""]
             + [f"![{kind}]({os.path.relpath(p, out_dir)})" for p in written
                if p.endswith(".png")])
  return summary, {"best_alpha": {str(k): v for k, v in best.items()}}


def build(out_dir: str, *, all_runs: bool = False) -> dict[str, Any]:
  """Writes report.md, fits.json and plots for `out_dir` from the finished runs of the
  current sweep (`all_runs`: also those of runs since removed from it); returns what it
  wrote."""
  settings = results.read_sweep(out_dir) or {}
  rows = results.load_results(out_dir, current_only=not all_runs)
  metric = settings.get("metric") or "accuracy"
  lower = settings.get("lower_is_better")
  if lower is None:
    lower = metric not in ("accuracy",)
  kind = (settings.get("plot") or {}).get("kind")
  lines = [f"# Sweep {settings.get('name', os.path.basename(os.path.abspath(out_dir)))}", "",
           f"{len(rows)} finished runs; metric `{metric}` "
           f"({'lower' if lower else 'higher'} is better).", ""]
  extra: dict[str, Any] = {}
  if rows and kind == "compute":
    summary, extra = _compute_report(rows, settings, out_dir, metric, lower)
    lines += summary + [""]
  elif rows and kind in ("alpha", "facets"):
    summary, extra = _alpha_report(rows, settings, out_dir, metric, lower, kind)
    lines += summary + [""]
  lines += ["## Runs", ""] + _run_table(rows, metric)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "fits.json"), "w") as f:
    json.dump(extra, f, indent=1, default=str)
  return {"report": os.path.join(out_dir, "report.md"), "rows": len(rows), **extra}
