"""Device mesh, logical axis rules and the `Sharding` a model is built with.

In MaxText's manner, arrays are annotated with logical axis names (`batch`, `seq`,
`embed`, `heads`, `mlp`, `kv`, `vocab`) and a rules table maps each name to mesh axes:

    mesh axes:  data (batch replicas), fsdp (batch + parameter shards), seq (sequence)

A `Sharding(mesh, rules, strategy)` is passed explicitly to the models (and from them to
every block and attention layer) when they are built: activations are then constrained
to their logical shardings, and with a `strategy` every attention layer runs split along
the sequence (`zoo.attention.dispatch`). Nothing here is ambient: the same layer
computes the same way wherever it is traced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "seq")

# Every strategy name a family may implement (each family declares the ones it has):
# gspmd / all_gather / ring for any attention, halo for families whose keys reach only a
# bounded distance (local windows, spans, convolutions).
STRATEGIES = ("gspmd", "all_gather", "ring", "halo")

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
class Sharding:
  """How a model's activations are laid out: a mesh, its logical rules, and the
  sequence-parallel attention strategy (None: every attention layer runs unsplit)."""
  mesh: Mesh
  rules: tuple = DEFAULT_RULES
  strategy: str | None = None

  def __post_init__(self):
    if self.strategy is not None and self.strategy not in STRATEGIES:
      raise ValueError(f"sequence-parallel strategy must be one of {STRATEGIES} (or None), "
                       f"got {self.strategy!r}")
    object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))


def constrain(x: jax.Array, names: Sequence[str | None],
              sharding: Sharding | None) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when `sharding` is None."""
  if sharding is None:
    return x
  spec = logical_to_spec(names, sharding.rules, sharding.mesh)
  for dim, (name, axes) in enumerate(zip(names, spec)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    parts = math.prod(sharding.mesh.shape[a] for a in axes)
    if x.shape[dim] % parts:
      hint = ("; a ViT's token count includes the class token (pool_type 'tok'): use "
              "pool_type gap or map, or a patch grid that divides" if name == "seq" else "")
      raise ValueError(f"cannot shard the {name!r} dimension of size {x.shape[dim]} over "
                       f"mesh axes {axes} of total size {parts} (shape {x.shape}){hint}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh))
