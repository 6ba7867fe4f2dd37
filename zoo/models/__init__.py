"""Backbones: `ViT` and the causal `DecoderLM`, both built on one transformer block, and
the authors' `TransformerSeq` (adaptive span / all-attention LM with segment caches)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from zoo import attention as attention_lib
from zoo.parallel import Sharding
from zoo.models import transformer_seq
from zoo.models.lm import DecoderLM
from zoo.models.transformer_seq import TransformerSeq
from zoo.models.transformer import Encoder, Encoder1DBlock, MlpBlock
from zoo.models.vit import ViT, decode_variant

MODELS = {"vit": ViT, "lm": DecoderLM, "transformer_seq": TransformerSeq}
CAUSAL = {"vit": False, "lm": True, "transformer_seq": True}


def _dtype(name):
  if name is None or not isinstance(name, str):
    return name
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype {name!r}") from None


def attention_name(model_config: Mapping[str, Any]) -> str:
  """The registered attention a model config builds (each model's default when unset)."""
  init = MODELS[model_config.get("name")].__init__
  default = inspect.signature(init).parameters["attention"].default
  return model_config.get("attention") or default


def constructor_defaults(name: str) -> dict[str, Any]:
  """The keyword defaults of model `name`'s constructor that a config may set (plain
  values only: no rngs, sharding or dtypes; none for transformer_seq, whose config keys
  are the authors' argument names)."""
  if name == "transformer_seq":
    return {}
  skip = {"rngs", "sharding", "dtype", "param_dtype", "self"}
  params = inspect.signature(MODELS[name].__init__).parameters.values()
  return {p.name: p.default for p in params
          if p.name not in skip and p.default is not inspect.Parameter.empty}


def attention_runs_cached(model_config: Mapping[str, Any]) -> bool:
  """Whether the model runs its attention's layer over a segment cache (TransformerSeq)."""
  return model_config.get("name") == "transformer_seq"


def validate(model_config: Mapping[str, Any]) -> None:
  """Checks a model config (name, attention and its options) before anything is built."""
  name = model_config.get("name")
  if name not in MODELS:
    raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
  if name == "transformer_seq":  # the registry's layers over a segment cache
    transformer_seq.model_kwargs(model_config)
    for key in ("dtype", "param_dtype"):
      _dtype(model_config.get(key))
    return
  attention_lib.validate(attention_name(model_config),
                         dict(model_config.get("attention_options") or {}),
                         causal=CAUSAL[name])


def create(model_config: Mapping[str, Any], rngs: nnx.Rngs,
           sharding: Sharding | None = None) -> nnx.Module:
  """Builds `ViT`, `DecoderLM` or `TransformerSeq` from a config dict (`name` plus
  constructor arguments; for transformer_seq see `transformer_seq.model_kwargs`), its
  blocks and attention layers laid out by `sharding` (None: one device, unsplit)."""
  validate(model_config)
  if model_config["name"] == "transformer_seq":
    kwargs = transformer_seq.model_kwargs(model_config)
    cls = TransformerSeq
  else:
    kwargs = dict(model_config)
    cls = MODELS[kwargs.pop("name")]
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = _dtype(kwargs[key])
  if "attention_options" in kwargs:
    kwargs["attention_options"] = dict(kwargs["attention_options"] or {})
  try:
    return cls(**kwargs, sharding=sharding, rngs=rngs)
  except TypeError as e:
    raise ValueError(f"bad model config for {cls.__name__}: {e}") from None


__all__ = ["ViT", "DecoderLM", "TransformerSeq", "Encoder", "Encoder1DBlock", "MlpBlock",
           "create", "validate", "decode_variant"]
