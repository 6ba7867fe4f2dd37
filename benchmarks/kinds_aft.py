"""Benchmark kinds for the AFT family (Zhai et al. 2021), loaded by attention.py.

    python benchmarks/attention.py --kinds aft_simple aft_conv \
        --lengths 1024 4096 16384 65536 --repeats 3 --out results/attention_aft.json

Every kind takes q, k, v `[batch, length, heads, head_dim]` like the other kinds and
flattens them to the cores' `[batch, length, heads * head_dim]` (AFT has no heads, except
AFT-conv's); position biases and filters are built inside, as the modules do:

* `aft_simple`: `aft.aft_simple` (Eq. 5), causal with `--causal` (a running-max scan).
* `aft_conv`: `aft.aft_conv` (Eq. 6), 1-D over the sequence, `heads` heads with a filter
  of `CONV_SIZE` = 11 taps each (Eq. 8 reparameterised from a fixed random raw filter,
  gain 1, bias 0) and K of one channel per head (the first channel of each head's k).
* `aft_full`: `aft.aft_full` (Eq. 2) with w = u v^T, u, v `[L, BIAS_RANK]` (d' = 128, N(0,
  1e-2) as the modules' init) computed inside the step, as the module does.
* `aft_local`: `aft.aft_local` (Eq. 4), the same bias kept within `WINDOW` = 32.

Full and local cost O(L^2 d) time and O(L^2) memory (the bias), so they are in QUADRATIC
(skipped when [L, L] score-sized arrays would not fit). FLOPs of one forward+backward step
(backward = 2 x forward, the attention.py convention), B H D = batch x width:
full / local 3 x (4 B L^2 H D + 2 L^2 d'), the two [L, L] x [L, width] matmuls of the fast
path and u v^T; simple 3 x 8 B L H D (exp, products, sums, ratio and gate, counted as
one flop each); conv 3 x (4 s + 12) B L H D (two depthwise s-tap convolutions, the
cumulative sums of the keys outside the window, exp, ratio and gate). The linear counts
are nominal (elementwise work, not multiply-adds): compare times and slopes, not GFLOP/s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention import aft

CONV_SIZE = 11
BIAS_RANK = 128
WINDOW = 32


def _flat(x):
  return x.reshape(x.shape[0], x.shape[1], -1)


def _factors(length, dtype):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.normal(scale=1e-2, size=(length, BIAS_RANK)), dtype)
               for _ in range(2))


def _aft_simple(args):
  def attn(q, k, v):
    return aft.aft_simple(_flat(q), _flat(k), _flat(v), causal=args.causal).reshape(q.shape)
  return attn


def _aft_conv(args):
  raw = jnp.asarray(np.random.default_rng(0).normal(size=(args.heads, CONV_SIZE)))
  kernel = aft.aft_conv_kernel(raw, jnp.ones(args.heads), jnp.zeros(args.heads))

  def attn(q, k, v):
    return aft.aft_conv(_flat(q), k[..., 0], _flat(v), kernel.astype(q.dtype),
                        causal=args.causal).reshape(q.shape)
  return attn


def _aft_full(args, window=None):
  def attn(q, k, v):
    # The barrier keeps XLA from constant-folding u v^T (the module computes it per step).
    u, w = jax.lax.optimization_barrier(_factors(q.shape[1], q.dtype))
    bias = u @ w.T
    if window is None:
      y = aft.aft_full(_flat(q), _flat(k), _flat(v), bias, causal=args.causal)
    else:
      y = aft.aft_local(_flat(q), _flat(k), _flat(v), bias, window=window, causal=args.causal)
    return y.reshape(q.shape)
  return attn


def _quadratic_flops(args, length):
  width = args.heads * args.head_dim
  return 3 * (4 * args.batch * length * length * width + 2 * length * length * BIAS_RANK)


KINDS = {
    "aft_full": _aft_full,
    "aft_local": lambda args: _aft_full(args, window=WINDOW),
    "aft_simple": _aft_simple,
    "aft_conv": _aft_conv,
}
FLOPS = {
    "aft_full": _quadratic_flops,
    "aft_local": _quadratic_flops,
    "aft_simple": lambda args, n: 3 * 8 * args.batch * n * args.heads * args.head_dim,
    "aft_conv": lambda args, n: (3 * (4 * CONV_SIZE + 12) * args.batch * n * args.heads
                                 * args.head_dim),
}
QUADRATIC = {"aft_full", "aft_local"}
DEFAULT_KINDS = []
