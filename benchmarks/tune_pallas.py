"""Tunes the fused Pallas pointwise-attention kernel's tiles on this GPU and writes the table.

    python benchmarks/tune_pallas.py --budget-s 150 --out benchmarks/results/h200/pallas_tuning.json
    ZOO_PALLAS_TUNING=benchmarks/results/h200/pallas_tuning.json python benchmarks/attention.py ...
    python benchmarks/tune_pallas.py --install benchmarks/results/h200/pallas_tuning.json

For every shape bucket (each of `--lengths` x `--head-dims` x `--dtypes` x causal or not;
batch `--batch`, `--heads` heads, ReLU with alpha = 1) it searches the launch parameters
of the three kernels (`zoo/attention/pointwise/pallas.py`) greedily, one kernel at a time,
from a short list of candidates per kernel (the untuned default first, then the tilings
of the Triton flash-attention tutorial and their neighbours):

1. `fwd`: the forward kernel alone (jitted forward) is timed per candidate;
2. `dq`: forward + backward with the best forward and each dq candidate;
3. `dkdv`: the same with the best dq and each dk/dv candidate;
4. `atomic`: forward + backward with `backward="atomic"` (dq added by the dk/dv kernel
   with float32 atomics) and each dk/dv candidate; it is chosen only when it beats the
   best split backward by more than `ATOMIC_MIN_GAIN` (it makes dq nondeterministic).

Before it is timed, every candidate configuration is checked against the dense XLA path
(float32 at "highest" precision on the same inputs, as `check_pallas_gpu.py`): output
and the three gradients, at a length that is not a multiple of its tiles and spans at
least two tiles of each (2.5 x the largest tile + 8; the tiles' correctness does not
depend on the length), tolerance 1e-4 relative to the largest reference value for float32
(the kernel at "highest" precision) and 3e-2 for bfloat16 / float16. A candidate that
fails, or does not compile (a Triton resource limit, say), is recorded and skipped. Each
timing is the median of `--repeats` samples after a warm-up call, a sample averaging
enough back-to-back calls to last >= 5 ms.

`--budget-s` bounds the whole search: every bucket gets an equal share of the time left
(fwd 30%, dq 25%, dkdv 25%, atomic 20% of it, unused time passing on); candidates left
when a share runs out are not tried, and a bucket whose default was never timed gets no
entry. The JSON written after every bucket (`--out`) holds the GPU name, jax version,
date, settings, one entry per bucket (the chosen launch parameters with the timings of
the chosen and the default configuration, see `zoo/attention/pointwise/pallas_tuning.py`)
and every trial. `--install TABLE.json` (any machine) checks such a file and rewrites
`pallas_tuning.py`'s TABLE from it, so that the zoo uses it by default.

Off the GPU it refuses (exit 1). `--interpret --dry-run` runs the candidate generation and
the verification path in the Pallas interpreter on the CPU (no timing, no entries; keep
`--lengths` and `--max-candidates` small), as the tests do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import pprint
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zoo.attention.pointwise import pallas  # noqa: E402
from zoo.attention.pointwise.core import length_scale, pointwise_attention  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

TABLE_MODULE = ROOT / "zoo" / "attention" / "pointwise" / "pallas_tuning.py"
PHASES = ("fwd", "dq", "dkdv", "atomic")
PHASE_SHARE = {"fwd": 0.30, "dq": 0.25, "dkdv": 0.25, "atomic": 0.20}
ATOMIC_MIN_GAIN = 0.03  # atomic backward only when > 3% faster than the best split one
MIN_SAMPLE_S = 0.005
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}

# (block_q, block_k, num_warps, num_stages); num_warps None: the kernel's default for the
# head_dim. fwd and dq hold block_q queries and loop over block_k keys; dk/dv holds
# block_k keys and loops over block_q queries. The first of each list is the default.
CANDIDATES = {
    "fwd": [(128, 64, None, 2), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3),
            (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 2),
            (64, 128, 4, 2), (128, 128, 4, 3)],
    "dq": [(128, 64, None, 2), (128, 32, 4, 5), (128, 64, 4, 3), (128, 128, 8, 2),
           (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3)],
    "dkdv": [(64, 128, None, 2), (32, 128, 4, 5), (64, 128, 8, 3), (64, 64, 4, 3),
             (32, 64, 4, 3), (128, 128, 8, 2), (16, 128, 4, 4)],
}
CANDIDATES["atomic"] = CANDIDATES["dkdv"]


def _launch(spec, head_dim, length):
  bq, bk, warps, stages = spec
  cap = max(16, 1 << (max(length, 1) - 1).bit_length())
  return {"block_q": min(bq, cap), "block_k": min(bk, cap),
          "num_warps": warps or pallas.default_num_warps(pallas.padded_head_dim(head_dim)),
          "num_stages": stages}


def candidates(phase: str, length: int, head_dim: int) -> list[dict]:
  """The launch dicts tried for `phase` at this length (tiles capped to it, duplicates
  dropped), the default first."""
  out = []
  for spec in CANDIDATES[phase]:
    launch = _launch(spec, head_dim, length)
    if launch not in out:
      out.append(launch)
  return out


def default_config(length: int, head_dim: int) -> dict:
  """The untuned configuration (pallas.DEFAULT_CONFIG) with tiles capped to the length."""
  return {"fwd": _launch(CANDIDATES["fwd"][0], head_dim, length),
          "dq": _launch(CANDIDATES["dq"][0], head_dim, length),
          "dkdv": _launch(CANDIDATES["dkdv"][0], head_dim, length), "backward": "split"}


def _inputs(batch, length, heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(kk, (batch, length, heads, head_dim), jnp.float32).astype(dtype)
               for kk in keys)


def _attn(config, causal, interpret):
  def attn(q, k, v):
    ls = length_scale(None, q.shape[1], k.shape[1], causal=causal, kv_length=None, alpha=1.0)
    return pallas.pointwise_attention_pallas(q, k, v, ls, activation="relu", causal=causal,
                                             config=config, interpret=interpret)
  return attn


def _forward_backward(attn):
  def loss(q, k, v, g):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _value_and_grads(attn, q, k, v, g):
  def run(q, k, v, g):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out,) + vjp(g.astype(out.dtype))
  return jax.block_until_ready(jax.jit(run)(q, k, v, g))


def verify(config: dict, causal: bool, dtype: str, head_dim: int, interpret: bool,
           cache: dict) -> dict:
  """{"ok", "max_rel_error", "error", "length"}: the kernel with `config` against the dense
  path (float32, "highest") on inputs of a length no tile divides; cached per config."""
  tiles = config if not interpret else {  # warps and stages mean nothing to the interpreter
      n: ({"block_q": v["block_q"], "block_k": v["block_k"]} if n in pallas.KERNELS else v)
      for n, v in config.items()}
  key = json.dumps([tiles, causal, dtype, head_dim], sort_keys=True)
  if key in cache:
    return cache[key]
  used = ("fwd", "dkdv") if config["backward"] == "atomic" else pallas.KERNELS
  tile = max(max(config[n]["block_q"], config[n]["block_k"]) for n in used)
  length = 2 * tile + tile // 2 + 8
  q, k, v, g = _inputs(1, length, 2, head_dim, dtype, seed=1)
  result = {"length": length}
  try:
    with jax.default_matmul_precision("highest"):
      got = _value_and_grads(_attn(config, causal, interpret), q, k, v, g)
      want = _value_and_grads(
          lambda q, k, v: pointwise_attention(q, k, v, activation="relu", causal=causal),
          *(x.astype(jnp.float32) for x in (q, k, v, g)))
    errors = []
    for a, b in zip(got, want):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      errors.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                    if np.all(np.isfinite(a)) else math.inf)
    result["max_rel_error"] = max(errors)
    result["ok"] = result["max_rel_error"] <= TOLERANCE[dtype]
    result["error"] = None if result["ok"] else (
        f"differs from the dense path by {result['max_rel_error']:.2e} > {TOLERANCE[dtype]:.0e}")
  except Exception as e:  # pylint: disable=broad-except
    result.update(ok=False, max_rel_error=None, error=_one_line(e))
  cache[key] = result
  return result


def _one_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def time_call(fn, args, repeats: int) -> tuple[float, float]:
  """(compile seconds, median seconds per call) of jitted `fn` on `args`."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  once = time.perf_counter() - t0
  inner = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(once, 1e-7))))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = compiled(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return compile_s, statistics.median(samples)


class Bucket:
  """One shape bucket's search (see the module docstring)."""

  def __init__(self, length, head_dim, dtype, causal, args, verify_cache, log):
    self.length, self.head_dim, self.dtype, self.causal = length, head_dim, dtype, causal
    self.args, self.cache, self.log = args, verify_cache, log
    self.trials: list[dict] = []
    self.inputs = None

  def _key(self):
    return {"length": self.length, "head_dim": self.head_dim, "dtype": self.dtype,
            "causal": self.causal}

  def trial(self, phase, config, *, forward_only=False):
    """Verifies `config`, then (not in a dry run) times it; the trial's record."""
    record = {**self._key(), "phase": phase, "config": config}
    check = verify(config, self.causal, self.dtype, self.head_dim, self.args.interpret,
                   self.cache)
    record.update(ok=check["ok"], max_rel_error=check["max_rel_error"],
                  verify_length=check["length"], error=check["error"])
    if check["ok"] and not self.args.dry_run:
      try:
        if self.inputs is None:
          self.inputs = _inputs(self.args.batch, self.length, self.args.heads, self.head_dim,
                                self.dtype)
        q, k, v, g = self.inputs
        attn = _attn(config, self.causal, self.args.interpret)
        fn, fargs = (attn, (q, k, v)) if forward_only else (_forward_backward(attn), (q, k, v, g))
        record["compile_s"], seconds = time_call(fn, fargs, self.args.repeats)
        record["ms"] = seconds * 1e3
      except Exception as e:  # pylint: disable=broad-except
        record.update(ok=False, error=_one_line(e))
    self.trials.append(record)
    what = (f"{record['ms']:.3f} ms" if "ms" in record else
            "verified" if record["ok"] else f"FAILED: {record['error']}")
    self.log(f"  {phase:6s} {_short(config, phase)}  err {_fmt(record['max_rel_error'])}  {what}")
    return record

  def run(self, deadline: float) -> dict | None:
    """Searches until `deadline` (time.perf_counter()); the table entry, or None when the
    default was not timed (dry run, budget, failure)."""
    default = default_config(self.length, self.head_dim)
    best, atomic_best = dict(default), None  # the best split configuration so far
    best_ms, default_ms = {}, {}
    phases = [p for p in PHASES if not (p == "atomic" and self.args.no_atomic)]
    for n, phase in enumerate(phases):
      now = time.perf_counter()
      if now > deadline:
        break
      share = PHASE_SHARE[phase] / sum(PHASE_SHARE[p] for p in phases[n:])
      phase_deadline = now + (deadline - now) * share
      kernel = "dkdv" if phase == "atomic" else phase
      backward = "atomic" if phase == "atomic" else "split"
      if phase == "dq" and best["fwd"] != default["fwd"]:
        record = self.trial("base", default)  # the untuned baseline of the entry
        if "ms" in record:
          default_ms["fwd_bwd"] = record["ms"]
      for i, launch in enumerate(candidates(phase, self.length, self.head_dim)):
        if i >= self.args.max_candidates or (i and time.perf_counter() > phase_deadline):
          break
        config = {**best, kernel: launch, "backward": backward}
        record = self.trial(phase, config, forward_only=phase == "fwd")
        if "ms" not in record:
          continue
        if config == default:
          default_ms.setdefault("fwd" if phase == "fwd" else "fwd_bwd", record["ms"])
        if record["ms"] < best_ms.get(phase, math.inf):
          best_ms[phase] = record["ms"]
          if phase == "atomic":
            atomic_best = config
          else:
            best = config
    if self.args.dry_run or "fwd" not in default_ms or "fwd_bwd" not in default_ms:
      return None
    chosen, total = best, best_ms.get("dkdv", best_ms.get("dq", math.inf))
    if atomic_best is not None and best_ms["atomic"] * (1 + ATOMIC_MIN_GAIN) < total:
      chosen, total = atomic_best, best_ms["atomic"]
    if not math.isfinite(total):
      return None
    return {**self._key(), **{k: chosen[k] for k in (*pallas.KERNELS, "backward")},
            "ms": {"fwd": best_ms["fwd"], "fwd_default": default_ms["fwd"],
                   "fwd_bwd": total, "fwd_bwd_default": default_ms["fwd_bwd"],
                   "fwd_bwd_atomic": best_ms.get("atomic")},
            "timed_trials": sum(1 for t in self.trials if "ms" in t)}


def _short(config, phase):
  kernel = "dkdv" if phase in ("atomic", "base") else phase
  if phase == "base":
    return "all defaults".ljust(22)
  l = config[kernel]
  return f"{l['block_q']:>3}x{l['block_k']:<3} w{l['num_warps']} s{l['num_stages']}".ljust(22)


def _fmt(x):
  return "-" if x is None else f"{x:.1e}"


def _on_gpu() -> bool:
  return jax.devices()[0].platform in pallas.GPU_PLATFORMS


def install(path: pathlib.Path, module: pathlib.Path = TABLE_MODULE) -> int:
  """Rewrites `module`'s TABLE from a tuner JSON (measured on a GPU, not a dry run)."""
  table = json.loads(path.read_text())
  pallas.check_table(table)
  if not table.get("measured_on") or table.get("settings", {}).get("dry_run"):
    print(f"tune_pallas: {path} was not measured on a GPU (measured_on "
          f"{table.get('measured_on')!r}); not installed")
    return 1
  keep = {k: table[k] for k in ("format", "source", "measured_on", "jax_version", "date",
                                "settings") if k in table}
  keep["entries"] = table["entries"]
  text = module.read_text()
  head = text[:text.index("TABLE = {")]
  module.write_text(head + "TABLE = " + pprint.pformat(keep, indent=1, width=96,
                                                       sort_dicts=False) + "\n")
  print(f"tune_pallas: wrote {len(keep['entries'])} entries measured on "
        f"{keep['measured_on']} to {module}")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                 help="length buckets (queries = keys) to tune")
  p.add_argument("--head-dims", type=int, nargs="+", default=[64])
  p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=sorted(TOLERANCE))
  p.add_argument("--causal", default="both", choices=["both", "true", "false"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5, help="timed samples per candidate")
  p.add_argument("--budget-s", type=float, default=240.0,
                 help="wall-clock bound of the whole search")
  p.add_argument("--max-candidates", type=int, default=100,
                 help="at most this many candidates per kernel and bucket")
  p.add_argument("--no-atomic", action="store_true", help="do not try the atomic backward")
  p.add_argument("--out", default=None,
                 help="JSON to write (default: benchmarks/results/<gpu>/pallas_tuning.json)")
  p.add_argument("--interpret", action="store_true",
                 help="run the kernels in the Pallas interpreter (only with --dry-run)")
  p.add_argument("--dry-run", action="store_true",
                 help="generate and verify the candidates, time nothing, write no entries")
  p.add_argument("--install", metavar="TABLE_JSON", default=None,
                 help="rewrite zoo/attention/pointwise/pallas_tuning.py from a measured table")
  args = p.parse_args(argv)
  if args.install:
    return install(pathlib.Path(args.install))
  dev = jax.devices()[0]
  if args.interpret and not args.dry_run:
    p.error("--interpret times nothing that means anything: use it with --dry-run")
  if not args.interpret and not _on_gpu():
    print(f"tune_pallas: no GPU here (JAX's backend is {dev.platform!r}): tiles are tuned on "
          f"the GPU that runs them; --interpret --dry-run checks the candidates on the CPU")
    return 1
  gpu = dev.device_kind if _on_gpu() else None
  out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / _slug(dev.device_kind)
                     / "pallas_tuning.json")
  causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
  buckets = [(n, d, t, c) for d in args.head_dims for t in args.dtypes for c in causals
             for n in args.lengths]
  start = time.perf_counter()
  end = start + args.budget_s
  cache: dict = {}
  table = {
      "format": 1,
      "source": ("dry run of benchmarks/tune_pallas.py: candidates verified, nothing timed; "
                 "not a table to install") if args.dry_run else
                ("benchmarks/tune_pallas.py: greedy per-kernel search, each candidate "
                 "verified against the dense path before timing"),
      "measured_on": None if args.dry_run else gpu,
      "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "settings": {"batch": args.batch, "heads": args.heads, "repeats": args.repeats,
                   "budget_s": args.budget_s, "max_candidates": args.max_candidates,
                   "atomic": not args.no_atomic, "interpret": args.interpret,
                   "dry_run": args.dry_run, "device": dev.device_kind,
                   "atomic_min_gain": ATOMIC_MIN_GAIN},
      "entries": [], "trials": [],
  }
  print(f"# tune_pallas  jax {jax.__version__}  {dev.device_kind}  {len(buckets)} buckets  "
        f"budget {args.budget_s:.0f} s{'  DRY RUN (interpreter)' if args.interpret else ''}",
        flush=True)
  for n, (length, d, dtype, causal) in enumerate(buckets):
    now = time.perf_counter()
    deadline = now + max(0.0, end - now) / (len(buckets) - n)
    print(f"# bucket length={length} head_dim={d} {dtype} causal={causal} "
          f"({deadline - now:.0f} s)", flush=True)
    bucket = Bucket(length, d, dtype, causal, args, cache, lambda s: print(s, flush=True))
    entry = bucket.run(deadline)
    table["trials"].extend(bucket.trials)
    if entry is not None:
      table["entries"].append(entry)
      ms = entry["ms"]
      print(f"# chosen: backward={entry['backward']}  fwd {ms['fwd']:.3f} ms (default "
            f"{ms['fwd_default']:.3f})  fwd+bwd {ms['fwd_bwd']:.3f} ms (default "
            f"{ms['fwd_bwd_default']:.3f}, {ms['fwd_bwd_default'] / ms['fwd_bwd']:.2f}x)",
            flush=True)
    elif not args.dry_run:
      print("# no entry: the default configuration was not timed", flush=True)
    table["settings"]["elapsed_s"] = time.perf_counter() - start
    pallas.check_table(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
  failed = [t for t in table["trials"] if not t["ok"]]
  print(f"# {len(table['trials'])} trials, {len(failed)} failed or did not compile, "
        f"{len(table['entries'])} entries, {time.perf_counter() - start:.0f} s; wrote {out}",
        flush=True)
  return 0


def _slug(device_kind: str) -> str:
  """'NVIDIA H200' -> 'h200' (the results folder of a GPU)."""
  words = [w for w in device_kind.lower().replace("-", " ").split() if w != "nvidia"]
  return "_".join(words) or "device"


if __name__ == "__main__":
  sys.exit(main())
