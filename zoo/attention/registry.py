"""Registry of attention families: config name -> module class.

A family registers its `nnx.Module` class once, in its own file:

    registry.register("relu", PointwiseAttention, supports_causal=True, defaults=...)

and the backbones build it with `registry.make(name, width=..., num_heads=..., causal=...,
rngs=..., **options)`. Every module class takes `(width, num_heads, *, causal, rngs,
dtype, param_dtype, **family_options)` and is called as `module(x, mask=...)` on
`[batch, length, width]` inputs, returning `[batch, length, width]`:

    module(x, *, mask=None, grid=None)

`mask` is boolean, broadcastable to `[batch, heads, q_len, kv_len]` (True = attend);
`grid` is the ViT's (rows, cols) patch grid when x holds exactly the patch tokens in
row-major order (for families with 2-D operators, e.g. AFT-conv, SOFT's landmarks), and
None in the LM or when a class token is present.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
  name: str
  module: Callable[..., Any]
  supports_causal: bool
  supports_noncausal: bool
  defaults: Mapping[str, Any]
  description: str


_FAMILIES: dict[str, AttentionFamily] = {}


def register(name: str, module: Callable[..., Any], *, supports_causal: bool = True,
             supports_noncausal: bool = True, defaults: Mapping[str, Any] | None = None,
             description: str = "") -> None:
  """Registers an attention family (or a named preset of one, via `defaults`)."""
  if name in _FAMILIES:
    raise ValueError(f"attention {name!r} is already registered")
  _FAMILIES[name] = AttentionFamily(name, module, supports_causal, supports_noncausal,
                                    dict(defaults or {}), description)


def names() -> list[str]:
  return sorted(_FAMILIES)


def get(name: str) -> AttentionFamily:
  if name not in _FAMILIES:
    raise ValueError(f"unknown attention {name!r}; registered: {', '.join(names())}")
  return _FAMILIES[name]


def _accepted_options(module) -> set[str] | None:
  """Keyword names the module class accepts (None: accepts anything via **kwargs)."""
  accepted = set()
  for cls in inspect.getmro(module):
    if "__init__" not in vars(cls):
      continue
    params = inspect.signature(vars(cls)["__init__"]).parameters.values()
    accepted |= {p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
      return accepted - {"self"}
  return accepted - {"self"}


def validate(name: str, options: Mapping[str, Any], *, causal: bool) -> AttentionFamily:
  """Checks a config's attention choice before any model is built."""
  family = get(name)
  if causal and not family.supports_causal:
    raise ValueError(f"attention {name!r} has no causal form, so it cannot be used in a "
                     f"causal language model; pick one of "
                     f"{[n for n in names() if _FAMILIES[n].supports_causal]}")
  if not causal and not family.supports_noncausal:
    raise ValueError(f"attention {name!r} is causal-only")
  accepted = _accepted_options(family.module)
  reserved = {"width", "num_heads", "causal", "rngs", "dtype", "param_dtype"}
  unknown = set(options) - (accepted - reserved)
  if unknown:
    raise ValueError(f"unknown option(s) {sorted(unknown)} for attention {name!r}; "
                     f"accepted: {sorted(accepted - reserved)}")
  return family


def make(name: str, *, width: int, num_heads: int, causal: bool, rngs,
         dtype=None, param_dtype=None, **options):
  """Builds the named attention module; options override the family's defaults."""
  family = validate(name, options, causal=causal)
  kwargs = {**family.defaults, **options}
  if param_dtype is not None:
    kwargs["param_dtype"] = param_dtype
  return family.module(width, num_heads, causal=causal, dtype=dtype, rngs=rngs, **kwargs)
