"""Softmax-to-X conversion on the embedded digits: pretrain a softmax ViT, fine-tune it
with another attention through `init_from`, and compare with that attention trained from
scratch for the same total number of steps.

    python benchmarks/finetune_from_softmax.py --out benchmarks/results/cpu/finetune_from_softmax.json

Each run is a real `python train.py` (configs/vit_digits.py; width 64, depth 4, 4 heads,
patch 2, batch 128, AdamW with warmup and cosine decay, each run's schedule over its own
`total_steps`); the figure is the test accuracy on digits' 360 held-out images that the
run's final evaluation prints. Fine-tuning loads the softmax checkpoint non-strictly
(`init_strict=False`): what the target attention adds (qk-LayerNorm scales, AFT's
position biases) starts at its initialisation and is listed by the loader.
Options: `--pretrain-steps 1500 --finetune-steps 500 --variants relu relu_qkln aft_full
--root workdirs/finetune_demo --seeds 0 1 2` (each seed its own pretraining, fine-tuning and
scratch runs under ROOT/seed<N>/; the table shows the mean and each seed's figure).
Existing workdirs resume (or are already finished), and every figure is read back with
`eval.py --workdir`, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variant -> the config argument string (besides total_steps)
VARIANTS = {
    "relu": "attention=relu",
    "relu_qkln": "attention=relu,qk_layernorm=True",
    "aft_full": "attention=aft_full",
}


def _run(args: list[str]) -> str:
  print("$ " + " ".join(args), flush=True)
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    sys.exit(f"run failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
  return result.stdout


def _train(config_arg: str, steps: int, workdir: str, seed: int, extra=()) -> dict:
  start = time.time()
  out = _run(["train.py", "--config", f"configs/vit_digits.py:{config_arg},total_steps={steps}",
              "--workdir", workdir, f"--config.seed={seed}", *extra])
  wall = round(time.time() - start, 1)
  status = json.loads(out.strip().splitlines()[-1])["status"]
  init = [line for line in out.splitlines() if line.startswith("init_from:")]
  metrics = json.loads(_run(["eval.py", "--workdir", workdir]).strip().splitlines()[-1])
  return {"workdir": os.path.relpath(workdir, REPO), "steps": steps, "seed": seed,
          "accuracy": metrics["accuracy"], "loss": metrics["loss"],
          "train_wall_s": wall if status == "done" else None, "status": status,
          "init_from": init[0] if init else None}


def _study(args, seed: int, root: str) -> dict:
  total = args.pretrain_steps + args.finetune_steps
  runs = {"softmax": _train("attention=softmax", args.pretrain_steps,
                            os.path.join(root, "softmax"), seed)}
  for name in args.variants:
    runs[f"{name}_finetuned"] = _train(
        VARIANTS[name], args.finetune_steps, os.path.join(root, f"{name}_finetuned"), seed,
        extra=(f"--config.init_from={os.path.join(root, 'softmax')}",
               "--config.init_strict=False"))
    runs[f"{name}_scratch"] = _train(VARIANTS[name], total,
                                     os.path.join(root, f"{name}_scratch"), seed)
  return runs


def _cell(runs: list[dict]) -> str:
  values = [r["accuracy"] for r in runs]
  each = " / ".join(f"{v:.3f}" for v in values)
  return f"{np.mean(values):.3f} ({each})" if len(values) > 1 else each


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pretrain-steps", type=int, default=1500)
  parser.add_argument("--finetune-steps", type=int, default=500)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--root", default="workdirs/finetune_demo")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default=None, help="JSON file for the results")
  args = parser.parse_args()
  root = os.path.join(REPO, args.root) if not os.path.isabs(args.root) else args.root
  total = args.pretrain_steps + args.finetune_steps
  studies = {seed: _study(args, seed, os.path.join(root, f"seed{seed}")) for seed in args.seeds}
  result = {
      "what": "digits ViT test accuracy (360 images): softmax pretrained, fine-tuned with "
              "another attention via init_from (init_strict=False), vs that attention from "
              "scratch for the same total steps",
      "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
      "seeds": args.seeds,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
                 f"{platform.release()}",
      "python": platform.python_version(),
      "runs": {f"seed{seed}/{name}": run for seed, runs in studies.items()
               for name, run in runs.items()}}
  seeds = "mean (" + " / ".join(f"seed {s}" for s in args.seeds) + ")"
  print(f"\nTest accuracy, {seeds}:\n\n| attention | softmax {args.pretrain_steps} steps, "
        f"then {args.finetune_steps} fine-tuning | from scratch, {total} steps |\n|---|---|---|")
  print(f"| softmax | {_cell([s['softmax'] for s in studies.values()])} (after "
        f"{args.pretrain_steps} steps) | - |")
  for name in args.variants:
    print(f"| {name} | {_cell([s[name + '_finetuned'] for s in studies.values()])} | "
          f"{_cell([s[name + '_scratch'] for s in studies.values()])} |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
