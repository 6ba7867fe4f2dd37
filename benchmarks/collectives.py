"""Collectives and per-device memory of sequence-parallel attention, read from compiled HLO.

    python benchmarks/collectives.py                     # length 8192 on 8 simulated devices
    python benchmarks/collectives.py --length 4096 --out results/collectives.json

For every kind (softmax, relu) and strategy (gspmd, all_gather, ring) it compiles the
forward and the gradient (d/dq,k,v of sum(out * g)) on a (data 1, seq 8) mesh and counts
the collective operations in the optimised HLO (`all-reduce`, `all-gather`,
`reduce-scatter`, `collective-permute`, `all-to-all`) with the bytes each moves (the size
of its result). Counts are static: an op inside the ring's loop body is listed once, with
the loop's trip count noted. Causal ring runs take inputs already in zigzag order. It also reports the per-device temporary memory (XLA's
memory analysis) of the ring ReLU forward+backward at length 65536 on 2, 4 and 8 devices.
Nothing is timed: the devices are simulated on the CPU.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # pylint: disable=wrong-import-position
import collections
import datetime
import json
import platform
import re

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp

from zoo import attention, parallel  # pylint: disable=wrong-import-position

OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8}
_OP_RE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(OPS) + r")(-start)?\(")
_SHAPE_RE = re.compile(r"(f32|bf16|f16|s32|u32|pred|f64|s64)\[([0-9,]*)\]")


def collectives(hlo: str) -> dict:
  """{op: {"count": n, "bytes": b, "shapes": [...]}} from optimised HLO text."""
  found = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "shapes": []})
  for line in hlo.splitlines():
    m = _OP_RE.search(line)
    if not m or "-done" in line.split("=")[1][:40]:
      continue
    op = m.group(2)
    shapes = _SHAPE_RE.findall(m.group(1))
    size = sum(_BYTES[t] * (eval("*".join(d.split(",")) or "1") if d else 1) for t, d in shapes)
    found[op]["count"] += 1
    found[op]["bytes"] += size
    found[op]["shapes"].append(" ".join(f"{t}[{d}]" for t, d in shapes))
  return dict(found)


def loop_trip_counts(hlo: str) -> list[int]:
  return [int(x) for x in re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo)]


def analyse(kind, strategy, length, devices, *, causal, heads, head_dim, block_size):
  mesh = parallel.make_mesh({"data": 1, "seq": len(devices)}, devices=devices)
  shape = (1, length, heads, head_dim)
  spec = jax.sharding.NamedSharding(mesh, parallel.logical_to_spec(("batch", "seq", None, None)))
  args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=spec) for _ in range(4)]
  opts = {"block_size": block_size} if kind != "softmax" else {}
  if strategy == "ring" and causal:
    # Inputs already in the load-balanced zigzag order, as a model keeps them: the
    # natural-order permutation (an all-gather) is a one-off cost outside attention.
    opts["layout"] = "zigzag"

  def forward(q, k, v):
    return attention.sequence_parallel_attention(q, k, v, mesh=mesh, kind=kind,
                                                strategy=strategy, causal=causal, **opts)

  def grad(q, k, v, g):
    return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)

  out = {}
  for name, fn, a in (("forward", forward, args[:3]), ("gradient", grad, args)):
    compiled = jax.jit(fn).lower(*a).compile()
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    out[name] = {"collectives": collectives(hlo), "loop_trip_counts": loop_trip_counts(hlo),
                 "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None)}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--block-size", type=int, default=512)
  p.add_argument("--memory-length", type=int, default=65536)
  p.add_argument("--out", default="results/collectives.json")
  args = p.parse_args()
  devices = jax.devices()
  report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "jax": jax.__version__, "devices": f"{len(devices)} x {devices[0].device_kind}"},
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": vars(args), "collectives": {}, "ring_memory": {}}
  print(f"collectives at length {args.length} on {len(devices)} devices "
        f"(static op counts in the optimised HLO; bytes = size of each op's result)")
  print(f"{'kind':8} {'strategy':11} {'causal':6} {'pass':8} {'ops':>4}  detail")
  for kind in ("softmax", "relu"):
    for strategy in parallel.STRATEGIES:
      for causal in (False, True):
        r = analyse(kind, strategy, args.length, devices, causal=causal, heads=args.heads,
                    head_dim=args.head_dim, block_size=args.block_size)
        report["collectives"][f"{kind}/{strategy}/{'causal' if causal else 'full'}"] = r
        for name in ("forward", "gradient"):
          c = r[name]["collectives"]
          total = sum(v["count"] for v in c.values())
          detail = ", ".join(f"{op} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                             for op, v in sorted(c.items()))
          loops = r[name]["loop_trip_counts"]
          print(f"{kind:8} {strategy:11} {str(causal):6} {name:8} {total:>4}  {detail}"
                + (f"  [loops: {loops}]" if loops else ""))

  print(f"\nring ReLU forward+backward, per-device temporary memory at length "
        f"{args.memory_length} (block_size {args.block_size}):")
  for n in (2, 4, 8):
    r = analyse("relu", "ring", args.memory_length, devices[:n], causal=True, heads=args.heads,
                head_dim=args.head_dim, block_size=args.block_size)
    temp = r["gradient"]["temp_bytes_per_device"]
    report["ring_memory"][n] = temp
    print(f"  {n} devices: {temp / 2**20:9.1f} MiB per device")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
