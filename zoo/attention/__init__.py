"""Attention families. Importing this package registers every family with the registry.

Each family lives in its own file: a pure functional core on `[batch, length, heads,
head_dim]` arrays and a thin `nnx.Module` around it. See `registry.py` for how to add one.
"""

from zoo.attention import registry
from zoo.attention import pointwise
from zoo.attention import softmax
from zoo.attention import soft
from zoo.attention import adaptive_span
from zoo.attention import persistent
from zoo.attention import aft
from zoo.attention.pointwise import pointwise_attention
from zoo.attention.registry import get, make, names, validate
from zoo.attention.softmax import softmax_attention

__all__ = ["registry", "pointwise_attention", "softmax_attention", "get", "make", "names",
           "validate"]
