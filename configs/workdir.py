"""The config a `train.py` run wrote to WORKDIR/config.json: `configs/workdir.py:WORKDIR`.

    python eval.py --workdir workdirs/lm_relu        # uses this config (no --config needed)
    python eval.py --config configs/workdir.py:workdirs/lm_relu --config.data.data_dir=/data

`eval.py` without `--config` uses it. `--config.FIELD=VALUE` still overrides any field,
e.g. `data.data_dir` on another machine or `mesh.seq` on fewer devices.
"""

import json
import os

import ml_collections

from zoo.config import overridable


def _fields(value):
  """Nested dicts as they are; None leaves as fields --config.FIELD can still set."""
  if isinstance(value, dict):
    return {k: _fields(v) for k, v in value.items()}
  return overridable(value)


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/workdir.py needs the workdir: configs/workdir.py:WORKDIR")
  path = os.path.join(os.path.expanduser(arg), "config.json")
  if not os.path.isfile(path):
    # Not FileNotFoundError: ml_collections would defer an IOError to the config's first use.
    raise ValueError(f"{path} does not exist (train.py writes it into the workdir)")
  with open(path) as f:
    return ml_collections.ConfigDict(_fields(json.load(f)))
