"""Public ViT checkpoints in the zoo's (big_vision's) parameter names, and back.

Every reader here takes a flat `{name: array}` dict as its publisher wrote it and returns
one keyed by big_vision's modern names (`embedding/kernel`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query/kernel`, ...), which
are the zoo ViT's own state paths, together with the notes of what it changed:

* `from_big_vision`: `params/` or `opt/target/` prefixes, the pre-Linen numbering of the
  original ViT/AugReg releases (`MultiHeadDotProductAttention_1`, `LayerNorm_2`,
  `MlpBlock_3`), their position table inside `Transformer/` or `posembed_input/` with the
  class token's row first (folded into `cls`, exactly as big_vision's
  `fix_old_checkpoints`), an inlined MAP probe, and scan-stacked `encoderblock` arrays.
* `from_timm`: timm/DeiT state dicts: the fused `qkv` split into heads, the class token's
  position row folded into `cls` (exact: timm adds it to the class token only), DeiT-3's
  layer scale folded into the output projections, `attn_pool` as `MAPHead_0`.
* `from_hf_vit`: Hugging Face `ViTForImageClassification` as `save_pretrained` writes it
  (and the renamed layout of transformers 5's in-memory modules).

`to_timm` is the inverse of `from_timm` (export). `resample_posemb` is big_vision's
high-resolution fine-tuning resize (`scipy.ndimage.zoom`, order 1), generalised to
non-square grids.
"""

from __future__ import annotations

import collections
import re
from typing import Mapping

import numpy as np
import scipy.ndimage

from zoo.checkpoints import torch_pickle
from zoo.checkpoints.files import CheckpointError

Flat = dict[str, np.ndarray]
RESERVED = re.compile(r"^__.*__$")  # the fixtures' and exports' non-parameter entries


def without_reserved(flat: Mapping[str, np.ndarray]) -> Flat:
  """The entries whose names are not `__like_this__`."""
  return {k: v for k, v in flat.items() if not RESERVED.match(k)}


def subtree(flat: Mapping[str, np.ndarray], key: str) -> Flat:
  """The entries under `key/` with that prefix removed (SigLIP's `:img`, say)."""
  prefix = key.strip("/") + "/"
  out = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if not out:
    tops = sorted({k.split("/")[0] for k in flat})
    raise CheckpointError(f"the checkpoint has nothing under {key!r}; its top-level names "
                          f"are {tops}")
  return out


# ----------------------------------------------------------------------------- big_vision

def _renumber_pre_linen(flat: Flat) -> Flat:
  """Pre-Linen flax numbered submodules across types (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`); Linen numbers each
  type from 0. Within every parent numbered that way (its children's numbers are
  0..n-1 across two or more types), each type's indices are renumbered in order (as
  `flax.training.checkpoints.convert_pre_linen`); other names are left alone."""
  children: dict[str, set[str]] = collections.defaultdict(set)
  for name in flat:
    parts = name.split("/")
    for depth in range(len(parts) - 1):
      children["/".join(parts[:depth])].add(parts[depth])
  rename: dict[tuple[str, str], str] = {}
  for parent, names in children.items():
    by_type: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for child in names:
      m = re.fullmatch(r"(.+)_(\d+)", child)
      if m and m.group(1) != "encoderblock":
        by_type[m.group(1)].append((int(m.group(2)), child))
    indices = sorted(i for numbered in by_type.values() for i, _ in numbered)
    if indices != list(range(len(indices))) or len(by_type) < 2:
      continue  # pre-Linen numbers a parent's children 0..n-1 across types; this is not it
    for kind, numbered in by_type.items():
      for new, (_, old) in enumerate(sorted(numbered)):
        rename[(parent, old)] = f"{kind}_{new}"
  out = {}
  for name, value in flat.items():
    parts = name.split("/")
    new_parts = [rename.get(("/".join(parts[:d]), p), p) if d < len(parts) - 1 else p
                 for d, p in enumerate(parts)]
    out["/".join(new_parts)] = value
  return out


def _unstack_scan(flat: Flat, notes: list[str]) -> Flat:
  """`Transformer/encoderblock/...` arrays stacked over depth (big_vision's scan=True)
  -> `Transformer/encoderblock_{i}/...`."""
  stacked = {k: v for k, v in flat.items() if k.startswith("Transformer/encoderblock/")}
  if not stacked:
    return flat
  depths = {v.shape[0] for v in stacked.values()}
  if len(depths) != 1:
    raise CheckpointError(f"scan-stacked encoder blocks of different depths {sorted(depths)}")
  depth = depths.pop()
  out = {k: v for k, v in flat.items() if k not in stacked}
  for name, value in stacked.items():
    rest = name[len("Transformer/encoderblock/"):]
    for i in range(depth):
      out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
  notes.append(f"unstacked {depth} scan-stacked encoder blocks")
  return out


def from_big_vision(flat: Mapping[str, np.ndarray], *, grid_rows: int | None = None
                    ) -> tuple[Flat, list[str]]:
  """A big_vision npz (modern, legacy ViT/AugReg, or a training checkpoint with
  `params/` or `opt/target/`) in modern names; see the module docstring. `grid_rows`:
  the target model's patch count, which tells a class-token row (`grid_rows + 1` rows)
  from a table of the same grid; without it, or for a table of another grid, big_vision's
  rule applies (a class row when the rows minus one make a square)."""
  flat = without_reserved(flat)
  notes: list[str] = []
  for prefix in ("params/", "opt/target/"):
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      notes.append(f"took the parameters under {prefix!r}")
      break
  renamed = _renumber_pre_linen(flat)
  if renamed.keys() != flat.keys():
    notes.append("renumbered pre-Linen module names (MultiHeadDotProductAttention_1 -> _0, "
                 "LayerNorm_2 -> LayerNorm_1, MlpBlock_3 -> MlpBlock_0)")
  flat = _unstack_scan(renamed, notes)
  for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if old in flat and "pos_embedding" not in flat:
      flat["pos_embedding"] = flat.pop(old)
      notes.append(f"moved {old} to pos_embedding")
  if "pos_embedding" in flat:
    flat["pos_embedding"] = _fold_class_row(flat, flat["pos_embedding"], notes,
                                            grid_rows=grid_rows)
  if "probe" in flat:  # MAP head inlined (ViT-G development checkpoints)
    for name in list(flat):
      if name.split("/")[0] in ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0",
                                "LayerNorm_0"):
        flat[f"MAPHead_0/{name}"] = flat.pop(name)
    notes.append("moved the inlined MAP head under MAPHead_0")
  return flat, notes


def _class_rows(rows: int, grid_rows: int | None, prefix: int) -> int:
  """How many leading rows of a `rows`-row position table belong to `prefix` tokens
  (class, distillation): 0 when the table is exactly the model's grid, `prefix` when it
  is the grid plus them; for another grid (to be resampled), `prefix` when the rest is a
  square and the whole is not (big_vision's rule, which can only guess)."""
  if grid_rows is not None:
    if rows == grid_rows:
      return 0
    if rows == grid_rows + prefix:
      return prefix
  rest = rows - prefix
  if prefix and rest > 0 and _is_square(rest) and not _is_square(rows):
    return prefix
  return 0


def _is_square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _fold_class_row(flat: Flat, pos: np.ndarray, notes: list[str], *,
                    grid_rows: int | None = None, prefix_tokens: int = 1) -> np.ndarray:
  """A position table with the class token's row first (`1 + grid` rows) -> the grid's
  rows, that first row added to `cls` in float32 (the class token gets no position
  embedding in big_vision's layout: the same function). `prefix_tokens` 2: a distilled
  DeiT's table (class, distillation, grid)."""
  prefix_rows = _class_rows(pos.shape[1], grid_rows, prefix_tokens)
  if prefix_rows == 0:
    return pos
  if "cls" in flat:
    total = flat["cls"].astype(np.float32) + pos[:, :1].astype(np.float32)
    flat["cls"] = total.astype(flat["cls"].dtype)
    notes.append("folded the class token's position row into cls")
  else:
    notes.append("dropped the class token's position row (no class token)")
  if prefix_rows == 2:
    flat["dist_pos_embedding"] = pos[:, 1:2]
    notes.append("set the distillation token's position row aside (dist_pos_embedding)")
  return pos[:, prefix_rows:]


# ----------------------------------------------------------------------------- timm / DeiT

_TIMM_BLOCK = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    "attn.proj.weight": "MultiHeadDotProductAttention_0/out/kernel",
    "attn.proj.bias": "MultiHeadDotProductAttention_0/out/bias",
}
_TIMM_TOP = {
    "patch_embed.proj.bias": "embedding/bias", "norm.weight": "Transformer/encoder_norm/scale",
    "norm.bias": "Transformer/encoder_norm/bias", "head.weight": "head/kernel",
    "head.bias": "head/bias", "pre_logits.fc.weight": "pre_logits/kernel",
    "pre_logits.fc.bias": "pre_logits/bias", "head_dist.weight": "head_dist/kernel",
    "head_dist.bias": "head_dist/bias", "dist_token": "dist_token",
    "attn_pool.latent": "MAPHead_0/probe",
    "attn_pool.norm.weight": "MAPHead_0/LayerNorm_0/scale",
    "attn_pool.norm.bias": "MAPHead_0/LayerNorm_0/bias",
    "attn_pool.mlp.fc1.weight": "MAPHead_0/MlpBlock_0/Dense_0/kernel",
    "attn_pool.mlp.fc1.bias": "MAPHead_0/MlpBlock_0/Dense_0/bias",
    "attn_pool.mlp.fc2.weight": "MAPHead_0/MlpBlock_0/Dense_1/kernel",
    "attn_pool.mlp.fc2.bias": "MAPHead_0/MlpBlock_0/Dense_1/bias",
    "attn_pool.proj.weight": "MAPHead_0/MultiHeadDotProductAttention_0/out/kernel",
    "attn_pool.proj.bias": "MAPHead_0/MultiHeadDotProductAttention_0/out/bias",
}
def _dense(weight: np.ndarray) -> np.ndarray:
  """torch Linear `[out, in]` -> flax kernel `[in, out]`."""
  return np.ascontiguousarray(weight.T)


def from_timm(state: Mapping[str, np.ndarray], *, num_heads: int,
              grid_rows: int | None = None) -> tuple[Flat, list[str]]:
  """A timm / DeiT `VisionTransformer` state dict in big_vision names.

  `num_heads` splits the fused `qkv` (rows ordered q|k|v, head, head_dim) and the
  projections into `[width, heads, head_dim]`; `grid_rows` (the model's patch count) tells
  a table with class-token rows from one without (timm's `no_embed_class`, DeiT-3). Refuses what has no big_vision
  counterpart (norm after pooling `fc_norm`, register tokens) with a clear message.
  """
  state = torch_pickle.unwrap_state_dict(state)
  notes: list[str] = []
  flat: Flat = {}
  for name in state:
    if name.startswith(("fc_norm.", "reg_token", "norm_pre.")):
      raise CheckpointError(
          f"timm checkpoint has {name!r}, which the zoo ViT does not model (fc_norm: "
          f"LayerNorm after pooling; reg_token: register tokens; norm_pre: pre-norm)")
  width = state["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in state \
      else None
  if width is not None and width % num_heads:
    raise CheckpointError(f"width {width} is not divisible by num_heads {num_heads}")
  head_dim = width // num_heads if width else None
  blocks = sorted({int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in state)
                   if m})
  used = set()

  def take(key):
    used.add(key)
    return state[key]

  if "patch_embed.proj.weight" in state:
    flat["embedding/kernel"] = np.transpose(take("patch_embed.proj.weight"), (2, 3, 1, 0))
  for key, target in _TIMM_TOP.items():
    if key in state:
      value = take(key)
      flat[target] = _dense(value) if key.endswith("weight") and value.ndim == 2 else value
  if "cls_token" in state:
    flat["cls"] = take("cls_token")
  folded_scale = False
  for i in blocks:
    src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    for key, target in _TIMM_BLOCK.items():
      if src + key in state:
        value = take(src + key)
        flat[dst + target] = _dense(value) if value.ndim == 2 else value
    attn = dst + "MultiHeadDotProductAttention_0/"
    if src + "attn.qkv.weight" in state:
      qkv = take(src + "attn.qkv.weight").reshape(3, num_heads, head_dim, width)
      for j, part in enumerate(("query", "key", "value")):
        flat[f"{attn}{part}/kernel"] = np.ascontiguousarray(np.transpose(qkv[j], (2, 0, 1)))
      if src + "attn.qkv.bias" in state:
        bias = take(src + "attn.qkv.bias").reshape(3, num_heads, head_dim)
        for j, part in enumerate(("query", "key", "value")):
          flat[f"{attn}{part}/bias"] = bias[j]
    if f"{attn}out/kernel" in flat:
      flat[f"{attn}out/kernel"] = flat[f"{attn}out/kernel"].reshape(num_heads, head_dim, width)
    for gamma_key, kernel, bias in (
        ("ls1.gamma", f"{attn}out/kernel", f"{attn}out/bias"),
        ("ls2.gamma", f"{dst}MlpBlock_0/Dense_1/kernel", f"{dst}MlpBlock_0/Dense_1/bias")):
      if src + gamma_key in state:  # y = gamma * (x W + b): fold into W and b (exact)
        gamma = take(src + gamma_key).astype(np.float32)
        flat[kernel] = (flat[kernel].astype(np.float32) * gamma).astype(flat[kernel].dtype)
        flat[bias] = (flat[bias].astype(np.float32) * gamma).astype(flat[bias].dtype)
        folded_scale = True
  if "attn_pool.q.weight" in state:
    attn = "MAPHead_0/MultiHeadDotProductAttention_0/"
    q = take("attn_pool.q.weight").reshape(num_heads, head_dim, width)
    flat[f"{attn}query/kernel"] = np.ascontiguousarray(np.transpose(q, (2, 0, 1)))
    if "attn_pool.q.bias" not in state or "attn_pool.kv.bias" not in state:
      raise CheckpointError("timm attn_pool without q/kv biases (qkv_bias=False) has no "
                            "big_vision counterpart")
    flat[f"{attn}query/bias"] = take("attn_pool.q.bias").reshape(num_heads, head_dim)
    kv = take("attn_pool.kv.weight").reshape(2, num_heads, head_dim, width)
    kv_bias = take("attn_pool.kv.bias").reshape(2, num_heads, head_dim)
    for j, part in enumerate(("key", "value")):
      flat[f"{attn}{part}/kernel"] = np.ascontiguousarray(np.transpose(kv[j], (2, 0, 1)))
      flat[f"{attn}{part}/bias"] = kv_bias[j]
    flat[f"{attn}out/kernel"] = flat[f"{attn}out/kernel"].reshape(num_heads, head_dim, width)
    if flat["MAPHead_0/probe"].shape[1] != 1:
      raise CheckpointError("timm attn_pool with more than one latent has no big_vision "
                            "counterpart")
  if folded_scale:
    notes.append("folded DeiT-3 layer scale (ls1, ls2) into the output projections")
  if any(s.endswith("attn.qkv.weight") for s in used):
    notes.append("split the fused qkv projections")
  if "pos_embed" in state:
    prefix = 2 if "dist_token" in state else (1 if "cls_token" in state else 0)
    flat["pos_embedding"] = _fold_class_row(flat, take("pos_embed"), notes,
                                            grid_rows=grid_rows, prefix_tokens=prefix)
  unknown = sorted(set(state) - used)
  for name in unknown:  # kept (and reported as unused) under their own names
    flat[name] = state[name]
  return flat, notes


def to_timm(flat: Mapping[str, np.ndarray], *, image_size: tuple[int, int]
            ) -> tuple[Flat, dict[str, object]]:
  """The inverse of `from_timm`: big_vision names -> a timm `VisionTransformer` state
  dict, and the `timm.create_model` keyword arguments it needs (class token, average or
  MAP pooling without `fc_norm`, the class token's position row set to zero so that
  timm's `cls_token + pos_embed[0]` equals big_vision's `cls`). A model without a learned
  table passes its fixed one as `pos_embedding` (timm then holds it as a learned one)."""
  flat = dict(flat)
  kernel = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  width, num_heads, head_dim = kernel.shape
  depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
  state: Flat = {}
  inverse = {v: k for k, v in {**_TIMM_TOP}.items()}
  for name, value in flat.items():
    if name in inverse:
      state[inverse[name]] = value.T if name.endswith("kernel") and value.ndim == 2 else value
  state["patch_embed.proj.weight"] = np.transpose(flat["embedding/kernel"], (3, 2, 0, 1))
  pos = flat.get("pos_embedding")
  if "cls" in flat:
    state["cls_token"] = flat["cls"]
    if pos is not None:
      pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  if pos is not None:
    state["pos_embed"] = pos
  block_inverse = {v: k for k, v in _TIMM_BLOCK.items()}
  for i in range(depth):
    src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    for target, key in block_inverse.items():
      value = flat[src + target]
      if target.endswith("out/kernel"):
        value = value.reshape(width, width)
      state[dst + key] = value.T if value.ndim == 2 else value
    attn = src + "MultiHeadDotProductAttention_0/"
    state[dst + "attn.qkv.weight"] = np.concatenate(
        [flat[f"{attn}{p}/kernel"].reshape(width, width).T for p in ("query", "key", "value")])
    state[dst + "attn.qkv.bias"] = np.concatenate(
        [flat[f"{attn}{p}/bias"].reshape(width) for p in ("query", "key", "value")])
  if "MAPHead_0/probe" in flat:
    attn = "MAPHead_0/MultiHeadDotProductAttention_0/"
    state["attn_pool.q.weight"] = flat[f"{attn}query/kernel"].reshape(width, width).T
    state["attn_pool.q.bias"] = flat[f"{attn}query/bias"].reshape(width)
    state["attn_pool.kv.weight"] = np.concatenate(
        [flat[f"{attn}{p}/kernel"].reshape(width, width).T for p in ("key", "value")])
    state["attn_pool.kv.bias"] = np.concatenate(
        [flat[f"{attn}{p}/bias"].reshape(width) for p in ("key", "value")])
    state["attn_pool.proj.weight"] = flat[f"{attn}out/kernel"].reshape(width, width).T
  pool = "token" if "cls" in flat else "map" if "MAPHead_0/probe" in flat else "avg"
  patch = flat["embedding/kernel"].shape[0]
  kwargs: dict[str, object] = dict(
      img_size=[int(image_size[0]), int(image_size[1])], embed_dim=int(width), depth=depth,
      num_heads=int(num_heads),
      mlp_ratio=flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1] / width,
      patch_size=int(patch), in_chans=int(flat["embedding/kernel"].shape[2]),
      num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else 0,
      global_pool=pool, class_token="cls" in flat, fc_norm=False)
  if pos is None:
    kwargs["pos_embed"] = "none"
  if "pre_logits/kernel" in flat:
    raise CheckpointError("timm's VisionTransformer has no representation (pre_logits) layer "
                          "in current versions; export this model as big_vision")
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  return state, kwargs


# ----------------------------------------------------------------------------- Hugging Face

# transformers 5's in-memory ViT names -> the on-disk names `save_pretrained` writes
# (the fixtures' manifest lists both; the files carry the on-disk ones).
_HF_V5 = (("vit.layers.", "vit.encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
          (".attention.k_proj.", ".attention.attention.key."),
          (".attention.v_proj.", ".attention.attention.value."),
          (".attention.o_proj.", ".attention.output.dense."),
          (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."))


def from_hf_vit(state: Mapping[str, np.ndarray], *, num_heads: int,
                grid_rows: int | None = None) -> tuple[Flat, list[str]]:
  """Hugging Face `ViTForImageClassification` / `ViTModel` safetensors in big_vision names
  (class-token pooling; a `ViTModel`'s pooler is the `pre_logits` layer, rep_size = width).
  `num_heads` from the checkpoint's config.json."""
  state = dict(state)
  for new, old in _HF_V5:
    state = {k.replace(new, old): v for k, v in state.items()}
  if not any(k.startswith("vit.") for k in state):  # a bare ViTModel
    state = {("vit." + k if not k.startswith("classifier.") else k): v
             for k, v in state.items()}
  # ViTModel's pooler, tanh(dense(class token)), is big_vision's pre_logits layer.
  timm_like: Flat = {}
  rename = {"vit.embeddings.cls_token": "cls_token",
            "vit.embeddings.position_embeddings": "pos_embed",
            "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
            "classifier.weight": "head.weight", "classifier.bias": "head.bias",
            "vit.pooler.dense.weight": "pre_logits.fc.weight",
            "vit.pooler.dense.bias": "pre_logits.fc.bias"}
  layer = {"layernorm_before": "norm1", "layernorm_after": "norm2",
           "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
           "output.dense": "mlp.fc2"}
  pending: dict[int, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for name, value in state.items():
    if name in rename:
      timm_like[rename[name]] = value
      continue
    m = re.fullmatch(r"vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in layer:
      timm_like[f"blocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
    elif m and m.group(2).startswith("attention.attention."):
      pending[int(m.group(1))][f"{m.group(2).rsplit('.', 1)[1]}.{m.group(3)}"] = value
    else:
      timm_like[name] = value  # reported as unused (e.g. vit.pooler.dense.*)
  for i, parts in pending.items():
    for kind in ("weight", "bias"):
      if all(f"{p}.{kind}" in parts for p in ("query", "key", "value")):
        timm_like[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
            [parts[f"{p}.{kind}"] for p in ("query", "key", "value")])
  flat, notes = from_timm(timm_like, num_heads=num_heads, grid_rows=grid_rows)
  return flat, [n for n in notes if "fused qkv" not in n]


# ----------------------------------------------------------------------------- position table

def resample_posemb(old: np.ndarray, new_grid: tuple[int, int],
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """`[1, gh*gw, width]` position table resized to `new_grid` by linear interpolation
  (`scipy.ndimage.zoom`, order 1), as big_vision's `resample_posemb` for high-resolution
  fine-tuning; `old_grid` defaults to the square grid its row count makes."""
  rows = old.shape[1]
  if rows == 0:
    raise CheckpointError("the checkpoint's position table has no rows")
  if old_grid is None:
    side = int(round(np.sqrt(rows)))
    if side * side != rows:
      raise CheckpointError(f"cannot resample a {rows}-row position table: not a square grid "
                            f"(give the grid)")
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != rows:
    raise CheckpointError(f"grid {old_grid} does not have {rows} rows")
  if tuple(old_grid) == tuple(new_grid):
    return old
  if min(new_grid) < 1:
    raise CheckpointError(f"cannot resample a position table to the grid {new_grid}")
  grid = old.reshape(old_grid[0], old_grid[1], -1)
  exact = np.float64 if old.dtype == np.float64 else np.float32  # scipy has no bfloat16
  zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
  grid = scipy.ndimage.zoom(grid.astype(exact), zoom, order=1)
  if grid.shape[:2] != tuple(new_grid):
    raise CheckpointError(f"resampling {old_grid} to {new_grid} gave {grid.shape[:2]}")
  return grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(old.dtype)
