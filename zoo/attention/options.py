"""Typed attention options: each family declares one frozen dataclass.

Defaults, types and checks live in one place, the dataclass; the registry, the configs
(`attention=NAME,opt=value`, `--config.model.attention_options.X`), validation messages
and the layers all read it:

    @dataclasses.dataclass(frozen=True)
    class PointwiseOptions(ProjectionOptions):
      activation: str = "relu"
      alpha: float = 1.0
      block_size: int | None = compute_only(None)

      def check(self):
        super().check()
        one_of("activation", self.activation, ACTIVATIONS)

Options marked `compute_only` change how attention is computed, never the parameters, so
a checkpoint restores whatever their values (tiles, kernels, implementations). Options
marked `model_level` are set by the backbone from its own keys (a segment model's
`max_span` and `dropout`), never by a config's attention options.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable, Mapping

import jax


def compute_only(default: Any = None) -> Any:
  """A field that changes only how attention is computed (not the parameters)."""
  return dataclasses.field(default=default, metadata={"compute_only": True})


def model_level(default: Any = None) -> Any:
  """A field the backbone sets from its own config keys (not an attention option there)."""
  return dataclasses.field(default=default, metadata={"model_level": True})


@dataclasses.dataclass(frozen=True)
class Options:
  """The base of every family's options: construction validates (`check`)."""

  def __post_init__(self):
    self.check()

  def check(self) -> None:
    """Raises ValueError naming the bad option; families extend it."""

  @classmethod
  def names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}

  @classmethod
  def compute_only_names(cls) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("compute_only"))

  @classmethod
  def model_level_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("model_level"))

  @classmethod
  def create(cls, family: str, options: Mapping[str, Any] | None = None) -> "Options":
    """`cls(**options)`, with a misspelt or foreign option named and the valid ones listed."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.names()))
    if unknown:
      raise ValueError(f"unknown option(s) {unknown} for attention {family!r}; "
                       f"accepted: {sorted(cls.names())}")
    return cls(**options)

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ----------------------------------------------------------------------------- checks

def positive_int(name: str, value, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                     f"got {value!r}")


def nonnegative_number(name: str, value) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value < 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def boolean(name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}")


def one_of(name: str, value, choices: Iterable) -> None:
  choices = list(choices)
  if value not in choices:
    shown = sorted(choices, key=str) if all(isinstance(c, str) for c in choices) else choices
    raise ValueError(f"{name} {value!r} is not one of {shown}")


# ----------------------------------------------------------------------------- shared

GATE_ACTIVATIONS = {
    "identity": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
    "swish": jax.nn.swish,
}


@dataclasses.dataclass(frozen=True)
class ProjectionOptions(Options):
  """Options of every family built on the shared q/k/v/out projections (`heads.py`).

  qk_layernorm: LayerNorm over head_dim (no bias, eps 1e-6) on projected q and k.
  output_gate: o = (attn(x) * act(x W_g)) W_o; gate_activation picks act.
  use_bias: biases on the q/k/v/out projections.
  """
  qk_layernorm: bool = False
  output_gate: bool = False
  gate_activation: str = "swish"
  use_bias: bool = True

  def check(self) -> None:
    super().check()
    for name in ("qk_layernorm", "output_gate", "use_bias"):
      boolean(name, getattr(self, name))
    one_of("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
