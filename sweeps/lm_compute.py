"""Byte LMs of six widths per attention family, against training compute (the ReLU
paper's Fig. 1 in spirit, across families): softmax, ReLU/L (alpha 1), ReLU/L with
qk-LayerNorm, AFT-local (window 32) and AFT-simple, each fitted with a power law in
training FLOPs and compared with softmax by its compute multiplier at equal loss.

    python sweep.py --sweep sweeps/lm_compute.py --out docs/studies/lm_compute
    python sweep.py --sweep sweeps/lm_compute.py:steps=1000,seeds=2 --out DIR

Every run is configs/lm_bytes.py (the embedded corpus of Python sources, context 64 here)
at depth 2 with `steps` steps of 16 sequences; the widths (and heads: width / 16) give the
sizes, so a variant's points differ in parameters and compute at a fixed number of
tokens. The metric is the test split's bits per byte (lower is better). Argument keys:
`steps` (default 400), `seeds` (default 1), `widths` (default 16/32/48/64/96/128, written
with slashes), `seq_len` (64).
"""

from zoo.config import parse_arg
from zoo.scaling import grid

FAMILIES = {
    "softmax": {"arg.attention": "softmax"},
    "relu": {"arg.attention": "relu"},
    "relu_qkln": {"arg.attention": "relu", "arg.qk_layernorm": True},
    "aft_local": {"arg.attention": "aft_local", "arg.window": 32},
    "aft_simple": {"arg.attention": "aft_simple"},
}


def get_sweep(arg=None):
  arg = parse_arg(arg, steps=400, seeds=1, widths="16/32/48/64/96/128", seq_len=64)
  unknown = sorted(set(arg) - {"steps", "seeds", "widths", "seq_len"})
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown}; sweeps/lm_compute.py takes steps, "
                     f"seeds, widths, seq_len")
  widths = [int(w) for w in str(arg.widths).split("/")]
  sizes = [{"arg.width": w, "arg.num_heads": max(1, w // 16)} for w in widths]
  families = [dict(f) for f in FAMILIES.values()]
  runs = grid.product(families, sizes, {"config.seed": list(range(int(arg.seeds)))})
  return {
      "name": "lm_compute",
      "config": f"configs/lm_bytes.py:depth=2,seq_len={int(arg.seq_len)},"
                f"total_steps={int(arg.steps)}",
      "runs": runs,
      "metric": "bits_per_byte",
      "plot": {"kind": "compute", "size_keys": ["arg.width", "arg.num_heads"],
               "baseline": "attention=softmax"},
      "fit": {"bootstrap": 200},
  }
