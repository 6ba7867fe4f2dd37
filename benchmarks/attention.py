"""Forward+backward speed and memory of attention functional cores.

    python benchmarks/attention.py --lengths 512 1024 2048 4096 8192 \
        --kinds softmax relu_dense relu_blockwise --out results/attention.json

For each kind and length this jits `value_and_grad` of `sum(attn(q, k, v) * g)` with
respect to q, k, v (the forward output is returned too, so no kind can drop its forward
pass), measures the compile time, the median wall time over `--repeats` runs
(`block_until_ready`), the compiled temporary memory (`memory_analysis()`), and achieved
GFLOP/s; also the process CPU time per step and GFLOP per CPU-second against the
matmul's ("%mm cpu": on a shared machine CPU time is less disturbed by other load than
wall time). In the same run a plain `[N, N] x [N, N]` matmul (`--matmul-size`) gives the
machine's reference GFLOP/s: once at the start, once at the end, and (unless
`--no-nearby-matmul`) right before and after every measurement, so that "% matmul" compares
against the machine as it was at that moment (other load on a shared machine changes both).

FLOP convention (also written to the JSON): forward = 4*B*H*Lq*Lk*D (the two matmuls
q.k^T and w.v, 2 flops per multiply-add), backward = 2x forward (dV, dW, dQ, dK), so a
forward+backward step counts 12*B*H*Lq*Lk*D. Causal runs count the same (full square), and
recomputation inside a memory-efficient backward is not counted: it is overhead.

`--torch` also times PyTorch's fused `scaled_dot_product_attention` (forward+backward,
same shapes, dtype and FLOP count, `torch.get_num_threads()` threads) in the same run, as
kind `torch_sdpa`, when PyTorch is installed (`pip install torch`; it is not a dependency
of the zoo); the summary then compares every kind with it too.

Families add kinds from `benchmarks/kinds_<family>.py` files, loaded at start: each defines
`KINDS` (name -> function(args) returning `attn(q, k, v) -> out` on `[batch, length,
heads, head_dim]` arrays; the function may build parameters), and optionally `FLOPS`
(name -> function(args, length) -> FLOPs of one fwd+bwd step, for kinds that are not
quadratic), `QUADRATIC` (kinds skipped when score matrices would not fit) and
`DEFAULT_KINDS` (added to the default `--kinds` list). The summary reports, per kind, the
slope of log(time) against log(length) (1 = linear, 2 = quadratic) and of temporary memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zoo.attention.pointwise import pointwise_attention  # noqa: E402
from zoo.attention.softmax import softmax_attention  # noqa: E402


def _softmax(args):
  return lambda q, k, v: softmax_attention(q, k, v, causal=args.causal)


def _softmax_cudnn(args):
  """cuDNN's fused flash attention (NVIDIA GPUs; float16/bfloat16 inputs only)."""
  return lambda q, k, v: softmax_attention(q, k, v, causal=args.causal,
                                           implementation="cudnn")


def _relu_dense(args):
  return lambda q, k, v: pointwise_attention(q, k, v, activation="relu", alpha=1.0,
                                             causal=args.causal)


def _relu_blockwise(args):
  return lambda q, k, v: pointwise_attention(q, k, v, activation="relu", alpha=1.0,
                                             causal=args.causal,
                                             block_size=args.block_size,
                                             query_block_size=args.query_block_size)


KINDS = {
    "softmax": _softmax,
    "softmax_cudnn": _softmax_cudnn,
    "relu_dense": _relu_dense,
    "relu_blockwise": _relu_blockwise,
}

# Kinds whose memory grows with Lq * Lk: skipped up front when the score matrices alone
# (a few [B, H, Lq, Lk] float32 arrays) would not fit. Others are checked after compiling.
QUADRATIC = {"softmax", "relu_dense"}
# Kinds whose FLOPs are not the quadratic formula: name -> f(args, length).
FLOPS = {}
DEFAULT_KINDS = ["softmax", "relu_dense", "relu_blockwise"]


def _load_family_kinds():
  for path in sorted(pathlib.Path(__file__).parent.glob("kinds_*.py")):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    KINDS.update(module.KINDS)
    FLOPS.update(getattr(module, "FLOPS", {}))
    QUADRATIC.update(getattr(module, "QUADRATIC", ()))
    DEFAULT_KINDS.extend(getattr(module, "DEFAULT_KINDS", ()))


_load_family_kinds()
SCORE_COPIES = 4  # score-sized temporaries a dense fwd+bwd keeps, roughly (measured: 3-5)


def total_memory_bytes() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return 24 << 30


def process_cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn, *xs, repeats):
  """Median wall seconds, all wall times, and median process CPU seconds per call."""
  jax.block_until_ready(fn(*xs))  # warm-up
  times, cpu = [], []
  for _ in range(repeats):
    c0, t0 = process_cpu_seconds(), time.perf_counter()
    jax.block_until_ready(fn(*xs))
    times.append(time.perf_counter() - t0)
    cpu.append(process_cpu_seconds() - c0)
  return statistics.median(times), times, statistics.median(cpu)


def matmul_reference(n: int, dtype, repeats: int) -> dict:
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  fn = jax.jit(jnp.matmul)
  t, _, cpu = timed(fn, a, b, repeats=repeats)
  return {"shape": [n, n, n], "seconds": t, "gflops": 2 * n**3 / t / 1e9, "cpu_seconds": cpu}


def bench_one(kind, attn, args, length, dtype, mem_limit, reference=None) -> dict:
  b, h, d = args.batch, args.heads, args.head_dim
  row = {"kind": kind, "length": length}
  row["flops"] = (FLOPS[kind](args, length) if kind in FLOPS
                 else 3 * 4 * b * h * length * length * d)
  if kind in QUADRATIC:
    need = SCORE_COPIES * b * h * length * length * 4
    if need > mem_limit:
      row["skipped"] = (f"needs about {need / 2**30:.1f} GiB ({SCORE_COPIES} score-sized "
                        f"float32 arrays) > limit {mem_limit / 2**30:.1f} GiB")
      return row
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(kk, (b, length, h, d), dtype) for kk in keys)

  def loss(q, k, v, g):
    out = attn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  t0 = time.perf_counter()
  compiled = step.lower(q, k, v, g).compile()
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    row["temp_bytes"] = int(mem.temp_size_in_bytes)
    row["argument_bytes"] = int(mem.argument_size_in_bytes)
    row["output_bytes"] = int(mem.output_size_in_bytes)
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    if total > mem_limit:
      row["skipped"] = (f"compiled program needs {total / 2**30:.1f} GiB > limit "
                        f"{mem_limit / 2**30:.1f} GiB")
      return row
  before = reference() if reference else None
  t, times, cpu = timed(compiled, q, k, v, g, repeats=args.repeats)
  if reference:
    after = reference()
    row["matmul_gflops_nearby"] = statistics.mean([before["gflops"], after["gflops"]])
    row["matmul_cpu_gflops_nearby"] = statistics.mean(
        [2 * args.matmul_size**3 / m["cpu_seconds"] / 1e9 for m in (before, after)])
  row["seconds"] = t
  row["all_seconds"] = times
  row["cpu_seconds"] = cpu
  row["gflops"] = row["flops"] / t / 1e9
  row["cpu_gflops"] = row["flops"] / cpu / 1e9  # per CPU-second
  return row


def bench_torch_sdpa(args, length) -> dict:
  """PyTorch's fused SDPA, forward+backward, timed like `bench_one` (no memory analysis)."""
  import torch  # pylint: disable=import-outside-toplevel
  b, h, d = args.batch, args.heads, args.head_dim
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  # On the GPU when JAX runs on one (and PyTorch sees it), else on the CPU.
  device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
  gen = torch.Generator().manual_seed(0)
  q, k, v, g = (torch.randn(b, h, length, d, generator=gen, dtype=dtype).to(device)
                for _ in range(4))
  causal = args.causal

  def step():
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
    (out.float() * g.float()).sum().backward()
    if device == "cuda":
      torch.cuda.synchronize()
    return qq.grad, kk.grad, vv.grad

  step()  # warm-up
  times, cpu = [], []
  for _ in range(args.repeats):
    c0, t0 = process_cpu_seconds(), time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    cpu.append(process_cpu_seconds() - c0)
  row = {"kind": "torch_sdpa", "length": length, "flops": 3 * 4 * b * h * length**2 * d,
         "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
         "torch_device": device,
         "seconds": statistics.median(times), "all_seconds": times,
         "cpu_seconds": statistics.median(cpu), "compile_s": 0.0}
  row["gflops"] = row["flops"] / row["seconds"] / 1e9
  row["cpu_gflops"] = row["flops"] / row["cpu_seconds"] / 1e9
  return row


def compare(rows, baseline):
  """Speed and temporary memory of every kind relative to `baseline`, per length."""
  by = {(r["kind"], r["length"]): r for r in rows if "seconds" in r}
  out = []
  for (kind, length), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    base = by.get((baseline, length))
    if kind == baseline or base is None:
      continue
    out.append({"kind": kind, "baseline": baseline, "length": length,
                "speedup": base["seconds"] / r["seconds"],
                "cpu_time_ratio": base["cpu_seconds"] / r["cpu_seconds"],
                "temp_ratio": (r["temp_bytes"] / base["temp_bytes"]
                               if r.get("temp_bytes") and base.get("temp_bytes") else None)})
  return out


def ratio_words(ratio: float, better: str, worse: str) -> str:
  """A baseline / kind ratio in words: 1.06 -> '1.06x faster', 0.94 -> '1.06x slower'."""
  if ratio >= 1:
    return f"{ratio:.2f}x {better}"
  return f"{1 / ratio:.2f}x {worse}"


def memory_growth(rows):
  """Per kind, the ratio of temporary memory between consecutive lengths."""
  growth = {}
  for kind in dict.fromkeys(r["kind"] for r in rows):
    pts = sorted((r["length"], r["temp_bytes"]) for r in rows
                 if r["kind"] == kind and r.get("temp_bytes"))
    growth[kind] = [b2 / b1 for (_, b1), (_, b2) in zip(pts, pts[1:])]
  return growth


def log_log_slopes(rows, key):
  """Per kind, the least-squares slope of log(row[key]) against log(length)."""
  slopes = {}
  for kind in dict.fromkeys(r["kind"] for r in rows):
    pts = [(math.log(r["length"]), math.log(r[key])) for r in rows
           if r["kind"] == kind and r.get(key)]
    if len(pts) < 2:
      continue
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    slopes[kind] = (sum((x - mx) * (y - my) for x, y in pts)
                    / sum((x - mx) ** 2 for x, _ in pts))
  return slopes


def fmt_bytes(n):
  return "-" if n is None else f"{n / 2**20:9.1f}"


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _reexec_with_huge_pages(args):
  """Restarts this process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux, glibc).

  glibc serves every allocation over 32 MiB (its largest mmap threshold) with a fresh
  mmap, so each step of a kind with buffers that large touches new 4 KiB pages: one page
  fault each, which on the 2-core test machine made an elementwise op over a 128 MiB
  buffer 10x slower per element than over 16 MiB (2.05 against 0.2-0.4 ns, with 32,769
  minor faults per call). Transparent huge pages for those mappings (the tunable; the
  kernel must allow `madvise` in /sys/kernel/mm/transparent_hugepage/enabled) cut that to
  0.66 ns and 576 faults. Every kind, softmax included, runs under the same setting; it is
  recorded in the JSON. `--no-huge-pages` keeps the default.
  """
  if args.no_huge_pages or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                 help="sequence lengths to time (queries = keys)")
  p.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=sorted(KINDS),
                 metavar="KIND",
                 help=f"attention cores to time, of: {', '.join(sorted(KINDS))}")
  p.add_argument("--batch", type=int, default=1, help="batch size B")
  p.add_argument("--heads", type=int, default=8, help="attention heads H")
  p.add_argument("--head-dim", type=int, default=64, help="per-head dimension D")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="dtype of q, k, v")
  p.add_argument("--block-size", type=int, default=256,
                 help="relu_blockwise key tile")
  p.add_argument("--query-block-size", type=int, default=None,
                 help="relu_blockwise query tile (None: automatic, large enough for "
                      "XLA:CPU to run each tile GEMM on all cores)")
  p.add_argument("--causal", action="store_true", help="causal masking")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs per measurement (the median is reported)")
  p.add_argument("--matmul-size", type=int, default=4096,
                 help="N of the [N, N] x [N, N] reference matmul")
  p.add_argument("--no-nearby-matmul", action="store_true",
                 help="compare with the start-of-run matmul only")
  p.add_argument("--memory-limit-gib", type=float, default=None,
                 help="skip runs needing more (None: physical memory)")
  p.add_argument("--torch", action="store_true",
                 help="also time PyTorch's fused scaled_dot_product_attention (kind "
                      "torch_sdpa) in the same run; needs `pip install torch`")
  p.add_argument("--no-huge-pages", action="store_true",
                 help="keep glibc's default allocation of large buffers (otherwise the "
                      "script reruns itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: "
                      "transparent huge pages, far fewer page faults on large buffers)")
  p.add_argument("--out", default="results/attention.json",
                 help="JSON file for the results (machine, config, rows, slopes)")
  args = p.parse_args(argv)
  if argv is None:  # a command line run; callers passing argv keep their process
    _reexec_with_huge_pages(args)

  dtype = jnp.dtype(args.dtype)
  mem_limit = (int(args.memory_limit_gib * 2**30) if args.memory_limit_gib
               else total_memory_bytes())
  dev = jax.devices()[0]
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(), "processor": platform.processor(),
      "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
      "backend": dev.platform, "device_kind": dev.device_kind,
      "memory_limit_bytes": mem_limit,
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }
  config = {k: v for k, v in vars(args).items() if k != "out"}
  flop_convention = ("forward 4*B*H*Lq*Lk*D (two matmuls, 2 flops per multiply-add), "
                     "backward 2x forward; one fwd+bwd step = 12*B*H*Lq*Lk*D; causal "
                     "counted as full; backward recomputation not counted")
  print(f"# {info['date']}  jax {jax.__version__}  {dev.device_kind}  "
        f"{info['cpu_count']} cpus  B={args.batch} H={args.heads} D={args.head_dim} "
        f"{args.dtype} causal={args.causal} block_size={args.block_size} "
        f"query_block_size={args.query_block_size or 'auto'}  "
        f"GLIBC_TUNABLES={info['glibc_tunables'] or '(unset)'}", flush=True)
  mm = matmul_reference(args.matmul_size, dtype, args.repeats)
  print(f"# matmul {args.matmul_size}^3: {mm['seconds'] * 1e3:.1f} ms, "
        f"{mm['gflops']:.1f} GFLOP/s", flush=True)

  mm_cpu_gflops = 2 * args.matmul_size**3 / mm["cpu_seconds"] / 1e9
  reference = None
  if not args.no_nearby_matmul:
    reference = lambda: matmul_reference(args.matmul_size, dtype, max(2, args.repeats // 2))  # noqa: E731
  rows = []
  header = (f"{'kind':>16} {'length':>6} {'compile s':>9} {'fwd+bwd ms':>10} "
            f"{'cpu ms':>9} {'GFLOP/s':>8} {'matmul':>7} {'% matmul':>8} {'%mm cpu':>8} "
            f"{'temp MiB':>9}")
  print(header)
  kinds = list(args.kinds) + (["torch_sdpa"] if args.torch else [])
  for length in args.lengths:
    for kind in kinds:
      if kind == "torch_sdpa":
        row = bench_torch_sdpa(args, length)
      else:
        row = bench_one(kind, KINDS[kind](args), args, length, dtype, mem_limit, reference)
      if "gflops" in row:
        ref = row.get("matmul_gflops_nearby", mm["gflops"])
        row["fraction_of_matmul"] = row["gflops"] / ref
        ref_cpu = row.get("matmul_cpu_gflops_nearby", mm_cpu_gflops)
        row["fraction_of_matmul_cpu"] = row["cpu_gflops"] / ref_cpu
        print(f"{kind:>16} {length:>6} {row['compile_s']:9.2f} {row['seconds'] * 1e3:10.1f} "
              f"{row['cpu_seconds'] * 1e3:9.1f} {row['gflops']:8.1f} {ref:7.1f} "
              f"{100 * row['fraction_of_matmul']:7.1f}% "
              f"{100 * row['fraction_of_matmul_cpu']:7.1f}% "
              f"{fmt_bytes(row.get('temp_bytes'))}", flush=True)
      else:
        print(f"{kind:>16} {length:>6}  skipped: {row['skipped']}", flush=True)
      rows.append(row)
  # A second matmul measurement after the runs, to show drift (other load on the machine).
  mm_after = matmul_reference(args.matmul_size, dtype, args.repeats)
  print(f"# matmul again: {mm_after['gflops']:.1f} GFLOP/s", flush=True)
  comparisons = compare(rows, baseline="softmax")
  if args.torch:
    comparisons += compare(rows, baseline="torch_sdpa")
  for c in comparisons:
    memory = ("" if c["temp_ratio"] is None
              else f", {c['temp_ratio']:.3f}x the temporary memory")
    print(f"# {c['kind']} vs {c['baseline']} at {c['length']}: "
          f"{ratio_words(c['speedup'], 'faster', 'slower')} (wall), "
          f"{ratio_words(c['cpu_time_ratio'], 'less', 'more')} CPU time{memory}")
  for kind, growth in memory_growth(rows).items():
    if not growth:
      continue
    print(f"# {kind} temporary memory per doubling of length: "
          + ", ".join(f"{g:.2f}x" for g in growth))

  time_slopes = log_log_slopes(rows, "seconds")
  memory_slopes = log_log_slopes(rows, "temp_bytes")
  for kind, slope in time_slopes.items():
    print(f"# {kind}: slope of log time against log length {slope:.2f}, of log temporary "
          f"memory {memory_slopes.get(kind, float('nan')):.2f}")

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": info, "config": config,
                             "flop_convention": flop_convention, "matmul": mm,
                             "matmul_after": mm_after, "results": rows,
                             "comparisons": comparisons,
                             "temp_memory_growth": memory_growth(rows),
                             "time_slope": time_slopes, "temp_memory_slope": memory_slopes},
                            indent=1))
  print(f"# wrote {out}")


if __name__ == "__main__":
  main()
