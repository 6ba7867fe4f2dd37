"""The one trainer: config in, checkpoints and metrics in the workdir out.

`train(config, workdir)` builds the model and optimiser, resumes from the newest
checkpoint in the workdir (parameters, optimiser state and the data iterator's position),
and runs to `config.total_steps` with a progress bar, JSONL + TensorBoard metrics,
periodic evaluation and interval checkpoints. A non-finite loss stops the run before it
can be checkpointed; SIGINT / SIGTERM save a checkpoint at the current step and stop.

`task: segment_lm` (the adaptive-span `TransformerSeq`) also carries per-layer caches from
step to step and checkpoints them; see `zoo/training/segment.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from zoo import data as data_lib
from zoo import models
from zoo import parallel
from zoo.attention import adaptive_span as span_lib
from zoo.training import checkpoint as ckpt_lib
from zoo.training import optim
from zoo.training import segment as segment_lib
from zoo.training import tasks


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


def _to_dict(cfg) -> dict:
  cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  return json.loads(json.dumps(cfg))  # the same form as after a checkpoint's JSON round trip


def validate_config(config) -> None:
  """Fails early, with the offending key named, before any data or model is built."""
  for key in ("task", "data", "model", "batch_size", "total_steps", "optimizer"):
    if key not in config:
      raise ValueError(f"config.{key} is missing")
  tasks.get(config.task)
  models.validate(config.model)
  want = tasks.MODEL_FOR_TASK[config.task]
  if config.model.name != want:
    if config.model.name in tasks.MODEL_FOR_TASK.values():
      need = [t for t, m in tasks.MODEL_FOR_TASK.items() if m == config.model.name][0]
      raise ValueError(f"task {config.task!r} needs model.name={want!r}, got "
                       f"{config.model.name!r} (which trains with task {need!r})")
    raise ValueError(f"task {config.task!r} needs model.name={want!r}, got {config.model.name!r}")
  if config.task == "segment_lm":
    segment_lib.validate(config)
  if int(config.total_steps) <= 0 or int(config.batch_size) <= 0:
    raise ValueError("config.total_steps and config.batch_size must be positive")
  if int(config.batch_size) % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide by the process count "
                     f"{jax.process_count()}")


def create_model(config, seed: int | None = None) -> nnx.Module:
  seed = int(config.get("seed", 0) if seed is None else seed)
  return models.create(config.model, nnx.Rngs(params=seed, dropout=seed + 1))


class Placement:
  """Where arrays live: the mesh, its logical rules and the sequence-parallel strategy.

  `config.mesh` (e.g. {"data": 2, "seq": 4}; default: all devices on `data`) and
  `config.sequence_parallel` (None, "gspmd", "all_gather", "ring" or "halo"; each family
  registers the ones it has). Parameters are
  replicated, or with `mesh.fsdp > 1` sharded over `fsdp` along their largest divisible
  dimension (big_vision's fsdp rule); batches are sharded over data/fsdp, and token
  sequences also over `seq`.
  """

  def __init__(self, config):
    self.mesh = parallel.make_mesh(config.get("mesh"))
    self.strategy = config.get("sequence_parallel")
    if self.strategy is not None and self.strategy not in parallel.STRATEGIES:
      raise ValueError(f"config.sequence_parallel must be None or one of "
                       f"{parallel.STRATEGIES}, got {self.strategy!r}")
    self.rules = parallel.DEFAULT_RULES + (
        parallel.FSDP_RULES if self.mesh.shape["fsdp"] > 1 else ())

  def check_batch_size(self, batch_size: int, what: str) -> None:
    replicas = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if batch_size % replicas:
      raise ValueError(f"{what} {batch_size} does not divide by the mesh's data x fsdp = "
                       f"{replicas} batch shards (mesh {dict(self.mesh.shape)}); set "
                       f"config.mesh or the batch size")

  def context(self):
    """Active while steps are traced: activation constraints and split attention."""
    return parallel.sharding_context(self.mesh, self.rules, self.strategy)

  def _param_sharding(self, x):
    n = self.mesh.shape["fsdp"]
    spec = [None] * getattr(x, "ndim", 0)
    if n > 1 and spec:
      dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
      for d in dims:
        if x.shape[d] % n == 0:
          spec[d] = "fsdp"
          break
    return NamedSharding(self.mesh, P(*spec))

  def put(self, nodes):
    """Moves the state of `nodes` (model, optimiser) onto the mesh; returns its shardings."""
    state = nnx.state(nodes)
    shardings = jax.tree.map(self._param_sharding, state)
    placed = jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]),
        state, shardings)
    nnx.update(nodes, placed)
    return shardings

  def batch(self, batch: dict) -> dict:
    """This process's rows -> global arrays sharded over the mesh."""
    def spec(x):
      names = ["batch"] + (["seq"] if x.ndim == 2 and self.mesh.shape["seq"] > 1 else [])
      names += [None] * (x.ndim - len(names))
      return parallel.named_sharding(self.mesh, names, self.rules)
    return {k: jax.make_array_from_process_local_data(spec(v), np.asarray(v))
            for k, v in batch.items()}


def _state_to_save(model, optimizer, caches=None) -> dict:
  """Parameters and optimiser state as plain nested dicts (stable across Flax versions),
  and a segment LM's caches."""
  state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
           "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
  if caches is not None:
    state["caches"] = segment_lib.caches_to_tree(caches)
  return state


def _apply_state(model, optimizer, restored) -> list | None:
  """Puts restored parameters (and optimiser state) in place; returns restored caches."""
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.update(model, params)
  if optimizer is not None:
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(optimizer, opt_state)
  if "caches" in restored:
    return segment_lib.caches_from_tree(restored["caches"])
  return None


def make_train_step(task: str, state_shardings=None):
  """`train_step(model, optimizer, batch, dropout_key) -> (loss, aux)`, updating in place.

  With `state_shardings`, the updated state is constrained to them (parameters stay
  replicated or FSDP-sharded as placed).
  """
  loss_fn, _ = tasks.get(task)

  @nnx.jit
  def train_step(model, optimizer, batch, dropout_key):
    nnx.reseed(model, dropout=dropout_key)
    (loss, aux), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch), has_aux=True)(model)
    optimizer.update(model, grads)
    if state_shardings is not None:
      nodes = (model, optimizer)
      nnx.update(nodes, jax.lax.with_sharding_constraint(nnx.state(nodes), state_shardings))
    return loss, {**aux, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_step(task: str):
  _, sums_fn = tasks.get(task)
  return nnx.jit(lambda model, batch: sums_fn(model, batch))


def evaluate(model, config, split: str, *, max_batches: int | None = None,
             eval_step=None, progress: bool = False, placement: Placement | None = None) -> dict:
  """Evaluates `model` on `split` (one ordered pass; every example counted once)."""
  placement = placement or Placement(config)
  if config.task == "segment_lm":
    return segment_lib.evaluate(model, config, split, placement=placement,
                                max_batches=max_batches, eval_step=eval_step,
                                progress=progress)
  eval_step = eval_step or make_eval_step(config.task)
  batch_size = int(config.get("eval_batch_size", config.batch_size))
  it = data_lib.make_iterator(config.data, split, batch_size=batch_size, train=False,
                              seed=int(config.get("seed", 0)))
  model.eval()
  totals: dict[str, float] = {}
  bar = tqdm(desc=f"eval {split}", unit="batch", disable=not progress, leave=False)
  for i, batch in enumerate(it):
    if max_batches is not None and i >= max_batches:
      break
    with placement.context():
      sums = jax.device_get(eval_step(model, placement.batch(batch)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    bar.update()
  bar.close()
  model.train()
  if not totals:
    raise ValueError(f"split {split!r} of {config.data.name!r} gave no evaluation batches")
  return tasks.finalize_eval(config.task, totals)


class _MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, global_step=step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGINT / SIGTERM into a flag the loop checks, so it can save and exit cleanly."""
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

  def handler(signum, frame):
    if stop.is_set():  # a second signal: give up at once
      signal.signal(signum, previous[signum])
      raise KeyboardInterrupt
    stop.set()

  for s in previous:
    signal.signal(s, handler)
  try:
    yield stop
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _eval_split(config) -> str:
  return config.get("eval_split", "validation" if config.task == "lm" else "test")


def train(config, workdir: str, *, stop_at_step: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Trains from the newest checkpoint in `workdir` (or from scratch) to total_steps.

  Args:
    config: an ml_collections ConfigDict (see `configs/`).
    workdir: checkpoints, `metrics.jsonl`, `tensorboard/` and `config.json` go here.
    stop_at_step: stop early at this step, saving a checkpoint there, as a preemption
      would (used to test resumption).
    progress: show a tqdm progress bar.

  Returns:
    {"step": last step, "status": "done" | "interrupted", "eval": last eval metrics}.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  model_config = _to_dict(config.model)
  meta = {"model": model_config, "task": config.task, "data": config.data.name}
  total_steps = int(config.total_steps)

  checkpointer = ckpt_lib.Checkpointer(workdir, every=int(config.get("checkpoint_every", 1000)),
                                       keep=int(config.get("keep_checkpoints", 3)))
  start_step = checkpointer.latest_step() or 0
  saved_meta = checkpointer.read_meta(start_step) if start_step else {}
  if start_step:  # refuse a different model before building anything
    ckpt_lib.check_compatible(saved_meta, model_config, config.task, checkpointer.directory)
  segment = config.task == "segment_lm"
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_to_dict(config), f, indent=1)

  placement = Placement(config)
  placement.check_batch_size(int(config.batch_size), "config.batch_size")
  placement.check_batch_size(int(config.get("eval_batch_size", config.batch_size)),
                             "config.eval_batch_size")
  model = create_model(config)
  tx = optim.make_optimizer(config.optimizer, total_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state_shardings = placement.put((model, optimizer))
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
  caches = None
  if segment:
    train_iter = data_lib.pipeline.make_segment_iterator(
        config.data, "train", batch_size=int(config.batch_size),
        block_len=segment_lib.block_len(config), train=True, seed=int(config.get("seed", 0)))
    if start_step:  # the trim lengths in force fix the cache shapes to restore onto
      segment_lib.set_trim_lengths(model, saved_meta["trim_lengths"])
    caches = segment_lib.init_caches(model, int(config.batch_size), placement)
  else:
    train_iter = data_lib.make_iterator(config.data, "train", batch_size=int(config.batch_size),
                                        train=True, seed=int(config.get("seed", 0)))
  if start_step:
    abstract = jax.tree.map(ocp_abstract, _state_to_save(model, optimizer, caches))
    caches = _apply_state(model, optimizer,
                          checkpointer.restore(start_step, abstract, train_iter))
  trim_every = int(config.get("trim_every", 1))

  if segment:
    train_step = segment_lib.make_train_step(state_shardings)
    eval_step = segment_lib.make_eval_step()
  else:
    train_step = make_train_step(config.task, state_shardings)
    eval_step = make_eval_step(config.task)
  writer = _MetricWriter(workdir, enabled=is_main)
  dropout_base = jax.random.key(int(config.get("seed", 0)) + 2)
  log_every = int(config.get("log_every", 50))
  eval_every = int(config.get("eval_every", 0))
  eval_batches = config.get("eval_batches", None)
  last_eval: dict = {}
  status = "done"
  step = start_step
  last_good_step = start_step

  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
             disable=not (progress and is_main), dynamic_ncols=True, mininterval=1.0)
  window_loss, window_examples, window_start = [], 0, time.perf_counter()
  pending = None  # (step, loss, aux) of the last step, read one step late to keep dispatch async

  def check(entry):
    nonlocal last_good_step
    s, loss, aux = entry
    loss = float(loss)
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"the training loss became {loss} at step {s}. Nothing after step "
          f"{last_good_step} was checkpointed; the last good checkpoint "
          f"({checkpointer.latest_step()}) is kept in {checkpointer.directory}. Try a lower "
          f"optimizer.lr, more warmup, gradient clipping or float32 compute.")
    last_good_step = s
    return loss, {k: float(v) for k, v in aux.items()}

  try:
    with _stop_on_signals() as stop:
      while step < total_steps:
        batch = next(train_iter)
        key = jax.random.fold_in(dropout_base, step)
        if segment:
          if step % trim_every == 0:  # host: static window sizes from the current spans
            span_lib.update_trim_lengths(model)
          with placement.context():
            loss, aux, caches = train_step(model, optimizer, placement.batch(batch), caches,
                                           key)
        else:
          with placement.context():
            loss, aux = train_step(model, optimizer, placement.batch(batch), key)
        step += 1
        if pending is not None:
          lval, avals = check(pending)
          window_loss.append(lval)
        pending = (step, loss, aux)
        window_examples += tasks.example_count(config.task, batch)

        stopping = stop.is_set() or (stop_at_step is not None and step >= stop_at_step)
        save_now = stopping or step == total_steps or step % checkpointer.every == 0
        if save_now or step % log_every == 0:
          lval, avals = check(pending)  # synchronous: never checkpoint an unchecked state
          window_loss.append(lval)
          pending = None
        if step % log_every == 0 or step == total_steps:
          elapsed = time.perf_counter() - window_start
          scalars = {"train/loss": float(np.mean(window_loss)), "train/lr": float(schedule(step - 1)),
                     **{f"train/{k}": v for k, v in avals.items()},
                     "train/examples_per_sec": window_examples / max(elapsed, 1e-9)}
          if segment:
            scalars.update({f"train/{k}": v for k, v in segment_lib.span_scalars(model).items()})
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                          ex_s=f"{scalars['train/examples_per_sec']:.0f}")
          window_loss, window_examples, window_start = [], 0, time.perf_counter()
        if eval_every and (step % eval_every == 0 or step == total_steps):
          last_eval = evaluate(model, config, _eval_split(config), max_batches=eval_batches,
                               eval_step=eval_step, placement=placement)
          writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()
                              if isinstance(v, (int, float))})
          bar.write(f"step {step}: eval {json.dumps(last_eval)}")
        if save_now:
          if segment:
            meta = {**meta, "trim_lengths": segment_lib.trim_lengths(model)}
          checkpointer.save(step, _state_to_save(model, optimizer, caches), train_iter, meta,
                            force=stopping or step == total_steps)
        bar.update()
        if stopping and step < total_steps:
          status = "interrupted"
          bar.write(f"stopped at step {step}; checkpoint saved in {checkpointer.directory}. "
                    f"Run the same command again to resume.")
          break
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  return {"step": step, "status": status, "eval": last_eval}


def ocp_abstract(x):
  """An abstract array (shape, dtype, sharding) to restore onto."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def restore_model(config, workdir: str, step: int | None = None):
  """The model from the workdir's checkpoint at `step` (default: newest), in eval mode."""
  validate_config(config)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train first with "
                              f"`python train.py --config ... --workdir {workdir}`")
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {checkpointer.directory}; "
                              f"available steps: {steps}")
    ckpt_lib.check_compatible(checkpointer.read_meta(step), _to_dict(config.model),
                              config.task, checkpointer.directory)
    model = create_model(config)
    Placement(config).put(model)
    abstract = jax.tree.map(ocp_abstract, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    # Parameters only: evaluation needs no optimiser state.
    _apply_state(model, None, checkpointer.restore(step, abstract, partial=True))
  finally:
    checkpointer.close()
  model.eval()
  return model, step
