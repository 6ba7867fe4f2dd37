"""A two-run sweep for tests and the README: ReLU against softmax attention in the tiny
ViT (configs/tests/tiny_vit.py), a few steps each.

    python sweep.py --sweep sweeps/tiny_test.py --out /tmp/tiny_sweep
    python sweep.py --sweep sweeps/tiny_test.py:steps=20 --out /tmp/tiny_sweep_20

The argument string takes `steps` (default 6).
"""

from zoo.config import parse_arg
from zoo.scaling import grid


def get_sweep(arg=None):
  arg = parse_arg(arg, steps=6)
  unknown = sorted(set(arg) - {"steps"})
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown}; sweeps/tiny_test.py takes steps")
  return {
      "config": "configs/tests/tiny_vit.py",
      "runs": grid.product({"arg.attention": ["relu", "softmax"],
                            "config.total_steps": [arg.steps]}),
      "metric": "accuracy",
      "x": "flops",
  }
