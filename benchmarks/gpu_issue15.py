"""Issue 15's GPU measurements in one run (< 8 minutes on an H200), results in one folder.

    python benchmarks/gpu_issue15.py                      # on the GPU
    python benchmarks/gpu_issue15.py --out-dir $OUT/h200  # the device tool: files come back
    python benchmarks/gpu_issue15.py --cpu-smoke          # the whole path at toy sizes, CPU

Parts, each a subprocess with a time limit (`--deadline-s` bounds the whole run; a part
that would start after it is skipped and said so):

1. `tune`: `tune_pallas.py --budget-s` (default 120 s) -> `pallas_tuning.json`. When it
   wrote entries, the later parts run with `ZOO_PALLAS_TUNING` pointing at it.
2. `check`: `check_pallas_gpu.py --no-highest --table pallas_tuning.json`: the fixed
   cases (less the float32 "highest" ones, slow to compile and not a tuned dtype) with the
   tuned parameters of their shapes, and every tuned entry with exactly its parameters.
3. `attention`: `attention.py`, bfloat16, batch 1, 8 heads, head_dim 64, forward +
   backward, lengths 1,024 to 65,536 (doubling), kinds relu_pallas (tuned),
   relu_pallas_untuned (128 x 64), softmax_cudnn and, when PyTorch is installed, torch's
   flash SDPA (`--torch`): non-causal -> `attention_issue15_bf16.json`, causal ->
   `attention_issue15_bf16_causal.json` (names that leave the earlier runs' files be).
4. `aft`: `attention.py --kinds aft_simple aft_conv`, bfloat16, 4,096 to 65,536 tokens,
   non-causal and causal -> `aft_issue15_bf16.json`, `aft_issue15_bf16_causal.json`
   (the time slopes are in them).
5. `e2e`: `train_throughput.py` (ViT-B/16 at 224 and 448 px, the 12 x 768 byte LM at
   4,096 and 16,384 tokens; softmax (cuDNN), ReLU (Pallas), AFT-simple; bfloat16; median
   of 20 steps after warm-up) -> `train_throughput.json`, with what time is left: every
   row is built and lowered, then all compiled at once (`--compile-workers` threads),
   then timed one by one until 45 s before the deadline.

Everything every part prints goes to `gpu_issue15.log`; `gpu_issue15.json` holds each
part's exit code and seconds and the acceptance read off the results: per length and
causal mode, Pallas ReLU's time against torch's SDPA (<= 0.8x) and cuDNN's (<= 1x), the
tuned kernel against the untuned one, the AFT slopes (<= 1.1), the check's verdict and
the end-to-end table. That is 8 files, the most the device tool brings back from $OUT.

`--cpu-smoke` runs every part at toy sizes on the CPU (tuner `--interpret --dry-run`,
check `--allow-cpu`, the Pallas kind in the interpreter, XLA softmax for cuDNN, toy
models), into a temporary folder unless `--out-dir` is given: a check of the script, not
a measurement. `--parts` runs a subset (e.g. `--parts e2e` to finish a run that ran out of
time; an existing `pallas_tuning.json` in the folder is then used).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
PARTS = ("tune", "check", "attention", "aft", "e2e")
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
AFT_LENGTHS = [4096, 8192, 16384, 32768, 65536]
# Seconds each part may take at most (the run's deadline may cut them shorter).
PART_LIMIT_S = {"tune": 180, "check": 120, "attention": 100, "aft": 60, "e2e": 600}
SDPA_RATIO = 0.8  # acceptance: Pallas ReLU <= 0.8x torch SDPA's time
CUDNN_RATIO = 1.0  # and <= cuDNN's
AFT_SLOPE = 1.1


def gpu_name() -> str | None:
  """The first GPU's name from nvidia-smi (without starting JAX, which would take the GPU's
  memory in this parent process), or None."""
  if not shutil.which("nvidia-smi"):
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (subprocess.SubprocessError, OSError):
    return None
  return out.strip().splitlines()[0].strip() if out.strip() else None


def slug(name: str) -> str:
  """'NVIDIA H200' -> 'h200'."""
  words = [w for w in name.lower().replace("-", " ").split() if w != "nvidia"]
  return "_".join(words) or "device"


class Runner:
  """Runs the parts' commands with time limits, teeing their output into one log."""

  def __init__(self, out_dir: pathlib.Path, deadline: float):
    self.out_dir, self.deadline = out_dir, deadline
    self.log = open(out_dir / "gpu_issue15.log", "a", buffering=1)
    self.env = dict(os.environ, PYTHONUNBUFFERED="1")
    self.status: dict[str, dict] = {}

  def say(self, line: str) -> None:
    print(line, flush=True)
    self.log.write(line + "\n")

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def run(self, name: str, argv: list[str], limit: float) -> dict:
    """Runs `python argv` for at most min(limit, time left); the part's status."""
    timeout = min(limit, self.left())
    if timeout < 5:
      status = {"rc": None, "skipped": "deadline reached before it started", "seconds": 0.0}
      self.say(f"### {name}: skipped (deadline)")
      self.status.setdefault(name, []).append(status)
      return status
    cmd = [sys.executable, *argv]
    self.say(f"### {name}: {' '.join(cmd)}  (limit {timeout:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=self.env, cwd=HERE.parent, start_new_session=True)
    pump = threading.Thread(target=self._pump, args=(proc,), daemon=True)
    pump.start()
    timed_out = False
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
      rc = proc.wait()
    pump.join(timeout=10)
    status = {"rc": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1)}
    self.say(f"### {name}: rc={rc}{' TIMED OUT' if timed_out else ''} "
             f"after {status['seconds']:.0f} s ({self.left():.0f} s left)")
    self.status.setdefault(name, []).append(status)
    return status

  def _pump(self, proc):
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      self.log.write(line)


def e2e_imports(runner: Runner) -> bool:
  """Whether the trainer and the configs import here (a bare GPU image may lack the zoo's
  data and config packages); says which module is missing if not."""
  probe = subprocess.run([sys.executable, "-c", "import configs.lm_bytes, zoo.training.trainer"],
                         capture_output=True, text=True, cwd=HERE.parent, env=runner.env,
                         timeout=120, check=False)
  if probe.returncode == 0:
    return True
  last = (probe.stderr.strip().splitlines() or ["?"])[-1]
  runner.say(f"### e2e: skipped: the trainer does not import here ({last}); carry the wheels "
             f"of benchmarks/gpu_wheels.sh")
  return False


def _read(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def attention_acceptance(result: dict | None) -> dict | None:
  """Per length: Pallas ReLU (tuned) against torch SDPA, cuDNN and the untuned kernel."""
  if not result:
    return None
  ms = {}
  for r in result["results"]:
    if "seconds" in r:
      ms.setdefault(r["length"], {})[r["kind"]] = r["seconds"] * 1e3
  rows, ok = [], True
  for length in sorted(ms):
    t = ms[length]
    relu = t.get("relu_pallas") or t.get("relu_pallas_interpret")
    row = {"length": length, "ms": t}
    if relu is None:
      row["pass"] = ok = False
      rows.append(row)
      continue
    if "torch_sdpa" in t:
      row["vs_torch_sdpa"] = relu / t["torch_sdpa"]
    if "softmax_cudnn" in t:
      row["vs_cudnn"] = relu / t["softmax_cudnn"]
    if "relu_pallas_untuned" in t:
      row["untuned_over_tuned"] = t["relu_pallas_untuned"] / relu
    row["pass"] = (row.get("vs_torch_sdpa", math.inf) <= SDPA_RATIO
                   and row.get("vs_cudnn", math.inf) <= CUDNN_RATIO)
    ok &= row["pass"]
    rows.append(row)
  return {"causal": result["config"]["causal"], "device": result["machine"]["device_kind"],
          "rows": rows, "pass": ok and bool(rows)}


def aft_acceptance(result: dict | None) -> dict | None:
  if not result:
    return None
  slopes = {k: v for k, v in result.get("time_slope", {}).items() if k.startswith("aft")}
  return {"causal": result["config"]["causal"], "time_slope": slopes,
          "pass": bool(slopes) and all(s <= AFT_SLOPE for s in slopes.values())}


def summarize(out_dir: pathlib.Path, runner: Runner, args) -> dict:
  summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "gpu": args.gpu, "cpu_smoke": args.cpu_smoke, "parts": runner.status,
             "criteria": {"pallas_vs_torch_sdpa_max": SDPA_RATIO,
                          "pallas_vs_cudnn_max": CUDNN_RATIO, "aft_slope_max": AFT_SLOPE}}
  table = _read(out_dir / "pallas_tuning.json")
  if table:
    summary["tuning"] = {"measured_on": table.get("measured_on"),
                         "entries": [{k: e[k] for k in ("length", "causal", "backward", "ms")}
                                     for e in table.get("entries", [])],
                         "trials": len(table.get("trials", [])),
                         "failed_trials": sum(not t["ok"] for t in table.get("trials", []))}
  check = runner.status.get("check")
  summary["check_pass"] = bool(check) and check[-1].get("rc") == 0
  summary["attention"] = [attention_acceptance(_read(out_dir / f"attention_issue15_bf16{s}.json"))
                          for s in ("", "_causal")]
  summary["aft"] = [aft_acceptance(_read(out_dir / f"aft_issue15_bf16{s}.json"))
                    for s in ("", "_causal")]
  e2e = _read(out_dir / "train_throughput.json")
  if e2e:
    summary["e2e"] = [{k: r.get(k) for k in ("model", "attention", "batch_size",
                                             "tokens_per_step", "median_step_s",
                                             "tokens_per_s", "error", "fallback")}
                      for r in e2e["rows"]]
    summary["e2e_skipped_for_budget"] = e2e.get("skipped_for_budget", [])
  parts_ok = [summary["check_pass"]] + [a["pass"] if a else False
                                        for a in summary["attention"] + summary["aft"]]
  summary["all_pass"] = all(parts_ok)
  return summary


def print_summary(s: dict, say) -> None:
  say(f"### summary ({s['gpu']}{', CPU SMOKE: not a measurement' if s['cpu_smoke'] else ''})")
  say(f"check_pallas_gpu: {'PASS' if s['check_pass'] else 'FAIL or not run'}")
  for a in s["attention"]:
    if not a:
      say("attention: not run")
      continue
    say(f"attention causal={a['causal']}: {'PASS' if a['pass'] else 'FAIL'}")
    for r in a["rows"]:
      words = [f"{k} {v:.3f} ms" for k, v in sorted(r["ms"].items())]
      ratios = [f"{k}={r[k]:.2f}" for k in ("vs_torch_sdpa", "vs_cudnn", "untuned_over_tuned")
                if k in r]
      say(f"  {r['length']:>6}: {', '.join(words)}; {' '.join(ratios)} "
          f"{'ok' if r['pass'] else 'MISS'}")
  for a in s["aft"]:
    if a:
      say(f"aft causal={a['causal']}: slopes "
          + ", ".join(f"{k} {v:.2f}" for k, v in a["time_slope"].items())
          + f" {'PASS' if a['pass'] else 'FAIL'}")
    else:
      say("aft: not run")
  for r in s.get("e2e", []):
    if r.get("tokens_per_s"):
      say(f"e2e {r['model']:>16} {r['attention']:>10}: {r['tokens_per_s']:10.0f} tokens/s "
          f"({r['median_step_s'] * 1e3:.1f} ms/step, batch {r['batch_size']})"
          f"{' ' + r['fallback'] if r.get('fallback') else ''}")
    else:
      say(f"e2e {r['model']:>16} {r['attention']:>10}: FAILED {r.get('error')}")
  if s.get("e2e_skipped_for_budget"):
    say(f"e2e skipped (time): {', '.join(s['e2e_skipped_for_budget'])}")
  say(f"all acceptance checks (check, attention, aft): {'PASS' if s['all_pass'] else 'FAIL'}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out-dir", default=None,
                 help="results folder (default: benchmarks/results/<gpu>; smoke: a temp dir)")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
  p.add_argument("--deadline-s", type=float, default=470.0,
                 help="no part starts, or runs on, after this many seconds")
  p.add_argument("--tune-budget-s", type=float, default=120.0)
  p.add_argument("--compile-workers", type=int, default=6,
                 help="e2e: train steps compiled at once (train_throughput.py)")
  p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
  p.add_argument("--aft-lengths", type=int, nargs="+", default=AFT_LENGTHS)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--cpu-smoke", action="store_true",
                 help="every part at toy sizes on the CPU (a check of this script)")
  args = p.parse_args(argv)
  args.gpu = "cpu (smoke)" if args.cpu_smoke else gpu_name()
  if not args.cpu_smoke and args.gpu is None:
    print("gpu_issue15: no NVIDIA GPU found (nvidia-smi); use --cpu-smoke for a CPU check")
    return 1
  if args.out_dir:
    out_dir = pathlib.Path(args.out_dir)
  elif args.cpu_smoke:
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="gpu_issue15_smoke_"))
  else:
    out_dir = HERE / "results" / slug(args.gpu)
  out_dir.mkdir(parents=True, exist_ok=True)
  runner = Runner(out_dir, time.monotonic() + args.deadline_s)
  smoke = args.cpu_smoke
  runner.say(f"### gpu_issue15 {datetime.datetime.now(datetime.timezone.utc).isoformat()} "
             f"gpu={args.gpu} out={out_dir} parts={' '.join(args.parts)}")
  table = out_dir / "pallas_tuning.json"
  torch = importlib.util.find_spec("torch") is not None

  if "tune" in args.parts:
    argv = [str(HERE / "tune_pallas.py"), "--out", str(table)]
    argv += (["--interpret", "--dry-run", "--lengths", "32", "--max-candidates", "1"] if smoke
             else ["--budget-s", str(args.tune_budget_s)])
    runner.run("tune", argv, PART_LIMIT_S["tune"] if not smoke else 120)
  tuned = _read(table)
  if tuned and tuned.get("entries"):
    runner.env["ZOO_PALLAS_TUNING"] = str(table)
    runner.say(f"### using the tuned table {table} ({len(tuned['entries'])} entries)")
  else:
    runner.say("### no tuned entries: the committed table (untuned defaults) is used")

  if "check" in args.parts:
    argv = [str(HERE / "check_pallas_gpu.py"), "--no-highest"]
    argv += ["--table", str(table)] if tuned and tuned.get("entries") else []
    argv += ["--allow-cpu"] if smoke else []
    runner.run("check", argv, PART_LIMIT_S["check"])

  common = ["--batch", "1", "--repeats", str(args.repeats), "--no-nearby-matmul"]
  if smoke:
    common = ["--batch", "1", "--heads", "2", "--head-dim", "16", "--repeats", "1",
              "--no-nearby-matmul", "--matmul-size", "64", "--dtype", "float32"]
  else:
    common += ["--heads", "8", "--head-dim", "64", "--dtype", "bfloat16", "--matmul-size", "8192"]
  if "attention" in args.parts:
    kinds = (["relu_pallas_interpret", "softmax"] if smoke else
             ["relu_pallas", "relu_pallas_untuned", "softmax_cudnn"])
    lengths = ["64", "128"] if smoke else [str(n) for n in args.lengths]
    for suffix, causal in (("", []), ("_causal", ["--causal"])):
      runner.run("attention", [str(HERE / "attention.py"), "--kinds", *kinds,
                               "--lengths", *lengths, *common, *causal,
                               *(["--torch"] if torch else []),
                               "--out", str(out_dir / f"attention_issue15_bf16{suffix}.json")],
                 PART_LIMIT_S["attention"])
  if "aft" in args.parts:
    lengths = ["64", "128", "256"] if smoke else [str(n) for n in args.aft_lengths]
    for suffix, causal in (("", []), ("_causal", ["--causal"])):
      runner.run("aft", [str(HERE / "attention.py"), "--kinds", "aft_simple", "aft_conv",
                         "--lengths", *lengths, *common, *causal,
                         "--out", str(out_dir / f"aft_issue15_bf16{suffix}.json")],
                 PART_LIMIT_S["aft"])
  if "e2e" in args.parts and not e2e_imports(runner):
    runner.status["e2e"] = [{"rc": None, "skipped": "zoo.training does not import here "
                             "(see the log); carry wheels: benchmarks/gpu_wheels.sh"}]
  elif "e2e" in args.parts:
    budget = max(0.0, runner.left() - 45)  # no new row timed in the last 45 s
    runner.run("e2e", [str(HERE / "train_throughput.py"), "--out",
                       str(out_dir / "train_throughput.json"), "--budget-s", f"{budget:.0f}",
                       "--compile-workers", str(args.compile_workers),
                       *(["--smoke", "--dtype", "float32"] if smoke else [])],
               PART_LIMIT_S["e2e"])

  summary = summarize(out_dir, runner, args)
  (out_dir / "gpu_issue15.json").write_text(json.dumps(summary, indent=1))
  print_summary(summary, runner.say)
  runner.say(f"### wrote {out_dir} ({len(list(out_dir.iterdir()))} files)")
  if smoke:  # a check of the script: every part must have run and exited 0
    return 0 if all(s.get("rc") == 0 for v in runner.status.values() for s in v) else 1
  return 0 if summary["all_pass"] else 2


if __name__ == "__main__":
  sys.exit(main())
