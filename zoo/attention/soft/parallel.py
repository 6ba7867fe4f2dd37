"""SOFT split along the sequence (Lu et al. 2021): strategies `all_gather` and `gspmd`.

SOFT's output for token i is K1_i . newton_inverse(K2) . (K1^T V) (`core.py`, Eq. 3): the
only sum over tokens is K1^T V `[batch, heads, m, dv]`, and the landmarks (m of them, few)
come from k x k windows of the patch grid. So with the tokens split over the mesh's `seq`
axis:

* `all_gather` (`jax.shard_map`): each shard computes the landmarks of its own patches,
  all-gathers them (m x d per head, small), forms K1 for its tokens and K2 (every shard
  the same m x m Newton inverse, redundantly: it is cheap), `psum`s its K1^T V over `seq`,
  and applies K1 to the result locally. The depthwise convolution on V (`conv_size` c)
  needs c // 2 grid rows from each neighbouring shard: those boundary rows come from
  `zoo.parallel.sequence.halo_exchange` (two `ppermute`s; the first and last shard receive
  zeros, i.e. the convolution's zero padding), V itself is never gathered. Communication
  per layer: all-gather of the landmarks, one all-reduce of K1^T V, 2 (c // 2) rows of V;
  activations per device O(n / s . m). Gradients are autodiff through the collectives.
* `gspmd`: the single-device core with q, v and the output constrained to length
  sharding; XLA's partitioner splits the rest (the K1^T V contraction becomes an
  all-reduce; the convolutions get their own halos). No split condition beyond the
  length dividing by the shard count.

How the sequence is split (`all_gather`). The ViT's tokens are the patches in row-major
order, so an even split of the length over s shards is a split of the grid's rows: shard i
holds rows [i R / s, (i + 1) R / s) of the R x C grid, all columns. A landmark window is
k x k patches (k = `ratio`) starting at rows 0, k, 2k, ...; it lies inside one shard
exactly when the rows per shard R / s are a multiple of k. So the split needs R % s == 0
and (R / s) % k == 0 when s > 1 (then R % k == 0 too: no trailing rows are dropped;
with s = 1 a trailing partial row of windows is floored as on one device); otherwise
`rows_per_shard` raises a ValueError naming the grid, the shard count, the ratio and the
shard counts that would work. The columns are never split, so a C that is not a multiple of
k is floored on every shard as on one device. Shard i then holds landmark rows
[i R / (s k), (i + 1) R / (s k)), contiguous in the landmarks' row-major order, so the
tiled all-gather returns them in exactly the single-device order. A class token (the ViT's
`pool_type="tok"`) makes the length R C + 1, which neither splits into whole rows nor has a
place in the grid: SOFT has no form for it, and the ViT then passes no grid, which SOFT
rejects with its own message, sharded or not (where R C + 1 does not divide by s, the
transformer block's sharding constraint on its input fails first, with JAX's message).

The functional entry point `zoo.attention.sequence_parallel_attention(q, q, v, mesh=...,
kind="soft", strategy=..., grid=(R, C), ratio=k)` computes
`soft_attention(q, v, pool_landmarks(q / d^{1/4}, grid, k))` (the paper's pooled landmarks;
K = Q, so pass q as k). `landmark_fn(q_scaled, grid)` and `value_conv_fn(v, grid)`
substitute learned landmarks and add the depthwise convolution on V; `SoftAttention`
passes its own (`make_landmarks`, `conv_values`), whose parameters are closed over and so
replicated on every shard.
"""

from __future__ import annotations

import jax

from zoo.attention.soft import core
from zoo.parallel import sequence as seq_lib


def rows_per_shard(grid, num_shards: int, ratio: int) -> int:
  """Rows of the patch grid each of `num_shards` shards holds; ValueError if the split
  would cut a k x k landmark window (see the module docstring)."""
  rows, cols = (int(g) for g in grid)
  if num_shards == 1:  # the whole grid: trailing rows floored as on one device
    return rows
  good = [1] + [s for s in range(2, rows + 1) if rows % s == 0 and (rows // s) % ratio == 0]
  if rows % num_shards or (rows // num_shards) % ratio:
    why = (f"{rows} rows do not divide by {num_shards}" if rows % num_shards else
           f"{rows // num_shards} rows per shard are not a multiple of the landmark ratio "
           f"{ratio}, so a {ratio}x{ratio} landmark window would straddle two shards")
    raise ValueError(
        f"SOFT's sequence split: the {rows}x{cols} patch grid is split by rows over the "
        f"mesh's seq axis ({num_shards} shards), and each shard must hold whole landmark "
        f"windows (rows per shard a multiple of ratio={ratio}); {why}. Shard counts that "
        f"work for this grid: {good}")
  return rows // num_shards


def _all_gather(q, k, v, *, mesh, causal, layout, grid=None, ratio=2, landmarks="pool",
                conv_size=0, num_iters=20, ridge=0.01, differentiate_iterations=False,
                landmark_fn=None, value_conv_fn=None, precision=None):
  del layout
  rows, cols = core.check_call(q, k, causal=causal, grid=grid, ratio=ratio,
                               landmarks=landmarks, landmark_fn=landmark_fn,
                               conv_size=conv_size, value_conv_fn=value_conv_fn)
  core.check_newton_options(num_iters, ridge)
  n = mesh.shape[seq_lib.AXIS]
  local_rows = rows_per_shard((rows, cols), n, ratio)
  local_grid = (local_rows, cols)
  halo = conv_size // 2 if value_conv_fn is not None else 0  # rows from each neighbour
  if halo > local_rows:
    raise ValueError(f"the {conv_size}x{conv_size} convolution on V needs {halo} rows from "
                     f"each neighbouring shard, but a shard holds only {local_rows}; use "
                     f"fewer seq shards")
  make_landmarks = core.landmark_maker(landmark_fn, ratio)
  spec = seq_lib.length_spec(mesh)

  def local(q, v):
    lm = make_landmarks(core.scaled_queries(q), local_grid)  # this shard's windows
    lm = jax.lax.all_gather(lm, seq_lib.AXIS, axis=1, tiled=True)  # all m, in order
    y = core.nystrom(q, v, lm, num_iters=num_iters, ridge=float(ridge),
                     differentiate_iterations=differentiate_iterations, precision=precision,
                     sum_over_tokens=lambda x: jax.lax.psum(x, seq_lib.AXIS))
    if value_conv_fn is not None:
      b, _, h, d = v.shape
      grid_v = v.reshape(b, local_rows, cols, h, d)
      if halo:  # the neighbours' boundary rows; zeros beyond the grid (the conv's padding)
        grid_v = seq_lib.halo_exchange(grid_v, halo, halo, n)
      conv = value_conv_fn(grid_v.reshape(b, -1, h, d), (local_rows + 2 * halo, cols))
      conv = conv.reshape(b, local_rows + 2 * halo, cols, h, d)[:, halo:halo + local_rows]
      y = y + conv.reshape(y.shape).astype(y.dtype)
    return y

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(q, v)


def _gspmd(q, k, v, *, mesh, causal, layout, **options):
  del layout
  core.check_tied(q, k)  # before the constraint makes q a new array
  spec = seq_lib.length_spec(mesh)
  q, v = (seq_lib.constrain_spec(x, mesh, spec) for x in (q, v))
  return seq_lib.constrain_spec(core.soft_core(q, q, v, causal=causal, **options), mesh, spec)


STRATEGIES = {"all_gather": _all_gather, "gspmd": _gspmd}
