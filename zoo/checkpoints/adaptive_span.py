"""The adaptive-span authors' released checkpoints (facebookresearch/adaptive-span) into the
zoo's `TransformerSeq`.

Their files (`get_pretrained.sh`: enwik8.pt, text8.pt, enwik8_large.pt, text8_large.pt)
are what their `utils.save_checkpoint` writes: `torch.save({"iter_no", "model",
"optimizer", "logger", "scheduler_iter"})` with `model` the state dict of the
DataParallel / DistributedDataParallel wrapper, so every key starts with `module.`.
`unwrap` takes the state dict out; `zoo.models.transformer_seq.load_authors_state_dict`
maps it onto the model.

Token ids. Their models do not number bytes. `data.py` builds a `Dictionary` from
`train.txt`: for every line, `line.split() + ['<eos>']`, each new token taking the next id
(first-appearance order; `sort_dict`, by count, only with `--adapt-io`, which the enwik8 /
text8 scripts do not set). The train.txt files come from `get_data.sh`:

* enwik8 (salesforce/awd-lstm-lm `data/enwik8/prep_enwik8.py`): the first 90M bytes of
  enwik8 written as `' '.join([str(c) if c != ord('\\n') else '\\n' for c in part])`, so
  a token is a byte's decimal value ("60" is '<') and the newline byte ends a line, i.e.
  is their `<eos>`. Byte b is token str(b), byte 10 is `<eos>`.
* text8 (kimiyoung/transformer-xl `prep_text8.py`): the first 90M characters, `strip()`ed,
  written as `' '.join(['_' if c == ' ' else c for c in part.strip()])`: one line of
  single-character tokens with `_` for the space; its only `<eos>` closes that line. Byte
  b is token chr(b), 32 is `_`, and `<eos>` is mapped to the newline byte 10.

The zoo's byte models (`configs/enwik8_adaptive_span.py`, `byte_file` data) read the raw
file's bytes as ids 0..255 (vocab_size 256). `byte_permutation(vocabulary)` says, for
every zoo id b, which row of the authors' embeddings is byte b's (-1: a byte the authors'
vocabulary lacks), and `load` permutes the rows of `in_emb.weight`, `out_emb.weight` and
`out_emb.bias` so that the zoo model reading bytes computes exactly what the authors'
model computes on their ids: the log-probability of byte b is the authors' log-probability
of b's token, for every token of theirs (every token of theirs must have a byte, so no
probability mass is lost). Bytes the authors' vocabulary lacks:

* `in_emb` rows are kept at the model's initialisation (the authors' model never saw
  them; listed in the report as kept);
* `out_emb` rows are zero with bias `missing_logit` (default -1e4): their probability is
  exp(-1e4 - logsumexp) = 0 in float32, so the distribution over the authors' tokens is
  theirs, while the loss of such a byte stays finite (about 1e4 nats). Finite, not
  -inf: the zoo's evaluation pads with byte 0 under mask 0 and -inf * 0 is NaN, and a
  fine-tuned model can still learn the new bytes. `missing_logit=None` keeps those rows
  at initialisation too (then the distribution is no longer the authors').

The authors' stream has one `<eos>` more than the raw file has newline bytes when a split
does not end with a newline (the last line's), and their text8 train.txt lacks the leading
space that `strip()` removed: one token per split, no effect on the weights.

`authors_vocabulary(train_txt)` reads their train.txt as their `Dictionary` does;
`vocabulary_from_raw(raw_train_bytes, scheme)` gives the same list from the raw training
bytes (the zoo's `byte_file` train split, i.e. all but the last 10M bytes), without
writing their train.txt.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from zoo.checkpoints import torch_pickle
from zoo.checkpoints.files import CheckpointError
from zoo.models.transformer_seq import TransformerSeq, load_authors_state_dict

EOS = "<eos>"  # data.py: `line.split() + ['<eos>']`
NEWLINE = 10  # the byte their <eos> stands for
SCHEMES = ("enwik8", "text8")
MISSING_LOGIT = -1e4
# Keys of the authors' state dict that name model parameters (load_authors_state_dict's).
_MODEL_PREFIXES = ("in_emb/", "out_emb/", "key_pe", "layers/")
# Whitespace str.split() drops (ASCII) and the line breaks of universal-newline reading.
_DROPPED = (9, 11, 12, 28, 29, 30, 31)
_LINE_BREAKS = (10, 13)


# ----------------------------------------------------------------------------------------
# The state dict.


# The authors' checkpoint dict (`{"iter_no", "model", "optimizer", ...}`) or a state dict
# itself -> {key: array} without DataParallel's `module.` prefix.
unwrap = torch_pickle.unwrap_state_dict


# ----------------------------------------------------------------------------------------
# The authors' vocabulary.


def authors_vocabulary(train_txt_path: str | os.PathLike, *,
                       sort_dict: bool = False) -> list[str]:
  """Their `data.Dictionary(train_txt_path, sort_dict).idx2word`: id i is token [i].

  Reads the file as they do (text, UTF-8, universal newlines): every line's
  `line.split() + ['<eos>']`, tokens numbered by first appearance. `sort_dict` (their
  `--adapt-io` runs only): by descending count, ties in reverse first-appearance order
  (their `sorted(..., key=count)[::-1]`).
  """
  path = os.fspath(train_txt_path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file (the authors' train.txt)")
  order: dict[str, int] = {}
  with open(path, "r", encoding="utf8") as f:
    for line in f:
      words = line.split() + [EOS]
      if sort_dict:
        for word in words:
          order[word] = order.get(word, 0) + 1
      else:
        for word in dict.fromkeys(words):
          order.setdefault(word, len(order))
  if sort_dict:
    return [w for w, _ in sorted(order.items(), key=lambda kv: kv[1])[::-1]]
  return list(order)


def vocabulary_from_raw(data: bytes | np.ndarray, scheme: str) -> list[str]:
  """The authors' vocabulary from the raw training bytes, without their train.txt.

  `data` is the split their prep script writes to train.txt: for enwik8 and text8 the
  whole file but its last 10,000,000 bytes (the zoo's `byte_file` train split).
  `scheme` "enwik8": prep_enwik8.py's decimal tokens; "text8": prep_text8.py's
  characters (ASCII only; `strip()`ed; space -> `_`; other whitespace as str.split and
  universal newlines treat it). Equal to `authors_vocabulary` of the written train.txt.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
  arr = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else \
      np.asarray(data, np.uint8).ravel()
  if scheme == "text8":
    if arr.size and arr.max() >= 128:
      raise ValueError("the text8 scheme reads ASCII text only (prep_text8 makes a token of "
                       "every character)")
    stripped = np.flatnonzero(~np.isin(arr, (32,) + _DROPPED + _LINE_BREAKS))
    arr = arr[stripped[0]:stripped[-1] + 1] if stripped.size else arr[:0]
    arr = arr[~np.isin(arr, _DROPPED)]
    arr = np.where(arr == 13, NEWLINE, arr)
  if arr.size == 0:
    return []
  values, first = np.unique(arr, return_index=True)
  tokens = [_token(int(b), scheme) for b in values[np.argsort(first, kind="stable")]]
  if EOS not in tokens:
    tokens.append(EOS)  # the last line's <eos>
  return tokens


def _token(byte: int, scheme: str) -> str:
  """The authors' token of a byte."""
  if byte == NEWLINE:
    return EOS
  if scheme == "enwik8":
    return str(byte)
  return "_" if byte == 32 else chr(byte)


def detect_scheme(vocabulary: Sequence[str]) -> str:
  """"enwik8" when every token but `<eos>` is a decimal byte value, "text8" when every one
  is a single character (a vocabulary of digits only reads as enwik8: pass the scheme)."""
  tokens = [t for t in vocabulary if t != EOS]
  if all(re.fullmatch(r"0|[1-9]\d{0,2}", t) and int(t) < 256 for t in tokens):
    return "enwik8"
  if all(len(t) == 1 for t in tokens):
    return "text8"
  odd = [t for t in tokens if len(t) != 1][:5]
  raise CheckpointError(f"the vocabulary is neither enwik8's decimal byte values nor text8's "
                        f"characters (e.g. {odd}); a byte model cannot take it")


def token_bytes(vocabulary: Sequence[str], scheme: str = "auto") -> np.ndarray:
  """The byte of each authors' token id: int64 [len(vocabulary)].

  enwik8: "b" -> b; text8: "_" -> 32, "c" -> ord(c); both: `<eos>` -> 10 (newline).
  Raises CheckpointError for a token without a byte or two tokens with the same byte.
  """
  scheme = detect_scheme(vocabulary) if scheme == "auto" else scheme
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be 'auto' or one of {SCHEMES}, got {scheme!r}")
  out, bad = [], []
  for token in vocabulary:
    if token == EOS:
      out.append(NEWLINE)
    elif scheme == "enwik8" and re.fullmatch(r"0|[1-9]\d{0,2}", token) and int(token) < 256:
      out.append(int(token))
    elif scheme == "text8" and len(token) == 1 and ord(token) < 256:
      out.append(32 if token == "_" else ord(token))
    else:
      bad.append(token)
      out.append(-1)
  if bad:
    raise CheckpointError(f"{len(bad)} token(s) of the authors' vocabulary have no byte in the "
                          f"{scheme} scheme: {bad[:10]}")
  values, counts = np.unique(out, return_counts=True)
  if (counts > 1).any():
    dup = [int(v) for v in values[counts > 1]]
    raise CheckpointError(f"byte(s) {dup[:10]} stand for more than one token of the authors' "
                          f"vocabulary in the {scheme} scheme")
  return np.asarray(out, np.int64)


def byte_permutation(vocabulary: Sequence[str], *, vocab_size: int = 256,
                     scheme: str = "auto") -> np.ndarray:
  """For each zoo token id (byte) b < vocab_size, the authors' id of b's token, or -1.

  `perm[b] = vocabulary.index(token(b))`; rows of the authors' `in_emb.weight`,
  `out_emb.weight` and `out_emb.bias` taken at `perm` give a byte model's rows. Every
  authors' token has a byte below vocab_size (else CheckpointError), so the byte model's
  softmax covers all their classes.
  """
  ids = token_bytes(vocabulary, scheme)
  if ids.size and ids.max() >= vocab_size:
    raise CheckpointError(f"the authors' vocabulary has bytes up to {int(ids.max())}, the model "
                          f"only {vocab_size} ids")
  perm = np.full(vocab_size, -1, np.int64)
  perm[ids] = np.arange(len(ids))
  return perm


# ----------------------------------------------------------------------------------------
# Loading.


def _ranges(ids: Sequence[int]) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
  parts, ids = [], sorted(int(i) for i in ids)
  start = prev = None
  for i in ids + [None]:
    if start is not None and (i is None or i != prev + 1):
      parts.append(str(start) if start == prev else f"{start}-{prev}")
      start = None
    if i is not None and start is None:
      start = i
    prev = i
  return ", ".join(parts)


def _current(param: nnx.Variable) -> np.ndarray | None:
  """The parameter's value as numpy, None for an abstract (`nnx.eval_shape`) model."""
  value = param.get_value()
  if isinstance(value, jax.ShapeDtypeStruct):
    return None
  return np.asarray(jax.device_get(value))


def _resolve_permutation(vocabulary, model_size: int, authors_size: int,
                         scheme: str) -> tuple[np.ndarray, str]:
  """(perm [model_size], how) from a train.txt path, a token list or a permutation."""
  if isinstance(vocabulary, (str, os.PathLike)):
    vocabulary = authors_vocabulary(vocabulary)
  if isinstance(vocabulary, np.ndarray) and vocabulary.dtype.kind in "iu" or (
      isinstance(vocabulary, Sequence) and vocabulary and
      all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vocabulary)):
    perm = np.asarray(vocabulary, np.int64).ravel()
    if perm.shape != (model_size,):
      raise CheckpointError(f"a permutation needs one entry per model token id "
                            f"({model_size}), got {perm.size}")
    if perm.min() < -1 or perm.max() >= authors_size:
      raise CheckpointError(f"permutation entries must be -1 or authors' ids < {authors_size}")
    used = perm[perm >= 0]
    if len(np.unique(used)) != len(used):
      raise CheckpointError("the permutation takes an authors' row for two model ids")
    return perm, "permutation given"
  tokens = [str(t) for t in vocabulary]
  if len(tokens) != authors_size:
    raise CheckpointError(f"the vocabulary has {len(tokens)} tokens, the checkpoint's "
                          f"embedding {authors_size} rows: not the vocabulary it was "
                          f"trained with")
  scheme = detect_scheme(tokens) if scheme == "auto" else scheme
  return byte_permutation(tokens, vocab_size=model_size, scheme=scheme), f"{scheme} scheme"


def _expected_keys(model: TransformerSeq) -> set[str]:
  """The state-dict keys (with "/") that load_authors_state_dict reads for `model`."""
  keys = {"in_emb/weight", "out_emb/weight", "out_emb/bias", "key_pe"}
  for i, layer in enumerate(model.layers()):
    p = f"layers/{i}"
    keys |= {f"{p}/attn/proj_{n}/weight" for n in ("query", "key", "val", "out")}
    keys |= {f"{p}/norm1/weight", f"{p}/norm1/bias"}
    if layer.ff is not None:
      keys |= {f"{p}/ff/{fc}/{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")}
      keys |= {f"{p}/norm2/weight", f"{p}/norm2/bias"}
    mask = f"{p}/attn/attn/adaptive_span/_mask"
    keys.add(f"{mask}/mask_template")
    if getattr(layer.attn, "span", None) is not None:
      keys.add(f"{mask}/current_val")
    if layer.all_attention:
      pm = f"{p}/attn/attn/persistent_memory"
      keys |= {f"{pm}/key", f"{pm}/val", f"{pm}/adaptive_span/_mask/mask_template",
               f"{pm}/adaptive_span/_mask/current_val"}
  return keys


def load(model: TransformerSeq, source: Any, *, vocabulary: Any = None, scheme: str = "auto",
         missing_logit: float | None = MISSING_LOGIT, strict: bool = True) -> dict[str, Any]:
  """Loads an adaptive-span authors' checkpoint into `model` (in place).

  Args:
    model: a `TransformerSeq` with the checkpoint's sizes (width, heads, depth, max_span,
      inner size, attention), and any vocab_size that holds the vocabulary's bytes (256).
    source: their checkpoint dict (`torch_pickle.read_torch` of their .pt), a state dict,
      or a path to either (.pt/.pth/.bin read with `read_torch`, .npz with numpy).
    vocabulary: None: the ids as they are (the checkpoint's vocabulary size must be the
      model's); the path of their train.txt; their token list (`authors_vocabulary`,
      `vocabulary_from_raw`); or a permutation, int [model.vocab_size], of authors' ids
      (-1: none). See the module docstring.
    scheme: "auto", "enwik8" or "text8": how tokens name bytes (for a token list).
    missing_logit: the output bias of model ids with no authors' token (output weight rows
      zero); None keeps those rows at initialisation.
    strict: as `load_authors_state_dict` (every parameter present, no unused layer key).

  Returns:
    {"loaded": model parameter names set (as `nnx.state` paths joined with "/"),
     "kept": {name: why} parameters (or rows) left at initialisation,
     "ignored": {checkpoint key: why} entries not loaded,
     "notes": [str], "vocabulary": None or {"scheme", "authors_size", "model_size",
     "permutation" (int [model_size]), "missing_ids", "missing_logit"}}.

  Raises:
    CheckpointError: no state dict, a vocabulary that does not fit, or (strict) a
    missing / unused / mis-shaped entry.
  """
  if isinstance(source, (str, os.PathLike)):
    source = _read_path(os.fspath(source))
  state = {k.replace(".", "/"): v for k, v in unwrap(source).items()}
  ignored: dict[str, str] = {}
  if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping):
    ignored.update({str(k): "training state, not model weights"
                    for k in source if k != "model"})
  notes: list[str] = []
  kept: dict[str, str] = {}
  for key in ("in_emb/weight", "out_emb/weight", "out_emb/bias"):
    if key not in state:
      raise CheckpointError(f"the state dict has no {key!r}")
  authors_size = state["in_emb/weight"].shape[0]
  model_size = model.vocab_size
  info = None
  if vocabulary is None:
    if authors_size != model_size:
      raise CheckpointError(
          f"the checkpoint's vocabulary has {authors_size} tokens (their ids in first-appearance "
          f"order of train.txt), the model {model_size}: pass vocabulary= (the authors' "
          f"train.txt, its token list or a permutation) to map their ids onto the model's")
    notes.append(f"token ids loaded as they are ({authors_size} ids, no vocabulary given)")
  else:
    perm, how = _resolve_permutation(vocabulary, model_size, authors_size, scheme)
    state, info = _permute(model, state, perm, missing_logit)
    info["scheme"] = how
    missing = info["missing_ids"]
    notes.append(f"vocabulary ({how}): the authors' {authors_size} token ids mapped onto "
                 f"{model_size - len(missing)} of the model's {model_size} ids")
    if missing:
      ids = _ranges(missing)
      kept[f"in_emb/embedding[{ids}]"] = "ids absent from the authors' vocabulary"
      if info["abstract_model"]:
        notes.append(f"the model is abstract (nnx.eval_shape): rows {ids} of in_emb are zeros, "
                     f"not an initialisation")
      if missing_logit is None:
        kept[f"out_emb/kernel[:, {ids}]"] = "ids absent from the authors' vocabulary"
        kept[f"out_emb/bias[{ids}]"] = "ids absent from the authors' vocabulary"
      else:
        notes.append(f"ids {ids} (absent from the authors' vocabulary): out_emb rows zero, "
                     f"bias {missing_logit:g}, so their probability is ~0")
    unused = sorted(set(range(authors_size)) - set(int(p) for p in perm[perm >= 0]))
    if unused:
      notes.append(f"authors' ids {_ranges(unused)} have no model id: their probability mass "
                   f"is dropped, the model's log-probabilities are not the authors'")
  params = {"/".join(map(str, path)): var
            for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
  before = {name: var.get_value() for name, var in params.items()}
  expected = _expected_keys(model)
  if strict:  # every problem named at once, before anything is set
    optional = {k for k in expected if k.endswith("/mask_template")
                or "/persistent_memory/adaptive_span/" in k}
    missing = sorted(expected - optional - set(state))
    unused = sorted(k for k in state if k not in expected and k.startswith(_MODEL_PREFIXES))
    if missing or unused:
      parts = ([f"missing from the checkpoint: {', '.join(missing)}"] if missing else []) + \
              ([f"not used by the model: {', '.join(unused)}"] if unused else [])
      raise CheckpointError(f"adaptive-span checkpoint does not match the model strictly: "
                            f"{'; '.join(parts)} (the model's depth, widths, span and "
                            f"attention must be the checkpoint's; strict=False loads what fits)")
  try:
    load_authors_state_dict(model, state, strict=strict)
  except (KeyError, ValueError) as e:
    for name, var in params.items():  # a refused load changes nothing
      if var.get_value() is not before[name]:
        var.set_value(before[name])
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise CheckpointError(f"adaptive-span checkpoint: {message}") from e
  loaded = sorted(n for n, var in params.items() if var.get_value() is not before[n])
  kept.update({n: "not in the checkpoint" for n in sorted(set(params) - set(loaded))})
  for key in sorted(state):
    if key in expected:
      continue
    if key.startswith(_MODEL_PREFIXES):
      ignored[key] = "not a parameter of this model"
    else:
      ignored[key] = "not a model parameter"
  return {"loaded": loaded, "kept": kept, "ignored": ignored, "notes": notes,
          "vocabulary": info}


def _read_path(path: str) -> Any:
  """A checkpoint file: .npz with numpy, anything else as a torch file."""
  if path.lower().endswith(".npz"):
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such file")
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  return torch_pickle.read_torch(path)


def _permute(model: TransformerSeq, state: dict[str, np.ndarray], perm: np.ndarray,
             missing_logit: float | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The state dict with the embedding rows in the model's id order (see `load`)."""
  in_w, out_w, out_b = (np.asarray(state[k]) for k in
                        ("in_emb/weight", "out_emb/weight", "out_emb/bias"))
  size = perm.shape[0]
  present = perm >= 0
  missing = [int(i) for i in np.flatnonzero(~present)]

  def rows(authors, init, fill):
    dtype = authors.dtype if init is None else np.result_type(authors.dtype, init.dtype)
    out = np.empty((size,) + authors.shape[1:], dtype)
    if missing:
      out[~present] = fill if init is None else init[~present]
    out[present] = authors[perm[present]]
    return out

  init_in = _current(model.in_emb.embedding)
  init_out = _current(model.out_emb.kernel)
  init_bias = _current(model.out_emb.bias)
  if missing_logit is None:
    new_out = rows(out_w, None if init_out is None else init_out.T, 0.0)
    new_bias = rows(out_b, init_bias, 0.0)
  else:
    new_out = rows(out_w, None, 0.0)
    new_bias = rows(out_b, None, missing_logit)
  new_in = rows(in_w, init_in, 0.0)
  state = dict(state)
  state.update({"in_emb/weight": new_in, "out_emb/weight": new_out, "out_emb/bias": new_bias})
  info = {"authors_size": int(in_w.shape[0]), "model_size": int(size),
          "permutation": perm.copy(), "missing_ids": missing, "missing_logit": missing_logit,
          "abstract_model": init_in is None}
  return state, info


__all__ = ["EOS", "SCHEMES", "MISSING_LOGIT", "unwrap", "authors_vocabulary",
           "vocabulary_from_raw", "detect_scheme", "token_bytes", "byte_permutation", "load"]
