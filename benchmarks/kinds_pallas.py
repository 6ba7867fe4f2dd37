"""Benchmark kinds for the fused Pallas (Triton) pointwise-attention kernel: GPU only.

    python benchmarks/attention.py --kinds relu_dense relu_pallas --dtype bfloat16 [--causal]

`relu_pallas` goes through `pointwise_attention(..., implementation="pallas")` with the
kernel's default tiles (128 x 64); `relu_pallas_64x32` calls the kernel with 64 x 32 tiles,
to compare tile sizes in the same run. `--block-size` does not apply to these kinds. Off
the GPU both raise ValueError when traced (the kernel refuses other backends), so they are
not in the default kind list. Check the kernel's values first with
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


def _relu_pallas(args):
  return lambda q, k, v: _pointwise.pointwise_attention(
      q, k, v, activation="relu", alpha=1.0, causal=args.causal, implementation="pallas")


def _relu_pallas_64x32(args):
  def attn(q, k, v):
    ls = _pointwise.length_scale(None, q.shape[1], k.shape[1], causal=args.causal,
                                  kv_length=None, alpha=1.0)
    return _pallas.pointwise_attention_pallas(q, k, v, ls, activation="relu",
                                              causal=args.causal, block_q=64, block_k=32)
  return attn


KINDS = {
    "relu_pallas": _relu_pallas,
    "relu_pallas_64x32": _relu_pallas_64x32,
}
