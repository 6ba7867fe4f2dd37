"""Meshes, logical sharding rules and sequence-parallel attention."""

from zoo.parallel.mesh import (DEFAULT_RULES, FSDP_RULES, MESH_AXES, active, constrain,
                               logical_to_spec, make_mesh, named_sharding, sharding_context)

STRATEGIES = ("gspmd", "all_gather", "ring")


def __getattr__(name):
  # `sequence` imports the attention families, which import `mesh`: load it lazily.
  if name in ("sequence_parallel_attention", "sequence"):
    from zoo.parallel import sequence  # pylint: disable=import-outside-toplevel
    return sequence if name == "sequence" else sequence.sequence_parallel_attention
  raise AttributeError(name)


__all__ = ["DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "STRATEGIES", "active", "constrain",
           "logical_to_spec", "make_mesh", "named_sharding", "sequence_parallel_attention",
           "sharding_context"]
