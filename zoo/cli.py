"""Shared command-line plumbing for `train.py` and `eval.py`."""

from __future__ import annotations

import os

from absl import flags
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


def default_workdir(config_path: str) -> str:
  """workdirs/vit_digits or workdirs/vit_digits_attention=softmax from the --config flag."""
  path, _, arg = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "_" + arg.replace(",", "_").replace("=", "-") if arg else ""
  return os.path.join("workdirs", name + suffix)
