"""`python -m zoo.attention`: the registered attention names with their options, defaults
and support, and the configs in configs/ with the keys of their argument strings.

Everything is read from the registry (`names()`, `get(name).option_defaults()`,
`strategies(name)`) and from each config file's `_ARGS` dict and docstring, so the list
cannot go stale.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

from zoo import cli
from zoo.attention import registry

_WIDTH = 92


def _wrap(prefix: str, items: list[str], indent: str = "    ") -> list[str]:
  """`prefix` then the items, comma-separated, wrapped at _WIDTH."""
  lines, line = [], prefix
  for i, item in enumerate(items):
    piece = item + ("," if i < len(items) - 1 else "")
    if len(line) + 1 + len(piece) > _WIDTH and line.strip():
      lines.append(line)
      line = indent + piece
    else:
      line += ("" if line.endswith(" ") or not line else " ") + piece
  return lines + [line]


def _options(family: registry.Family, cached: bool) -> list[str]:
  options_class = family.options_class_for(cached)
  compute_only = options_class.compute_only_names()
  out = []
  for name, default in family.option_defaults(cached=cached).items():
    mark = " (fixed)" if name in family.preset else "*" if name in compute_only else ""
    out.append(f"{name}={default!r}{mark}")
  return out


def describe_attention(name: str) -> list[str]:
  """The lines for one registered name."""
  family = registry.get(name)
  forms = [form for form, ok in (("causal", family.supports_causal),
                                 ("non-causal", family.supports_noncausal)) if ok]
  lines = textwrap.wrap(f"{name}: {family.description}", _WIDTH, subsequent_indent="    ")
  lines += [f"  forms: {', '.join(forms)}; sequence parallel: "
           f"{', '.join(registry.strategies(name)) or 'none'}"]
  lines += _wrap("  options:", _options(family, cached=False))
  if family.cached_layer is not None and family.cached_layer is not family.layer:
    lines += _wrap("  over a segment cache (model transformer_seq): sequence parallel "
                   f"{', '.join(registry.strategies(name, cached=True))}; options:",
                   _options(family, cached=True))
  return lines


def config_files() -> list[str]:
  """configs/*.py and configs/tests/*.py, relative to the repository."""
  out = []
  for folder in ("configs", os.path.join("configs", "tests")):
    path = os.path.join(cli.REPO_ROOT, folder)
    out += sorted(os.path.join(folder, f) for f in os.listdir(path)
                  if f.endswith(".py") and not f.startswith("_"))
  return out


def describe_config(path: str) -> list[str]:
  """The lines for one config file: its docstring's first line and its argument keys."""
  module = importlib.import_module(os.path.splitext(path)[0].replace(os.sep, "."))
  summary = (module.__doc__ or "").strip().split("\n\n")[0]
  lines = textwrap.wrap(f"{path}: {' '.join(summary.split())}", _WIDTH,
                        subsequent_indent="    ")
  args = getattr(module, "_ARGS", None)
  if args:
    lines += _wrap("  args:", [f"{k}={v!r}" for k, v in args.items()])
  return lines


def main() -> None:
  if cli.REPO_ROOT not in sys.path:
    sys.path.insert(0, cli.REPO_ROOT)  # the configs import each other as `configs.x`
  print(textwrap.fill(
      "Attention names: `attention=NAME` in a config's argument string; options as "
      "NAME=VALUE there too, or --config.model.attention_options.NAME=VALUE. * = compute "
      "only (how, not what, is computed); (fixed) = set by the name.", _WIDTH) + "\n")
  for name in registry.names():
    print("\n".join(describe_attention(name)))
  print("\n" + textwrap.fill(
      "Configs: python train.py --config FILE[:ARGS], ARGS = key=value,... of the keys "
      "below (defaults shown) and the chosen attention's options.", _WIDTH) + "\n")
  for path in config_files():
    print("\n".join(describe_config(path)))


if __name__ == "__main__":
  main()
