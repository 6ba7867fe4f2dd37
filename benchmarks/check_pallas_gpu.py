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

With `--allow-cpu` it runs the same checks in the Pallas interpreter (slow; shapes cut down).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zoo.attention.pointwise import pointwise_attention  # noqa: E402

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


def _inputs(shape, dtype, seed):
  b, lq, lk, h, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, lq, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, lk, h, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, lk, h, d), jnp.float32)
  g = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, g))


def _value_and_grads(implementation, q, k, v, g, options):
  def run(q, k, v, g):
    out, vjp = jax.vjp(lambda q, k, v: pointwise_attention(
        q, k, v, implementation=implementation, **options), q, k, v)
    return (out,) + vjp(g.astype(out.dtype))
  return jax.block_until_ready(jax.jit(run)(q, k, v, g))


def check(name, dtype, precision, shape, options, tol, implementation, seed):
  if implementation == "pallas_interpret":
    shape = tuple(c if c is not None else s for c, s in zip(CPU_SHAPE, shape))
  q, k, v, g = _inputs(shape, dtype, seed)
  options = dict(options)
  if options.get("mask") == "padding":
    valid = jnp.arange(shape[2])[None, :] < jnp.array([shape[2], shape[2] * 2 // 3])[:shape[0], None]
    options["mask"] = valid[:, None, None, :]
  t0 = time.perf_counter()
  with jax.default_matmul_precision(precision or "default"):
    got = _value_and_grads(implementation, q, k, v, g, options)
  seconds = time.perf_counter() - t0
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(None, *(x.astype(jnp.float32) for x in (q, k, v, g)), options)
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


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--allow-cpu", action="store_true",
                      help="off the GPU, run the checks in the Pallas interpreter")
  args = parser.parse_args()
  dev = jax.devices()[0]
  print(f"# jax {jax.__version__}  backend {dev.platform}  {dev.device_kind}", flush=True)
  if dev.platform not in ("gpu", "cuda", "rocm") and not args.allow_cpu:
    print("FAIL  no GPU here (use --allow-cpu for the interpreter)")
    return 1
  implementation = "pallas" if dev.platform != "cpu" else "pallas_interpret"
  failures = 0
  for seed, case in enumerate(CASES):
    try:
      failures += not check(*case, implementation=implementation, seed=seed)
    except Exception:  # pylint: disable=broad-except
      failures += 1
      print(f"FAIL  {case[0]}: raised", flush=True)
      traceback.print_exc()
  print(f"# {'PASS' if not failures else 'FAIL'}: {len(CASES) - failures}/{len(CASES)} "
        f"checks passed", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
