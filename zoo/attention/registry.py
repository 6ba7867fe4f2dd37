"""The one registry of attention families: config name -> layer, typed options, support.

A family registers its layer once, in its own package, with one line per name:

    registry.register("relu", PointwiseAttention, preset={"activation": "relu"})

The layer class carries everything else: its options dataclass (`Layer.Options`, see
`options.py`), its functional core and strategies (`Layer.core`, see `core.py`), and which
forms it has (`Layer.causal_forms`: (False, True) for both). Backbones build layers
with `registry.make(name, width=..., num_heads=..., causal=..., rngs=..., **options)`;
every layer is called as `layer(x, mask=None, grid=None)` on `[batch, length, width]`
inputs and returns `[batch, length, width]`.

`mask` is boolean, broadcastable to `[batch, heads, q_len, kv_len]` (True = attend);
`grid` is the ViT's (rows, cols) patch grid when x holds exactly the patch tokens in
row-major order (for families with 2-D operators, e.g. AFT-conv, SOFT's landmarks), and
None in the LM or when a class token is present.

Segment models (`TransformerSeq`) run a name's `cached_layer` instead: a layer over the
window of positions before each query in cat(cache, block) (`Layer.cached`, see
`zoo.attention.cache_window`). A family whose layer is itself cached (adaptive span)
has it by default; another family attaches one with `set_cached_layer(name, Layer)` (or
`register(..., cached_layer=Layer)`). The name's preset applies to both layers;
`names(cached=True)` lists the names a segment model accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from zoo.attention.options import Options
from zoo.parallel import STRATEGIES


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """A registered name: its layer class and the options preset that name fixes."""
  name: str
  layer: type
  preset: Mapping[str, Any]
  description: str
  cached_layer: type | None = None  # the layer over a segment cache (TransformerSeq)

  @property
  def options_class(self) -> type[Options]:
    return self.layer.Options

  @property
  def supports_causal(self) -> bool:
    return True in self.layer.causal_forms

  @property
  def supports_noncausal(self) -> bool:
    return False in self.layer.causal_forms

  @property
  def cached(self) -> bool:
    """Whether the name runs over a segment cache (it has a `cached_layer`)."""
    return self.cached_layer is not None

  def options_class_for(self, cached: bool = False) -> type[Options]:
    """The options dataclass of the layer (of the cached layer with `cached`)."""
    if not cached:
      return self.options_class
    if self.cached_layer is None:
      raise ValueError(f"attention {self.name!r} does not run over a segment cache; "
                       f"those that do: {', '.join(names(cached=True))}")
    return self.cached_layer.Options

  def option_defaults(self, *, cached: bool = False) -> dict[str, Any]:
    """Every option with its default (the name's preset wins). With `cached`, those of
    the cached layer that a config sets: without the fields the segment model sets from
    its own keys (`Options.model_level_names()`, e.g. max_span)."""
    options_class = self.options_class_for(cached)
    defaults = options_class.defaults()
    for name in (options_class.model_level_names() if cached else ()):
      defaults.pop(name)
    return {**defaults, **self.preset}

  def options(self, given: Mapping[str, Any] | None = None, *,
              cached: bool = False) -> Options:
    """The typed options (of the cached layer with `cached`): preset, then `given` (a
    misspelt name fails, listing the valid; a value that contradicts the name's preset,
    e.g. attention 'relu' with activation 'gelu', fails naming the preset)."""
    given = dict(given or {})
    clash = sorted(k for k, v in self.preset.items() if k in given and given[k] != v)
    if clash:
      raise ValueError(f"attention {self.name!r} fixes {', '.join(f'{k}={self.preset[k]!r}' for k in clash)}; "
                       f"got {', '.join(f'{k}={given[k]!r}' for k in clash)}; choose the attention "
                       f"name that has the value you want (e.g. attention=pointwise sets any "
                       f"activation)")
    return self.options_class_for(cached).create(self.name, {**self.preset, **given})


_FAMILIES: dict[str, Family] = {}


def _check_layer(name: str, layer: type, preset: Mapping[str, Any]) -> None:
  for attr in ("Options", "core", "causal_forms"):
    if not hasattr(layer, attr):
      raise TypeError(f"{layer.__name__} has no {attr!r}: derive it from "
                      f"zoo.attention.base.AttentionLayer")
  unknown = set(preset) - set(layer.Options.names())
  if unknown:
    raise ValueError(f"preset of {name!r} sets unknown option(s) {sorted(unknown)} of "
                     f"{layer.__name__}")


def register(name: str, layer: type, *, preset: Mapping[str, Any] | None = None,
             description: str = "", cached_layer: type | None = None) -> None:
  """Registers a layer class under `name` (or a named preset of its options), with the
  layer it runs as over a segment cache (default: `layer` itself when `layer.cached`)."""
  if name in _FAMILIES:
    raise ValueError(f"attention {name!r} is already registered")
  preset = dict(preset or {})
  _check_layer(name, layer, preset)
  _FAMILIES[name] = Family(name, layer, preset, description)
  if cached_layer is not None or getattr(layer, "cached", False):
    set_cached_layer(name, cached_layer or layer)


def set_cached_layer(name: str, layer: type) -> None:
  """Attaches to the registered `name` the layer it runs as over a segment cache (a
  `cached` layer, causal; the name's preset must be options of it too)."""
  family = get(name)
  if family.cached_layer is not None:
    raise ValueError(f"attention {name!r} already has the cached layer "
                     f"{family.cached_layer.__name__}")
  _check_layer(name, layer, family.preset)
  if not getattr(layer, "cached", False) or True not in layer.causal_forms:
    raise TypeError(f"{layer.__name__} is not a causal layer over a segment cache "
                    f"(set cached = True; see zoo.attention.cache_window)")
  _FAMILIES[name] = dataclasses.replace(family, cached_layer=layer)


def names(*, causal: bool | None = None, cached: bool | None = None) -> list[str]:
  """Registered names; `causal=True/False` keeps those with that form, `cached=True`
  those that run over a segment cache (`TransformerSeq`), `cached=False` the others."""
  def keep(f: Family) -> bool:
    if causal is not None and not (f.supports_causal if causal else f.supports_noncausal):
      return False
    return cached is None or f.cached == cached
  return sorted(n for n, f in _FAMILIES.items() if keep(f))


def get(name: str) -> Family:
  if name not in _FAMILIES:
    raise ValueError(f"unknown attention {name!r}; registered: {', '.join(names())}")
  return _FAMILIES[name]


def strategies(name: str, *, cached: bool = False) -> tuple[str, ...]:
  """The sequence-parallel strategies the named attention has (its cached layer's with
  `cached`), in `STRATEGIES` order."""
  family = get(name)
  layer = family.layer
  if cached:
    family.options_class_for(cached=True)  # a clear error when it has no cached layer
    layer = family.cached_layer
  return tuple(s for s in STRATEGIES if s in layer.core.strategies)


def validate(name: str, options: Mapping[str, Any] | None = None, *,
             causal: bool) -> Options:
  """Checks a config's attention choice before any model is built; returns its options."""
  family = get(name)
  if causal and not family.supports_causal:
    raise ValueError(f"attention {name!r} has no causal form, so it cannot be used in a "
                     f"causal language model; pick one of {names(causal=True)}")
  if not causal and not family.supports_noncausal:
    raise ValueError(f"attention {name!r} is causal-only")
  return family.options(options)


def make(name: str, *, width: int, num_heads: int, causal: bool, rngs, dtype=None,
         param_dtype=None, sharding=None, **options):
  """Builds the named attention layer with the name's preset and `options`."""
  family = get(name)
  validate(name, options, causal=causal)
  kwargs = {} if param_dtype is None else {"param_dtype": param_dtype}
  return family.layer(width, num_heads, causal=causal, dtype=dtype, rngs=rngs,
                      sharding=sharding, **kwargs, **{**family.preset, **options})
