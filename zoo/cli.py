"""Shared command-line plumbing for `train.py` and `eval.py`."""

from __future__ import annotations

import os

import jax
from absl import app, flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "vit_digits.py")


def define_flags(default_workdir: str | None):
  config = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG,
      "Config file, optionally with an argument: `configs/vit_digits.py:attention=softmax`. "
      "Override fields with --config.total_steps=100 and the like.", lock_config=True)
  workdir = flags.DEFINE_string(
      "workdir", default_workdir,
      "Directory for checkpoints and metrics (default: workdirs/<config name>[_<arg>]).")
  return config, workdir


def define_distributed_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs "
                      "(or env JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (or env JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (or env JAX_PROCESS_ID).")


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
    raise app.UsageError("a multi-process run needs --num_processes and --process_id "
                         "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                             process_id=int(pid))


def default_workdir(config_path: str) -> str:
  """workdirs/vit_digits or workdirs/vit_digits_attention=softmax from the --config flag."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + arg.replace(",", "_").replace("=", "-") if arg else ""
  return os.path.join("workdirs", name + suffix)
