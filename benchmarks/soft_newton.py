"""How fast SOFT's Newton-Schulz inverse converges: residual against iteration count.

    python benchmarks/soft_newton.py --max-iters 30 --out results/soft_newton.json

For the three Gaussian Gram matrices of the fixture `soft_newton_inverse.npz` (landmarks
p ~ N(0, s^2 I) in 32 dims, s = 0.5, 0.25, 0.1; condition numbers ~1, ~20, ~2e3; each a
[2, 2, 49, 49] batch of 4 matrices), with the authors' ridge 0.01 and with ridge 0, this
prints the Moore-Penrose residual

    r_N = |A V_N A - A|_F / |A|_F

after N = 1..max_iters iterations (max and median over the 4 matrices of a batch), in
float64. V_0 comes from the zoo's `newton_inverse(A, num_iters=0, ridge=...)` (alpha P);
the steps V <- 2V - V P V are applied here so one pass gives every N (re-running the zoo
for each N would compile one loop per N), and the iterates are checked against the zoo's
`newton_inverse(A, num_iters=N)` at N = 5, 10, 20 and `max_iters`.

With ridge > 0 the iteration converges to (A + ridge I)^{-1}, not A^+, so r_N stops at the
floor |A (A + ridge I)^{-1} A - A|_F / |A|_F (the `limit` column), which grows with the
condition number; with ridge 0 it tends to 0 (to rounding) once N is large enough.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zoo.attention.soft import newton_inverse  # noqa: E402

FIXTURE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
           / "soft_newton_inverse.npz")


def residual(a: np.ndarray, v: np.ndarray) -> np.ndarray:
  """|A V A - A|_F / |A|_F per matrix of `[..., m, m]`."""
  r = a @ v @ a - a
  return np.linalg.norm(r, axis=(-2, -1)) / np.linalg.norm(a, axis=(-2, -1))


def run(a: np.ndarray, ridge: float, max_iters: int) -> dict:
  m = a.shape[-1]
  p = a + ridge * np.eye(m)
  v = np.asarray(newton_inverse(jax.numpy.asarray(a), num_iters=0, ridge=ridge))
  per_iter, check = [], {}
  for n in range(1, max_iters + 1):
    v = 2 * v - v @ p @ v
    per_iter.append(residual(a, v))
    if n in (5, 10, 20, max_iters):
      zoo = np.asarray(newton_inverse(jax.numpy.asarray(a), num_iters=n, ridge=ridge))
      check[n] = float(np.max(np.abs(zoo - v)) / np.max(np.abs(zoo)))
  per_iter = np.stack(per_iter)  # [N, batch, heads]
  limit = residual(a, np.linalg.inv(p)) if ridge else np.zeros(a.shape[:-2])
  return {
      "ridge": ridge,
      "residual_max": per_iter.reshape(max_iters, -1).max(axis=1).tolist(),
      "residual_median": np.median(per_iter.reshape(max_iters, -1), axis=1).tolist(),
      "limit_max": float(np.max(limit)),
      "zoo_vs_here_rel": {str(k): val for k, val in check.items()},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-iters", type=int, default=30)
  parser.add_argument("--ridges", type=float, nargs="+", default=[0.01, 0.0])
  parser.add_argument("--out", default="results/soft_newton.json")
  args = parser.parse_args(argv)
  if not FIXTURE.exists():
    sys.exit(f"fixture {FIXTURE} not found")
  data = np.load(FIXTURE)
  results = []
  for i in range(3):
    a = np.asarray(data[f"A_{i}"], np.float64)
    entry = {"matrix": f"A_{i}", "scale": float(data[f"scale_{i}"]),
             "condition_number_max": float(np.max(np.linalg.cond(a))),
             "runs": [run(a, r, args.max_iters) for r in args.ridges]}
    results.append(entry)
    for r in entry["runs"]:
      worst = max(r["zoo_vs_here_rel"].values())
      if worst > 1e-10:
        sys.exit(f"iterates here differ from the zoo's newton_inverse by {worst:.2e}")

  cols = [(e, r) for e in results for r in e["runs"]]
  header = "  N " + "".join(f" | s={e['scale']:<4} ridge={r['ridge']:<4}" for e, r in cols)
  print("max over 4 matrices of |A V_N A - A|_F / |A|_F (float64)")
  print("cond(A): " + ", ".join(f"s={e['scale']}: {e['condition_number_max']:.3g}"
                                for e in results))
  print(header)
  print("-" * len(header))
  for n in range(args.max_iters):
    print(f"{n + 1:3d} " + "".join(f" | {r['residual_max'][n]:>20.3e}" for _, r in cols))
  print("lim " + "".join(f" | {r['limit_max']:>20.3e}" for _, r in cols))

  out = {
      "benchmark": "soft_newton",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "jax": jax.__version__, "platform": platform.platform(),
      "backend": jax.default_backend(), "dtype": "float64",
      "residual": "|A V_N A - A|_F / |A|_F, V_N after N Newton steps from alpha (A + ridge I)",
      "iterations": list(range(1, args.max_iters + 1)),
      "matrices": results,
  }
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
