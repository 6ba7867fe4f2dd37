"""Attention split along the sequence over the mesh's `seq` axis.

`sequence_parallel_attention(q, k, v, mesh=..., kind=..., strategy=...)` takes global
`[batch, length, heads, head_dim]` arrays (length sharded over `seq`, batch over
`data`/`fsdp`) and equals the single-device functional core of `kind` in values and
gradients. Strategies:

* `gspmd`: the pjit path. Sharding constraints keep q, k, v and the output sharded along
  length and the attention weights sharded along the *key* axis, so the partitioner splits
  the key contraction. Pointwise attention then needs only the reduction of the output;
  softmax also needs the max and sum reductions over keys. Dense: each device holds an
  `[L, L / n]` slice of the weights.
* `all_gather`: keys and values all-gathered, queries local.
* `ring`: `jax.shard_map` with `ppermute` of key/value blocks around the ring. Softmax
  carries the running max and sum (online softmax); pointwise attention carries nothing
  but the output accumulator, and its backward pass sends (k, v, dk, dv) round the ring
  again (a custom VJP), so per-device memory is O(L / n) rather than O(L).
  Causal runs use the load-balanced zigzag order: with 2n chunks, device i holds chunks i
  and 2n - 1 - i, so every device does equal work. Inputs in natural order are permuted
  into it and back (`layout="natural"`); callers that keep activations in zigzag order
  pass `layout="zigzag"` and skip both permutations.

* `halo`: for families whose queries see only a bounded stretch of keys behind (and ahead
  of) them, each device receives that stretch from its neighbours (`ppermute`) and
  computes locally.

Families add their own implementations with `register(core, strategy, fn)`; the module
class of a registered attention names its core in `sequence_parallel_core`. The
implementations of the other families live in `zoo.parallel.sequence_<family>` modules,
imported at the end of this one. Not every family has every strategy:
`strategies(core)` lists those registered.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo.attention import masking
from zoo.attention import pointwise as pointwise_lib
from zoo.attention import registry
from zoo.attention import softmax as softmax_lib

from zoo.parallel import STRATEGIES
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
_NEG = -1e30  # a finite "minus infinity": exp(_NEG - _NEG) stays finite


def register(core: str, strategy: str, fn: Callable) -> None:
  """Registers `fn(q, k, v, *, mesh, causal, layout, **options)` for a family's core."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  _IMPLEMENTATIONS[(core, strategy)] = fn


def strategies(core: str | None = None) -> tuple[str, ...]:
  """The strategies registered for `core` (for every core when None), in STRATEGIES order."""
  names = {s for c, s in _IMPLEMENTATIONS if core is None or c == core}
  return tuple(s for s in STRATEGIES if s in names)


def batch_axes(mesh) -> tuple[str, ...] | None:
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
  return axes or None


def qkv_spec(mesh) -> P:
  return P(batch_axes(mesh), "seq", None, None)


def _constrain(x, mesh, spec):
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- zigzag

def zigzag_permutation(length: int, num_shards: int) -> jax.Array:
  """Token order in which shard i holds chunks i and 2n - 1 - i of 2n equal chunks."""
  chunk = length // (2 * num_shards)
  order = [c for i in range(num_shards) for c in (i, 2 * num_shards - 1 - i)]
  return jnp.concatenate([jnp.arange(c * chunk, (c + 1) * chunk) for c in order])


def to_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  return jnp.take(x, zigzag_permutation(x.shape[axis], num_shards), axis=axis)


def from_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
  inverse = jnp.argsort(zigzag_permutation(x.shape[axis], num_shards))
  return jnp.take(x, inverse, axis=axis)


# ----------------------------------------------------------------------------- gspmd

def _gspmd_scores(q, k, mesh):
  spec = qkv_spec(mesh)
  q, k = _constrain(q, mesh, spec), _constrain(k, mesh, spec)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s / math.sqrt(q.shape[-1])
  return _constrain(s, mesh, P(batch_axes(mesh), None, None, "seq"))  # key-sharded weights


def _pointwise_gspmd(q, k, v, *, mesh, causal, layout, activation="relu", alpha=1.0,
                     block_size=None, query_block_size=None):
  del layout, block_size, query_block_size  # dense: the partitioner splits the key axis
  length = q.shape[1]
  w = pointwise_lib.ACTIVATIONS[activation](_gspmd_scores(q, k, mesh))
  if causal:
    w = jnp.where(masking.causal_mask(length, length)[None, None], w, 0.0)
  scale = pointwise_lib._length_scale(None, length, length, causal=causal, kv_length=None,
                                      alpha=alpha)
  v = _constrain(v, mesh, qkv_spec(mesh))
  out = jnp.einsum("bhqk,bkhd->bhqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out * scale).astype(q.dtype).transpose(0, 2, 1, 3)
  return _constrain(out, mesh, qkv_spec(mesh))


def _softmax_gspmd(q, k, v, *, mesh, causal, layout):
  del layout
  length = q.shape[1]
  s = _gspmd_scores(q, k, mesh)
  if causal:
    s = jnp.where(masking.causal_mask(length, length)[None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1)  # max and sum over the sharded key axis: two reductions
  v = _constrain(v, mesh, qkv_spec(mesh))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return _constrain(out.astype(q.dtype), mesh, qkv_spec(mesh))


# ----------------------------------------------------------------------------- all-gather

def _all_gather(core_fn, q, k, v, *, mesh, causal, layout, **options):
  del layout
  spec = qkv_spec(mesh)

  def local(q, k, v):
    shard, local_len = jax.lax.axis_index("seq"), q.shape[1]
    k_all = jax.lax.all_gather(k, "seq", axis=1, tiled=True)
    v_all = jax.lax.all_gather(v, "seq", axis=1, tiled=True)
    mask = None
    if causal:
      mask = masking.causal_mask(local_len, k_all.shape[1], q_offset=shard * local_len)[None, None]
    return core_fn(q, k_all, v_all, mask=mask, **options)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)


# ----------------------------------------------------------------------------- ring

def _chunk_ids(shard, num_shards, causal):
  """Global chunk indices a shard holds: (i, 2n-1-i) in zigzag order, else (i,)."""
  return (shard, 2 * num_shards - 1 - shard) if causal else (shard,)


def _pair_mode(q_chunk, k_chunk):
  """0: all keys visible, 1: the causal diagonal block, 2: all keys in the future."""
  return jnp.where(k_chunk < q_chunk, 0, jnp.where(k_chunk == q_chunk, 1, 2))


def _split(x, parts):
  return jnp.split(x, parts, axis=1) if parts > 1 else [x]


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _pointwise_block_sums(q, kb, vb, q_chunks, k_chunks, causal, activation, block_size,
                          query_block_size):
  """sum_j h(q_i . k_j / sqrt d) v_j over one key block (no length scaling), float32."""
  def pair(qc, kc, vc, mode):
    def run(is_diag):
      return pointwise_lib.pointwise_attention(
          qc, kc, vc, activation=activation, alpha=0.0, causal=is_diag,
          block_size=block_size, query_block_size=query_block_size).astype(jnp.float32)
    zeros = lambda: jnp.zeros(qc.shape[:3] + (vc.shape[-1],), jnp.float32)
    if not causal:
      return run(False)
    return jax.lax.switch(mode, [lambda: run(False), lambda: run(True), zeros])

  qs, ks, vs = _split(q, len(q_chunks)), _split(kb, len(k_chunks)), _split(vb, len(k_chunks))
  outs = []
  for qc, qi in zip(qs, q_chunks):
    total = 0.0
    for kc, vc, ki in zip(ks, vs, k_chunks):
      total = total + pair(qc, kc, vc, _pair_mode(qi, ki))
    outs.append(total)
  return jnp.concatenate(outs, axis=1)


def _pointwise_ring(q, k, v, *, mesh, causal, layout, activation="relu", alpha=1.0,
                    block_size=None, query_block_size=None):
  n = mesh.shape["seq"]
  spec = qkv_spec(mesh)
  length = q.shape[1]
  if causal and layout == "natural":
    q, k, v = (to_zigzag(x, n) for x in (q, k, v))

  def local_length_scale(local_len):
    """L^-alpha of this shard's queries: global position + 1 (causal) or the length."""
    if not causal:
      return jnp.full((1, local_len, 1, 1), float(length) ** (-float(alpha)), jnp.float32)
    shard, chunk = jax.lax.axis_index("seq"), local_len // 2
    starts = jnp.stack(_chunk_ids(shard, n, causal)) * chunk
    counts = (starts[:, None] + jnp.arange(chunk)[None, :]).reshape(-1) + 1
    return (counts.astype(jnp.float32) ** (-float(alpha)))[None, :, None, None]

  def block_sums(q, kb, vb, src):
    shard = jax.lax.axis_index("seq")
    return _pointwise_block_sums(q, kb, vb, _chunk_ids(shard, n, causal),
                                 _chunk_ids(src, n, causal), causal, activation, block_size,
                                 query_block_size)

  @jax.custom_vjp
  def ring(q, k, v, scale):
    return ring_fwd(q, k, v, scale)[0]

  # The ring is a fori_loop (compiled once, whatever n): step t uses the key/value block
  # of shard (i - t) mod n, then passes it on; after n hops every block is home again.
  def ring_fwd(q, k, v, scale):
    shard = jax.lax.axis_index("seq")

    def body(t, carry):
      acc, kb, vb = carry
      acc = acc + block_sums(q, kb, vb, (shard - t) % n)
      kb, vb = jax.lax.ppermute((kb, vb), "seq", _ring_perm(n))
      return acc, kb, vb

    acc0 = jnp.zeros(q.shape[:3] + (v.shape[-1],), jnp.float32)
    acc, _, _ = jax.lax.fori_loop(0, n, body, (acc0, k, v))
    return (acc * scale).astype(q.dtype), (q, k, v, scale)

  def ring_bwd(res, g):
    q, k, v, scale = res
    shard = jax.lax.axis_index("seq")
    g = g.astype(jnp.float32) * scale

    def body(t, carry):  # the key/value block travels with its gradient accumulators
      dq, kb, vb, dkb, dvb = carry
      _, vjp = jax.vjp(lambda q_, k_, v_: block_sums(q_, k_, v_, (shard - t) % n), q, kb, vb)
      dq_t, dk_t, dv_t = vjp(g)
      kb, vb, dkb, dvb = jax.lax.ppermute((kb, vb, dkb + dk_t, dvb + dv_t), "seq",
                                          _ring_perm(n))
      return dq + dq_t, kb, vb, dkb, dvb

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, _, _, dk, dv = jax.lax.fori_loop(0, n, body, (zeros(q), k, v, zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  ring.defvjp(ring_fwd, ring_bwd)
  out = jax.shard_map(lambda q, k, v: ring(q, k, v, local_length_scale(q.shape[1])),
                      mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
  if causal and layout == "natural":
    out = from_zigzag(out, n)
  return out


def _softmax_block(qc, kc, vc, mode, causal):
  """Block statistics of online softmax: (running max, sum of exp, unnormalised output)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", qc, kc, preferred_element_type=jnp.float32)
  s = s / math.sqrt(qc.shape[-1])
  if causal:
    diag = masking.causal_mask(qc.shape[1], kc.shape[1])[None, None]
    visible = jnp.where(mode == 0, True, jnp.where(mode == 1, diag, False))
    s = jnp.where(visible, s, _NEG)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  if causal:
    p = jnp.where(visible, p, 0.0)
  o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
  return m, jnp.sum(p, axis=-1), o


def _softmax_ring(q, k, v, *, mesh, causal, layout):
  n = mesh.shape["seq"]
  spec = qkv_spec(mesh)
  if causal and layout == "natural":
    q, k, v = (to_zigzag(x, n) for x in (q, k, v))

  def local(q, k, v):
    shard = jax.lax.axis_index("seq")
    q_chunks = _chunk_ids(shard, n, causal)
    qs = _split(q, len(q_chunks))

    def body(t, carry):
      stats, kb, vb = carry
      k_chunks = _chunk_ids((shard - t) % n, n, causal)
      ks, vs = _split(kb, len(k_chunks)), _split(vb, len(k_chunks))
      new_stats = []
      for (m, l, o), qc, qi in zip(stats, qs, q_chunks):
        for kc, vc, ki in zip(ks, vs, k_chunks):  # online softmax: rescale and add
          mb, lb, ob = _softmax_block(qc, kc, vc, _pair_mode(qi, ki), causal)
          m_new = jnp.maximum(m, mb)
          a, b = jnp.exp(m - m_new), jnp.exp(mb - m_new)
          l = l * a + lb * b
          o = o * a.transpose(0, 2, 1)[..., None] + ob * b.transpose(0, 2, 1)[..., None]
          m = m_new
        new_stats.append((m, l, o))
      kb, vb = jax.lax.ppermute((kb, vb), "seq", _ring_perm(n))
      return tuple(new_stats), kb, vb

    stats0 = tuple((jnp.full((q.shape[0], q.shape[2], qc.shape[1]), _NEG, jnp.float32),
                    jnp.zeros((q.shape[0], q.shape[2], qc.shape[1]), jnp.float32),
                    jnp.zeros(qc.shape[:3] + (v.shape[-1],), jnp.float32)) for qc in qs)
    stats, _, _ = jax.lax.fori_loop(0, n, body, (stats0, k, v))
    outs = [o / l.transpose(0, 2, 1)[..., None] for _, l, o in stats]
    return jnp.concatenate(outs, axis=1).astype(q.dtype)

  out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                      check_vma=False)(q, k, v)
  if causal and layout == "natural":
    out = from_zigzag(out, n)
  return out


register("softmax", "gspmd", _softmax_gspmd)
register("softmax", "all_gather", functools.partial(
    _all_gather, lambda q, k, v, mask: softmax_lib.softmax_attention(q, k, v, mask=mask)))
register("softmax", "ring", _softmax_ring)
register("pointwise", "gspmd", _pointwise_gspmd)
register("pointwise", "all_gather", functools.partial(_all_gather, pointwise_lib.pointwise_attention))
register("pointwise", "ring", _pointwise_ring)


# ----------------------------------------------------------------------------- entry point

def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, kind: str,
                                strategy: str, causal: bool = False, layout: str = "natural",
                                mask: jax.Array | None = None, **options) -> jax.Array:
  """Self-attention of `kind` with the sequence split over the mesh's `seq` axis.

  Args:
    q, k, v: global `[batch, length, heads, head_dim]` arrays (sharded or not; the result
      is sharded along length over `seq` and batch over `data`/`fsdp`).
    mesh: a `jax.sharding.Mesh` with a `seq` axis (see `zoo.parallel.make_mesh`).
    kind: a registered attention name (`softmax`, `relu`, `pointwise`, ...).
    strategy: `gspmd`, `all_gather` or `ring` (see the module docstring).
    causal: query i sees keys j <= i.
    layout: `natural`, or `zigzag` when the caller already holds the sequence in the
      load-balanced order (causal ring only).
    **options: the family's core options (e.g. `activation`, `alpha`, `block_size`).

  Returns:
    The same values as the family's single-device core, `[batch, length, heads, head_dim]`.
  """
  family = registry.get(kind)
  core = getattr(family.module, "sequence_parallel_core", None)
  if mask is not None:
    raise ValueError("sequence-parallel attention takes no mask (causal=True is supported); "
                     "pad sequences to the mesh-divisible length and mask the loss instead")
  return run(core, q, k, v, mesh=mesh, strategy=strategy, causal=causal, layout=layout,
             **{**family.defaults, **options})


def run(core: str | None, q, k, v, *, mesh, strategy: str, causal: bool = False,
        layout: str = "natural", **options) -> jax.Array:
  """Dispatches to the registered implementation of `core` (checks shapes first)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if (core, strategy) not in _IMPLEMENTATIONS:
    raise ValueError(f"attention core {core!r} has no sequence-parallel {strategy!r} strategy; "
                     f"available: {sorted(s for c, s in _IMPLEMENTATIONS if c == core) or 'none'}")
  if layout not in ("natural", "zigzag"):
    raise ValueError(f"layout must be natural or zigzag, got {layout!r}")
  if options.get("implementation") is not None:
    raise ValueError(f"implementation={options['implementation']!r} selects a single-device "
                     f"kernel; sequence-parallel strategies run the XLA paths: drop the option "
                     f"or config.sequence_parallel")
  if q.ndim == 4:
    masking.check_qkv(q, k, v)
  if "seq" not in mesh.shape:
    raise ValueError(f"the mesh has no 'seq' axis: {dict(mesh.shape)}")
  n = mesh.shape["seq"]
  length = q.shape[1]
  if k.shape[1] != length:
    raise ValueError(f"sequence-parallel attention is self-attention: q has length {length}, "
                     f"k has {k.shape[1]}")
  parts = 2 * n if (strategy == "ring" and causal) else n
  if length % parts:
    raise ValueError(f"sequence length {length} does not divide into {parts} equal parts "
                     f"(the mesh's seq axis is {n}"
                     f"{'; causal ring attention uses 2 chunks per device' if parts != n else ''})")
  replicas = math.prod(mesh.shape[a] for a in (batch_axes(mesh) or ()))
  if q.shape[0] % replicas:
    raise ValueError(f"batch {q.shape[0]} does not divide by the mesh's batch axes ({replicas})")
  return _IMPLEMENTATIONS[(core, strategy)](q, k, v, mesh=mesh, causal=causal, layout=layout,
                                           **options)
from zoo.parallel import sequence_soft  # noqa: E402,F401  registers SOFT strategies
from zoo.parallel import sequence_aft  # noqa: E402,F401  registers AFT strategies
from zoo.parallel import sequence_adaptive_span  # noqa: E402,F401  registers adaptive-span strategies
