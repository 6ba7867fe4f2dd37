"""GPU self-check of the fused Pallas pointwise kernel against the dense XLA path.

    python benchmarks/check_pallas_gpu.py            # exits 1 if any check fails

For a few shapes (lengths that are not multiples of the tiles, causal and not, head_dim
32/64/128, a key-padding mask, alpha != 1) it compares the output and the gradients
(dq, dk, dv of sum(out * g)) of `pointwise_attention(..., implementation="pallas")` with
the dense path (`implementation=None`) evaluated in float32 at "highest" matmul precision
on the same inputs (bfloat16 inputs are upcast for the reference). The error printed is
max |kernel - reference| / max(max |reference|, tiny), per output:

* float32 under `jax.default_matmul_precision("highest")` (IEEE float32 dots in the
  kernel): tolerance 1e-4.
* float32 at the default precision (TF32 tensor-core dots, as the benchmark runs):
  tolerance 3e-2. TF32 keeps 10 mantissa bits, and unlike the bfloat16 cases (whose
  reference is computed from the already-rounded inputs) the rounding of q and k is
  counted here; it flips the sign of scores near 0, so dq and dk see changes of the ReLU
  mask. Measured on an H200: out 2.9e-4, dq 1.4e-2, dk 1.1e-2, dv 3.5e-4.
* bfloat16: tolerance 3e-2.

Every case runs with the launch parameters the tuning table gives its shape (printed);
then every entry of the table (`--table`, default: the one in use, `$ZOO_PALLAS_TUNING` or
`zoo/attention/pointwise/pallas_tuning.py`) is checked with exactly its parameters, in its
dtype and causal mode, head_dim as tuned, at min(length, 16384) - 24 tokens (not a
multiple of the tiles; the dense reference does not fit at 65,536), batch 1, 4 heads.

With `--allow-cpu` it runs the same checks in the Pallas interpreter (slow; shapes cut
down; `--skip-cases` leaves out the fixed cases, keeping the table's; `--no-highest` the
float32 "highest" ones, whose Triton compiles take 15-35 s each on an H200).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zoo.attention.pointwise import pallas, pointwise_attention  # noqa: E402
from zoo.attention.pointwise.core import length_scale  # noqa: E402

# jax >= 0.11 warns at every Triton-backend lowering that the backend is deprecated (it
# still works); only that message is silenced.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

# name, dtype, precision of the kernel, (B, Lq, Lk, H, D), options, tolerance
CASES = [
    ("f32 highest relu", "float32", "highest", (2, 1000, 1000, 4, 64), {}, 1e-4),
    ("f32 highest relu causal", "float32", "highest", (2, 1000, 1000, 4, 64),
     {"causal": True}, 1e-4),
    ("f32 highest gelu Lq!=Lk D=32", "float32", "highest", (1, 300, 520, 2, 32),
     {"activation": "gelu", "alpha": 0.5}, 1e-4),
    ("f32 tf32 relu causal", "float32", None, (2, 1000, 1000, 4, 64), {"causal": True}, 3e-2),
    ("bf16 relu causal D=128", "bfloat16", None, (2, 777, 777, 4, 128), {"causal": True},
     3e-2),
    ("bf16 relu causal D=64 L=4096", "bfloat16", None, (1, 4096, 4096, 8, 64),
     {"causal": True}, 3e-2),
    ("bf16 relu2 key-padding mask D=32", "bfloat16", None, (2, 512, 512, 4, 32),
     {"activation": "relu2", "mask": "padding"}, 3e-2),
]
CPU_SHAPE = (1, 40, 56, 2, None)  # interpret mode: keep D, shrink the rest
ENTRY_MAX_LENGTH = 16384  # table entries are checked at min(length, this) - 24 tokens
TOLERANCES = {"float32": 3e-2, "bfloat16": 3e-2, "float16": 3e-2}  # default precision


def _inputs(shape, dtype, seed):
  b, lq, lk, h, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, lq, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, lk, h, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, lk, h, d), jnp.float32)
  g = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, g))


def _attention(implementation, options, config):
  if config is None:
    return lambda q, k, v: pointwise_attention(q, k, v, implementation=implementation,
                                               **options)
  causal = options.get("causal", False)

  def attn(q, k, v):  # the kernel with exactly `config` (a table entry's parameters)
    ls = length_scale(None, q.shape[1], k.shape[1], causal=causal, kv_length=None, alpha=1.0)
    return pallas.pointwise_attention_pallas(
        q, k, v, ls, causal=causal, config=config,
        interpret=implementation == "pallas_interpret")
  return attn


def _value_and_grads(attn, q, k, v, g):
  def run(q, k, v, g):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out,) + vjp(g.astype(out.dtype))
  return jax.block_until_ready(jax.jit(run)(q, k, v, g))


def _launch_words(launch):
  cfg = " ".join(f"{n}={launch[n]['block_q']}x{launch[n]['block_k']}/w{launch[n]['num_warps']}"
                 f"/s{launch[n]['num_stages']}" for n in pallas.KERNELS)
  return f"{cfg} backward={launch['backward']}"


def check(name, dtype, precision, shape, options, tol, implementation, seed, config=None):
  if implementation == "pallas_interpret" and config is None:  # table cases come sized
    shape = tuple(c if c is not None else s for c, s in zip(CPU_SHAPE, shape))
  q, k, v, g = _inputs(shape, dtype, seed)
  options = dict(options)
  if options.get("mask") == "padding":
    valid = jnp.arange(shape[2])[None, :] < jnp.array([shape[2], shape[2] * 2 // 3])[:shape[0], None]
    options["mask"] = valid[:, None, None, :]
  launch = pallas.resolve_config(shape[1], shape[2], shape[4], dtype,
                                 options.get("causal", False), config=config)
  print(f"      {name}: {launch['source']}: {_launch_words(launch)}", flush=True)
  t0 = time.perf_counter()
  with jax.default_matmul_precision(precision or "default"):
    got = _value_and_grads(_attention(implementation, options, config), q, k, v, g)
  seconds = time.perf_counter() - t0
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(_attention(None, options, None),
                            *(x.astype(jnp.float32) for x in (q, k, v, g)))
  errors = {}
  finite = True
  for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    finite &= bool(np.all(np.isfinite(a)))
    errors[label] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
  ok = finite and max(errors.values()) <= tol
  print(f"{'PASS' if ok else 'FAIL'}  {name:34s} shape(B,Lq,Lk,H,D)={shape} "
        + " ".join(f"{k}={e:.2e}" for k, e in errors.items())
        + f"  tol={tol:.0e}{'' if finite else '  NON-FINITE'}  ({seconds:.1f} s incl. compile)",
        flush=True)
  return ok


def table_cases(table, cpu: bool):
  """One check case per entry of a tuning table: (name, dtype, precision, shape, options,
  tol, config)."""
  cases = []
  for e in table["entries"]:
    length = min(e["length"], ENTRY_MAX_LENGTH) - 24
    config = {k: e[k] for k in (*pallas.KERNELS, "backward")}
    name = (f"table {e['dtype']} L={e['length']} D={e['head_dim']}"
            f"{' causal' if e['causal'] else ''}")
    shape = (1, length, length, 4, e["head_dim"])
    if cpu:  # interpret mode: a length that spans 2.5 of the entry's largest tiles
      tile = max(max(config[n]["block_q"], config[n]["block_k"]) for n in pallas.KERNELS)
      shape = (1, min(length, 2 * tile + tile // 2 + 8), min(length, 2 * tile + tile // 2 + 8),
               2, e["head_dim"])
    cases.append((name, e["dtype"], None, shape, {"causal": e["causal"]},
                  TOLERANCES[e["dtype"]], config))
  return cases


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--allow-cpu", action="store_true",
                      help="off the GPU, run the checks in the Pallas interpreter")
  parser.add_argument("--table", default=None,
                      help="a tuning table JSON whose entries to check (default: the one "
                           "in use)")
  parser.add_argument("--skip-cases", action="store_true",
                      help="check only the table's entries, not the fixed cases")
  parser.add_argument("--no-highest", action="store_true",
                      help="skip the float32 cases at 'highest' precision (their IEEE "
                           "float32 Triton dots compile slowly: 15-35 s each on an H200)")
  args = parser.parse_args(argv)
  dev = jax.devices()[0]
  print(f"# jax {jax.__version__}  backend {dev.platform}  {dev.device_kind}", flush=True)
  if dev.platform not in ("gpu", "cuda", "rocm") and not args.allow_cpu:
    print("FAIL  no GPU here (use --allow-cpu for the interpreter)")
    return 1
  implementation = "pallas" if dev.platform != "cpu" else "pallas_interpret"
  if args.table:
    table = json.loads(pathlib.Path(args.table).read_text())
    pallas.check_table(table)
  else:
    table = pallas.tuning_table()
  print(f"# tuning table: {table.get('source')} (measured on {table.get('measured_on')}, "
        f"{len(table['entries'])} entries)", flush=True)
  cases = [] if args.skip_cases else [(*c, None) for c in CASES
                                       if not (args.no_highest and c[2] == "highest")]
  cases += table_cases(table, cpu=implementation == "pallas_interpret")
  failures = 0
  for seed, case in enumerate(cases):
    *fixed, config = case
    try:
      failures += not check(*fixed, implementation=implementation, seed=seed, config=config)
    except Exception:  # pylint: disable=broad-except
      failures += 1
      print(f"FAIL  {case[0]}: raised", flush=True)
      traceback.print_exc()
  print(f"# {'PASS' if not failures else 'FAIL'}: {len(cases) - failures}/{len(cases)} "
        f"checks passed", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
