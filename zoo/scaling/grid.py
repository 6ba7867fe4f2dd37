"""Helpers that build a sweep's `runs`: lists of dicts, one dict of overrides per run.

A key names where its value goes:

* `arg.NAME` into the config's argument string (`configs/vit_digits.py:NAME=VALUE,...`),
  e.g. `arg.attention`, `arg.alpha`;
* `config.FIELD` becomes `--config.FIELD=VALUE`, e.g. `config.total_steps`,
  `config.model.width`, `config.seed`.

    product({"arg.attention": ["relu", "softmax"], "config.seed": [0, 1]})   # 4 runs
    chain(sweep("arg.attention", ["softmax"]),
          product({"arg.attention": ["relu"], "arg.alpha": [0.5, 1.0]}))      # 3 runs
    zip(sweep("config.model.width", [32, 64]), sweep("config.model.depth", [2, 4]))

Each helper returns a new list of new dicts (the first axis of `product` varies slowest),
so `runs` can as well be written by hand. Values are plain Python values (numpy scalars
become Python numbers); keys of another form are an error naming the allowed forms.
"""

from __future__ import annotations

import builtins
import itertools
import numbers
import re
from typing import Any, Iterable, Mapping

# `arg.NAME`: a key of the config's argument string; `config.FIELD`: a dotted field path.
_KEY = re.compile(r"(arg)\.([A-Za-z_][A-Za-z0-9_]*)|(config)\.([A-Za-z_][A-Za-z0-9_]*"
                  r"(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
KEY_FORMS = ("arg.NAME (a key of the config's argument string, e.g. arg.attention)",
             "config.FIELD (a --config.FIELD=VALUE override, e.g. config.total_steps)")


def check_key(key: Any) -> str:
  """`key` when it has one of the two forms, else a one-line ValueError naming them."""
  if not isinstance(key, str) or not _KEY.fullmatch(key):
    raise ValueError(f"run key {key!r} is neither {' nor '.join(KEY_FORMS)}")
  return key


def plain(value: Any) -> Any:
  """`value` as a plain Python value: numpy scalars as int, float or bool, tuples and
  lists element by element (tuples stay tuples)."""
  if isinstance(value, (bool, str, type(None))):
    return value
  if isinstance(value, (list, tuple)):
    return type(value)(plain(v) for v in value)
  if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
    return plain(value.item())
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  return value


def _values(key: str, values: Any) -> list[Any]:
  if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
    raise ValueError(f"the values of {key!r} must be a list, got {values!r} (one value: "
                     f"[{values!r}])")
  values = [plain(v) for v in values]
  if not values:
    raise ValueError(f"{key!r} has no values")
  return values


def checked(grid: Any, where: str) -> list[dict[str, Any]]:
  """`grid` as a list of run dicts with checked keys and plain values (copies); a
  one-line ValueError naming `where` otherwise."""
  if isinstance(grid, Mapping) or isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
    raise ValueError(f"{where} must be a list of run dicts, got {grid!r}")
  runs = []
  for i, run in enumerate(grid):
    if not isinstance(run, Mapping):
      raise ValueError(f"{where} must be a list of run dicts, got an item {run!r}")
    try:
      runs.append({check_key(k): plain(v) for k, v in run.items()})
    except ValueError as e:
      raise ValueError(f"{where}, run {i}: {e}") from None
  return runs


def _merge(runs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """One dict from several; a key given two different values is an error."""
  merged: dict[str, Any] = {}
  for run in runs:
    for key, value in run.items():
      if key in merged and merged[key] != value:
        raise ValueError(f"{key!r} is set twice in one run ({merged[key]!r} and {value!r})")
      merged[key] = value
  return merged


def sweep(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
  """One run per value: `sweep("arg.alpha", [0.5, 1])` -> [{"arg.alpha": 0.5},
  {"arg.alpha": 1}]."""
  check_key(key)
  return [{key: v} for v in _values(key, values)]


def product(*grids: Mapping[str, Iterable[Any]] | list[dict[str, Any]],
            **axes: Iterable[Any]) -> list[dict[str, Any]]:
  """The cartesian product of the axes: `product({"arg.attention": ["relu", "softmax"],
  "config.seed": [0, 1]})` or `product(**{"arg.attention": [...]})` is 4 runs.

  A positional argument is a dict of lists (its axes, in order) or a list of run dicts (a
  grid, e.g. from `chain`), so grids multiply too. The first axis varies slowest.
  """
  factors: list[list[dict[str, Any]]] = []
  for i, grid in enumerate(grids):
    if isinstance(grid, Mapping):
      factors += [sweep(k, v) for k, v in grid.items()]
    else:
      factors.append(checked(grid, f"product's argument {i + 1}"))
  factors += [sweep(k, v) for k, v in axes.items()]
  if not factors:
    raise ValueError("product() needs at least one axis")
  return [_merge(combination) for combination in itertools.product(*factors)]


def zip(*grids: list[dict[str, Any]]) -> list[dict[str, Any]]:  # pylint: disable=redefined-builtin
  """Elementwise merge of equal-length grids: `zip(sweep("arg.a", [1, 2]),
  sweep("arg.b", [3, 4]))` -> [{"arg.a": 1, "arg.b": 3}, {"arg.a": 2, "arg.b": 4}]."""
  grids_ = [checked(g, f"zip's argument {i + 1}") for i, g in enumerate(grids)]
  lengths = [len(g) for g in grids_]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip needs grids of one length, got lengths {lengths}")
  return [_merge(runs) for runs in builtins.zip(*grids_)]


def chain(*grids: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The grids one after another (their runs concatenated)."""
  return [run for i, g in enumerate(grids) for run in checked(g, f"chain's argument {i + 1}")]
