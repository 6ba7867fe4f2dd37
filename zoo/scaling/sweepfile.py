"""Sweep files: `sweeps/NAME.py[:ARG]`, Python like the configs.

A sweep file defines `get_sweep(arg=None)` returning a dict:

* `config` (required): a config path with optional `:args`, as `train.py --config` takes;
* `runs` (required): a list of dicts, one per run (`zoo.scaling.grid` builds them); a key
  `arg.NAME` goes into the config's argument string, `config.FIELD` becomes
  `--config.FIELD=VALUE`;
* optional: `name` (default: the file's name), `metric` (e.g. "accuracy" or
  "bits_per_byte"), `lower_is_better` (a bool), `x` (e.g. "flops"), `plot` and `fit`
  (settings for the report, passed through as they are), `description`.

`load(spec)` imports the file by path and checks the dict (one-line ValueErrors: a missing
key, an unknown setting, a run key of another form, two equal runs). Per run:
`run_id(run)` names its workdir, `config_arg` and `config_flags` are its `train.py`
arguments, and `load_config` builds the same config in this process (for parameter
counts, FLOPs and dry runs) through the same ml_collections flag parsing as `train.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags as ml_config_flags

from zoo import cli
from zoo import config as config_lib
from zoo.scaling import grid

SWEEPS_DIR = os.path.join(cli.REPO_ROOT, "sweeps")
REQUIRED = ("config", "runs")
OPTIONAL = ("name", "metric", "lower_is_better", "x", "plot", "fit", "description")
SLUG_LENGTH = 60


# ----------------------------------------------------------------------------- files

def resolve(path: str, what: str, *, default_dir: str | None = None) -> str:
  """`path` as it is when it exists relative to the current directory, else relative to
  the repository (else, for a bare NAME, `default_dir/NAME.py`); a one-line ValueError
  when none exists."""
  path = os.path.expanduser(path)
  candidates = [path, os.path.join(cli.REPO_ROOT, path)]
  if default_dir and os.sep not in path and not path.endswith(".py"):
    candidates.append(os.path.join(default_dir, path + ".py"))
  for candidate in candidates:
    if path and os.path.isfile(candidate):
      return candidate
  hint = ""
  if default_dir and os.path.isdir(default_dir):
    names = [n for n in os.listdir(default_dir) if n.endswith(".py") and not n.startswith("_")]
    stem = os.path.splitext(os.path.basename(path))[0]
    hint = config_lib.did_you_mean([stem], [os.path.splitext(n)[0] for n in names])
    hint += f"; {os.path.relpath(default_dir)}/ has: {', '.join(sorted(names)) or 'nothing'}"
  where = " and ".join(dict.fromkeys([os.getcwd(), cli.REPO_ROOT]))
  raise ValueError(f"no {what} {path!r} (looked in {where}){hint}")


def _display(path: str) -> str:
  """`path` relative to the repository when inside it, else absolute."""
  path = os.path.abspath(path)
  relative = os.path.relpath(path, cli.REPO_ROOT)
  return path if relative.startswith("..") else relative


def _import(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str) -> dict[str, Any]:
  """The checked sweep of `sweeps/NAME.py[:ARG]` (see the module docstring), with `file`
  (the path, relative to the repository when inside it) and `arg` added; `config` is
  given with a path relative to the repository when inside it."""
  path, sep, arg = spec.partition(":")
  path = resolve(path, "sweep file", default_dir=SWEEPS_DIR)
  stem = os.path.splitext(os.path.basename(path))[0]
  if cli.REPO_ROOT not in sys.path:  # sweep and config files import zoo and configs
    sys.path.insert(0, cli.REPO_ROOT)
  try:
    module = _import(path, f"zoo_sweep_{re.sub(r'[^A-Za-z0-9_]', '_', stem)}")
  except Exception as e:  # pylint: disable=broad-except  (the user's file: one line)
    raise ValueError(f"{spec}: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_sweep", None)):
    raise ValueError(f"{spec}: a sweep file defines get_sweep(arg=None) returning a dict "
                     f"with {' and '.join(REQUIRED)}")
  try:
    value = module.get_sweep(arg) if sep else module.get_sweep()
  except ValueError as e:
    raise ValueError(f"{spec}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{spec}: get_sweep raised {type(e).__name__}: {e}") from None
  sweep = validate(value, spec)
  sweep.setdefault("name", stem + (f"_{arg}" if arg else ""))
  sweep["file"] = _display(path)
  sweep["arg"] = arg if sep else None
  return sweep


def validate(sweep: Any, where: str = "the sweep") -> dict[str, Any]:
  """A checked copy of a sweep dict (runs as plain dicts of checked keys); one-line
  ValueErrors naming `where`."""
  if not isinstance(sweep, dict):
    raise ValueError(f"{where}: get_sweep must return a dict, got {type(sweep).__name__}")
  missing = [k for k in REQUIRED if k not in sweep]
  if missing:
    raise ValueError(f"{where}: the sweep has no {' and no '.join(repr(k) for k in missing)} "
                     f"(required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})")
  unknown = sorted(set(sweep) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    hint = config_lib.did_you_mean(unknown, REQUIRED + OPTIONAL)
    raise ValueError(f"{where}: unknown sweep setting(s) {unknown}{hint} (the settings: "
                     f"{', '.join(REQUIRED + OPTIONAL)})")
  if not isinstance(sweep["config"], str) or not sweep["config"]:
    raise ValueError(f"{where}: 'config' must be a config path with optional :args, got "
                     f"{sweep['config']!r}")
  path, sep, arg = sweep["config"].partition(":")
  try:
    path = resolve(path, "config file")
  except ValueError as e:
    raise ValueError(f"{where}: 'config': {e}") from None
  try:
    runs = grid.checked(sweep["runs"], "runs")
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if not runs:
    raise ValueError(f"{where}: 'runs' is empty")
  seen: dict[str, int] = {}
  for i, run in enumerate(runs):
    try:
      check_run(run)
    except ValueError as e:
      raise ValueError(f"{where}: run {i}: {e}") from None
    key = run_id(run)
    if key in seen:
      raise ValueError(f"{where}: runs {seen[key]} and {i} are the same run {key} "
                       f"({json.dumps(run)})")
    seen[key] = i
  for key in ("name", "metric", "x", "description"):
    if key in sweep and not isinstance(sweep[key], str):
      raise ValueError(f"{where}: {key!r} must be a string, got {sweep[key]!r}")
  if "lower_is_better" in sweep and not isinstance(sweep["lower_is_better"], bool):
    raise ValueError(f"{where}: 'lower_is_better' must be True or False, got "
                     f"{sweep['lower_is_better']!r}")
  return {**sweep, "config": _display(path) + sep + arg, "runs": runs}


def check_run(run: dict[str, Any]) -> None:
  """One-line ValueError for a value that cannot be passed on the command line."""
  for key, value in run.items():
    grid.check_key(key)
    try:
      json.dumps(value, allow_nan=True)
    except TypeError:
      raise ValueError(f"{key}={value!r}: values are str, int, float, bool, None or "
                       f"lists of them") from None
    if key.startswith("arg.") and ("," in _format(value) or isinstance(value, (list, tuple, dict))):
      raise ValueError(f"{key}={value!r}: an argument-string value cannot hold a comma or a "
                       f"list; set the field with config.FIELD instead")


# ----------------------------------------------------------------------------- one run

def run_id(run: dict[str, Any]) -> str:
  """`<readable slug>-<8 hex digits>`: the slug from the values (keys in sorted order,
  named by their last part, e.g. `alpha-0.5_attention-relu_seed-1`), filesystem-safe and
  at most 60 characters; the hash is of the overrides as sorted JSON, so the id depends
  only on the overrides (not their order, nor the rest of the sweep)."""
  run = {k: grid.plain(v) for k, v in run.items()}
  text = json.dumps(run, sort_keys=True, separators=(",", ":"))
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  parts = [f"{key.rsplit('.', 1)[-1]}-{_slug_value(run[key])}" for key in sorted(run)]
  slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts))
  slug = slug[:SLUG_LENGTH].strip("-_.") or "default"
  return f"{slug}-{digest}"


def _slug_value(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return "x".join(_slug_value(v) for v in value)
  return str(value)


def _format(value: Any) -> str:
  """A value as `--config.FIELD=` and argument strings spell it: bools True/False, numbers
  by repr, strings as they are, tuples, lists and dicts as Python literals."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    return repr(tuple(value))  # ml_collections parses tuples; a ConfigDict keeps no lists
  return repr(value)


def _arg_items(arg: str) -> list[tuple[str | None, str]]:
  """(key, item) per comma-separated item; key None for one without `=`."""
  items = []
  for item in filter(None, (s.strip() for s in arg.split(","))):
    key, sep, _ = item.partition("=")
    items.append((key.strip() if sep else None, item))
  return items


def config_arg(sweep_config: str, run: dict[str, Any]) -> str:
  """`path:merged,args`: the sweep's config with the run's `arg.NAME` values set (an
  argument the config string already has is replaced in place, new ones are appended)."""
  path, _, arg = sweep_config.partition(":")
  items = _arg_items(arg)
  keys = [k for k, _ in items]
  for key, value in run.items():
    if not key.startswith("arg."):
      continue
    name, item = key[4:], f"{key[4:]}={_format(value)}"
    if name in keys:
      items[keys.index(name)] = (name, item)
    else:
      items.append((name, item))
      keys.append(name)
  merged = ",".join(item for _, item in items)
  return f"{path}:{merged}" if merged else path


def config_flags(run: dict[str, Any]) -> list[str]:
  """`--config.FIELD=VALUE` per `config.FIELD` key, in the run's order."""
  return [f"--{key}={_format(value)}" for key, value in run.items() if key.startswith("config.")]


def train_command(sweep_config: str, run: dict[str, Any], workdir: str) -> list[str]:
  """The arguments after `python` of the run's `train.py` (paths relative to the
  repository, which is the command's working directory)."""
  return ["train.py", f"--config={config_arg(sweep_config, run)}", *config_flags(run),
          f"--workdir={workdir}"]


def eval_command(workdir: str) -> list[str]:
  """The arguments after `python` of the run's `eval.py` (the workdir's own config)."""
  return ["eval.py", f"--workdir={workdir}"]


def _parse(argv: list[str]) -> config_dict.ConfigDict:
  values = flags.FlagValues()
  ml_config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                     sys_argv=argv, lock_config=True)
  values(argv)
  return values["config"].value


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def load_config(sweep_config: str, run: dict[str, Any]) -> config_dict.ConfigDict:
  """The run's config, built in this process as `train.py` builds it: the config file's
  `get_config(merged args)`, then the `config.FIELD` overrides parsed by ml_collections'
  own flag parsers (so their types are the same). One-line ValueError on failure."""
  arg_string = config_arg(sweep_config, run)
  path, sep, arg = arg_string.partition(":")
  path = os.path.abspath(resolve(path, "config file"))
  if cli.REPO_ROOT not in sys.path:
    sys.path.insert(0, cli.REPO_ROOT)
  base = ["sweep", f"--config={path}{sep}{arg}"]
  overrides = config_flags(run)
  try:
    return _parse(base + overrides)
  except Exception as e:  # pylint: disable=broad-except  (any parse failure: one line)
    message = str(e)
    if isinstance(e, flags.IllegalFlagValueError) and not message.startswith("flag --config="):
      raise ValueError(cli.one_line(message)) from None  # e.g. a bad --config.FIELD value
    try:
      config = _parse(base)
    except Exception as base_error:  # pylint: disable=broad-except  (get_config failed)
      root = _root_cause(base_error)
      raise ValueError(cli.one_line(f"--config={arg_string}: {root}")) from None
    for flag in overrides:
      missing = cli.missing_field(config, flag[len("--config."):].partition("=")[0])
      if missing:
        raise ValueError(cli.one_line(missing)) from None
    root = _root_cause(e)
    raise ValueError(cli.one_line(f"{type(root).__name__}: {root}")) from None
