"""Benchmark kinds for the fused Pallas (Triton) pointwise-attention kernel.

    python benchmarks/attention.py --kinds relu_pallas relu_pallas_untuned --dtype bfloat16

* `relu_pallas`: `pointwise_attention(..., implementation="pallas")`, with the launch
  parameters the tuning table gives the shape (`pallas.kernel_config`: the committed
  `pallas_tuning.py`, or the JSON named by `ZOO_PALLAS_TUNING`).
* `relu_pallas_untuned`: the kernel with `pallas.DEFAULT_CONFIG` (128 x 64 tiles)
  whatever the table says, to show what tuning gained in the same run.
* `relu_pallas_64x32`: the kernel with 64 x 32 tiles for every kernel.
* `relu_pallas_interpret`: the kernel in the Pallas interpreter (any backend; for smoke
  runs of the benchmark scripts on the CPU at toy lengths only).

`--block-size` does not apply to these kinds. Off the GPU all but the interpreter kind
raise ValueError when traced (the kernel refuses other backends), so they are not in the
default kind list. Check the kernel's values first with
`python benchmarks/check_pallas_gpu.py`.
"""

from __future__ import annotations

import warnings

from zoo.attention import pointwise as _pointwise
from zoo.attention.pointwise import pallas as _pallas

# jax >= 0.11 warns at every Triton-backend lowering that the backend is deprecated (it
# still works); only that message is silenced.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


def _relu_pallas(args, implementation="pallas"):
  return lambda q, k, v: _pointwise.pointwise_attention(
      q, k, v, activation="relu", alpha=1.0, causal=args.causal, implementation=implementation)


def _relu_pallas_with(args, **launch):
  def attn(q, k, v):
    ls = _pointwise.length_scale(None, q.shape[1], k.shape[1], causal=args.causal,
                                  kv_length=None, alpha=1.0)
    return _pallas.pointwise_attention_pallas(q, k, v, ls, activation="relu",
                                              causal=args.causal, **launch)
  return attn


def _relu_pallas_untuned(args):
  def attn(q, k, v):
    untuned = _pallas.kernel_config(max(q.shape[1], k.shape[1]), q.shape[-1], q.dtype,
                                    args.causal, table={"entries": []})
    return _relu_pallas_with(args, config={n: untuned[n] for n in
                                           (*_pallas.KERNELS, "backward")})(q, k, v)
  return attn


KINDS = {
    "relu_pallas": _relu_pallas,
    "relu_pallas_untuned": _relu_pallas_untuned,
    "relu_pallas_64x32": lambda args: _relu_pallas_with(args, block_q=64, block_k=32),
    "relu_pallas_interpret": lambda args: _relu_pallas(args, "pallas_interpret"),
}
