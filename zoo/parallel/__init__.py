"""Meshes, logical sharding rules and sequence-parallel attention."""

import importlib

from zoo.parallel.mesh import (DEFAULT_RULES, FSDP_RULES, MESH_AXES, active, constrain,
                               logical_to_spec, make_mesh, named_sharding, sharding_context)

# Every strategy name a family may implement (each family registers the ones it has):
# gspmd / all_gather / ring for any attention, halo for families whose keys reach only a
# bounded distance back (local windows, spans, convolutions).
STRATEGIES = ("gspmd", "all_gather", "ring", "halo")


def __getattr__(name):
  # `sequence` imports the attention families, which import `mesh`: load it lazily.
  if name in ("sequence_parallel_attention", "sequence"):
    sequence = importlib.import_module("zoo.parallel.sequence")
    return sequence if name == "sequence" else sequence.sequence_parallel_attention
  raise AttributeError(name)


__all__ = ["DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "STRATEGIES", "active", "constrain",
           "logical_to_spec", "make_mesh", "named_sharding", "sequence_parallel_attention",
           "sharding_context"]
