"""Pointwise attention split along the sequence: gspmd, all_gather and ring strategies.

Pointwise attention has no normalisation over keys, so a query's output is a plain sum
over key blocks (Wortsman et al. 2023, Sec. 1): the shards exchange no running max or sum.

* `gspmd`: the weights are sharded along the key axis and the partitioner splits the key
  contraction; only the output is reduced across shards.
* `all_gather`: keys and values all-gathered, queries local (L^-alpha from the global
  key count).
* `ring`: key/value blocks travel round the ring; each device keeps only its output
  accumulator. The backward pass (a custom VJP) sends (k, v, dk, dv) round the ring
  again, so per-device memory is O(L / n). Causal rings run in the zigzag order; inside,
  each block pair runs the dense or the blockwise (`block_size`) core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.attention.pointwise.activations import ACTIVATIONS
from zoo.attention.pointwise.core import length_scale, pointwise_attention
from zoo.parallel import sequence as seq_lib


def _gspmd(q, k, v, *, mesh, causal, layout, activation="relu", alpha=1.0,
           block_size=None, query_block_size=None):
  del layout, block_size, query_block_size  # dense: the partitioner splits the key axis
  length = q.shape[1]
  w = ACTIVATIONS[activation](seq_lib.key_sharded_scores(q, k, mesh))
  if causal:
    w = jnp.where(seq_lib.causal_block_mask(length, length)[None, None], w, 0.0)
  scale = length_scale(None, length, length, causal=causal, kv_length=None, alpha=alpha)
  v = seq_lib.constrain_spec(v, mesh, seq_lib.length_spec(mesh))
  out = jnp.einsum("bhqk,bkhd->bhqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out * scale).astype(q.dtype).transpose(0, 2, 1, 3)
  return seq_lib.constrain_spec(out, mesh, seq_lib.length_spec(mesh))


def _all_gather(q, k, v, *, mesh, causal, layout, **options):
  del layout
  return seq_lib.all_gather_attention(pointwise_attention, q, k, v, mesh=mesh, causal=causal,
                                      **options)


def _block_sums(q, kb, vb, q_chunks, k_chunks, causal, activation, block_size,
                query_block_size):
  """sum_j h(q_i . k_j / sqrt d) v_j over one key block (no length scaling), float32."""
  def pair(qc, kc, vc, mode):
    def run(is_diag):
      return pointwise_attention(
          qc, kc, vc, activation=activation, alpha=0.0, causal=is_diag,
          block_size=block_size, query_block_size=query_block_size).astype(jnp.float32)
    zeros = lambda: jnp.zeros(qc.shape[:3] + (vc.shape[-1],), jnp.float32)
    if not causal:
      return run(False)
    return jax.lax.switch(mode, [lambda: run(False), lambda: run(True), zeros])

  qs = seq_lib.split_chunks(q, len(q_chunks))
  ks, vs = seq_lib.split_chunks(kb, len(k_chunks)), seq_lib.split_chunks(vb, len(k_chunks))
  outs = []
  for qc, qi in zip(qs, q_chunks):
    total = 0.0
    for kc, vc, ki in zip(ks, vs, k_chunks):
      total = total + pair(qc, kc, vc, seq_lib.pair_mode(qi, ki))
    outs.append(total)
  return jnp.concatenate(outs, axis=1)


def _ring(q, k, v, *, mesh, causal, layout, activation="relu", alpha=1.0,
          block_size=None, query_block_size=None):
  n = mesh.shape[seq_lib.AXIS]
  spec = seq_lib.length_spec(mesh)
  length = q.shape[1]
  if causal and layout == "natural":
    q, k, v = (seq_lib.to_zigzag(x, n) for x in (q, k, v))

  def local_length_scale(local_len):
    """L^-alpha of this shard's queries: global position + 1 (causal) or the length."""
    if not causal:
      return jnp.full((1, local_len, 1, 1), float(length) ** (-float(alpha)), jnp.float32)
    shard, chunk = jax.lax.axis_index(seq_lib.AXIS), local_len // 2
    starts = jnp.stack(seq_lib.chunk_ids(shard, n, causal)) * chunk
    counts = (starts[:, None] + jnp.arange(chunk)[None, :]).reshape(-1) + 1
    return (counts.astype(jnp.float32) ** (-float(alpha)))[None, :, None, None]

  def block_sums(q, kb, vb, src):
    shard = jax.lax.axis_index(seq_lib.AXIS)
    return _block_sums(q, kb, vb, seq_lib.chunk_ids(shard, n, causal),
                       seq_lib.chunk_ids(src, n, causal), causal, activation, block_size,
                       query_block_size)

  @jax.custom_vjp
  def ring(q, k, v, scale):
    return ring_fwd(q, k, v, scale)[0]

  def ring_fwd(q, k, v, scale):
    def step(src, acc, blocks):
      return acc + block_sums(q, *blocks, src), blocks

    acc0 = jnp.zeros(q.shape[:3] + (v.shape[-1],), jnp.float32)
    acc, _ = seq_lib.ring_loop(step, acc0, (k, v), n)
    return (acc * scale).astype(q.dtype), (q, k, v, scale)

  def ring_bwd(res, g):
    q, k, v, scale = res
    g = g.astype(jnp.float32) * scale

    def step(src, dq, blocks):  # the key/value block travels with its gradient accumulators
      kb, vb, dkb, dvb = blocks
      _, vjp = jax.vjp(lambda q_, k_, v_: block_sums(q_, k_, v_, src), q, kb, vb)
      dq_t, dk_t, dv_t = vjp(g)
      return dq + dq_t, (kb, vb, dkb + dk_t, dvb + dv_t)

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, (_, _, dk, dv) = seq_lib.ring_loop(step, zeros(q), (k, v, zeros(k), zeros(v)), n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  ring.defvjp(ring_fwd, ring_bwd)
  out = jax.shard_map(lambda q, k, v: ring(q, k, v, local_length_scale(q.shape[1])),
                      mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
  if causal and layout == "natural":
    out = seq_lib.from_zigzag(out, n)
  return out


STRATEGIES = {"gspmd": _gspmd, "all_gather": _all_gather, "ring": _ring}
