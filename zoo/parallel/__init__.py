"""Meshes, logical sharding rules and generic sequence-parallel building blocks.

A leaf package: it imports nothing from `zoo.attention`. Each attention family builds its
own strategies from `zoo.parallel.sequence`; `zoo.attention.sequence_parallel_attention`
runs them.
"""

from zoo.parallel import sequence
from zoo.parallel.mesh import (DEFAULT_RULES, FSDP_RULES, MESH_AXES, STRATEGIES, Sharding,
                               constrain, logical_to_spec, make_mesh, named_sharding)

__all__ = ["DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "STRATEGIES", "Sharding", "constrain",
           "logical_to_spec", "make_mesh", "named_sharding", "sequence"]
