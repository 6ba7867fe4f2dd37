"""End-to-end training-step throughput of the zoo's trainer step on one device.

    python benchmarks/train_throughput.py --models vit_b16_224 lm_12x768_4096 \
        --attentions softmax relu aft_simple --out results/h200/train_throughput.json

For every (model, attention) it builds the model from the repo's config (`configs/
vit_digits.py` for the ViTs, `configs/lm_bytes.py` for the byte LM, with the sizes of
`MODELS`), the optimiser and placement exactly as `zoo.training.trainer` does, and the
trainer's own jitted step (`trainer.make_train_step`: forward, backward, AdamW update),
then times it on one fixed synthetic batch (random images / bytes; no input pipeline):
the first call (compile), `--warmup` more, then `--steps` steps each timed to
`block_until_ready` of the loss. It reports the median step time, tokens/s (tokens per
step = batch x (image patches or sequence length) / median) and examples/s; the JSON also
holds every step time, the parameter count and the compiled step's compile time.

Attentions, bfloat16 compute (float32 parameters), as the configs' options:

* `softmax`: `implementation="cudnn"` on a GPU (cuDNN's fused kernel); if cuDNN refuses
  the shape the row is retried with XLA's softmax and says so. On the CPU: XLA.
* `relu`: ReLU attention, alpha = 1, `implementation="pallas"` (the fused Pallas kernel
  with the tuning table in use) on a GPU; `pallas_interpret` on the CPU.
* `aft_simple`: AFT-simple (Zhai et al. 2021), causal in the LM.

`measure(config, ...)` is the reusable part: any trainer config in, the timing dict out.
`--smoke` swaps in toy sizes (one block, a few tokens, 2 steps) so that the whole path
runs on the CPU in seconds. `--budget-s` stops starting new rows once that much time has
passed (the rows skipped are listed in the JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import pathlib
import statistics
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import lm_bytes, vit_digits  # noqa: E402
from zoo.training import optim, tasks, trainer  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

# name -> (config module, overrides of its model, batch size); `SMOKE` the toy versions.
MODELS = {
    "vit_b16_224": ("vit", dict(variant="B/16", image_size=224), 256),
    "vit_b16_448": ("vit", dict(variant="B/16", image_size=448), 64),
    "lm_12x768_4096": ("lm", dict(width=768, depth=12, num_heads=12, seq_len=4096), 16),
    "lm_12x768_16384": ("lm", dict(width=768, depth=12, num_heads=12, seq_len=16384), 4),
}
SMOKE = {
    "vit_b16_224": ("vit", dict(variant="mu/16", image_size=32), 2),
    "vit_b16_448": ("vit", dict(variant="mu/16", image_size=64), 2),
    "lm_12x768_4096": ("lm", dict(width=32, depth=1, num_heads=2, seq_len=32), 2),
    "lm_12x768_16384": ("lm", dict(width=32, depth=1, num_heads=2, seq_len=64), 2),
}
ATTENTIONS = ("softmax", "relu", "aft_simple")


def _on_gpu() -> bool:
  return jax.devices()[0].platform in ("gpu", "cuda", "rocm")


def attention_arg(attention: str, on_gpu: bool, *, softmax_xla: bool = False) -> str:
  """The config argument string of an attention (see the module docstring)."""
  if attention == "softmax":
    return "attention=softmax" + (",implementation=cudnn" if on_gpu and not softmax_xla else "")
  if attention == "relu":
    return f"attention=relu,implementation={'pallas' if on_gpu else 'pallas_interpret'}"
  if attention == "aft_simple":
    return "attention=aft_simple"
  raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


def make_config(model: str, attention: str, *, smoke: bool = False, on_gpu: bool | None = None,
                dtype: str = "bfloat16", batch_size: int | None = None,
                softmax_xla: bool = False):
  """The trainer config of a `MODELS` row with `attention` (a `configs/` config with the
  model's sizes)."""
  on_gpu = _on_gpu() if on_gpu is None else on_gpu
  family, sizes, batch = (SMOKE if smoke else MODELS)[model]
  arg = f"{attention_arg(attention, on_gpu, softmax_xla=softmax_xla)},dtype={dtype}"
  if family == "lm":
    config = lm_bytes.get_config(arg + "," + ",".join(f"{k}={v}" for k, v in sizes.items()))
  else:
    config = vit_digits.get_config(arg)
    config.model.update(dict(variant=sizes["variant"], width=None, depth=None, mlp_dim=None,
                             num_heads=None, patch_size=None, image_size=sizes["image_size"],
                             in_channels=3, num_classes=1000))
  config.batch_size = int(batch_size or batch)
  return config


def _tokens_per_example(config) -> int:
  if config.task == "lm":
    return int(config.model.max_len)
  patch = int(config.model.variant.partition("/")[2])
  return (int(config.model.image_size) // patch) ** 2


def synthetic_batch(config, seed: int = 0) -> dict:
  """One batch of the task's layout (`zoo.data`): random images or bytes, all valid."""
  rng = np.random.default_rng(seed)
  n = int(config.batch_size)
  if config.task == "lm":
    tokens = rng.integers(0, 256, (n, int(config.model.max_len) + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "mask": np.ones((n, int(config.model.max_len)), np.float32)}
  size = int(config.model.image_size)
  return {"image": rng.normal(size=(n, size, size, int(config.model.in_channels)))
          .astype(np.float32),
          "label": rng.integers(0, int(config.model.num_classes), n, dtype=np.int32),
          "mask": np.ones(n, np.float32)}


def prepare(config, *, seed: int = 0) -> dict:
  """The model, optimiser, placement, the trainer's step and one placed synthetic batch,
  built as `trainer.train` builds them (one device's mesh unless `config.mesh` says
  otherwise), and the step lowered for them (not compiled yet)."""
  task = tasks.get(config.task)
  placement = trainer.Placement(config)
  model = trainer.create_model(config, seed=seed, sharding=placement.sharding)
  optimizer = nnx.Optimizer(
      model, optim.make_optimizer(config.optimizer, int(config.total_steps)), wrt=nnx.Param)
  shardings = placement.put((model, optimizer))
  prep = {"config": config, "model": model, "optimizer": optimizer,
          "step": trainer.make_train_step(task, shardings),
          "batch": placement.batch(synthetic_batch(config, seed)),
          "carry": task.init_carry(model, int(config.batch_size), placement.sharding),
          "key": jax.random.key(seed + 2)}
  t0 = time.perf_counter()
  prep["lowered"] = prep["step"].lower(model, optimizer, prep["batch"], prep["carry"],
                                       jax.random.fold_in(prep["key"], 0))
  prep["lower_s"] = time.perf_counter() - t0
  return prep


def compile_step(prep: dict) -> float:
  """Compiles the lowered step (the jitted step's later calls reuse the executable); the
  seconds it took. Thread-safe: several rows may compile at once."""
  t0 = time.perf_counter()
  prep["lowered"].compile()
  prep["compile_s"] = time.perf_counter() - t0
  return prep["compile_s"]


def time_steps(prep: dict, *, steps: int = 20, warmup: int = 3) -> dict:
  """Runs the (compiled) step once, `warmup` more times, then `steps` times, each to
  `block_until_ready` of its loss; the timing dict (see `measure`)."""
  config, model, optimizer = prep["config"], prep["model"], prep["optimizer"]
  step, batch, carry, key = prep["step"], prep["batch"], prep["carry"], prep["key"]
  t0 = time.perf_counter()
  loss, _, _ = step(model, optimizer, batch, carry, jax.random.fold_in(key, 0))
  jax.block_until_ready(loss)
  first = time.perf_counter() - t0
  for i in range(warmup):
    loss, _, _ = step(model, optimizer, batch, carry, jax.random.fold_in(key, 1 + i))
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    loss, _, _ = step(model, optimizer, batch, carry, jax.random.fold_in(key, 1 + warmup + i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  tokens = int(config.batch_size) * _tokens_per_example(config)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return {"median_step_s": median, "step_s": times, "first_step_s": first,
          "lower_s": prep.get("lower_s"), "compile_s": prep.get("compile_s"),
          "tokens_per_step": tokens, "tokens_per_s": tokens / median,
          "examples_per_s": int(config.batch_size) / median, "params": params,
          "final_loss": float(loss)}


def measure(config, *, steps: int = 20, warmup: int = 3, seed: int = 0) -> dict:
  """Times the trainer's train step for `config` on one synthetic batch: `prepare`,
  `compile_step`, `time_steps`.

  Returns:
    {"median_step_s", "step_s" (all), "first_step_s" (after compiling), "lower_s",
     "compile_s", "tokens_per_step", "tokens_per_s", "examples_per_s", "params",
     "final_loss"}.
  """
  prep = prepare(config, seed=seed)
  compile_step(prep)
  return time_steps(prep, steps=steps, warmup=warmup)


def _one_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


class Row:
  """One (model, attention) row: its config, prepared state and result."""

  def __init__(self, model, attention, args, on_gpu):
    self.model, self.attention, self.args, self.on_gpu = model, attention, args, on_gpu
    self.result = {"model": model, "attention": attention, "dtype": args.dtype}
    self.prep = None

  def config(self, softmax_xla=False):
    return make_config(self.model, self.attention, smoke=self.args.smoke, on_gpu=self.on_gpu,
                       dtype=self.args.dtype, batch_size=self.args.batch.get(self.model),
                       softmax_xla=softmax_xla)

  def prepare(self):
    """Builds and lowers the row (cuDNN refusing the softmax shape: XLA's softmax)."""
    config = self.config()
    self.result.update(batch_size=int(config.batch_size),
                       attention_options=dict(config.model.attention_options.to_dict()))
    try:
      self.prep = prepare(config)
    except Exception as e:  # pylint: disable=broad-except
      self.result["error"] = _one_line(e)
      traceback.print_exc()
      if self.attention == "softmax" and self.on_gpu:
        self._fall_back()

  def _fall_back(self):
    try:
      self.prep = prepare(self.config(softmax_xla=True))
      self.result["fallback"] = f"XLA softmax (cuDNN failed: {self.result.pop('error')})"
    except Exception as e:  # pylint: disable=broad-except
      self.result["fallback_error"] = _one_line(e)

  def compile(self):
    if self.prep is None:
      return
    try:
      compile_step(self.prep)
    except Exception as e:  # pylint: disable=broad-except
      self.result["error"] = _one_line(e)
      self.prep = None

  def time(self):
    if self.prep is None and "error" in self.result and self.attention == "softmax" \
        and self.on_gpu and "fallback" not in self.result:
      self._fall_back()
      self.compile()
    if self.prep is None:
      return
    try:
      self.result.update(time_steps(self.prep, steps=self.args.steps, warmup=self.args.warmup))
      self.result.pop("error", None)
    except Exception as e:  # pylint: disable=broad-except
      self.result["error"] = _one_line(e)
      traceback.print_exc()
    self.prep = None  # frees the model, optimiser and executable
    gc.collect()


def _batch_arg(text: str):
  model, _, size = text.partition("=")
  if model not in MODELS or not size.isdigit():
    raise argparse.ArgumentTypeError(f"--batch takes MODEL=N with MODEL in {sorted(MODELS)}")
  return model, int(size)


def _print_row(r: dict) -> None:
  if "median_step_s" in r:
    print(f"{r['model']:>16} {r['attention']:>10} {r['batch_size']:>5} {r['tokens_per_step']:>11} "
          f"{r['median_step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} "
          f"{r.get('compile_s') or 0:9.1f}{'  ' + r['fallback'] if 'fallback' in r else ''}",
          flush=True)
  else:
    print(f"{r['model']:>16} {r['attention']:>10}  FAILED: {r.get('error')}", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
  p.add_argument("--warmup", type=int, default=3, help="steps after the first")
  p.add_argument("--batch", type=_batch_arg, nargs="*", default=[],
                 help="MODEL=N batch sizes replacing MODELS' (e.g. vit_b16_448=32)")
  p.add_argument("--compile-workers", type=int, default=1,
                 help="> 1: build and lower every row first, compile them in this many "
                      "threads at once, then time them one by one (less wall time)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="time no new row after this many seconds")
  p.add_argument("--smoke", action="store_true", help="toy sizes (CPU check of the path)")
  p.add_argument("--out", default="results/train_throughput.json")
  args = p.parse_args(argv)
  args.batch = dict(args.batch)
  if args.smoke:
    args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
  dev = jax.devices()[0]
  on_gpu = _on_gpu()
  info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax_version": jax.__version__, "backend": dev.platform,
          "device_kind": dev.device_kind, "smoke": args.smoke, "steps": args.steps,
          "warmup": args.warmup, "compile_workers": args.compile_workers}
  print(f"# train_throughput  jax {jax.__version__}  {dev.device_kind}  {args.dtype}  "
        f"median of {args.steps} steps after {args.warmup} + 1"
        f"{'  SMOKE' if args.smoke else ''}", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  rows = [Row(m, a, args, on_gpu) for m in args.models for a in args.attentions]
  skipped: list[str] = []

  def write():
    out.write_text(json.dumps({"machine": info, "rows": [r.result for r in rows
                                                         if "median_step_s" in r.result
                                                         or "error" in r.result],
                               "skipped_for_budget": skipped}, indent=1))

  def over_budget():
    return args.budget_s is not None and time.perf_counter() - start > args.budget_s

  if args.compile_workers > 1:
    for row in rows:
      if not over_budget():
        row.prepare()
    with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
      list(pool.map(lambda row: row.compile(), rows))
    print(f"# built, lowered and compiled {len(rows)} rows in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
  print(f"{'model':>16} {'attention':>10} {'batch':>5} {'tokens/step':>11} {'step ms':>9} "
        f"{'tokens/s':>10} {'compile s':>9}", flush=True)
  for row in rows:
    if over_budget():
      skipped.append(f"{row.model}/{row.attention}")
      row.prep = None
      continue
    if args.compile_workers <= 1:
      row.prepare()
      row.compile()
    row.time()
    _print_row(row.result)
    write()
  if skipped:
    print(f"# skipped (budget): {', '.join(skipped)}", flush=True)
  write()
  print(f"# wrote {out} ({time.perf_counter() - start:.0f} s)", flush=True)
  return 0 if all("median_step_s" in r.result for r in rows) and not skipped else 1


if __name__ == "__main__":
  sys.exit(main())
