"""Shared command-line plumbing for `train.py` and `eval.py`.

`run(main, default_config=...)` replaces `absl.app.run`: it puts the `--config` flag first
(defaulted when absent, found relative to the repository when not relative to the
current directory), parses the flags, and turns every parse failure into one line on
stderr and exit code 1: a misspelt key in the config's argument string, a misspelt
`--config.FIELD` (naming the nearest fields), an unknown attention, an unknown flag, a
missing config file. `-h` / `--help` print the script's docstring and its flags.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, NoReturn

import jax
from absl import app, flags
from ml_collections import config_dict, config_flags

from zoo import config as config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "vit_digits.py")
# `configs/workdir.py:WORKDIR`: the config a train.py run wrote to WORKDIR/config.json.
WORKDIR_CONFIG = os.path.join(CONFIGS_DIR, "workdir.py")
_HELP_FLAGS = ("-h", "-help", "--help", "-helpshort", "--helpshort", "-?")


def define_flags(default_config_help: str):
  """The `--config` and `--workdir` flags; `default_config_help` says what a run without
  `--config` uses."""
  config = config_flags.DEFINE_config_file(
      "config", None,
      "Config file, optionally with an argument string, e.g. "
      f"configs/vit_digits.py:attention=softmax (default: {default_config_help}). "
      "--config.FIELD=VALUE overrides any field, e.g. --config.total_steps=100; "
      "`python -m zoo.attention` lists the configs, their arguments and the attentions.",
      lock_config=True)
  flags.FLAGS["config"].default_as_str = None  # the help text says the default
  workdir = flags.DEFINE_string(
      "workdir", None,
      "Directory of the run's checkpoints, metrics.jsonl and config.json (default: "
      "workdirs/<config name>[_<argument string>]).")
  return config, workdir


def define_distributed_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-host: host:port of process 0, the same for every process "
                      "(or env JAX_COORDINATOR_ADDRESS). Unset: one process.")
  flags.DEFINE_integer("num_processes", None,
                       "Multi-host: the number of processes (or env JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None,
                       "Multi-host: this process's index, 0 .. num_processes - 1 (or env "
                       "JAX_PROCESS_ID).")


def initialize_distributed() -> None:
  """`jax.distributed.initialize` from the flags or the JAX_* environment variables.

  Single-process runs (no coordinator given) skip it. On CPU, cross-process collectives
  use gloo.
  """
  f = flags.FLAGS
  address = f.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  num = f.num_processes if f.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = f.process_id if f.process_id is not None else os.environ.get("JAX_PROCESS_ID")
  if num is None or pid is None:
    fail("a multi-process run needs --num_processes and --process_id "
         "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                             process_id=int(pid))


def default_workdir(config_path: str) -> str:
  """workdirs/vit_digits or workdirs/vit_digits_attention-softmax from the --config flag."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + arg.replace(",", "_").replace("=", "-") if arg else ""
  return os.path.join("workdirs", name + suffix)


def config_string() -> str:
  """The parsed `--config` value, `FILE[:ARGS]`."""
  return flags.FLAGS["config"].config_filename


def config_from_workdir() -> bool:
  """Whether the config is the one a run wrote to the workdir (`configs/workdir.py`)."""
  return os.path.abspath(config_string().partition(":")[0]) == WORKDIR_CONFIG


def workdir() -> str:
  """`--workdir`, or the default for the config."""
  value = flags.FLAGS.workdir
  if value:
    return value
  if config_from_workdir():
    return config_string().partition(":")[2]
  return default_workdir(config_string())


def one_line(message: Any) -> str:
  """A (possibly multi-line) message as one line: lines joined by '; ' (by ' ' after ':')."""
  text = ""
  for line in str(message).splitlines():
    line = line.strip()
    if line:
      text += ("" if not text else " " if text.endswith(":") else "; ") + line
  return text


def fail(message: Any) -> NoReturn:
  """Prints `error: MESSAGE` as one line on stderr and exits with status 1."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(1)


def require_workdir(path: str) -> None:
  """Fails (creating nothing) unless `path` is an existing directory."""
  if not os.path.isdir(path):
    fail(f"workdir {path} does not exist (train first: python train.py --config ... "
         f"--workdir {path})")


def workdir_config(argv: list[str]) -> str:
  """eval.py's default `--config`: the config.json of `--workdir` (default
  workdirs/vit_digits), which train.py writes."""
  path = flag_value(argv, "workdir") or default_workdir(DEFAULT_CONFIG)
  require_workdir(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    fail(f"{path} has no config.json (train.py writes it); pass the run's --config")
  return f"{WORKDIR_CONFIG}:{path}"


def _split_flag(argv: list[str], name: str) -> tuple[str | None, list[str]]:
  """(the value of the last `--name=V`, `--name V` or one-dash form, the arguments after
  argv[0] without them); everything from a `--` on is left as it is."""
  rest, value, i = [], None, 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest += argv[i:]
      break
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
      i += 1 if match.group(1) else 2
      continue
    rest.append(arg)
    i += 1
  return value, rest


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=V` / `--name V` in `argv` (the last one), before any `--`."""
  return _split_flag(argv, name)[0]


def _config_first(argv: list[str], default: Callable[[list[str]], str]) -> list[str]:
  """argv with `--config=FILE[:ARGS]` right after the program name (so --config.FIELD may
  come before it), defaulted when absent; FILE is taken relative to the repository when
  it does not exist relative to the current directory."""
  value, rest = _split_flag(argv, "config")
  if value is None:
    value = default(argv)
  path, sep, arg = value.partition(":")
  if not os.path.isfile(os.path.expanduser(path)):
    in_repo = os.path.join(REPO_ROOT, path)
    if not path or not os.path.isfile(in_repo):
      where = " and ".join(dict.fromkeys([os.getcwd(), REPO_ROOT]))
      fail(f"--config: no config file {path!r} (looked in {where}); `python -m zoo.attention` "
           f"lists the configs")
    path = in_repo
  return [argv[0], f"--config={os.path.expanduser(path)}{sep}{arg}"] + rest


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _fields(node, prefix: str = "") -> list[str]:
  """Every field path of a config, groups included."""
  out = []
  for key, value in node.items():
    out.append(prefix + key)
    if isinstance(value, (config_dict.ConfigDict, dict)):
      out += _fields(value, prefix + key + ".")
  return out


def missing_field(config, path: str) -> str | None:
  """None when `config` has the field `path` (a.b.c), else a one-line message naming it,
  the fields nearest to it, and the fields of its group."""
  parts, node = path.split("."), config
  for i, part in enumerate(parts):
    if isinstance(node, (config_dict.ConfigDict, dict)) and part in node:
      node = node[part]
      continue
    group = ".".join(parts[:i])
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      return f"--config.{path}: config.{group} is a value, not a group of fields"
    guesses = [".".join(parts[:i] + [g]) for g in config_lib.nearest(part, node.keys())]
    guesses += [f for f in _fields(config) if f.rsplit(".", 1)[-1] == part]
    hint = ("; did you mean " + " or ".join(f"--config.{g}" for g in dict.fromkeys(guesses))
            + "?") if guesses else ""
    where = f"config.{group}" if group else "the config"
    return (f"--config.{path}: no such config field{hint} ({where} has: "
            f"{', '.join(sorted(node.keys()))})")
  return None


def _override_error(argv: list[str]) -> str | None:
  """The first `--config.FIELD` override whose field the config does not have."""
  try:
    config = flags.FLAGS["config"].parser.parse(flag_value(argv, "config"))
  except Exception:  # pylint: disable=broad-except  (the caller reports the original error)
    return None
  for arg in argv[1:]:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    message = match and missing_field(config, match.group(1))
    if message:
      return message
  return None


def _parse_error(error: Exception, argv: list[str]) -> str:
  """One line for an exception raised while parsing the flags."""
  if isinstance(error, flags.UnrecognizedFlagError):
    ours = [flag.name for flag in flags.FLAGS.get_key_flags_for_module(argv[0])]
    close = config_lib.nearest(error.flagname, ours)
    hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""
    return f"unknown flag --{error.flagname}{hint}; see --help"
  message = str(error)
  if isinstance(error, flags.IllegalFlagValueError) and not message.startswith("flag --config="):
    return message  # e.g. "flag --config.total_steps=abc: invalid literal for int() ..."
  root = _root_cause(error)
  if isinstance(error, flags.IllegalFlagValueError):  # the config file's get_config failed
    return f"--config={flag_value(argv, 'config')}: {root}"
  return _override_error(argv) or f"{type(root).__name__}: {root}"


def print_help() -> None:
  """The main script's docstring and its flags (absl's --helpfull lists every flag)."""
  main = sys.modules["__main__"]
  print((main.__doc__ or "").strip() + "\n")
  print("flags:\n" + flags.FLAGS.main_module_help().strip().split("\n", 1)[-1])
  print("\n--helpfull lists absl's and JAX's flags too.")


def parse_flags(argv: list[str], default_config: Callable[[list[str]], str]) -> list[str]:
  """absl's flag parsing with one-line errors; returns the remaining arguments."""
  argv = list(argv)
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    print_help()
    sys.exit(0)
  argv = _config_first(argv, default_config)
  sys.argv = argv  # ml_collections reads the --config.FIELD overrides from sys.argv
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (any parse failure: one line)
    fail(_parse_error(e, argv))


def run(main: Callable[[list[str]], None], *,
        default_config: Callable[[list[str]], str] = lambda argv: DEFAULT_CONFIG) -> None:
  """`absl.app.run(main)` with `parse_flags`; `main` gets no positional arguments
  (any is an error)."""
  def checked(argv):
    if len(argv) > 1:
      fail(f"unexpected argument(s) {argv[1:]}: flags are --name=value; see --help")
    main(argv)
  app.run(checked, flags_parser=lambda argv: parse_flags(argv, default_config))
