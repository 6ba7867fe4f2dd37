"""Scaling-law fits and figures (zoo.scaling.fit, zoo.scaling.plots): a known law recovered
from noisy synthetic points with intervals that cover it, a shared floor, analytic compute
multipliers, the data warnings, input errors, and each figure written as PNG and SVG."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from zoo.scaling import fit, plots

E, A, ALPHA = 1.7, 400.0, 0.3
X = np.geomspace(1e8, 1e11, 16)  # three decades; y falls from 3.3 to 1.9


def law(x, e=E, a=A, alpha=ALPHA):
  return e + a * np.asarray(x, dtype=float) ** -alpha


def noisy(x, seed, noise=0.01, **params):
  """law(x) with 1% multiplicative (log-normal) noise."""
  rng = np.random.default_rng(seed)
  return law(x, **params) * np.exp(noise * rng.standard_normal(len(x)))


def quiet(f, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    return f(*args, **kwargs)


# ----------------------------------------------------------------------------- fits

def test_exact_points_give_the_law_back():
  result = fit.fit_power_law(X, law(X))
  assert result["E"] == pytest.approx(E, rel=1e-3)
  assert result["A"] == pytest.approx(A, rel=2e-2)
  assert result["alpha"] == pytest.approx(ALPHA, rel=2e-3)
  assert result["loss"] < 1e-10
  assert result["n"] == 16 and result["x_decades"] == pytest.approx(3.0)
  assert result["warnings"] == [] and result["converged"]


def test_noisy_fit_recovers_the_law_and_the_bootstrap_covers_it():
  y = noisy(X, seed=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 16 points over 3 decades: no data warnings
    result = fit.fit_power_law(X, y, bootstrap=60, seed=1)
  # E within 6%, alpha within 0.03; A is an extrapolation to x = 1 (8 decades below the
  # data) where an alpha error of 0.01 moves log A by 0.2, so it gets a factor of 1.6.
  assert abs(result["E"] - E) < 0.1
  assert abs(result["alpha"] - ALPHA) < 0.03
  assert abs(math.log(result["A"] / A)) < math.log(1.6)
  # over the data the fitted curve is within 2% (twice the noise) of the true one
  assert np.max(np.abs(fit.predict(result, X) / law(X) - 1)) < 2e-2
  for key, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
    lo, hi = result[f"{key}_ci"]
    assert lo <= truth <= hi, (key, lo, hi)
    assert lo <= result[key] <= hi and lo < hi
  assert result["E_ci"][1] - result["E_ci"][0] < 0.5  # informative, not the whole line
  assert len(result["bootstrap"]["alpha"]) == 60 and result["bootstrap_failed"] == 0
  # "loss" is the summed Huber loss of the log residuals at the returned parameters
  r = np.log(y) - np.log(fit.predict(result, X))
  huber = np.where(np.abs(r) <= 1e-3, 0.5 * r ** 2, 1e-3 * (np.abs(r) - 0.5e-3))
  assert result["loss"] == pytest.approx(huber.sum(), rel=1e-6)


def test_objective_gradient_matches_finite_differences():
  group = fit._Group("", X, noisy(X, seed=3))
  logx, logy, index = fit._stack([group, group])
  theta = np.array([0.4, 0.2, 0.35, -0.1, 0.2])  # e, a~_1, alpha_1, a~_2, alpha_2
  args = (logx, logy, index, 2, None, 0.05)  # delta = 0.05: both Huber branches in play
  loss, grad = fit._objective(theta, *args)
  step = 1e-6
  numeric = [(fit._objective(theta + step * d, *args)[0]
              - fit._objective(theta - step * d, *args)[0]) / (2 * step) for d in np.eye(5)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_fixed_floor_fits_only_A_and_alpha():
  result = fit.fit_power_law(X, noisy(X, seed=2), shared_E=E)
  assert result["E"] == E
  assert abs(result["alpha"] - ALPHA) < 0.01
  assert abs(math.log(result["A"] / A)) < 0.2


def test_shared_E_recovers_the_common_floor():
  x2 = np.geomspace(3e8, 3e11, 12)
  groups = {"softmax": (X, noisy(X, seed=4)),
            "relu": (x2, noisy(x2, seed=5, a=250.0, alpha=0.25))}
  fits = fit.fit_shared_E(groups)
  assert set(fits) == {"softmax", "relu"}
  assert fits["softmax"]["E"] == fits["relu"]["E"]
  assert abs(fits["softmax"]["E"] - E) < 0.08
  assert abs(fits["softmax"]["alpha"] - 0.3) < 0.03
  assert abs(fits["relu"]["alpha"] - 0.25) < 0.03
  assert fits["relu"]["n"] == 12 and fits["relu"]["x_min"] == pytest.approx(3e8)
  joint = fits["softmax"]["joint_loss"]
  assert joint == pytest.approx(fits["softmax"]["loss"] + fits["relu"]["loss"], rel=1e-6)
  # one E is a constraint: the joint loss is at least the two free fits' total
  free = sum(fit.fit_power_law(*xy)["loss"] for xy in groups.values())
  assert joint >= free * (1 - 1e-6)


# ----------------------------------------------------------------------------- multipliers

def test_compute_multiplier_matches_the_analytic_value():
  base = {"E": 2.0, "A": 50.0, "alpha": 0.2, "x_min": 1e15, "x_max": 1e18}
  twice = dict(base, A=50.0 * 2 ** 0.2)  # A x 2^alpha: the same y at twice the x
  assert fit.compute_multiplier(twice, base) == pytest.approx(2.0, rel=1e-9)
  with pytest.warns(UserWarning, match=r"x=2.57e\+11, outside its fitted range .*extrapolated"):
    assert fit.compute_multiplier(twice, base, at_y=2.3) == pytest.approx(2.0, rel=1e-9)
  assert fit.compute_multiplier(base, twice) == pytest.approx(0.5, rel=1e-9)
  # different exponents: x(y) = (A / (y - E))^(1/alpha) for each
  other = {"E": 1.9, "A": 80.0, "alpha": 0.25, "x_min": 1e15, "x_max": 1e18}
  expected = (80.0 / 0.5) ** (1 / 0.25) / (50.0 / 0.4) ** (1 / 0.2)
  with pytest.warns(UserWarning, match="extrapolated"):
    assert fit.compute_multiplier(other, base, at_y=2.4) == pytest.approx(expected, rel=1e-9)
  # default target: the baseline's y at sqrt(1e15 * 1e18)
  y_mid = 2.0 + 50.0 * 10 ** (-16.5 * 0.2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # other's x(y_mid) is extrapolated
    assert fit.compute_multiplier(other, base) == pytest.approx(
        fit.compute_multiplier(other, base, at_y=y_mid), rel=1e-12)
  with pytest.raises(ValueError, match="below the variant fit's E=2.* unreachable"):
    fit.compute_multiplier(twice, other, at_y=1.95)
  with pytest.raises(ValueError, match="below the baseline fit's E"):
    fit.compute_multiplier(other, base, at_y=1.95)


def test_compute_multiplier_ci_from_paired_shared_E_bootstrap():
  y_variant = noisy(X, seed=7, a=A * 2 ** ALPHA)  # needs exactly twice the compute
  fits = fit.fit_shared_E({"base": (X, noisy(X, seed=6)), "variant": (X, y_variant)},
                          bootstrap=40, seed=0)
  assert fits["base"]["E_ci"] == fits["variant"]["E_ci"]
  assert fits["base"]["bootstrap"]["e"] == fits["variant"]["bootstrap"]["e"]  # paired
  estimate, lo, hi = fit.compute_multiplier_ci(fits["variant"], fits["base"])
  assert estimate == pytest.approx(fit.compute_multiplier(fits["variant"], fits["base"]))
  assert abs(math.log(estimate / 2.0)) < math.log(1.25)
  assert lo <= 2.0 <= hi and lo < estimate < hi
  assert hi / lo < 4.0
  # a fixed target y is kept fixed in every resample: A x 2^alpha doubles x at any y
  estimate, lo, hi = fit.compute_multiplier_ci(fits["variant"], fits["base"], at_y=2.2)
  assert lo <= 2.0 <= hi and abs(math.log(estimate / 2.0)) < math.log(1.25)
  with pytest.raises(ValueError, match="no bootstrap samples"):
    fit.compute_multiplier_ci({"E": 1.0, "A": 1.0, "alpha": 0.5}, fits["base"])


# ----------------------------------------------------------------------------- warnings, errors

def test_few_points_and_narrow_range_warn():
  one = {"grid": {"e": [0.5], "a": [6.0], "alpha": [0.3]}}  # one start: the data are exact
  x4 = np.geomspace(1e8, 1e11, 4)
  with pytest.warns(UserWarning, match="only 4 distinct x values"):
    few = fit.fit_power_law(x4, law(x4), **one)
  assert len(few["warnings"]) == 1 and "fewer than 5" in few["warnings"][0]
  narrow_x = np.geomspace(1e9, 1e10, 8)
  with pytest.warns(UserWarning, match="spans only 1.00 decades"):
    narrow = fit.fit_power_law(narrow_x, law(narrow_x), **one)
  assert len(narrow["warnings"]) == 1 and "less than 1.5" in narrow["warnings"][0]
  x3 = np.geomspace(1e9, 1e10, 3)
  both = quiet(fit.fit_power_law, x3, law(x3), **one)
  assert len(both["warnings"]) == 2


@pytest.mark.parametrize("x, y, match", [
    ([1, 2, 3], [1, 2], "differ in length"),
    ([1, 2], [1, 2], "at least 3 points"),
    ([1, 2, 3, 4], [1, 2, -3, 4], "y must be positive and finite, got -3.0 at index 2"),
    ([1, 0, 3, 4], [1, 2, 3, 4], "x must be positive and finite"),
    ([1, 2, np.nan, 4], [1, 2, 3, 4], "x must be positive and finite"),
    ([1, 2, np.inf, 4], [1, 2, 3, 4], "x must be positive and finite"),
    ([1, 1, 2, 2], [4, 4, 3, 3], "only 2 distinct value"),
    ([[1, 2, 3]], [[1, 2, 3]], "must be 1-D"),
    (["a", "b", "c"], [1, 2, 3], "sequences of numbers"),
])
def test_bad_points_are_one_line_errors(x, y, match):
  with pytest.raises(ValueError, match=match) as info:
    fit.fit_power_law(x, y)
  assert "\n" not in str(info.value)


def test_bad_options_are_errors():
  y = law(X)
  with pytest.raises(ValueError, match="shared_E must be a positive number"):
    fit.fit_power_law(X, y, shared_E=-1.0)
  with pytest.raises(ValueError, match="bootstrap must be a non-negative integer"):
    fit.fit_power_law(X, y, bootstrap=-2)
  with pytest.raises(ValueError, match="delta must be a positive number"):
    fit.fit_power_law(X, y, delta=0)
  with pytest.raises(ValueError, match=r"grid has unknown key\(s\) \['b'\]"):
    fit.fit_power_law(X, y, grid={"b": [1.0]})
  with pytest.raises(ValueError, match="at least two"):
    fit.fit_shared_E({"only": (X, y)})
  with pytest.raises(ValueError, match="group 'b': y must be positive"):
    fit.fit_shared_E({"a": (X, y), "b": (X, -y)})
  with pytest.raises(ValueError, match="x_range must be"):
    fit.compute_multiplier({"E": 1, "A": 2, "alpha": 0.5}, {"E": 1, "A": 1, "alpha": 0.5},
                           x_range=(10, 1))


def test_user_grid_is_in_raw_units():
  """a = log A for the raw x: a grid around the truth reaches the same optimum."""
  start = fit.fit_power_law(X, law(X), grid={"e": [0.0], "a": [6.0], "alpha": [0.3]})
  assert start["E"] == pytest.approx(E, rel=1e-3)
  assert start["alpha"] == pytest.approx(ALPHA, rel=2e-3)


# ----------------------------------------------------------------------------- figures

def _written(paths, stem):
  assert paths == [f"{stem}.png", f"{stem}.svg"]
  with open(paths[0], "rb") as f:
    png = f.read()
  with open(paths[1]) as f:
    svg = f.read()
  assert png.startswith(b"\x89PNG") and len(png) > 5000
  assert "<svg" in svg and len(svg) > 5000


def test_plot_compute_writes_png_and_svg(tmp_path):
  rows = {"softmax": list(zip(X, noisy(X, seed=8))),
          "relu": list(zip(X, noisy(X, seed=9, a=A * 2 ** ALPHA)))}
  fits = {"softmax": {"E": E, "A": A, "alpha": ALPHA, "x_min": 1e8, "x_max": 1e11},
          "relu": {"E": E, "A": A * 2 ** ALPHA, "alpha": ALPHA, "x_min": 1e8, "x_max": 1e11}}
  stem = tmp_path / "figs" / "new" / "compute"  # parent folders are created
  _written(plots.plot_compute(rows, fits, stem, baseline="softmax"), stem)
  assert plots._multiplier_text("relu", fits, "softmax", None) == ", compute x2.00 vs softmax"
  assert plots._multiplier_text("relu", fits, None, {"relu": (1.5, 1.2, 1.9)}) == \
      ", compute x1.50 [1.20, 1.90]"
  _written(plots.plot_compute(rows, None, tmp_path / "points", logy=False),
           tmp_path / "points")
  with pytest.raises(ValueError, match="baseline 'gelu' is not one of the variants"):
    plots.plot_compute(rows, fits, tmp_path / "x", baseline="gelu")


def _sweep_rows():
  rows = []
  for seq_len, offset in ((64, 0.0), (256, 0.3)):
    for seed in range(3):
      rows.append({"attention": "softmax", "alpha": None, "seq_len": seq_len, "seed": seed,
                   "loss": 2.0 + offset + 0.01 * seed})  # no switches: in every panel
      for activation, shift in (("relu", 0.0), ("gelu", 0.1)):
        for alpha in (0.0, 0.5, 1.0, 1.5, 2.0):
          for qk_layernorm, gate in ((True, False), (False, False), (True, True)):
            rows.append({"attention": activation, "alpha": alpha, "seq_len": seq_len,
                         "seed": seed, "qk_layernorm": qk_layernorm, "gate": gate,
                         "loss": 2.0 + offset + shift + (alpha - 1.0) ** 2 + 0.02 * seed})
  rows[-1]["loss"] = float("nan")  # a diverged run
  return rows


def test_sweep_summaries_are_mean_min_max_over_seeds():
  rows = [r for r in _sweep_rows() if r.get("qk_layernorm", True) and not r.get("gate")]
  summary, dropped = plots._summaries(rows, ("attention", "seq_len"), "alpha", "loss")
  assert summary[("relu", 64)][2.0] == pytest.approx((3.02, 3.0, 3.04))
  assert summary[("softmax", 256)][None] == pytest.approx((2.31, 2.3, 2.32))
  assert summary[("gelu", 256)][0.5] == pytest.approx((2.67, 2.65, 2.69))
  assert dropped == 0
  all_rows = _sweep_rows()
  summary, dropped = plots._summaries(all_rows, ("attention", "seq_len"), "alpha", "loss")
  assert dropped == 1


def test_facet_panels_put_rows_without_a_switch_in_every_panel():
  panels = plots._facet_panels(_sweep_rows(), ("qk_layernorm", "gate"))
  assert list(panels) == [(False, False), (False, True), (True, False), (True, True)]
  for combo, rows in panels.items():
    softmax = [r for r in rows if r["attention"] == "softmax"]
    assert len(softmax) == 6  # 2 lengths x 3 seeds, in every panel
    others = [r for r in rows if r["attention"] != "softmax"]
    assert len(others) == (0 if combo == (False, True) else 60)
    assert all((r["qk_layernorm"], r["gate"]) == combo for r in others)
  with pytest.raises(ValueError, match="no row has the facet key 'window'"):
    plots._facet_panels(_sweep_rows(), ("window",))


def test_plot_alpha_sweep_and_facets_write_png_and_svg(tmp_path):
  rows = _sweep_rows()
  sweep = [r for r in rows if r.get("qk_layernorm", True) and not r.get("gate")]
  stem = tmp_path / "sweep" / "alpha"
  _written(plots.plot_alpha_sweep(sweep, stem, metric="loss", lower_is_better=True), stem)
  stem = tmp_path / "facets"
  _written(plots.plot_facets(rows, stem, metric="loss", lower_is_better=True), stem)
  with pytest.raises(ValueError, match=r"row 0 lacks key\(s\) \['accuracy'\]"):
    plots.plot_alpha_sweep(sweep, tmp_path / "x", metric="accuracy", lower_is_better=False)
  with pytest.raises(ValueError, match="non-empty list of dicts"):
    plots.plot_facets([], tmp_path / "x", metric="loss")
