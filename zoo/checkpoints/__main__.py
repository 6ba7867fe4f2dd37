"""`python -m zoo.checkpoints list | fetch NAME | inspect SOURCE | convert SOURCE OUT`.

* `list`: the registry of public checkpoints (name, format, sha256 pin, what it is).
* `fetch NAME [--allow-unpinned]`: downloads an entry into the cache (`$ZOO_CACHE`,
  default ~/.cache/attention-zoo) with a progress bar, checks its sha256, prints the path.
* `inspect SOURCE [--all]`: a file, workdir or registry name: its format, sha256, array
  count, the zoo model config it describes (JSON) and its names and shapes.
* `convert SOURCE OUT.npz|OUT.safetensors`: loads SOURCE strictly into the zoo ViT it
  describes and exports it in big_vision (`.npz`) or timm (`.safetensors`) format.

Errors are one line `error: ...` on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from flax import nnx

from zoo import models
from zoo.checkpoints import catalog, exporting, loading
from zoo.checkpoints.files import CheckpointError


def _list(_args) -> None:
  rows = [(e.name, e.format, "sha256" if e.sha256 else
           f"prefix {e.sha256_prefix}" if e.sha256_prefix else "unpinned", e.description)
          for e in (catalog.get(n) for n in catalog.names())]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  for row in rows:
    print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])


def _fetch(args) -> None:
  path = catalog.fetch(args.name, allow_unpinned=args.allow_unpinned, progress=True)
  print(path)


def _inspect(args) -> None:
  src = loading.read(args.source, allow_unpinned=args.allow_unpinned)
  print(f"path: {src.path}\nformat: {src.format}\nsha256: {src.sha256}")
  arrays = {k: v for k, v in src.flat.items() if isinstance(v, np.ndarray)}
  print(f"arrays: {len(arrays)}, values: {sum(int(v.size) for v in arrays.values()):,}")
  try:
    print("zoo model config: " + json.dumps(exporting.describe(src)))
  except (CheckpointError, KeyError) as e:
    print(f"zoo model config: unknown ({e})")
  names = sorted(arrays)
  shown = names if args.all else names[:40]
  for name in shown:
    print(f"  {name} {tuple(arrays[name].shape)} {arrays[name].dtype}")
  if len(shown) < len(names):
    print(f"  ... {len(names) - len(shown)} more (--all)")


def _convert(args) -> None:
  if not args.out.endswith((".npz", ".safetensors")):
    raise CheckpointError(f"OUT must end in .npz (big_vision) or .safetensors (timm), got "
                          f"{args.out!r}")
  src = loading.read(args.source, allow_unpinned=args.allow_unpinned)
  config = exporting.describe(src)
  model = models.create(config, nnx.Rngs(0))
  report = loading.load(src, model, strict=True)
  digest = exporting.export(model, args.out,
                         format="big_vision" if args.out.endswith(".npz") else "timm")
  print(report.summary())
  print(f"wrote {args.out} (sha256 {digest})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zoo.checkpoints",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="the registry of public checkpoints").set_defaults(run=_list)
  p = sub.add_parser("fetch", help="download a registry entry into the cache")
  p.add_argument("name")
  p.set_defaults(run=_fetch)
  p = sub.add_parser("inspect", help="what a checkpoint holds")
  p.add_argument("source")
  p.add_argument("--all", action="store_true", help="list every array")
  p.set_defaults(run=_inspect)
  p = sub.add_parser("convert", help="to big_vision .npz or timm .safetensors")
  p.add_argument("source")
  p.add_argument("out")
  p.set_defaults(run=_convert)
  for name in ("fetch", "inspect", "convert"):
    sub.choices[name].add_argument(
        "--allow-unpinned", action="store_true",
        help="download a registry entry whose publisher states no sha256")
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except (CheckpointError, ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("error: interrupted (nothing partial is left in the cache)", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
