"""`load(source, model)`: pretrained weights into an existing zoo model, with a report.

A source is a registry name (`python -m zoo.checkpoints list`), a file, or a zoo workdir:

* `.npz`: big_vision (modern or legacy layout, `params/`/`opt/target/` prefixes,
  scan-stacked blocks; `path.npz:img` takes a sub-tree such as SigLIP's image tower), or
  a zoo export (the same names);
* `.safetensors`: timm / DeiT, or Hugging Face ViT (recognised by its `vit.` names; its
  `config.json` beside the file is read for the heads, LayerNorm epsilon and GELU);
* `.pt`, `.pth`, `.bin`: torch files (timm/DeiT state dicts, or the adaptive-span authors'
  `{"model": {"module.*": ...}}`), read without running code from the file;
* a directory: a zoo workdir (its newest readable Orbax checkpoint's parameters, restored
  without the optimiser), or a Hugging Face `save_pretrained` folder.

Accounting is strict by default: every model parameter the checkpoint lacks, every
checkpoint entry the model does not use, and every shape that does not fit is named in one
`CheckpointError`. `dont_load` regexes (matched in full against the model's names, and
against the checkpoint's for entries to drop) keep parameters at their initialisation,
e.g. `("head/.*",)` for a new class count. With `strict=False` what does not fit is kept
at initialisation (or ignored) and listed in the report instead. A position table of
another grid is resampled (`vit.resample_posemb`); per-head projections load into the
flat `[width, width]` kernels of families such as AFT (same numbers, other shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from zoo.checkpoints import adaptive_span, catalog, files, torch_pickle
from zoo.checkpoints import vit as vit_lib
from zoo.checkpoints.files import CheckpointError
from zoo.models.transformer_seq import TransformerSeq
from zoo.models.vit import ViT

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Projection entries whose per-head layout may load into a flat kernel of the same numbers.
_PROJECTION = re.compile(r".*/(query|key|value|out|gate)/(kernel|bias)$")


@dataclasses.dataclass
class LoadReport:
  """What `load` did.

  Attributes:
    source: what was asked for; `path`: the file or workdir read; `format`: big_vision,
      timm, hf_vit, adaptive_span or zoo; `sha256`: the file's digest (None for a
      workdir or an in-memory dict).
    loaded: model parameters set from the checkpoint.
    kept: model parameters left at initialisation -> why (dont_load, absent from the
      checkpoint, shape).
    ignored: checkpoint entries not used -> why.
    resampled: parameters resized -> "old shape -> new shape".
    notes: layout conversions made (legacy names, fused qkv, folded rows and scales).
    warnings: mismatches that change the function without changing shapes (a GELU or
      LayerNorm epsilon other than the checkpoint's publisher used).
  """
  source: str
  path: str | None = None
  format: str = ""
  sha256: str | None = None
  loaded: list[str] = dataclasses.field(default_factory=list)
  kept: dict[str, str] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  resampled: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    """A few lines for a log: counts, then each kept, ignored and resampled name."""
    lines = [f"loaded {len(self.loaded)} parameters from {self.path or self.source} "
             f"({self.format}{', sha256 ' + self.sha256[:12] if self.sha256 else ''})"]
    for title, items in (("kept at initialisation", self.kept),
                         ("ignored from the checkpoint", self.ignored),
                         ("resampled", self.resampled)):
      if items:
        lines.append(f"{title}: " + "; ".join(f"{k} ({v})" for k, v in sorted(items.items())))
    lines += [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.warnings]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
  """A checkpoint read into memory: flat arrays in their publisher's names, plus what
  describes them: `config`, the publisher's (Hugging Face config.json, safetensors
  metadata such as timm's, a zoo workdir's run metadata and step); `zoo_model`, the zoo
  model config when the source states it (registry entries, zoo workdirs)."""
  flat: dict[str, np.ndarray]
  format: str
  path: str | None = None
  sha256: str | None = None
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  zoo_model: dict[str, Any] | None = None
  raw: Any = None  # the torch object, for the adaptive-span loader


def _split_subtree(source: str) -> tuple[str, str | None]:
  """'file.npz:img' -> ('file.npz', 'img') when 'file.npz' exists and the whole does not."""
  if os.path.exists(source) or ":" not in source:
    return source, None
  path, _, key = source.rpartition(":")
  if os.path.exists(path) and re.fullmatch(r"[\w/]+", key):
    return path, key
  return source, None


def _hf_config(path: str) -> dict[str, Any]:
  """The config.json `save_pretrained` wrote beside `path` (or `<stem>_config.json`)."""
  folder, name = os.path.split(path)
  stem = name.rsplit(".", 1)[0]
  for candidate in (os.path.join(folder, f"{stem}_config.json"),
                    os.path.join(folder, f"{stem}.json"),
                    os.path.join(folder, "config.json")):
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f)
  return {}


def _workdir_checkpoints(path: str) -> str | None:
  directory = os.path.join(path, "checkpoints")
  return directory if os.path.isdir(directory) else None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax's warnings for a checkpoint read without its optional metadata file are noise
  here (the trainer writes none for the `state` item)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def read_workdir(path: str) -> Source:
  """The parameters of a zoo workdir's newest readable checkpoint (each newer step that
  cannot be read is skipped), with the run's model config from its metadata. Reads
  without a lock and writes nothing, so it is safe beside a running `train.py`."""
  directory = _workdir_checkpoints(path)
  steps = sorted((int(s) for s in os.listdir(directory) if s.isdigit()), reverse=True) \
      if directory else []
  if not steps:
    raise CheckpointError(f"no checkpoint in {path} (train first, or give a checkpoint file)")
  problems = []
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    try:
      with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
      with _quiet_orbax():
        checkpointer = ocp.PyTreeCheckpointer()
        structure = checkpointer.metadata(os.path.join(step_dir, "state"))
        tree = getattr(structure, "item_metadata", None) or getattr(structure, "tree",
                                                                     structure)
        wanted = {"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                         dict(tree)["params"])}
        try:  # only the parameters (Orbax versions with partial restore)
          restore = ocp.args.PyTreeRestore(item=wanted, restore_args=wanted,
                                           partial_restore=True)
        except TypeError:  # older Orbax: the whole state, as numpy
          everything = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    dict(tree))
          restore = ocp.args.PyTreeRestore(item=everything, restore_args=everything)
        restored = checkpointer.restore(os.path.join(step_dir, "state"), args=restore)
    except Exception as e:  # pylint: disable=broad-except  # an unreadable step: try older
      problems.append(f"step {step}: {' '.join(str(e).split())[:160]}")
      continue
    return Source(_flatten(restored["params"]), "zoo", path=os.path.abspath(path),
                  config={"step": step, **meta}, zoo_model=meta.get("model"))
  raise CheckpointError(f"no readable checkpoint in {path}: {'; '.join(problems)}")


def read(source: str | os.PathLike | Mapping[str, Any], *, allow_unpinned: bool = False,
         progress: bool = True) -> Source:
  """Reads `source` (see the module docstring) into a `Source`, without a model."""
  if isinstance(source, Mapping):
    return Source(dict(source), _detect(source), config={})
  source = os.path.expanduser(os.fspath(source))
  entry = None
  if not os.path.exists(_split_subtree(source)[0]) and source in catalog.names():
    entry = catalog.get(source)
    source = os.fspath(catalog.fetch(source, allow_unpinned=allow_unpinned, progress=progress))
  path, key = _split_subtree(source)
  if not os.path.exists(path):
    near = catalog.names()
    raise CheckpointError(f"no checkpoint file, workdir or registry name {source!r} "
                          f"(registry: python -m zoo.checkpoints list; e.g. {near[:3]})")
  if os.path.isdir(path):
    if _workdir_checkpoints(path):
      return read_workdir(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return read(os.path.join(path, name))
    raise CheckpointError(f"{path} is a directory but neither a zoo workdir (no checkpoints/) "
                          f"nor a Hugging Face folder (no model.safetensors)")
  digest = files.sha256(path)
  lower = path.lower()
  config: dict[str, Any] = {}
  raw = None
  if lower.endswith(".npz"):
    flat = files.read_npz(path)
    fmt = "big_vision"
  elif lower.endswith(".safetensors"):
    flat, metadata = files.read_safetensors(path)
    fmt = _detect(flat)
    config = _hf_config(path) if fmt == "hf_vit" else dict(metadata)
  elif lower.endswith(TORCH_SUFFIXES):
    raw = torch_pickle.read_torch(path)
    flat = torch_pickle.unwrap_state_dict(raw)
    fmt = _detect(flat)
    if fmt == "hf_vit":
      config = _hf_config(path)
  else:
    raise CheckpointError(f"unknown checkpoint format for {path}: expected .npz, "
                          f".safetensors, .pt/.pth/.bin or a workdir")
  if key is not None:
    flat = vit_lib.subtree(vit_lib.without_reserved(flat), key)
  return Source(flat, fmt, path=path, sha256=digest, config=config, raw=raw,
                zoo_model=dict(entry.model) if entry is not None else None)


def _detect(flat: Mapping[str, Any]) -> str:
  """The publisher's layout from the names."""
  names = list(flat)
  if any(n.startswith(("vit.embeddings.", "vit.encoder.", "vit.layers.",
                        "embeddings.patch_embeddings.", "encoder.layer.")) for n in names):
    return "hf_vit"
  if any(n.startswith(("patch_embed.", "blocks.")) for n in names):
    return "timm"
  if any(re.match(r"(module\.)?layers\.\d+\.attn\.proj_query", n) for n in names) \
      or any(n.startswith(("in_emb", "module.in_emb")) for n in names):
    return "adaptive_span"
  return "big_vision"


# ----------------------------------------------------------------------------- into a model

def model_parameters(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters by '/'-joined state path (big_vision's names for the ViT)."""
  return {"/".join(str(p) for p in path): value
          for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _value(variable):
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _compile(patterns: Iterable[str] | str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for pattern in patterns:
    try:
      out.append(re.compile(pattern))
    except re.error as e:
      raise CheckpointError(f"bad dont_load regex {pattern!r}: {e}") from None
  return out


def _activation_checks(model: ViT, source: Source, report: LoadReport) -> None:
  """Warns when the model's GELU or LayerNorm epsilon differs from the publisher's."""
  if source.format == "hf_vit":
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(
        source.config.get("hidden_act", "gelu"))
    eps = source.config.get("layer_norm_eps", 1e-12)
  elif source.format == "timm":
    act, eps = "gelu", 1e-6
  elif source.format == "big_vision":
    act, eps = "gelu_tanh", 1e-6
  else:
    return
  block = model.Transformer.encoderblock_0
  if act and block.MlpBlock_0.activation != act:
    report.warnings.append(f"the checkpoint's MLP uses {act!r}, the model "
                           f"{block.MlpBlock_0.activation!r} (set mlp_activation={act!r})")
  if not np.isclose(block.LayerNorm_0.epsilon, eps, rtol=1e-3, atol=0):
    report.warnings.append(f"the checkpoint's LayerNorm epsilon is {eps:g}, the model's "
                           f"{block.LayerNorm_0.epsilon:g} (set layernorm_epsilon={eps:g})")


def _vit_names(model: ViT, source: Source, report: LoadReport) -> dict[str, np.ndarray]:
  heads = model.Transformer.encoderblock_0.MultiHeadDotProductAttention_0.num_heads
  grid_rows = model.grid[0] * model.grid[1]
  try:
    return _convert_vit(source, heads, grid_rows, model, report)
  except KeyError as e:  # a file without a name its layout always has
    raise CheckpointError(f"{source.path or 'the checkpoint'} is not a complete "
                          f"{source.format} ViT: it has no {e.args[0]!r}") from None


def _convert_vit(source: Source, heads: int, grid_rows: int, model: ViT,
                 report: LoadReport) -> dict[str, np.ndarray]:
  if source.format == "big_vision":
    flat, notes = vit_lib.from_big_vision(source.flat, grid_rows=grid_rows)
  elif source.format == "timm":
    flat, notes = vit_lib.from_timm(source.flat, num_heads=heads, grid_rows=grid_rows)
  elif source.format == "hf_vit":
    if "num_attention_heads" in source.config and \
        int(source.config["num_attention_heads"]) != heads:
      raise CheckpointError(f"the checkpoint's config.json has {source.config['num_attention_heads']} "
                            f"heads, the model {heads}")
    flat, notes = vit_lib.from_hf_vit(source.flat, num_heads=heads, grid_rows=grid_rows)
  elif source.format == "zoo":
    flat, notes = vit_lib.without_reserved(source.flat), []
  else:
    raise CheckpointError(f"a {source.format} checkpoint does not load into a ViT")
  report.notes += notes
  _activation_checks(model, source, report)
  return flat


def _fit(name: str, value: np.ndarray, target, model: nnx.Module,
         report: LoadReport) -> np.ndarray | None:
  """`value` shaped for `target`, resampling a position table and merging per-head
  layouts; None when it does not fit."""
  shape = tuple(target.shape)
  if tuple(value.shape) == shape:
    return value
  if name == "pos_embedding" and isinstance(model, ViT) and value.ndim == 3 \
      and value.shape[-1] == shape[-1]:
    resampled = vit_lib.resample_posemb(value, model.grid)
    report.resampled[name] = f"{tuple(value.shape)} -> {shape}"
    return resampled
  if _PROJECTION.match(name) and value.size == int(np.prod(shape)):
    return _merge_heads(name, value, shape)
  return None


def _merge_heads(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """The same numbers between a per-head and a flat projection of the same width: query,
  key, value (and gate) kernels `[w, h, d]` <-> `[w, h*d]`, the output kernel `[h, d, w]`
  <-> `[h*d, w]`, biases `[h, d]` <-> `[h*d]`. A per-head layout with another split of the
  heads is not the same function and does not fit."""
  src, dst = tuple(value.shape), tuple(shape)
  out = name.endswith("/out/kernel")
  pairs = []
  if name.endswith("/kernel"):
    pairs = [(src, dst)] if len(src) == 3 else [(dst, src)]
    per_head, flat = pairs[0]
    if len(per_head) != 3 or len(flat) != 2:
      return None
    merged = (per_head[0] * per_head[1], per_head[2]) if out else \
        (per_head[0], per_head[1] * per_head[2])
    return value.reshape(dst) if merged == flat else None
  if name.endswith("/bias"):
    per_head, flat = (src, dst) if len(src) == 2 else (dst, src)
    if len(per_head) == 2 and len(flat) == 1 and per_head[0] * per_head[1] == flat[0]:
      return value.reshape(dst)
  return None


def load(source, model: nnx.Module, *, dont_load: Iterable[str] | str = (),
         strict: bool = True, allow_unpinned: bool = False, progress: bool = True,
         vocabulary=None) -> LoadReport:
  """Loads `source` into `model` in place and returns a `LoadReport`.

  Args:
    source: a registry name, a file path (`.npz[:subtree]`, `.safetensors`, torch
      `.pt/.pth/.bin`), a zoo workdir or Hugging Face folder, or a flat dict of arrays.
    model: a `ViT`, `DecoderLM` or `TransformerSeq` built with the checkpoint's shapes
      (any attention family: what the family adds is reported as kept).
    dont_load: regexes (full match) of parameters to keep at initialisation, and of
      checkpoint entries to drop, e.g. `("head/.*",)`.
    strict: refuse (one error listing every name) a missing, unused or mis-shaped
      parameter; False keeps or ignores them and lists them in the report.
    allow_unpinned: download a registry entry whose publisher states no sha256.
    progress: a progress bar for downloads.
    vocabulary: for the adaptive-span authors' checkpoints, the path of their training
      text (train.txt) or its token list, to map their first-appearance token ids to the
      zoo's byte ids (see `zoo.checkpoints.adaptive_span`).
  """
  read_source = source if isinstance(source, Source) else read(
      source, allow_unpinned=allow_unpinned, progress=progress)
  label = (read_source.path or "<Source>") if isinstance(source, Source) else \
      "<dict>" if isinstance(source, Mapping) else str(source)
  report = LoadReport(source=label,
                      path=read_source.path, format=read_source.format,
                      sha256=read_source.sha256)
  if isinstance(model, TransformerSeq) and read_source.format == "adaptive_span":
    if tuple(dont_load) if not isinstance(dont_load, str) else dont_load:
      raise CheckpointError("dont_load is not supported for the adaptive-span authors' "
                            "checkpoints (use strict=False to keep what is missing)")
    result = adaptive_span.load(model, read_source.raw if read_source.raw is not None
                                else read_source.flat, vocabulary=vocabulary, strict=strict)
    report.loaded = list(result.get("loaded", []))
    report.kept = dict(result.get("kept", {}))
    report.ignored = dict(result.get("ignored", {}))
    report.notes += list(result.get("notes", []))
    return report
  patterns = _compile(dont_load)
  skip = lambda name: any(p.fullmatch(name) for p in patterns)  # noqa: E731
  if isinstance(model, ViT):
    flat = _vit_names(model, read_source, report)
  elif read_source.format in ("zoo", "big_vision"):
    flat = vit_lib.without_reserved(read_source.flat)
  else:
    raise CheckpointError(f"a {read_source.format} checkpoint does not load into a "
                          f"{type(model).__name__}")
  params = model_parameters(model)
  new_values: dict[str, np.ndarray] = {}
  missing, mismatched = [], []
  for name, variable in params.items():
    target = _value(variable)
    if skip(name):
      report.kept[name] = "dont_load"
      continue
    if name not in flat:
      report.kept[name] = "not in the checkpoint"
      missing.append(name)
      continue
    fitted = _fit(name, np.asarray(flat[name]), target, model, report)
    if fitted is None:
      report.kept[name] = f"checkpoint shape {tuple(flat[name].shape)}, model {tuple(target.shape)}"
      mismatched.append(f"{name} (checkpoint {tuple(flat[name].shape)}, model "
                        f"{tuple(target.shape)})")
      continue
    new_values[name] = fitted
  unused = []
  for name in sorted(flat):
    if skip(name):
      report.ignored[name] = "dont_load"
    elif name not in params:
      report.ignored[name] = "not a parameter of this model"
      unused.append(name)
  if strict and (missing or unused or mismatched):
    raise CheckpointError(_strict_message(report.path or report.source, missing, unused,
                                          mismatched))
  _assign(model, params, new_values)
  report.loaded = sorted(new_values)
  return report


def _strict_message(where: str, missing, unused, mismatched) -> str:
  parts = []
  if missing:
    parts.append(f"missing from the checkpoint: {', '.join(missing)}")
  if unused:
    parts.append(f"not used by the model: {', '.join(unused)}")
  if mismatched:
    parts.append(f"shapes that do not fit: {', '.join(mismatched)}")
  hint = ("pass dont_load regexes (init_dont_load) for what should stay at "
          "initialisation or be dropped, or strict=False (init_strict=False) to keep and "
          "list them")
  if any(n.startswith(("dist_token", "dist_pos_embedding", "head_dist")) for n in unused):
    hint = ("a distilled DeiT's distillation token has no place in the zoo ViT: drop it "
            "with dont_load=('dist_token', 'dist_pos_embedding', 'head_dist/.*'); " + hint)
  return f"{where} does not match the model strictly: {'; '.join(parts)}. To load anyway, {hint}."


def _assign(model: nnx.Module, params: Mapping[str, Any], values: Mapping[str, np.ndarray]):
  """Sets each named parameter in place, in the model's dtype and sharding."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  updated = []
  for path, variable in flat:
    name = "/".join(str(p) for p in path)
    if name in values:
      old = _value(variable)
      value = np.asarray(values[name]).astype(old.dtype)
      if isinstance(old, jax.Array):  # each device (of every process) takes its own slice
        new = jax.make_array_from_callback(old.shape, old.sharding, lambda i, v=value: v[i])
      else:
        new = jnp.asarray(value)
      variable = variable.replace(new)
    updated.append((path, variable))
  nnx.update(model, nnx.from_flat_state(updated))
