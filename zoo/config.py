"""Config helpers in big_vision's manner: `get_config(arg)` with `file.py:key=value,...`.

`parse_arg("attention=softmax,steps=300", attention="relu", steps=1000)` returns a
ConfigDict whose values take the type of the defaults. Keys that are not defaults are
kept (parsed as Python literals when they look like one) so that config files can route
them, e.g. into the chosen attention's options.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable

import ml_collections
from ml_collections.config_dict import placeholder

from zoo.attention import registry


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _cast(text: str, default: Any, key: str) -> Any:
  if isinstance(default, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"config argument {key}={text!r} must be true or false")
  if default is None:
    return _literal(text)
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text!r} must be a {type(default).__name__}") from None


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """The candidates a misspelt `name` most likely meant: close spellings (difflib) and
  abbreviations by initials (`learning_rate` -> `lr`, `lr` -> `learning_rate`)."""
  candidates = sorted(set(candidates))
  abbreviations = [c for c in candidates if len(c) > 1 and (
      c == _initials(name) or name == _initials(c))]
  scores = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in candidates}
  best = max(scores.values(), default=0.0)
  close = sorted((c for c, r in scores.items() if r >= max(0.6, best - 0.1)),
                 key=lambda c: -scores[c])
  return list(dict.fromkeys(abbreviations + close))[:n]


def did_you_mean(names: Iterable[str], candidates: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the first of `names` that has a near candidate, else ''."""
  candidates = list(candidates)
  for name in names:
    close = nearest(name, candidates)
    if close:
      return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
  return ""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x' into a ConfigDict, typed by `defaults` (unknown keys kept)."""
  result = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"config argument {item!r} is not of the form key=value")
    result[key] = _cast(value.strip(), defaults[key], key) if key in defaults else _literal(value.strip())
  return ml_collections.ConfigDict(result)


def key_first(arg: str | None, key: str) -> str | None:
  """Lets an argument string name its first item without `key=`: with key 'model',
  'small,lr=0.1' -> 'model=small,lr=0.1' (strings whose first item has '=' pass as they are)."""
  if arg and "=" not in arg.split(",")[0]:
    first, _, rest = arg.partition(",")
    return f"{key}={first}" + (f",{rest}" if rest else "")
  return arg


def attention_option_defaults(name: str, *, cached: bool = False) -> dict[str, Any]:
  """Every option the named attention accepts, with its default (the name's preset wins),
  read from the family's options dataclass in the registry (with `cached`: those of its
  layer over a segment cache, in a TransformerSeq).

  Config files fill `model.attention_options` with this so that any option can be set
  with `--config.model.attention_options.NAME=VALUE`.
  """
  return registry.get(name).option_defaults(cached=cached)


def attention_options_from_arg(name: str, arg: ml_collections.ConfigDict, used: set[str],
                               *, cached: bool = False,
                               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The attention's options: the registry's defaults, the config file's `overrides`,
  then any `key=value` from the config argument.

  Keys of `arg` that are neither in `used` (the config file's own keys) nor options of
  the attention are an error, so a typo never passes silently.
  """
  options = attention_option_defaults(name, cached=cached)
  options.update({k: v for k, v in (overrides or {}).items() if k in options})
  extra = {k: v for k, v in arg.items() if k not in used}
  unknown = set(extra) - set(options)
  if unknown:
    where = " in transformer_seq" if cached else ""
    hint = did_you_mean(sorted(unknown), set(used) | set(options))
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}{hint}: neither a config "
                     f"key ({sorted(used)}) nor an option of attention {name!r}{where} "
                     f"({sorted(options)})")
  options.update(extra)
  return {k: overridable(v) for k, v in options.items()}


def overridable(value: Any, kind: type = object) -> Any:
  """None as a field that `--config.x=VALUE` can still set (ml_collections cannot
  override a plain None); other values as they are."""
  return placeholder(kind) if value is None else value


def add_init_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields that start a run from pretrained weights when its workdir has no
  checkpoint of its own (a resume always wins):

  * `init_from`: a registry name (`python -m zoo.checkpoints list`), a checkpoint file
    (`.npz[:subtree]`, `.safetensors`, `.pt`) or a zoo workdir; None: from scratch.
  * `init_dont_load`: regexes of parameters to keep at initialisation (and checkpoint
    entries to drop), comma-separated, e.g. `head/.*` for another class count.
  * `init_strict`: refuse a checkpoint with missing, unused or mis-shaped parameters
    (False: keep or drop them and list them), see `zoo.checkpoints.load`.
  * `init_allow_unpinned`: download a registry entry whose publisher states no sha256.
  * `init_vocabulary`: for the adaptive-span authors' checkpoints, their train.txt, whose
    first-appearance token order maps their ids onto the zoo's byte ids.
  """
  config.init_from = placeholder(str)
  config.init_dont_load = ""
  config.init_strict = True
  config.init_allow_unpinned = False
  config.init_vocabulary = placeholder(str)
  return config

