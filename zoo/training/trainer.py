"""The one trainer: config in, checkpoints and metrics in the workdir out.

`train(config, workdir)` builds the model and optimiser on the mesh, resumes from the
newest checkpoint in the workdir (parameters, optimiser state, the task's carried state
and the data iterator's position), and runs to `config.total_steps` with a progress bar,
JSONL + TensorBoard metrics, periodic evaluation and interval checkpoints. A non-finite
loss stops the run before it can be checkpointed; SIGINT / SIGTERM save a checkpoint at
the current step and stop.

Every task runs through the same train step and eval loop: the task
(`zoo.training.tasks`) says what a batch means and what is carried between batches, and
the model's optional hooks (`regularization_loss`, `after_update`, `before_step`,
`checkpoint_state`, `host_metrics`, `eval_report`; see `tasks`) add what the model needs.
"""

from __future__ import annotations

import contextlib
import itertools
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

from zoo import models
from zoo import parallel
from zoo.attention import registry
from zoo.training import checkpoint as ckpt_lib
from zoo.training import optim
from zoo.training import tasks
from zoo.training.tasks import hook

# The trainer's own keys in a checkpoint's metadata; the rest is the model's
# `checkpoint_state`.
_RUN_META = ("model", "task", "data")


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


def _to_dict(cfg) -> dict:
  cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  return json.loads(json.dumps(cfg))  # the same form as after a checkpoint's JSON round trip


def _check_sequence_parallel(config) -> None:
  """`config.sequence_parallel` must be a strategy of the attention layer the model runs
  (for a segment model, the name's layer over the cache)."""
  strategy = config.get("sequence_parallel")
  if strategy is None:
    return
  attention = models.attention_name(config.model)
  available = registry.strategies(attention, cached=models.attention_runs_cached(config.model))
  if strategy not in available:
    raise ValueError(f"config.sequence_parallel={strategy!r} is not a strategy of attention "
                     f"{attention!r}; available: {', '.join(available) or 'none'}")


def validate_config(config) -> None:
  """Fails early, with the offending key named, before any data or model is built."""
  for key in ("task", "data", "model", "batch_size", "total_steps", "optimizer"):
    if key not in config:
      raise ValueError(f"config.{key} is missing")
  task = tasks.get(config.task)
  models.validate(config.model)
  if config.model.name != task.model:
    trains = [t for t, m in tasks.MODEL_FOR_TASK.items() if m == config.model.name]
    which = f" (which trains with task {trains[0]!r})" if trains else ""
    raise ValueError(f"task {config.task!r} needs model.name={task.model!r}, got "
                     f"{config.model.name!r}{which}")
  task.validate(config)
  _check_sequence_parallel(config)
  if int(config.total_steps) <= 0 or int(config.batch_size) <= 0:
    raise ValueError("config.total_steps and config.batch_size must be positive")
  if int(config.batch_size) % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide by the process count "
                     f"{jax.process_count()}")


def create_model(config, seed: int | None = None,
                 sharding: parallel.Sharding | None = None) -> nnx.Module:
  """The config's model, laid out by `sharding` (None: one device, attention unsplit)."""
  seed = int(config.get("seed", 0) if seed is None else seed)
  return models.create(config.model, nnx.Rngs(params=seed, dropout=seed + 1),
                       sharding=sharding)


def _eval_batch_size(config) -> int:
  return int(config.get("eval_batch_size", config.batch_size))


class Placement:
  """Where arrays live: the mesh, its logical rules and the sequence-parallel strategy.

  `config.mesh` (e.g. {"data": 2, "seq": 4}; default: all devices on `data`) and
  `config.sequence_parallel` (None or one of the chosen attention's strategies) make
  `self.sharding`, which the model is built with. Parameters are replicated, or with
  `mesh.fsdp > 1` sharded over `fsdp` along their largest divisible dimension
  (big_vision's fsdp rule); batches are sharded over data/fsdp, and token sequences also
  over `seq`.
  """

  def __init__(self, config):
    self.mesh = parallel.make_mesh(config.get("mesh"))
    self.rules = parallel.DEFAULT_RULES + (
        parallel.FSDP_RULES if self.mesh.shape["fsdp"] > 1 else ())
    self.sharding = parallel.Sharding(self.mesh, self.rules, config.get("sequence_parallel"))

  def check_batch_size(self, batch_size: int, what: str) -> None:
    replicas = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if batch_size % replicas:
      raise ValueError(f"{what} {batch_size} does not divide by the mesh's data x fsdp = "
                       f"{replicas} batch shards (mesh {dict(self.mesh.shape)}); set "
                       f"config.mesh or the batch size")

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


def _state_to_save(model, optimizer, task, carry) -> dict:
  """Parameters and optimiser state as plain nested dicts (stable across Flax versions),
  and the task's carried state."""
  return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
          **task.carry_to_save(carry)}


def _apply_state(model, optimizer, restored) -> None:
  """Puts restored parameters (and optimiser state, unless `optimizer` is None) in place."""
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.update(model, params)
  if optimizer is not None:
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(optimizer, opt_state)


def _abstract(x):
  """An abstract array (shape, dtype, sharding) to restore onto."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _restore_model_state(model, meta: dict) -> None:
  """The model's host state (`checkpoint_state`) saved in a checkpoint's metadata."""
  hook(model, "restore_checkpoint_state", {k: v for k, v in meta.items() if k not in _RUN_META})


def training_loss(task, model, batch, carry):
  """(objective, (aux, next carry)): the task's loss plus the model's
  `regularization_loss` when it has one (logged as `aux[task.regularization_metric]`;
  never part of evaluation)."""
  loss, aux, carry = task.loss(model, batch, carry)
  penalty = hook(model, "regularization_loss")
  if penalty is not None:
    penalty = penalty.astype(jnp.float32)
    loss, aux = loss + penalty, {**aux, task.regularization_metric: penalty}
  return loss, (aux, carry)


def loss_and_grads(task, model, batch, carry, dropout_key):
  """(objective, aux, next carry, gradients): what a train step computes before its update."""
  nnx.reseed(model, dropout=dropout_key)
  (loss, (aux, carry)), grads = nnx.value_and_grad(
      lambda m: training_loss(task, m, batch, carry), has_aux=True)(model)
  return loss, aux, carry, grads


def make_train_step(task, state_shardings=None):
  """`train_step(model, optimizer, batch, carry, dropout_key) -> (loss, aux, next carry)`,
  updating the model and optimiser in place.

  After the update the model's `after_update` hook runs (inside the step). With
  `state_shardings`, the updated state is constrained to them (parameters stay
  replicated or FSDP-sharded as placed).
  """
  @nnx.jit
  def train_step(model, optimizer, batch, carry, dropout_key):
    loss, aux, carry, grads = loss_and_grads(task, model, batch, carry, dropout_key)
    optimizer.update(model, grads)
    hook(model, "after_update")
    if state_shardings is not None:
      nodes = (model, optimizer)
      nnx.update(nodes, jax.lax.with_sharding_constraint(nnx.state(nodes), state_shardings))
    return loss, {**aux, "grad_norm": optax.tree.norm(grads)}, carry

  return train_step


def make_eval_step(task):
  """`eval_step(model, batch, carry) -> (sums, next carry)`."""
  return nnx.jit(task.eval_sums)


def _length(batches) -> int | None:
  try:
    return len(batches)
  except TypeError:
    return None


def evaluate(model, config, split: str, *, max_batches: int | None = None,
             eval_step=None, progress: bool = False, placement: Placement | None = None) -> dict:
  """Evaluates `model` on `split`: one ordered pass, every example counted once.

  `max_batches` limits the pass to its first batches (for the segment LM, a prefix of
  every row). The model's `before_step` hook runs first (TransformerSeq: the trimmed
  windows follow the current spans) and its `checkpoint_state` is put back afterwards, so
  evaluation inside a training run does not change the run. Returns the task's metrics
  and the model's `eval_report` (TransformerSeq: the learned `spans`).
  """
  task = tasks.get(config.task)
  placement = placement or Placement(config)
  eval_step = eval_step or make_eval_step(task)
  batch_size = _eval_batch_size(config)
  placement.check_batch_size(batch_size, "config.eval_batch_size")
  batches = task.eval_iterator(config, split, batch_size)
  total = _length(batches)
  if max_batches is not None:
    batches = itertools.islice(batches, max_batches)
    total = max_batches if total is None else min(total, max_batches)
  saved = hook(model, "checkpoint_state")
  hook(model, "before_step")
  model.eval()
  carry = task.init_carry(model, batch_size, placement.sharding)
  totals: dict[str, float] = {}
  bar = tqdm(total=total, desc=f"eval {split}", unit="batch", disable=not progress,
             leave=False)
  try:
    for batch in batches:
      sums, carry = eval_step(model, placement.batch(batch), carry)
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
      bar.update()
  finally:
    bar.close()
    model.train()
    if saved is not None:
      hook(model, "restore_checkpoint_state", saved)
  if not totals.get("count"):
    raise ValueError(f"split {split!r} of {config.data.name!r} gave nothing to evaluate")
  return {**task.finalize(totals), **hook(model, "eval_report", default={})}


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


class _LossWindow:
  """The training losses, checked one step late (so dispatch stays asynchronous), and
  their mean and throughput over the logging window."""

  def __init__(self, checkpointer, start_step: int):
    self.checkpointer = checkpointer
    self.last_good_step = start_step
    self.pending = None  # (step, loss, aux) of the last step, not yet read back
    self.aux: dict[str, float] = {}
    self._reset()

  def _reset(self):
    self.losses, self.examples, self.start = [], 0, time.perf_counter()

  def add(self, step: int, loss, aux, examples: int) -> None:
    self.check()
    self.pending = (step, loss, aux)
    self.examples += examples

  def check(self) -> None:
    """Reads the pending step's loss back; raises if it is not finite."""
    if self.pending is None:
      return
    step, loss, aux = self.pending
    self.pending = None
    loss = float(loss)
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f"the training loss became {loss} at step {step}. Nothing after step "
          f"{self.last_good_step} was checkpointed; the last good checkpoint "
          f"({self.checkpointer.latest_step()}) is kept in {self.checkpointer.directory}. "
          f"Try a lower optimizer.lr, more warmup, gradient clipping or float32 compute.")
    self.last_good_step = step
    self.losses.append(loss)
    self.aux = {k: float(v) for k, v in aux.items()}

  def scalars(self, lr: float) -> dict[str, float]:
    """The window's train/ scalars (after `check`); starts the next window."""
    elapsed = time.perf_counter() - self.start
    out = {"train/loss": float(np.mean(self.losses)), "train/lr": lr,
           **{f"train/{k}": v for k, v in self.aux.items()},
           "train/examples_per_sec": self.examples / max(elapsed, 1e-9)}
    self._reset()
    return out


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
  task = tasks.get(config.task)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  total_steps, batch_size = int(config.total_steps), int(config.batch_size)
  meta = {"model": _to_dict(config.model), "task": config.task, "data": config.data.name}

  checkpointer = ckpt_lib.Checkpointer(workdir, every=int(config.get("checkpoint_every", 1000)),
                                       keep=int(config.get("keep_checkpoints", 3)))
  start_step = checkpointer.latest_step() or 0
  saved_meta = checkpointer.read_meta(start_step) if start_step else {}
  if start_step:  # refuse a different model before building anything
    ckpt_lib.check_compatible(saved_meta, meta["model"], config.task, checkpointer.directory)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_to_dict(config), f, indent=1)

  placement = Placement(config)
  placement.check_batch_size(batch_size, "config.batch_size")
  placement.check_batch_size(_eval_batch_size(config), "config.eval_batch_size")
  model = create_model(config, sharding=placement.sharding)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer, total_steps),
                            wrt=nnx.Param)
  state_shardings = placement.put((model, optimizer))
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
  train_iter = task.train_iterator(config)
  if start_step:  # the model's saved host state fixes the carried state's shapes
    _restore_model_state(model, saved_meta)
  carry = task.init_carry(model, batch_size, placement.sharding)
  if start_step:
    restored = checkpointer.restore(
        start_step, jax.tree.map(_abstract, _state_to_save(model, optimizer, task, carry)),
        train_iter)
    _apply_state(model, optimizer, restored)
    carry = task.carry_from_saved(restored)

  train_step = make_train_step(task, state_shardings)
  eval_step = make_eval_step(task)
  writer = _MetricWriter(workdir, enabled=is_main)
  dropout_base = jax.random.key(int(config.get("seed", 0)) + 2)
  log_every = int(config.get("log_every", 50))
  eval_every = int(config.get("eval_every", 0))
  eval_split = config.get("eval_split", task.eval_split)
  losses = _LossWindow(checkpointer, start_step)
  last_eval: dict = {}
  status = "done"
  step = start_step
  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
             disable=not (progress and is_main), dynamic_ncols=True, mininterval=1.0)
  try:
    with _stop_on_signals() as stop:
      while step < total_steps:
        batch = next(train_iter)
        task.before_step(model, config, step)
        loss, aux, carry = train_step(model, optimizer, placement.batch(batch), carry,
                                      jax.random.fold_in(dropout_base, step))
        step += 1
        losses.add(step, loss, aux, task.examples(batch))

        stopping = stop.is_set() or (stop_at_step is not None and step >= stop_at_step)
        save_now = stopping or step == total_steps or step % checkpointer.every == 0
        if save_now or step % log_every == 0:
          losses.check()  # synchronous: never checkpoint an unchecked state
        if step % log_every == 0 or step == total_steps:
          scalars = losses.scalars(float(schedule(step - 1)))
          scalars.update({f"train/{k}": v
                          for k, v in hook(model, "host_metrics", default={}).items()})
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                          ex_s=f"{scalars['train/examples_per_sec']:.0f}")
        if eval_every and (step % eval_every == 0 or step == total_steps):
          last_eval = evaluate(model, config, eval_split, max_batches=config.get("eval_batches"),
                               eval_step=eval_step, placement=placement)
          writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()
                              if isinstance(v, (int, float))})
          bar.write(f"step {step}: eval {json.dumps(last_eval)}")
        if save_now:
          checkpointer.save(step, _state_to_save(model, optimizer, task, carry), train_iter,
                            {**meta, **hook(model, "checkpoint_state", default={})},
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
    meta = checkpointer.read_meta(step)
    ckpt_lib.check_compatible(meta, _to_dict(config.model), config.task,
                              checkpointer.directory)
    placement = Placement(config)
    model = create_model(config, sharding=placement.sharding)
    placement.put(model)
    _restore_model_state(model, meta)
    # Parameters only: evaluation needs no optimiser state.
    abstract = jax.tree.map(_abstract, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    _apply_state(model, None, checkpointer.restore(step, abstract, partial=True))
  finally:
    checkpointer.close()
  model.eval()
  return model, step
