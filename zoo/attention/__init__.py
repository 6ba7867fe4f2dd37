"""Attention families. Importing this package registers every family with the registry.

Each family lives in its own package under `zoo/attention/`: a pure functional core on
`[batch, length, heads, head_dim]` arrays, its sequence-parallel strategies, and a thin
layer (`base.AttentionLayer`) with a typed options dataclass, registered by name in
`registry.py`. See README, "Architecture", for how to add one.
"""

from zoo.attention import registry
from zoo.attention import softmax
from zoo.attention import pointwise
from zoo.attention import cache_window
from zoo.attention import adaptive_span
from zoo.attention import persistent
from zoo.attention import aft
from zoo.attention import soft
from zoo.attention.base import AttentionLayer, use_sharding
from zoo.attention.core import AttentionCore, dispatch, sequence_parallel_attention
from zoo.attention.heads import MultiHeadAttention
from zoo.attention.options import Options, ProjectionOptions, compute_only
from zoo.attention.pointwise import pointwise_attention
from zoo.attention.registry import get, make, names, strategies, validate
from zoo.attention.softmax import softmax_attention

__all__ = ["AttentionCore", "AttentionLayer", "MultiHeadAttention", "Options",
           "ProjectionOptions", "compute_only", "dispatch", "get", "make", "names",
           "pointwise_attention", "registry", "sequence_parallel_attention",
           "softmax_attention", "strategies", "use_sharding", "validate"]
