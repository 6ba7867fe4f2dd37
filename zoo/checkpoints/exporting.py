"""A zoo ViT written in big_vision's or timm's format, and the zoo model config that a
checkpoint file describes.

* `export(model, path, format="big_vision")`: an `.npz` whose names are big_vision's
  (`big_vision.models.vit.load` reads it), written atomically. Any attention family exports, but only a softmax ViT computes in
  big_vision what it computed here.
* `export(model, path, format="timm")`: a `.safetensors` state dict for timm's
  `VisionTransformer`, with the `timm.create_model` keyword arguments it needs in the
  file's metadata (`timm_kwargs`, JSON); softmax attention only.
* `describe(source)`: the zoo model config (`zoo.models.create` accepts it) that a
  checkpoint holds, from its shapes and, where the publisher wrote one, its config.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx

from zoo.checkpoints import files, loading, torch_pickle
from zoo.checkpoints import vit as vit_lib
from zoo.checkpoints.files import CheckpointError
from zoo.models.vit import ViT, decode_variant, posemb_sincos_2d

FORMATS = ("big_vision", "timm")
# timm's ViT heads per width, as the variants (Ti 192: 3, S 384: 6, B 768: 12, L 1024: 16,
# H 1280: 16, ...), for timm files whose metadata does not say.
_HEADS_BY_WIDTH = {decode_variant(v)["width"]: decode_variant(v)["num_heads"]
                   for v in ("Ti", "S", "M", "B", "L", "So400m", "H", "g", "G", "e")}


def _attention_name(model: ViT) -> str:
  layer = model.Transformer.encoderblock_0.MultiHeadDotProductAttention_0
  return getattr(layer, "family", type(layer).__name__)


def export(model: nnx.Module, path: str | os.PathLike, *, format: str = "big_vision"
           ) -> str:  # pylint: disable=redefined-builtin
  """Writes `model`'s parameters to `path` in `format` and returns the file's sha256."""
  if format not in FORMATS:
    raise CheckpointError(f"export format must be one of {FORMATS}, got {format!r}")
  if not isinstance(model, ViT):
    raise CheckpointError(f"export writes ViTs; got a {type(model).__name__} (its workdir "
                          f"checkpoint loads with zoo.checkpoints.load)")
  flat = {name: np.asarray(loading._value(value))  # pylint: disable=protected-access
          for name, value in loading.model_parameters(model).items()}
  if format == "big_vision":
    files.write_npz(path, flat)
  else:
    _check_timm_exportable(model)
    if model.posemb == "sincos2d":  # fixed here; timm holds it as a (learned) table
      flat["pos_embedding"] = np.asarray(posemb_sincos_2d(*model.grid, model.width))
    activation = model.Transformer.encoderblock_0.MlpBlock_0.activation
    state, kwargs = vit_lib.to_timm(flat, image_size=model.image_size)
    kwargs["act_layer"] = "gelu" if activation == "gelu" else "gelu_tanh"
    files.write_safetensors(path, state, metadata={
        "format": "pt", "exported_by": "attention-zoo", "timm_kwargs": json.dumps(kwargs)})
  return files.sha256(path)


def _check_timm_exportable(model: ViT) -> None:
  """Refuses what timm's VisionTransformer cannot compute the same way."""
  family = _attention_name(model)
  if family != "softmax":
    raise CheckpointError(f"timm has no {family!r} attention: only a softmax ViT exports "
                          f"to timm (use format='big_vision' for the zoo's own use)")
  if model.pool_type not in ("tok", "gap", "map"):
    raise CheckpointError(f"timm has no pool_type={model.pool_type!r} (first token without "
                          f"a class token); export as big_vision")
  epsilon = model.Transformer.encoderblock_0.LayerNorm_0.epsilon
  if epsilon != 1e-6:
    raise CheckpointError(f"timm's VisionTransformer uses LayerNorm epsilon 1e-6, the model "
                          f"{epsilon:g}; export as big_vision")
  if model.rep_size:
    raise CheckpointError("timm's VisionTransformer has no representation (pre_logits) "
                          "layer; export this model as big_vision")


def _vit_config_from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  query = flat.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  if query is None or "embedding/kernel" not in flat:
    raise CheckpointError("not a ViT checkpoint: no embedding/kernel or encoder block 0 "
                          "query kernel")
  width, heads, _ = query.shape
  depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
  patch, _, channels, _ = flat["embedding/kernel"].shape
  config: dict[str, Any] = dict(
      name="vit", variant=None, width=int(width), depth=depth, num_heads=int(heads),
      mlp_dim=int(flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
      patch_size=int(patch), in_channels=int(channels),
      num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else 0,
      pool_type="map" if "MAPHead_0/probe" in flat else "tok" if "cls" in flat else "gap",
      head_zeroinit=False)
  if "pos_embedding" in flat:
    side = int(round(np.sqrt(flat["pos_embedding"].shape[1])))
    config.update(posemb="learn", image_size=side * int(patch))
  else:
    config["posemb"] = "sincos2d"  # or "none": the file cannot tell; image size unknown
  if "pre_logits/kernel" in flat:
    config["rep_size"] = int(flat["pre_logits/kernel"].shape[1])
  return config


def describe(source, *, allow_unpinned: bool = False) -> dict[str, Any]:
  """The zoo model config of `source` (any `zoo.checkpoints.load` source).

  A registry entry and a zoo workdir carry theirs; for files it is read off the shapes
  (ViTs), Hugging Face's config.json, and timm's metadata (`num_heads`; without it,
  timm's 64-wide heads are assumed). The MLP activation and LayerNorm epsilon are the
  publisher's (exact GELU for timm and Hugging Face, epsilon 1e-12 for the latter).
  """
  src = source if isinstance(source, loading.Source) else loading.read(
      source, allow_unpinned=allow_unpinned)
  if src.zoo_model is not None:
    return dict(src.zoo_model)
  if src.format == "adaptive_span":
    raise CheckpointError("an adaptive-span checkpoint's model arguments are not in the "
                          "file: use its registry entry or the authors' command line")
  if src.format in ("big_vision", "zoo"):
    flat, _ = vit_lib.from_big_vision(src.flat)
    return {**_vit_config_from_big_vision(flat), "mlp_activation": "gelu_tanh",
            "layernorm_epsilon": 1e-6}
  if src.format == "hf_vit":
    c = src.config
    if not c:
      raise CheckpointError(f"no config.json beside {src.path}: the Hugging Face checkpoint's "
                            f"heads and LayerNorm epsilon are unknown")
    heads = int(c["num_attention_heads"])
    flat, _ = vit_lib.from_hf_vit(src.flat, num_heads=heads)
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh"}.get(c.get("hidden_act", "gelu"))
    if act is None:
      raise CheckpointError(f"hidden_act {c.get('hidden_act')!r} has no zoo counterpart")
    return {**_vit_config_from_big_vision(flat), "mlp_activation": act,
            "layernorm_epsilon": float(c.get("layer_norm_eps", 1e-12))}
  kwargs = json.loads(src.config.get("kwargs") or src.config.get("timm_kwargs") or "{}")
  state = torch_pickle.unwrap_state_dict(src.flat)
  if "patch_embed.proj.weight" not in state:
    raise CheckpointError(f"{src.path} is not a timm ViT: no patch_embed.proj.weight")
  width = int(state["patch_embed.proj.weight"].shape[0])
  heads = kwargs.get("num_heads") or _HEADS_BY_WIDTH.get(width)
  if not heads:
    raise CheckpointError(f"the number of heads of {src.path} is not in its metadata and no "
                          f"ViT variant has width {width}: build the model yourself and "
                          f"load into it")
  flat, _ = vit_lib.from_timm(state, num_heads=int(heads))
  act = kwargs.get("act_layer", "gelu")
  return {**_vit_config_from_big_vision(flat),
          "mlp_activation": "gelu_tanh" if act == "gelu_tanh" else "gelu",
          "layernorm_epsilon": 1e-6}
