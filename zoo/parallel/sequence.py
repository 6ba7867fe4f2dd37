"""Generic building blocks for attention split along the sequence over the mesh's `seq` axis.

Nothing here knows an attention family: each family's own package builds its strategies
(`gspmd`, `all_gather`, `ring`, `halo`; see `STRATEGIES`) from these pieces and declares
them in its `AttentionCore`, and `zoo.attention.dispatch` picks one.

* Specs: `batch_axes`, `length_spec` (batch over data/fsdp, length over seq).
* `check_split`: the shape checks every strategy shares (divisible lengths and batches).
* Zigzag order for causal rings: with 2n chunks, device i holds chunks i and 2n - 1 - i,
  so every device does equal work (`to_zigzag`, `from_zigzag`, `chunk_ids`, `pair_mode`).
* `ring_loop`: n hops of a `fori_loop`, each passing the travelling blocks one device on
  (`ppermute`); `all_gather_attention`: keys and values gathered, queries local.
* Halos: `halo_exchange` (the neighbours' edge rows) and `preceding_rows` (a window of
  rows before the block, from as many earlier shards as it spans).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo.parallel.mesh import STRATEGIES

AXIS = "seq"


# ----------------------------------------------------------------------------- specs

def batch_axes(mesh) -> tuple[str, ...] | None:
  """The mesh axes the batch is split over (data, fsdp; those of size > 1)."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
  return axes or None


def length_spec(mesh, ndim: int = 4) -> P:
  """`[batch, length, ...]`: batch over data/fsdp, length over seq."""
  return P(batch_axes(mesh), AXIS, *([None] * (ndim - 2)))


def constrain_spec(x: jax.Array, mesh, spec: P) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def check_split(q: jax.Array, k: jax.Array, *, mesh, strategy: str, causal: bool,
                layout: str = "natural") -> None:
  """Raises ValueError unless q, k split evenly over the mesh for `strategy`."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if layout not in ("natural", "zigzag"):
    raise ValueError(f"layout must be natural or zigzag, got {layout!r}")
  if AXIS not in mesh.shape:
    raise ValueError(f"the mesh has no 'seq' axis: {dict(mesh.shape)}")
  n = mesh.shape[AXIS]
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


def causal_block_mask(q_len: int, kv_len: int, q_offset=0, kv_offset=0) -> jax.Array:
  """`[q_len, kv_len]` boolean: True where the key's global position <= the query's."""
  return (kv_offset + jnp.arange(kv_len)[None, :]) <= (q_offset + jnp.arange(q_len)[:, None])


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


def chunk_ids(shard, num_shards: int, causal: bool):
  """Global chunk indices a shard holds: (i, 2n-1-i) in zigzag order, else (i,)."""
  return (shard, 2 * num_shards - 1 - shard) if causal else (shard,)


def pair_mode(q_chunk, k_chunk):
  """0: all keys visible, 1: the causal diagonal block, 2: all keys in the future."""
  return jnp.where(k_chunk < q_chunk, 0, jnp.where(k_chunk == q_chunk, 1, 2))


def split_chunks(x: jax.Array, parts: int) -> list[jax.Array]:
  return jnp.split(x, parts, axis=1) if parts > 1 else [x]


# ----------------------------------------------------------------------------- ring

def ring_perm(num_shards: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % num_shards) for i in range(num_shards)]


def ring_loop(step: Callable, carry, travelling, num_shards: int):
  """Inside `shard_map`: for t in 0..n-1, `carry, travelling = step(src, carry,
  travelling)` with `src = (shard - t) mod n` the shard the travelling blocks came from,
  then the blocks move one device on. A `fori_loop`, compiled once whatever n; after n
  hops every block is home again. Returns (carry, travelling)."""
  shard = jax.lax.axis_index(AXIS)

  def body(t, state):
    carry, travelling = step((shard - t) % num_shards, *state)
    return carry, jax.lax.ppermute(travelling, AXIS, ring_perm(num_shards))

  return jax.lax.fori_loop(0, num_shards, body, (carry, travelling))


def all_gather_attention(core_fn: Callable, q, k, v, *, mesh, causal: bool,
                         **options) -> jax.Array:
  """Keys and values all-gathered, queries local: `core_fn(q, k, v, mask=..., **options)`
  on each shard with the causal mask offset to the shard's global query positions."""
  spec = length_spec(mesh)

  def local(q, k, v):
    shard, local_len = jax.lax.axis_index(AXIS), q.shape[1]
    k_all = jax.lax.all_gather(k, AXIS, axis=1, tiled=True)
    v_all = jax.lax.all_gather(v, AXIS, axis=1, tiled=True)
    mask = None
    if causal:
      mask = causal_block_mask(local_len, k_all.shape[1], q_offset=shard * local_len)[None, None]
    return core_fn(q, k_all, v_all, mask=mask, **options)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)


# ----------------------------------------------------------------------------- halos

def from_neighbour(tree, *, before: bool, num_shards: int):
  """Inside `shard_map`: the previous (`before`) or next shard's copy of `tree` (zeros on
  the first / last shard, which has no such neighbour)."""
  perm = ([(i, i + 1) for i in range(num_shards - 1)] if before
          else [(i + 1, i) for i in range(num_shards - 1)])
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), tree)


def key_sharded_scores(q: jax.Array, k: jax.Array, mesh) -> jax.Array:
  """q.k / sqrt(d) `[b, h, q, k]` in float32 from length-sharded q, k, constrained to be
  sharded along the keys, so the partitioner (gspmd) splits the key contraction."""
  spec = length_spec(mesh)
  q, k = constrain_spec(q, mesh, spec), constrain_spec(k, mesh, spec)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s / math.sqrt(q.shape[-1])
  return constrain_spec(s, mesh, P(batch_axes(mesh), None, None, AXIS))


def halo_exchange(x: jax.Array, before: int, after: int, num_shards: int,
                  axis: int = 1) -> jax.Array:
  """Inside `shard_map`: this shard's block with the previous shard's last `before` rows
  in front and the next shard's first `after` rows behind (zeros beyond the first and
  last shard). Both halos must fit in one block."""
  size = x.shape[axis]
  if before > size or after > size:
    raise ValueError(f"a halo of {max(before, after)} rows does not fit in one shard's "
                     f"block of {size}")
  parts = []
  if before:
    edge = jax.lax.slice_in_dim(x, size - before, size, axis=axis)
    parts.append(from_neighbour(edge, before=True, num_shards=num_shards))
  parts.append(x)
  if after:
    edge = jax.lax.slice_in_dim(x, 0, after, axis=axis)
    parts.append(from_neighbour(edge, before=False, num_shards=num_shards))
  return jnp.concatenate(parts, axis=axis)


def preceding_rows(x: jax.Array, window_len: int, num_shards: int,
                   fill: jax.Array | None = None) -> jax.Array:
  """Inside `shard_map`: the `window_len` rows before this shard's block `[B, c, ...]`.

  Rows from earlier shards arrive by `ppermute` (shard i - t sends to shard i), from as
  many shards back as the window spans; rows before the whole sequence come from `fill`
  (`[B, window_len, ...]`, replicated: e.g. a cache of the previous segment), zeros when
  None.
  """
  n, c, w = num_shards, x.shape[1], window_len
  shard = jax.lax.axis_index(AXIS)
  hops = -(-w // c)  # shards' worth of rows behind the block
  parts = []
  for t in range(hops, 0, -1):  # farthest first
    rows = w - (hops - 1) * c if t == hops else c  # only what the window needs
    if t >= n:  # no shard that far back
      parts.append(jnp.zeros(x.shape[:1] + (rows,) + x.shape[2:], x.dtype))
      continue
    parts.append(jax.lax.ppermute(x[:, c - rows:], AXIS, [(i, i + t) for i in range(n - t)]))
  from_shards = jnp.concatenate(parts, axis=1)  # positions shard*c - w .. shard*c - 1
  if fill is None:
    return from_shards
  # Positions p < 0 come from `fill`: fill[p + w] = padded[shard*c + j].
  padded = jnp.concatenate([fill.astype(x.dtype), jnp.zeros_like(fill, x.dtype)], axis=1)
  start = jnp.minimum(shard * c, w)
  return from_shards + jax.lax.dynamic_slice_in_dim(padded, start, w, axis=1)
