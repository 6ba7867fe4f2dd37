"""Device mesh, logical axis rules and the active sequence-parallel context.

In MaxText's manner, arrays are annotated with logical axis names (`batch`, `seq`,
`embed`, `heads`, `mlp`, `kv`, `vocab`) and a rules table maps each name to mesh axes:

    mesh axes:  data (batch replicas), fsdp (batch + parameter shards), seq (sequence)

`sharding_context(mesh, rules, strategy)` makes a mesh active while a step is traced:
activations are then constrained to their logical shardings and every attention layer
runs `zoo.parallel.sequence_parallel_attention` with the named strategy.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "seq")

# Logical name -> mesh axes. Parameters use `embed` (sharded over fsdp when fsdp > 1);
# activations use `batch` and `seq`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("embed", None),
    ("heads", None),
    ("kv", None),
    ("mlp", None),
    ("vocab", None),
)
FSDP_RULES = (("embed", "fsdp"),)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, seq); a size of -1 takes the remaining devices.

  `make_mesh({"data": 2, "seq": 4})` on 8 devices; `make_mesh()` is data-parallel only.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {a: 1 for a in MESH_AXES} | dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  free = [a for a in MESH_AXES if shape[a] == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  known = math.prod(shape[a] for a in MESH_AXES if shape[a] != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {shape}")
    shape[free[0]] = len(devices) // known
  sizes = tuple(int(shape[a]) for a in MESH_AXES)
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"there are {len(devices)}")
  # Processes own contiguous device blocks, so each process holds whole data rows.
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES, mesh: Mesh | None = None) -> P:
  """('batch', 'seq', 'embed') -> PartitionSpec(('data', 'fsdp'), 'seq', None).

  Mesh axes of size 1 are dropped so specs stay readable and valid on any mesh.
  """
  table = dict(rules)
  used = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  mesh: Mesh
  rules: tuple
  strategy: str | None  # sequence-parallel attention strategy, None: attention unsplit


_ACTIVE: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "zoo_sharding_context", default=None)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES, strategy: str | None = None):
  """Makes `mesh` active for model code traced inside (see module docstring)."""
  token = _ACTIVE.set(ShardingContext(mesh, tuple(rules), strategy))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> ShardingContext | None:
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the active mesh; else a no-op."""
  ctx = active()
  if ctx is None:
    return x
  spec = logical_to_spec(names, ctx.rules, ctx.mesh)
  for dim, (name, axes) in enumerate(zip(names, spec)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    parts = math.prod(ctx.mesh.shape[a] for a in axes)
    if x.shape[dim] % parts:
      hint = ("; a ViT's token count includes the class token (pool_type 'tok'): use "
              "pool_type gap or map, or a patch grid that divides" if name == "seq" else "")
      raise ValueError(f"cannot shard the {name!r} dimension of size {x.shape[dim]} over "
                       f"mesh axes {axes} of total size {parts} (shape {x.shape}){hint}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh))
