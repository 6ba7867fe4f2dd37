"""Figures for scaling studies, each written as PNG and SVG (matplotlib's Agg backend, no
display needed); every function returns the paths it wrote, [stem.png, stem.svg], and
creates the parent folders.

* `plot_compute`: y (loss, or error rate = 1 - accuracy) against training compute x on
  log-log axes, one colour per variant: the runs as points and the fitted power law
  y = E + A * x^(-alpha) (`zoo.scaling.fit`) over that variant's x range; the legend gives
  alpha (with its bootstrap interval when there is one) and, against a baseline, the
  compute multiplier m = x_variant(y*) / x_baseline(y*) (m > 1: the variant needs m times
  the baseline's compute).
* `plot_alpha_sweep`: after Fig. 2 of Wortsman et al. 2023 ("Replacing softmax with ReLU
  in vision transformers", arXiv 2309.08586): the metric against the exponent alpha of the
  L^(-alpha) scaling of pointwise attention, one line per (activation, sequence length)
  with the mean over seeds and min-max error bars; softmax (rows with alpha None) at each
  sequence length as a horizontal band spanning its seeds' min-max around a dashed mean,
  in that length's colour.
* `plot_facets`: the same drawing, one panel per combination of on/off switches (e.g.
  qk_layernorm x gate), panels sharing the y axis.

Rows for the sweeps are dicts such as {"attention": "relu", "alpha": 1.0, "seq_len": 256,
"seed": 0, "loss": 2.31}; non-finite metric values (diverged runs) are left out of the
means and counted in a note on the figure.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import warnings
from typing import Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zoo.scaling import fit as fit_lib

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


# ----------------------------------------------------------------------------- helpers

def _save(fig: Figure, path_stem) -> list[str]:
  """Writes stem.png and stem.svg (a .png/.svg suffix on the stem is dropped)."""
  stem = pathlib.Path(path_stem)
  if stem.suffix.lower() in (".png", ".svg"):
    stem = stem.with_suffix("")
  stem.parent.mkdir(parents=True, exist_ok=True)
  png, svg = f"{stem}.png", f"{stem}.svg"
  fig.savefig(png, dpi=150)
  fig.savefig(svg, metadata={"Date": None})
  return [png, svg]


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _show(key: str, value) -> str:
  """A facet or series value as a label: on/off for switches, L=256 for lengths."""
  if isinstance(value, (bool, np.bool_)):
    return f"{key}={'on' if value else 'off'}"
  if key == "seq_len":
    return f"L={value}"
  if key == "attention":
    return str(value)
  return f"{key}={value}"


def _order(value):
  """Sort key for mixed values: numbers (and switches) first, then strings, then None."""
  if value is None:
    return (2, "")
  if _number(value) or isinstance(value, (bool, np.bool_)):
    return (0, float(value))
  return (1, str(value))


def _check_rows(rows, keys: Sequence[str], metric: str, what: str) -> list[dict]:
  if not isinstance(metric, str) or not metric:
    raise ValueError(f"{what}: metric must be the name of a row key, got {metric!r}")
  if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
    raise ValueError(f"{what}: rows must be a non-empty list of dicts")
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"{what}: row {i} is a {type(row).__name__}, not a dict")
    missing = [k for k in (*keys, metric) if k not in row]
    if missing:
      raise ValueError(f"{what}: row {i} lacks key(s) {missing} (has {sorted(row)})")
    if not _number(row[metric]):
      raise ValueError(f"{what}: row {i} has {metric}={row[metric]!r}, not a number")
  return list(rows)


def _summaries(rows, series_keys, x, metric):
  """{series: {x: (mean, min, max)}} over the finite metric values, and how many
  non-finite values were left out."""
  values: dict[tuple, dict] = {}
  dropped = 0
  for row in rows:
    v = float(row[metric])
    if not math.isfinite(v):
      dropped += 1
      continue
    series = tuple(row.get(k) for k in series_keys)
    values.setdefault(series, {}).setdefault(row[x], []).append(v)
  out = {s: {xv: (float(np.mean(v)), float(np.min(v)), float(np.max(v)))
             for xv, v in by_x.items()} for s, by_x in values.items()}
  return out, dropped


def _draw_sweep(ax, rows, *, x, metric, series_keys, colours, styles) -> int:
  """Lines with min-max error bars per series for rows with a numeric x; rows with
  x None (softmax, when x is alpha) as a dashed mean line in a min-max band. Colours by
  the last series key, markers and line styles by the rest. Returns the dropped count."""
  for row in rows:
    if row[x] is not None and not _number(row[x]):
      raise ValueError(f"{x}={row[x]!r} is not a number (use None for the softmax baseline)")
  summaries, dropped = _summaries(rows, series_keys, x, metric)
  for series in sorted(summaries, key=lambda s: tuple(_order(v) for v in s)):
    by_x = summaries[series]
    colour = colours[series[-1]]
    marker, linestyle = styles[series[:-1]]
    label = ", ".join(_show(k, v) for k, v in zip(series_keys, series))
    band = by_x.pop(None, None)
    if band is not None:
      mean, lo, hi = band
      ax.axhline(mean, color=colour, linestyle="--", linewidth=1.2, label=label)
      ax.axhspan(lo, hi, color=colour, alpha=0.15, linewidth=0)
    if by_x:
      xs = sorted(by_x)
      mean, lo, hi = (np.array([by_x[v][i] for v in xs]) for i in range(3))
      ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], color=colour, marker=marker,
                  linestyle=linestyle, capsize=3, markersize=4, label=label)
  return dropped


def _styles(rows, series_keys):
  """Consistent colours (by the last series key) and (marker, line style) per the rest,
  shared by all panels."""
  last = sorted({r.get(series_keys[-1]) for r in rows}, key=_order)
  colours = {v: f"C{i % 10}" for i, v in enumerate(last)}
  rest = sorted({tuple(r.get(k) for k in series_keys[:-1]) for r in rows},
                key=lambda s: tuple(_order(v) for v in s))
  styles = {s: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
            for i, s in enumerate(rest)}
  return colours, styles


def _ylabel(metric: str, lower_is_better: bool | None) -> str:
  if lower_is_better is None:
    return metric
  return f"{metric} ({'lower' if lower_is_better else 'higher'} is better)"


def _title(title: str | None, dropped: int, metric: str) -> str:
  """The title, with a line counting the non-finite metric values left out."""
  note = f"({dropped} non-finite {metric} value(s), diverged runs, left out)" if dropped else ""
  return "\n".join(t for t in (title, note) if t)


# ----------------------------------------------------------------------------- compute

def _multiplier_text(name, fits, baseline, multipliers) -> str:
  if multipliers is not None and name in multipliers:
    m = multipliers[name]
  elif baseline is not None and fits and name != baseline and name in fits and baseline in fits:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # extrapolation notes: not for a legend
      try:
        if "bootstrap" in fits[name] and "bootstrap" in fits[baseline]:
          m = fit_lib.compute_multiplier_ci(fits[name], fits[baseline])
        else:
          m = fit_lib.compute_multiplier(fits[name], fits[baseline])
      except ValueError as error:  # e.g. never reaches the baseline's mid-range y
        return ", unreachable" if "unreachable" in str(error) else ", multiplier n/a"
  else:
    return ""
  where = f" vs {baseline}" if baseline is not None else ""
  if isinstance(m, (tuple, list)):
    return f", compute x{m[0]:.2f} [{m[1]:.2f}, {m[2]:.2f}]{where}"
  return f", compute x{float(m):.2f}{where}"


def plot_compute(rows_by_variant: Mapping[str, Sequence[tuple[float, float]]],
                 fits: Mapping[str, Mapping] | None, path_stem, *,
                 xlabel: str = "training FLOPs", ylabel: str = "loss", logy: bool = True,
                 baseline: str | None = None,
                 multipliers: Mapping[str, float | tuple[float, float, float]] | None = None,
                 title: str | None = None) -> list[str]:
  """y against compute per variant: points, the fitted curve over the variant's x range,
  log-log axes (log x only with logy=False).

  Args:
    rows_by_variant: {variant: [(x, y), ...]} (repeated x for seeds are fine).
    fits: {variant: fit dict from zoo.scaling.fit} or None (points only); variants
      without a fit are drawn as points.
    path_stem: output path without suffix.
    baseline: a variant whose fit the others' compute multipliers are taken against
      (with their paired bootstrap interval when both fits have one).
    multipliers: {variant: m or (m, lo, hi)} to show instead of computing them.
  """
  if not isinstance(rows_by_variant, Mapping) or not rows_by_variant:
    raise ValueError("plot_compute: rows_by_variant must be a non-empty {variant: [(x, y)]}")
  if fits is not None and not isinstance(fits, Mapping):
    raise ValueError("plot_compute: fits must be a {variant: fit} dict or None")
  if baseline is not None and baseline not in rows_by_variant:
    raise ValueError(f"plot_compute: baseline {baseline!r} is not one of the variants "
                     f"{sorted(rows_by_variant)}")
  points = {}
  for name, rows in rows_by_variant.items():
    xy = np.asarray(rows, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
      raise ValueError(f"plot_compute: variant {name!r} needs a non-empty list of (x, y) pairs")
    if not (np.isfinite(xy).all() and (xy[:, 0] > 0).all() and (not logy or (xy[:, 1] > 0).all())):
      raise ValueError(f"plot_compute: variant {name!r} has non-finite or non-positive values "
                       f"(log axes)")
    points[name] = xy
  fig = _figure(7.0, 4.8)
  ax = fig.subplots()
  for i, (name, xy) in enumerate(points.items()):
    colour = f"C{i % 10}"
    fit = (fits or {}).get(name)
    label = str(name)
    if fit is not None:
      grid = np.geomspace(xy[:, 0].min(), xy[:, 0].max(), 200)
      alpha = f"alpha={fit['alpha']:.3f}"
      if "alpha_ci" in fit:
        alpha += f" [{fit['alpha_ci'][0]:.3f}, {fit['alpha_ci'][1]:.3f}]"
      label = (f"{name}: {alpha}, E={fit['E']:.3g}"
               f"{_multiplier_text(name, fits, baseline, multipliers)}")
      ax.plot(grid, fit_lib.predict(fit, grid), color=colour, linewidth=1.5)
    elif multipliers is not None and name in multipliers:
      label += _multiplier_text(name, fits, baseline, multipliers)
    ax.scatter(xy[:, 0], xy[:, 1], color=colour, s=16, label=label, zorder=3)
  ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    y = np.concatenate([xy[:, 1] for xy in points.values()])
    if y.max() / y.min() < 10:  # within a decade: label the 2, 3, ... ticks too
      ax.yaxis.set_minor_formatter(plain)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(fontsize=7)
  return _save(fig, path_stem)


# ----------------------------------------------------------------------------- sweeps

def plot_alpha_sweep(rows: Sequence[Mapping], path_stem, *, metric: str,
                     lower_is_better: bool, logy: bool = False,
                     title: str | None = None) -> list[str]:
  """The metric against alpha, one line per (attention, seq_len) (mean over seeds,
  min-max error bars); rows with alpha None (softmax) as a band per seq_len in that
  length's colour. Rows need the keys alpha, attention, seq_len, seed and `metric`."""
  rows = _check_rows(rows, ("alpha", "attention", "seq_len", "seed"), metric,
                     "plot_alpha_sweep")
  series_keys = ("attention", "seq_len")
  colours, styles = _styles(rows, series_keys)
  fig = _figure(6.5, 4.5)
  ax = fig.subplots()
  dropped = _draw_sweep(ax, rows, x="alpha", metric=metric, series_keys=series_keys,
                        colours=colours, styles=styles)
  ax.set_xlabel("alpha (attention scaled by L^-alpha)")
  ax.set_ylabel(_ylabel(metric, lower_is_better))
  if logy:
    ax.set_yscale("log")
  if _title(title, dropped, metric):
    ax.set_title(_title(title, dropped, metric), fontsize=9)
  ax.grid(True, alpha=0.25)
  ax.legend(fontsize=7)
  return _save(fig, path_stem)


def _facet_panels(rows, facet_keys) -> dict[tuple, list]:
  """{(value per facet key): rows} for every combination of the values the rows take; a
  row lacking a facet key belongs to every panel along that key."""
  values = []
  for key in facet_keys:
    found = sorted({r[key] for r in rows if key in r}, key=_order)
    if not found:
      raise ValueError(f"plot_facets: no row has the facet key {key!r}")
    values.append(found)
  return {combo: [r for r in rows
                  if all(k not in r or r[k] == v for k, v in zip(facet_keys, combo))]
          for combo in itertools.product(*values)}


def plot_facets(rows: Sequence[Mapping], path_stem, *,
                facet_keys: Sequence[str] = ("qk_layernorm", "gate"), x: str = "alpha",
                metric: str, lower_is_better: bool | None = None,
                series_keys: Sequence[str] = ("attention", "seq_len"),
                logy: bool = False, title: str | None = None) -> list[str]:
  """One panel per combination of the `facet_keys` values: the last facet key across
  columns, the others down rows. A row lacking a facet key (e.g. softmax, which has no
  gate) is drawn in every panel along that key. In each panel the metric against `x` as in
  `plot_alpha_sweep` (one line per `series_keys`, mean and min-max over seeds; rows with
  x None as a band). Panels share the y axis."""
  facet_keys, series_keys = tuple(facet_keys), tuple(series_keys)
  if not facet_keys or not series_keys:
    raise ValueError("plot_facets: facet_keys and series_keys must each name at least one key")
  rows = _check_rows(rows, (x,), metric, "plot_facets")
  panels = _facet_panels(rows, facet_keys)
  columns = sorted({combo[-1] for combo in panels}, key=_order)
  row_combos = sorted({combo[:-1] for combo in panels},
                      key=lambda c: tuple(_order(v) for v in c))
  colours, styles = _styles(rows, series_keys)
  fig = _figure(3.6 * len(columns) + 1.8, 3.0 * len(row_combos) + 0.4)
  axes = fig.subplots(len(row_combos), len(columns), squeeze=False, sharey=True)
  dropped = 0
  handles = {}
  for (i, outer), (j, last) in itertools.product(enumerate(row_combos), enumerate(columns)):
    ax = axes[i][j]
    combo = (*outer, last)
    panel = panels[combo]
    ax.set_title(", ".join(_show(k, v) for k, v in zip(facet_keys, combo)), fontsize=9)
    if not panel:
      ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
      continue
    dropped += _draw_sweep(ax, panel, x=x, metric=metric, series_keys=series_keys,
                           colours=colours, styles=styles)
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
    if logy:
      ax.set_yscale("log")
    ax.grid(True, alpha=0.25)
    if i == len(row_combos) - 1:
      ax.set_xlabel(x)
    if j == 0:
      ax.set_ylabel(_ylabel(metric, lower_is_better))
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
  if _title(title, dropped, metric):
    fig.suptitle(_title(title, dropped, metric), fontsize=9)
  return _save(fig, path_stem)
