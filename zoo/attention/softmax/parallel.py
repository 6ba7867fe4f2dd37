"""Softmax attention split along the sequence: gspmd, all_gather and ring strategies.

* `gspmd`: sharding constraints keep q, k, v and the output sharded along length and the
  attention weights along the *key* axis, so the partitioner splits the key contraction;
  softmax then needs the max and sum reductions over keys besides the output's.
* `all_gather`: keys and values all-gathered, queries local.
* `ring`: key/value blocks travel round the ring (`ppermute`); each device keeps a running
  (max, sum, output) triple per query, merged in log space (`zoo.attention.logspace`: the
  online softmax). Causal rings run in the load-balanced zigzag order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zoo.attention import logspace
from zoo.attention.softmax.core import softmax_attention
from zoo.parallel import sequence as seq_lib

_NEG = -1e30  # a finite "minus infinity" for masked scores: exp(_NEG - m) is 0, not nan


def _gspmd(q, k, v, *, mesh, causal, layout):
  del layout
  length = q.shape[1]
  s = seq_lib.key_sharded_scores(q, k, mesh)
  if causal:
    s = jnp.where(seq_lib.causal_block_mask(length, length)[None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1)  # max and sum over the sharded key axis: two reductions
  v = seq_lib.constrain_spec(v, mesh, seq_lib.length_spec(mesh))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return seq_lib.constrain_spec(out.astype(q.dtype), mesh, seq_lib.length_spec(mesh))


def _all_gather(q, k, v, *, mesh, causal, layout):
  del layout
  return seq_lib.all_gather_attention(softmax_attention, q, k, v, mesh=mesh, causal=causal)


def _block_triple(qc, kc, vc, mode, causal) -> logspace.Triple:
  """One query chunk against one key chunk: (max `[b,h,q,1]`, output sum `[b,h,q,d]`,
  exp sum `[b,h,q,1]`); `mode` from `pair_mode` (causal: all, diagonal or no keys)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", qc, kc, preferred_element_type=jnp.float32)
  s = s / math.sqrt(qc.shape[-1])
  if causal:
    diag = seq_lib.causal_block_mask(qc.shape[1], kc.shape[1])[None, None]
    visible = jnp.where(mode == 0, True, jnp.where(mode == 1, diag, False))
    s = jnp.where(visible, s, _NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  if causal:
    p = jnp.where(visible, p, 0.0)
  o = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
  return m, o, jnp.sum(p, axis=-1, keepdims=True)


def _ring(q, k, v, *, mesh, causal, layout):
  n = mesh.shape[seq_lib.AXIS]
  spec = seq_lib.length_spec(mesh)
  if causal and layout == "natural":
    q, k, v = (seq_lib.to_zigzag(x, n) for x in (q, k, v))

  def local(q, k, v):
    q_chunks = seq_lib.chunk_ids(jax.lax.axis_index(seq_lib.AXIS), n, causal)
    qs = seq_lib.split_chunks(q, len(q_chunks))

    def step(src, stats, blocks):
      kb, vb = blocks
      k_chunks = seq_lib.chunk_ids(src, n, causal)
      ks, vs = seq_lib.split_chunks(kb, len(k_chunks)), seq_lib.split_chunks(vb, len(k_chunks))
      stats = tuple(
          logspace.merge(t, *(_block_triple(qc, kc, vc, seq_lib.pair_mode(qi, ki), causal)
                              for kc, vc, ki in zip(ks, vs, k_chunks)))
          for t, qc, qi in zip(stats, qs, q_chunks))
      return stats, blocks

    def empty(qc):
      b, length, h, _ = qc.shape
      return logspace.empty(jnp.zeros((b, h, length, 1), jnp.float32),
                            jnp.zeros((b, h, length, v.shape[-1]), jnp.float32))

    stats, _ = seq_lib.ring_loop(step, tuple(empty(qc) for qc in qs), (k, v), n)
    outs = [logspace.ratio(t).transpose(0, 2, 1, 3) for t in stats]
    return jnp.concatenate(outs, axis=1).astype(q.dtype)

  out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                      check_vma=False)(q, k, v)
  if causal and layout == "natural":
    out = seq_lib.from_zigzag(out, n)
  return out


STRATEGIES = {"gspmd": _gspmd, "all_gather": _all_gather, "ring": _ring}
