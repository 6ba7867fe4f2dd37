"""Saturating power-law fits for scaling studies, and the compute multipliers they imply.

The law, for a quantity y that falls with compute (or parameters, tokens) x:

    y(x) = E + A * x^(-alpha),        E >= 0 the irreducible floor, A > 0, alpha > 0.

Fitted as in Chinchilla's approach 3 (Hoffmann et al. 2022) as Epoch AI's replication
codes it (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt"): with
e = log E and a = log A the prediction is made in log space,

    log y_hat(x) = logsumexp(a - alpha * log x, e),

and the objective is the Huber loss of the log residuals, summed over the points,

    L(e, a, alpha) = sum_i H_delta(log y_i - log y_hat(x_i)),
    H_delta(r) = r^2 / 2  if |r| <= delta  else  delta * (|r| - delta / 2),   delta = 1e-3,

minimised with scipy's L-BFGS-B (analytic gradient) from every point of a grid of
starting values; the best end point wins. Since delta = 1e-3 is far below the usual
noise, H_delta is close to the absolute residual: a robust, median-like fit.

Numerics: x is divided by its geometric mean x0 before fitting, i.e. the optimiser sees
a~ = a - alpha * log x0 in place of a. This is the same model (a = a~ + alpha * log x0),
so the optimum is the same; it only decorrelates a and alpha and makes the default grid
independent of the units of x. The default grid is set from the data:
e in log(f * min y) for f in (0.05, 0.25, 0.5, 0.75, 0.95), a~ in log(median y) +
linspace(-5, 0.5, 5) and alpha in geomspace(0.03, 2, 6) (150 starts). A `grid` of
{"e": [...], "a": [...], "alpha": [...]} replaces any of the three, in the original units
(e = log E, a = log A for the raw x).

Uncertainty: `bootstrap=B` refits B resamples of the points (drawn with replacement,
within each group for joint fits) and reports 95% percentile intervals. Each resample is
fitted from the full-data optimum and from the 4 grid starts that ended lowest on the full
data (not the whole grid, to keep B refits cheap). Resamples with fewer than 3 distinct x
values are not fitted and count as NaN (`bootstrap_failed`).

Joint fits (`fit_shared_E`): one e for all groups, a separate (a, alpha) per group, one
summed objective; the same method. A known floor can instead be fixed with
`fit_power_law(..., shared_E=E)`, which fits only A and alpha.

Compute multiplier of a variant over a baseline at a target y* (e.g. a loss), from the
inverse x(y) = (A / (y - E))^(1/alpha):

    m(y*) = x_variant(y*) / x_baseline(y*).

m > 1 means the variant needs m times the baseline's compute to reach y*; m < 1 means it
needs less (it is 1/m times more compute-efficient). By default y* is the baseline's fitted
y at the geometric middle sqrt(x_min * x_max) of its fitted x range. A y* at or below a
fit's E is unreachable at any compute (a ValueError).

Metrics where higher is better (accuracy) do not fall to a floor; fit the error rate
1 - accuracy instead (E is then the irreducible error), and read multipliers at a target
error rate.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
MIN_DISTINCT_X = 3  # E, A and alpha need at least three distinct x values
FEW_POINTS = 5  # fewer distinct x values than this: warn
NARROW_DECADES = 1.5  # x spanning fewer decades than this: warn
CI_PERCENTILES = (2.5, 97.5)  # 95% percentile bootstrap intervals
BOOTSTRAP_STARTS = 4  # grid starts (the best on the full data) reused for each resample
DEFAULT_E_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)  # E = f * min(y)
DEFAULT_A_OFFSETS = tuple(np.linspace(-5.0, 0.5, 5))  # a~ = log(median y) + offset
DEFAULT_ALPHAS = tuple(np.geomspace(0.03, 2.0, 6))


class _Group:
  """One curve's points, in the log form the objective uses (x normalised by x0)."""

  def __init__(self, name: str, x: np.ndarray, y: np.ndarray):
    self.name, self.x, self.y = name, x, y
    self.log_x0 = float(np.mean(np.log(x)))
    self.logx = np.log(x) - self.log_x0
    self.logy = np.log(y)
    self.n = len(x)
    self.distinct = len(np.unique(x))
    self.x_min, self.x_max = float(x.min()), float(x.max())
    self.decades = math.log10(self.x_max / self.x_min)

  def resample(self, index: np.ndarray) -> _Group:
    """The points at `index`, keeping this group's x0 (so parameters stay comparable)."""
    group = _Group(self.name, self.x[index], self.y[index])
    group.log_x0 = self.log_x0
    group.logx = np.log(group.x) - self.log_x0
    return group


# ----------------------------------------------------------------------------- validation

def _points(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
  """x and y as float arrays, or a one-line ValueError naming `what`."""
  try:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
  except (TypeError, ValueError):
    raise ValueError(f"{what}: x and y must be sequences of numbers") from None
  if x.ndim != 1 or y.ndim != 1:
    raise ValueError(f"{what}: x and y must be 1-D, got shapes {x.shape} and {y.shape}")
  if len(x) != len(y):
    raise ValueError(f"{what}: x and y differ in length ({len(x)} vs {len(y)})")
  if len(x) < MIN_DISTINCT_X:
    raise ValueError(f"{what}: need at least {MIN_DISTINCT_X} points to fit E, A and alpha, "
                     f"got {len(x)}")
  for name, values in (("x", x), ("y", y)):
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
      raise ValueError(f"{what}: {name} must be positive and finite, got {float(values[bad][0])!r} "
                       f"at index {int(np.flatnonzero(bad)[0])}")
  distinct = len(np.unique(x))
  if distinct < MIN_DISTINCT_X:
    raise ValueError(f"{what}: x holds only {distinct} distinct value(s); fitting E, A and "
                     f"alpha needs at least {MIN_DISTINCT_X}")
  return x, y


def _positive(value) -> bool:
  """A finite number > 0 (Python or NumPy scalar, not a bool)."""
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and math.isfinite(value) and value > 0)


def _check_delta(delta) -> float:
  if not _positive(delta):
    raise ValueError(f"delta must be a positive number, got {delta!r}")
  return float(delta)


def _check_bootstrap(bootstrap) -> int:
  if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
    raise ValueError(f"bootstrap must be a non-negative integer (number of resamples), "
                     f"got {bootstrap!r}")
  return int(bootstrap)


def _check_grid(grid) -> dict[str, tuple[float, ...]]:
  if grid is None:
    return {}
  if not isinstance(grid, Mapping):
    raise ValueError(f"grid must be a dict with keys among 'e', 'a', 'alpha', got {grid!r}")
  unknown = sorted(set(grid) - {"e", "a", "alpha"})
  if unknown:
    raise ValueError(f"grid has unknown key(s) {unknown}; use 'e' (log E), 'a' (log A), 'alpha'")
  out = {}
  for key, values in grid.items():
    values = np.atleast_1d(np.asarray(values, dtype=float))
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
      raise ValueError(f"grid[{key!r}] must be a non-empty list of finite numbers")
    out[key] = tuple(float(v) for v in values)
  return out


# ----------------------------------------------------------------------------- objective

def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  """H_delta(r) elementwise."""
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta, logx, logy, group, n_groups, e_fixed, delta):
  """Summed Huber loss of the log residuals and its gradient.

  theta = [e, a~_1, alpha_1, ..., a~_G, alpha_G] (without e when e_fixed is set); `group`
  gives each point's group index."""
  if e_fixed is None:
    e, rest = theta[0], theta[1:]
  else:
    e, rest = e_fixed, theta
  a, alpha = rest[0::2], rest[1::2]
  u = a[group] - alpha[group] * logx
  pred = np.logaddexp(u, e)
  r = logy - pred
  loss = float(np.sum(_huber(r, delta)))
  d_pred = -np.clip(r, -delta, delta)  # dH/dpred
  s = np.exp(u - pred)  # d pred / d u: the power-law term's share of y_hat
  grad_rest = np.empty_like(rest)
  grad_rest[0::2] = np.bincount(group, d_pred * s, n_groups)
  grad_rest[1::2] = np.bincount(group, -d_pred * s * logx, n_groups)
  if e_fixed is not None:
    return loss, grad_rest
  grad_e = np.sum(d_pred * np.exp(e - pred))
  return loss, np.concatenate([[grad_e], grad_rest])


def _stack(groups: Sequence[_Group]):
  logx = np.concatenate([g.logx for g in groups])
  logy = np.concatenate([g.logy for g in groups])
  index = np.concatenate([np.full(g.n, i) for i, g in enumerate(groups)])
  return logx, logy, index


def _starts(groups: Sequence[_Group], grid: dict, e_fixed) -> list[np.ndarray]:
  """The grid of starting points: e x (a, alpha), every group starting from the same
  (offset, alpha) relative to its own data."""
  min_y = min(float(g.y.min()) for g in groups)
  es = grid.get("e", tuple(math.log(f * min_y) for f in DEFAULT_E_FRACTIONS))
  alphas = grid.get("alpha", DEFAULT_ALPHAS)
  a_values = grid.get("a", DEFAULT_A_OFFSETS)
  starts = []
  for e, a, alpha in itertools.product(es, a_values, alphas):
    rest = []
    for g in groups:
      # user a's are log A for raw x; default a's are offsets from log(median y) at x0
      a_norm = a - alpha * g.log_x0 if "a" in grid else a + math.log(float(np.median(g.y)))
      rest += [a_norm, alpha]
    starts.append(np.array(rest if e_fixed is not None else [e] + rest))
  if e_fixed is not None:  # e does not vary: drop the repeats
    starts = list({tuple(s): s for s in starts}.values())
  return starts


def _minimise(groups, starts, e_fixed, delta):
  """[(loss, theta, start, converged)] for each start, best first."""
  logx, logy, index = _stack(groups)
  args = (logx, logy, index, len(groups), e_fixed, delta)
  results = []
  with np.errstate(over="ignore", under="ignore", invalid="ignore"):
    for start in starts:
      res = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B")
      if np.isfinite(res.fun) and np.isfinite(res.x).all():
        results.append((float(res.fun), res.x, start, bool(res.success)))
  results.sort(key=lambda r: r[0])
  return results


def _decode(theta, groups, e_fixed) -> list[tuple[float, float, float]]:
  """[(e, a, alpha)] per group in the original units (a = log A for raw x)."""
  e = float(theta[0]) if e_fixed is None else e_fixed
  rest = theta[1:] if e_fixed is None else theta
  return [(e, float(rest[2 * i] + rest[2 * i + 1] * g.log_x0), float(rest[2 * i + 1]))
          for i, g in enumerate(groups)]


def _exp(v: float) -> float:
  return math.exp(v) if v < 709.0 else math.inf


# ----------------------------------------------------------------------------- fitting

def _user_warning(message: str) -> None:
  """warnings.warn, pointing at the first caller outside this module."""
  frame, level = sys._getframe(0), 1
  while frame is not None and frame.f_globals.get("__name__") == __name__:
    frame, level = frame.f_back, level + 1
  warnings.warn(message, UserWarning, stacklevel=level)


def _warn(messages: list[str], message: str) -> None:
  """Records `message` in a fit's warnings and issues it."""
  messages.append(message)
  _user_warning(message)


def _data_warnings(g: _Group, prefix: str) -> list[str]:
  out: list[str] = []
  if g.distinct < FEW_POINTS:
    _warn(out, f"{prefix}only {g.distinct} distinct x values (fewer than {FEW_POINTS}): E, A "
               f"and alpha are barely constrained")
  if g.decades < NARROW_DECADES:
    _warn(out, f"{prefix}x spans only {g.decades:.2f} decades (less than {NARROW_DECADES}): "
               f"alpha and E trade off; extrapolation is unreliable")
  return out


def _fit(groups: list[_Group], e_fixed, delta, grid, bootstrap, seed):
  """The joint fit of `groups` (one shared e); returns one fit dict per group."""
  prefix = (lambda g: f"{g.name}: ") if len(groups) > 1 else (lambda g: "")
  messages = [_data_warnings(g, prefix(g)) for g in groups]
  with threadpool_limits(limits=1, user_api="blas"):  # BLAS threads only slow 3x3 work
    results = _minimise(groups, _starts(groups, grid, e_fixed), e_fixed, delta)
  if not results:
    raise ValueError("the power-law fit failed from every starting point (non-finite loss)")
  loss, theta, _, converged = next((r for r in results if r[3]), results[0])
  if not converged:
    for m in messages:
      _warn(m, "L-BFGS-B did not report convergence from any starting point; "
               "the best end point is used")
  params = _decode(theta, groups, e_fixed)
  fits = []
  for i, (g, (e, a, alpha)) in enumerate(zip(groups, params)):
    pred = np.logaddexp(a - alpha * np.log(g.x), e)
    if alpha <= 0:
      _warn(messages[i], f"{prefix(g)}fitted alpha={alpha:.3g} <= 0: y does not fall with x")
    fits.append({
        "E": _exp(e), "A": _exp(a), "alpha": alpha, "e": e, "a": a,
        "loss": float(np.sum(_huber(g.logy - pred, delta))), "n": g.n,
        "x_min": g.x_min, "x_max": g.x_max, "x_decades": g.decades,
        "converged": converged, "warnings": messages[i]})
  if len(groups) > 1:
    for f in fits:
      f["joint_loss"] = loss
  if bootstrap:
    with threadpool_limits(limits=1, user_api="blas"):
      _bootstrap(fits, groups, e_fixed, delta, bootstrap, seed,
                 [theta] + [r[2] for r in results[:BOOTSTRAP_STARTS]])
  return fits


def _bootstrap(fits, groups, e_fixed, delta, n_resamples, seed, starts) -> None:
  """Adds bootstrap samples and 95% percentile intervals to `fits` (in place)."""
  rng = np.random.default_rng(seed)
  samples = np.full((n_resamples, len(groups), 3), np.nan)  # (e, a, alpha)
  for b in range(n_resamples):
    resampled = [g.resample(rng.integers(0, g.n, g.n)) for g in groups]
    if any(g.distinct < MIN_DISTINCT_X for g in resampled):
      continue
    results = _minimise(resampled, starts, e_fixed, delta)
    if results:
      samples[b] = _decode(results[0][1], resampled, e_fixed)
  failed = int(np.isnan(samples[:, 0, 0]).sum())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns when all failed
    for i, f in enumerate(fits):
      e, a, alpha = samples[:, i].T
      f["bootstrap"] = {"e": e.tolist(), "a": a.tolist(), "alpha": alpha.tolist()}
      f["bootstrap_failed"] = failed
      for key, values in (("E", np.exp(e)), ("A", np.exp(a)), ("alpha", alpha)):
        lo, hi = np.nanpercentile(values, CI_PERCENTILES)
        f[f"{key}_ci"] = (float(lo), float(hi))
  if failed:
    for f in fits:
      _warn(f["warnings"], f"{failed} of {n_resamples} bootstrap resamples could not be fitted "
                           f"(fewer than {MIN_DISTINCT_X} distinct x values, or no finite "
                           f"optimum)")


def fit_power_law(x, y, *, shared_E: float | None = None, delta: float = HUBER_DELTA,
                  grid: Mapping[str, Sequence[float]] | None = None, bootstrap: int = 0,
                  seed: int = 0) -> dict:
  """Fits y = E + A * x^(-alpha) to the points (x_i, y_i) (see the module docstring).

  Args:
    x, y: positive finite values, equal lengths, at least 3 distinct x (repeated x, e.g.
      seeds, are fine). For accuracy-like metrics pass y = 1 - accuracy.
    shared_E: a known floor E > 0 to hold fixed (only A and alpha are fitted).
    delta: the Huber threshold on log residuals.
    grid: starting values {"e": log E's, "a": log A's, "alpha": alphas}; any key left out
      keeps its data-derived default.
    bootstrap: number B of resamples for percentile intervals (0: none).
    seed: seeds the resampling.

  Returns:
    {"E", "A", "alpha", "e" (log E), "a" (log A), "loss" (summed Huber loss), "n",
    "x_min", "x_max", "x_decades", "converged", "warnings": [str]}; with bootstrap > 0
    also "E_ci", "A_ci", "alpha_ci" as (lo, hi), "bootstrap" ({"e", "a", "alpha"}: lists
    of B values, NaN for resamples that could not be fitted) and "bootstrap_failed".
    The warnings (fewer than 5 distinct x, x over less than 1.5 decades, ...) are also
    issued with `warnings.warn`.
  """
  x, y = _points(x, y, "fit_power_law")
  delta, bootstrap = _check_delta(delta), _check_bootstrap(bootstrap)
  grid = _check_grid(grid)
  e_fixed = None
  if shared_E is not None:
    if not _positive(shared_E):
      raise ValueError(f"shared_E must be a positive number (a fixed floor E), got {shared_E!r}")
    e_fixed = math.log(shared_E)
  fit = _fit([_Group("", x, y)], e_fixed, delta, grid, bootstrap, seed)[0]
  if e_fixed is not None:
    fit["E"] = float(shared_E)
    if bootstrap:
      fit["E_ci"] = (float(shared_E), float(shared_E))
  return fit


def fit_shared_E(groups: Mapping[str, tuple], *, delta: float = HUBER_DELTA,
                 grid: Mapping[str, Sequence[float]] | None = None, bootstrap: int = 0,
                 seed: int = 0) -> dict[str, dict]:
  """Fits y_g = E + A_g * x^(-alpha_g) jointly to {name: (x, y)}: one E for all groups,
  separate A and alpha per group, one summed Huber objective (the same method as
  `fit_power_law`, whose fit dict each group gets; E and its interval are common).

  Each dict also carries "joint_loss" (the summed objective over all groups; "loss" is the
  group's share). Bootstrap resamples every group's points (within the group) together,
  so the i-th bootstrap sample of every group comes from the same joint refit: pairing
  them (`compute_multiplier_ci`) keeps the shared E's uncertainty correlated.
  """
  if not isinstance(groups, Mapping) or len(groups) < 2:
    raise ValueError("fit_shared_E needs a dict of at least two {name: (x, y)} groups")
  delta, bootstrap = _check_delta(delta), _check_bootstrap(bootstrap)
  grid = _check_grid(grid)
  prepared = []
  for name, xy in groups.items():
    if not (isinstance(xy, (tuple, list)) and len(xy) == 2):
      raise ValueError(f"fit_shared_E: group {name!r} must be an (x, y) pair")
    prepared.append(_Group(str(name), *_points(xy[0], xy[1], f"fit_shared_E group {name!r}")))
  fits = _fit(prepared, None, delta, grid, bootstrap, seed)
  return dict(zip(groups, fits))


# ----------------------------------------------------------------------------- using fits

def _logs(fit: Mapping) -> tuple[float, float, float]:
  """(e, a, alpha) of a fit dict; "e" and "a" (exact even where E or A overflow) when
  present, else log E and log A (so hand-written {"E", "A", "alpha"} dicts work)."""
  try:
    e = fit["e"] if "e" in fit else (math.log(fit["E"]) if fit["E"] > 0 else -math.inf)
    return float(e), float(fit["a"] if "a" in fit else math.log(fit["A"])), float(fit["alpha"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"a fit needs E > 0, A > 0 and alpha, got {dict(fit)!r}") from None


def predict(fit: Mapping, x) -> np.ndarray:
  """The fitted y = E + A * x^(-alpha) at x (array or scalar)."""
  e, a, alpha = _logs(fit)
  x = np.asarray(x, dtype=float)
  return np.exp(np.logaddexp(a - alpha * np.log(x), e))


def log_x_at(fit: Mapping, y: float, *, name: str = "fit") -> float:
  """log x(y) = (log A - log(y - E)) / alpha: log of the x at which the fit reaches y.
  A ValueError if y is at or below the fit's E (unreachable) or alpha <= 0."""
  e, a, alpha = _logs(fit)
  if alpha <= 0:
    raise ValueError(f"the {name} has alpha={alpha:.3g} <= 0: y does not fall with x")
  if not y > math.exp(e):
    raise ValueError(f"y={y:.6g} is at or below the {name}'s E={math.exp(e):.6g}: unreachable "
                     f"at any x")
  return (a - math.log(y - math.exp(e))) / alpha


def _target(fit_baseline: Mapping, at_y, x_range) -> tuple[float | None, float | None]:
  """(at_y, log x_mid): a fixed target, or the log middle of x_range (default: the
  baseline's fitted range) whose baseline y is the target."""
  if at_y is not None:
    if not _positive(at_y):
      raise ValueError(f"at_y must be a positive number, got {at_y!r}")
    return float(at_y), None
  if x_range is None:
    if "x_min" not in fit_baseline or "x_max" not in fit_baseline:
      raise ValueError("the baseline fit has no x_min/x_max; pass at_y or x_range=(lo, hi)")
    x_range = (fit_baseline["x_min"], fit_baseline["x_max"])
  try:
    lo, hi = (float(v) for v in x_range)
  except (TypeError, ValueError):
    raise ValueError(f"x_range must be (lo, hi), got {x_range!r}") from None
  if not (0 < lo <= hi and math.isfinite(hi)):
    raise ValueError(f"x_range must be (lo, hi) with 0 < lo <= hi, got {x_range!r}")
  return None, 0.5 * (math.log(lo) + math.log(hi))


def compute_multiplier(fit_variant: Mapping, fit_baseline: Mapping, at_y: float | None = None,
                       x_range: tuple[float, float] | None = None) -> float:
  """x_variant(y*) / x_baseline(y*): how many times the baseline's compute the variant needs
  to reach y* (> 1: the variant needs more; < 1: less).

  y* is `at_y`, or by default the baseline's fitted y at the geometric middle of `x_range`
  (default: the baseline's fitted x range). A ValueError if y* is at or below either fit's
  E. Warns when the variant's x(y*) lies outside its fitted x range (extrapolation).
  """
  y_star, log_mid = _target(fit_baseline, at_y, x_range)
  if y_star is None:
    y_star = float(predict(fit_baseline, math.exp(log_mid)))
  log_x_v = log_x_at(fit_variant, y_star, name="variant fit")
  log_m = log_x_v - log_x_at(fit_baseline, y_star, name="baseline fit")
  x_v = _exp(log_x_v)
  if "x_min" in fit_variant and not fit_variant["x_min"] <= x_v <= fit_variant["x_max"]:
    _user_warning(f"the variant reaches y={y_star:.6g} at x={x_v:.3g}, outside its fitted "
                  f"range [{fit_variant['x_min']:.3g}, {fit_variant['x_max']:.3g}]: the "
                  f"multiplier is extrapolated")
  return _exp(log_m)


def compute_multiplier_ci(fit_variant: Mapping, fit_baseline: Mapping,
                          at_y: float | None = None,
                          x_range: tuple[float, float] | None = None
                          ) -> tuple[float, float, float]:
  """(estimate, lo, hi): `compute_multiplier` and its 95% percentile interval over paired
  bootstrap samples (the i-th of the variant with the i-th of the baseline; both fits need
  `bootstrap=B` with the same B). With the default target each resample uses its own
  baseline's y at the middle of the x range; a fixed `at_y` is kept fixed. A resample in
  which the variant cannot reach the target counts as an infinite multiplier, one in which
  the baseline cannot as zero (a warning says how many); those where neither fit could be
  refitted or neither reaches it are dropped."""
  for name, fit in (("variant", fit_variant), ("baseline", fit_baseline)):
    if "bootstrap" not in fit:
      raise ValueError(f"the {name} fit has no bootstrap samples; fit it with bootstrap=B > 0")
  n_v, n_b = len(fit_variant["bootstrap"]["e"]), len(fit_baseline["bootstrap"]["e"])
  if n_v != n_b:
    raise ValueError(f"paired bootstrap needs as many resamples in both fits, got {n_v} "
                     f"(variant) and {n_b} (baseline)")
  estimate = compute_multiplier(fit_variant, fit_baseline, at_y, x_range)
  y_star, log_mid = _target(fit_baseline, at_y, x_range)
  v = {k: np.asarray(fit_variant["bootstrap"][k], dtype=float) for k in ("e", "a", "alpha")}
  b = {k: np.asarray(fit_baseline["bootstrap"][k], dtype=float) for k in ("e", "a", "alpha")}
  with np.errstate(all="ignore"):
    if y_star is None:
      y = np.exp(np.logaddexp(b["a"] - b["alpha"] * log_mid, b["e"]))
      log_x_b = np.full_like(y, log_mid)
    else:
      y = np.full_like(b["e"], y_star)
      log_x_b = (b["a"] - np.log(y - np.exp(b["e"]))) / b["alpha"]
      log_x_b = np.where((y > np.exp(b["e"])) & (b["alpha"] > 0), log_x_b, np.inf)
    reach_v = (y > np.exp(v["e"])) & (v["alpha"] > 0)
    log_x_v = np.where(reach_v, (v["a"] - np.log(y - np.exp(v["e"]))) / v["alpha"], np.inf)
    log_m = log_x_v - log_x_b  # inf - inf = NaN: dropped
    valid = np.isfinite(v["e"]) & np.isfinite(b["e"]) & ~np.isnan(log_m)
  log_m = log_m[valid]
  if len(log_m) == 0:
    raise ValueError("no bootstrap resample gives a multiplier (none reaches the target y)")
  unreachable = int(np.sum(np.isinf(log_m)))
  if unreachable:
    _user_warning(f"in {unreachable} of {len(log_m)} bootstrap resamples one fit never reaches "
                  f"the target y; the interval counts them as 0 or infinite multipliers")
  lo = np.percentile(log_m, CI_PERCENTILES[0], method="lower")
  hi = np.percentile(log_m, CI_PERCENTILES[1], method="higher")
  return estimate, float(np.exp(lo)), float(np.exp(hi))
