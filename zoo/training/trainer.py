"""The one trainer: config in, checkpoints and metrics in the workdir out.

`train(config, workdir)` validates the whole config, locks the workdir (one writer at a
time, `workdir.WorkdirLock`), builds the model and optimiser on the mesh, resumes from the
newest checkpoint in the workdir that can be read (parameters, optimiser state, the task's
carried state and the data iterator's position; unreadable newer steps are moved aside),
and runs to `config.total_steps` with a progress bar, JSONL + TensorBoard metrics (rows
past the restored step dropped first), periodic evaluation and interval checkpoints.
Nothing is written to the workdir before the config and the checkpoints' model and data
have been checked.

A checkpoint only ever holds parameters whose own loss and gradient norm were seen
finite: the state of a checkpoint step is saved once the next step's loss and gradient
(those of these parameters) are read back finite, and the last one is checked on one
more batch. A non-finite loss or gradient stops the run (or, with
`config.skip_nonfinite_updates`, the update is skipped and counted in the metrics);
SIGINT / SIGTERM save a checkpoint at the current step and stop.

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
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from zoo import checkpoints
from zoo import models
from zoo import parallel
from zoo.attention import registry
from zoo.training import checkpoint as ckpt_lib
from zoo.training import optim
from zoo.training import tasks
from zoo.training import workdir as workdir_lib
from zoo.training.tasks import hook
from zoo.training.workdir import UserError

# The trainer's own keys in a checkpoint's metadata; the rest is the model's
# `checkpoint_state`.
_RUN_META = ("model", "task", "data")


class NonFiniteLossError(UserError, RuntimeError):
  """The training loss or gradient norm became NaN or Inf (a UserError: one line)."""


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


# The trainer's knobs: (key, default, lowest allowed value, what the lowest means).
_KNOBS = (("checkpoint_every", 1000, 1, ""), ("keep_checkpoints", 3, 1, ""),
          ("log_every", 50, 1, ""), ("eval_every", 0, 0, " (0: evaluate only at the end)"))


def _knob(config, key: str) -> int:
  return int(config.get(key, next(k[1] for k in _KNOBS if k[0] == key)))


def _check_knobs(config) -> None:
  for key, default, lowest, note in _KNOBS:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      raise UserError(f"config.{key} must be an int >= {lowest}{note}, got {value!r}")
  batches = config.get("eval_batches")
  if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                              or batches < 1):
    raise UserError(f"config.eval_batches must be None (all) or an int >= 1, got {batches!r}")
  skip = config.get("skip_nonfinite_updates", False)
  if not isinstance(skip, bool):
    raise UserError(f"config.skip_nonfinite_updates must be True or False, got {skip!r}")


def init_dont_load(config) -> tuple[str, ...]:
  """`config.init_dont_load` as a tuple of regexes (a string is split at commas)."""
  value = config.get("init_dont_load") or ()
  if isinstance(value, str):
    value = value.split(",")
  return tuple(str(v).strip() for v in value if str(v).strip())


def _check_init(config) -> None:
  """`init_from` (None or a non-empty string), `init_dont_load` (regexes) and
  `init_strict` (a bool), checked before anything is built or written."""
  source = config.get("init_from")
  if source is not None and (not isinstance(source, str) or not source.strip()):
    raise UserError(f"config.init_from must be a registry name, a checkpoint path or a "
                    f"workdir, got {source!r}")
  value = config.get("init_dont_load") or ()
  if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in
                                                          ([value] if isinstance(value, str)
                                                           else value)):
    raise UserError(f"config.init_dont_load must be comma-separated regexes or a list of "
                    f"them, got {value!r}")
  for pattern in init_dont_load(config):
    try:
      re.compile(pattern)
    except re.error as e:
      raise UserError(f"config.init_dont_load: bad regex {pattern!r}: {e}") from None
  for key in ("init_allow_unpinned", "init_strict"):
    if not isinstance(config.get(key, True), bool):
      raise UserError(f"config.{key} must be True or False, got {config.get(key)!r}")


def initialize_from(config, model: nnx.Module, progress: bool = True) -> dict | None:
  """Loads `config.init_from` into `model` (`zoo.checkpoints.load` with `init_dont_load`
  and `init_strict`), prints what it did, and returns the record kept in the checkpoint
  metadata; None when the config sets no `init_from`."""
  source = config.get("init_from")
  if not source:
    return None
  allow_unpinned = bool(config.get("init_allow_unpinned", False))
  if jax.process_count() > 1 and source in checkpoints.catalog.names():
    if jax.process_index() == 0:  # one download; the others read the cached file
      checkpoints.catalog.fetch(source, allow_unpinned=allow_unpinned, progress=progress)
    multihost_utils.sync_global_devices("init_from download")
  report = checkpoints.load(source, model, dont_load=init_dont_load(config),
                            strict=bool(config.get("init_strict", True)),
                            allow_unpinned=allow_unpinned,
                            progress=progress and jax.process_index() == 0,
                            vocabulary=config.get("init_vocabulary"))
  _say(f"init_from: {report.summary()}")
  return {"source": source, "path": report.path, "format": report.format,
          "sha256": report.sha256, "loaded": len(report.loaded), "kept": report.kept,
          "ignored": report.ignored, "resampled": report.resampled,
          "dont_load": list(init_dont_load(config)),
          "strict": bool(config.get("init_strict", True))}


def validate_config(config) -> None:
  """Fails early, with the offending key named, before any data or model is built and
  before anything is written."""
  for key in ("task", "data", "model", "batch_size", "total_steps", "optimizer"):
    if key not in config:
      raise ValueError(f"config.{key} is missing")
  _check_knobs(config)
  task = tasks.get(config.task)
  models.validate(config.model)
  if config.model.name != task.model:
    trains = [t for t, m in tasks.MODEL_FOR_TASK.items() if m == config.model.name]
    which = f" (which trains with task {trains[0]!r})" if trains else ""
    raise ValueError(f"task {config.task!r} needs model.name={task.model!r}, got "
                     f"{config.model.name!r}{which}")
  task.validate(config)
  _check_init(config)
  optim.validate(config.optimizer, int(config.total_steps))
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


def make_train_step(task, state_shardings=None, *, skip_nonfinite: bool = False):
  """`train_step(model, optimizer, batch, carry, dropout_key) -> (loss, aux, next carry)`,
  updating the model and optimiser in place; `aux["grad_norm"]` is the gradient's global
  norm.

  After the update the model's `after_update` hook runs (inside the step). With
  `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves the model,
  the optimiser and the carried state as they were. With `state_shardings`, the updated
  state is constrained to them (parameters stay replicated or FSDP-sharded as placed).
  """
  @nnx.jit
  def train_step(model, optimizer, batch, carry, dropout_key):
    nodes = (model, optimizer)
    kept = nnx.Not(nnx.RngState)
    # A copy of the leaves: the update below replaces the variables' values in place.
    before = jax.tree.map(lambda x: x, nnx.state(nodes, kept)) if skip_nonfinite else None
    loss, aux, next_carry, grads = loss_and_grads(task, model, batch, carry, dropout_key)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    hook(model, "after_update")
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      choose = lambda new, old: jnp.where(ok, new, old)  # pylint: disable=unnecessary-lambda-assignment
      nnx.update(nodes, jax.tree.map(choose, nnx.state(nodes, kept), before))
      next_carry = jax.tree.map(choose, next_carry, carry)
    if state_shardings is not None:
      nnx.update(nodes, jax.lax.with_sharding_constraint(nnx.state(nodes), state_shardings))
    return loss, {**aux, "grad_norm": grad_norm}, next_carry

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
  """The training losses and gradient norms, read back one step late (so dispatch stays
  asynchronous) and checked finite, and their mean and throughput over the logging
  window. A non-finite step raises `on_nonfinite`'s error, or with `skip` (the train
  step left the state alone) is counted as skipped."""

  def __init__(self, skip: bool, on_nonfinite):
    self.skip = skip
    self.on_nonfinite = on_nonfinite  # (step, what, value) -> an exception to raise
    self.pending = None  # (step, loss, aux) of the last step, not yet read back
    self.aux: dict[str, float] = {}
    self.skipped_total = 0
    self._reset()

  def _reset(self):
    self.losses, self.skipped, self.examples = [], 0, 0
    self.start = time.perf_counter()

  def add(self, step: int, loss, aux, examples: int) -> None:
    self.check()
    self.pending = (step, loss, aux)
    self.examples += examples

  def check(self) -> bool:
    """Reads the pending step back (if any); whether its loss and gradient norm were
    finite (only False with `skip`: otherwise a non-finite one raises)."""
    if self.pending is None:
      return True
    step, loss, aux = self.pending
    self.pending = None
    loss, aux = jax.device_get((loss, aux))  # one transfer for the step's scalars
    loss, aux = float(loss), {k: float(v) for k, v in aux.items()}
    for what, value in (("loss", loss), ("gradient norm", aux["grad_norm"])):
      if not np.isfinite(value):
        if not self.skip:
          raise self.on_nonfinite(step, what, value)
        self.skipped += 1
        self.skipped_total += 1
        return False
    self.losses.append(loss)
    self.aux = aux
    return True

  def scalars(self, lr: float) -> dict[str, float]:
    """The window's train/ scalars (after `check`); starts the next window."""
    elapsed = time.perf_counter() - self.start
    out = {"train/loss": float(np.mean(self.losses))} if self.losses else {}
    out.update({"train/lr": lr, **{f"train/{k}": v for k, v in self.aux.items()},
                "train/examples_per_sec": self.examples / max(elapsed, 1e-9)})
    if self.skip:
      out["train/skipped_steps"] = self.skipped
    self._reset()
    return out


def _say(line: str) -> None:
  """A progress line on stdout (process 0)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def _warn(line: str) -> None:
  """A one-line warning on stderr (process 0)."""
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def _all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


class _Resumed:
  """What `_resume` restored (or built fresh): the model, optimiser, their shardings,
  the train iterator, the carried state, the step, and the compute-only changes since
  the checkpoint."""

  def __init__(self, config, task, placement):
    self.model = create_model(config, sharding=placement.sharding)
    self.optimizer = nnx.Optimizer(
        self.model, optim.make_optimizer(config.optimizer, int(config.total_steps)),
        wrt=nnx.Param)
    self.shardings = placement.put((self.model, self.optimizer))
    self.train_iter = task.train_iterator(config)
    self.carry = task.init_carry(self.model, int(config.batch_size), placement.sharding)
    self.step = 0
    self.changes: list[str] = []
    self.init_from: dict | None = None  # what `initialize_from` loaded, kept in the meta


def _run_meta(config) -> dict:
  return {"model": _to_dict(config.model), "task": config.task, "data": _to_dict(config.data)}


def _resume(config, task, placement, workdir: str) -> _Resumed:
  """The model, optimiser, iterator and carry at the newest checkpoint that can be read
  (newer unreadable ones are moved aside; process 0), or fresh. Refuses a checkpoint of
  another model or data before building anything."""
  reader = ckpt_lib.Checkpointer(workdir, read_only=True)
  run_meta = _run_meta(config)
  run: _Resumed | None = None

  def load(step: int):
    nonlocal run
    saved_meta = reader.read_meta(step)
    changes = ckpt_lib.check_compatible(saved_meta, run_meta["model"], config.task,
                                        reader.directory, config.data)
    run = run or _Resumed(config, task, placement)
    _restore_model_state(run.model, saved_meta)  # fixes the carried state's shapes
    carry = task.init_carry(run.model, int(config.batch_size), placement.sharding)
    restored = reader.restore(
        step, jax.tree.map(_abstract, _state_to_save(run.model, run.optimizer, task, carry)),
        run.train_iter)
    if not _all_finite(restored["params"]):
      raise ValueError("it holds non-finite parameters")
    _apply_state(run.model, run.optimizer, restored)
    run.carry, run.step, run.changes = task.carry_from_saved(restored), step, changes
    run.init_from = saved_meta.get("init_from")

  try:
    reader.restore_newest(load, move_aside=jax.process_index() == 0, log=_warn)
  finally:
    reader.close(quiet=True)
  if run is not None:
    if config.get("init_from"):
      _say(f"the workdir's own checkpoint (step {run.step}) wins over "
           f"init_from={config.init_from!r}, which is not applied")
    return run
  run = _Resumed(config, task, placement)
  run.init_from = initialize_from(config, run.model)
  return run


def _record_config(config, workdir: str, start_step: int) -> None:
  """Writes `config.json` (atomically); a different earlier one is appended to
  `config_history.jsonl` with the step it ran to."""
  path = os.path.join(workdir, "config.json")
  text = json.dumps(_to_dict(config), indent=1)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    try:
      earlier = json.loads(old) if old != text else None
    except ValueError:
      earlier = None
    if earlier is not None:
      with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
        f.write(json.dumps({"until_step": start_step, "config": earlier}) + "\n")
  workdir_lib.atomic_write(path, text)


def train(config, workdir: str, *, stop_at_step: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Trains from the newest readable checkpoint in `workdir` (or from scratch) to
  total_steps.

  Args:
    config: an ml_collections ConfigDict (see `configs/`).
    workdir: checkpoints, `metrics.jsonl`, `tensorboard/`, `config.json` (and
      `config_history.jsonl`, the earlier configs) and the lock file `.lock` go here.
    stop_at_step: stop early at this step, saving a checkpoint there, as a preemption
      would (used to test resumption).
    progress: show a tqdm progress bar.

  Returns:
    {"step": last step, "status": "done" | "interrupted" | "already_finished",
     "eval": last eval metrics} (and "skipped_steps" with skip_nonfinite_updates).

  Raises:
    UserError (one line) for what the user fixes: a bad config value, a workdir in use
    by another run (naming its pid) or not writable, checkpoints of another model or
    data, no readable checkpoint left, a full disk; NonFiniteLossError (a UserError)
    for a non-finite loss or gradient. A command refused before the run starts leaves
    the workdir as it was.
  """
  validate_config(config)
  task = tasks.get(config.task)
  placement = Placement(config)
  placement.check_batch_size(int(config.batch_size), "config.batch_size")
  placement.check_batch_size(_eval_batch_size(config), "config.eval_batch_size")
  lock = workdir_lib.WorkdirLock(workdir)
  is_main = jax.process_index() == 0
  started = False
  try:
    if is_main:
      lock.acquire()
    run = _resume(config, task, placement, workdir)
    total_steps = int(config.total_steps)
    if run.step >= total_steps:
      extra = f" (config.total_steps is {total_steps})" if run.step > total_steps else ""
      _say(f"already finished at step {run.step}{extra}; nothing to do")
      return {"step": run.step, "status": "already_finished", "eval": {}}
    started = True
    if run.step:
      _say(f"resuming from step {run.step} of {total_steps}")
    if run.changes:
      _say("the config changes how the checkpoint's model computes, not its parameters: "
           + "; ".join(run.changes))
    if is_main:
      _record_config(config, workdir, run.step)
    return _train_loop(config, task, placement, workdir, run, stop_at_step, progress)
  except OSError as e:
    raise workdir_lib.user_os_error(e, f"cannot write in the workdir {workdir}") or e from None
  finally:
    lock.release(undo=not started)


def _train_loop(config, task, placement, workdir, run: _Resumed, stop_at_step, progress):
  """The steps from `run.step` to total_steps: logging, evaluation and checkpoints."""
  is_main = jax.process_index() == 0
  total_steps, start_step = int(config.total_steps), run.step
  model, optimizer, train_iter, carry = run.model, run.optimizer, run.train_iter, run.carry
  every, log_every, eval_every = (_knob(config, k) for k in
                                  ("checkpoint_every", "log_every", "eval_every"))
  skip = bool(config.get("skip_nonfinite_updates", False))
  meta = _run_meta(config)
  if run.init_from:
    meta["init_from"] = run.init_from
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps)
  train_step = make_train_step(task, run.shardings, skip_nonfinite=skip)
  eval_step = make_eval_step(task)
  dropout_base = jax.random.key(int(config.get("seed", 0)) + 2)
  eval_split = config.get("eval_split", task.eval_split)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=_knob(config, "keep_checkpoints"))
  saved = [start_step or None]  # the newest checkpoint (its loss and gradient were finite)

  def nonfinite(step, what, value):
    newest = (f"the newest checkpoint, step {saved[0]} in {checkpointer.directory}, holds "
              f"parameters whose loss and gradient were finite, and the same command "
              f"resumes from it" if saved[0] else "no checkpoint was written")
    return NonFiniteLossError(
        f"the training {what} became {value} at step {step}, so the parameters after step "
        f"{step - 1} were not checkpointed; {newest}. Try a lower optimizer.lr, more "
        f"warmup, gradient clipping or float32 compute, or set "
        f"config.skip_nonfinite_updates=True to skip such steps.")

  def run_step(step):
    """Trains on the next batch: (loss, aux, next carry, examples)."""
    batch = next(train_iter)
    task.before_step(model, config, step)
    loss, aux, next_carry = train_step(model, optimizer, placement.batch(batch), carry,
                                       jax.random.fold_in(dropout_base, step))
    return loss, aux, next_carry, task.examples(batch)

  def snapshot(step):
    """What a checkpoint of `step` holds, taken now (the arrays are not changed in place)."""
    return (step, _state_to_save(model, optimizer, task, carry),
            ckpt_lib.IteratorSnapshot(train_iter),
            {**meta, **hook(model, "checkpoint_state", default={})})

  def save(pending):
    checkpointer.save(*pending)
    saved[0] = pending[0]

  writer = workdir_lib.MetricWriter(workdir, enabled=is_main, start_step=start_step)
  losses = _LossWindow(skip, nonfinite)
  last_eval: dict = {}
  status = "done"
  step = start_step
  pending = None  # a checkpoint's snapshot, saved once its own loss is seen finite
  due = False
  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
             disable=not (progress and is_main), dynamic_ncols=True,
             mininterval=1.0 if sys.stderr.isatty() else 30.0)  # logs: a line per 30 s
  failed = True
  try:
    with _stop_on_signals() as stop:
      while step < total_steps:
        loss, aux, carry, examples = run_step(step)
        step += 1
        losses.add(step, loss, aux, examples)
        if pending is not None:  # this step's loss and gradient are the snapshot's own
          if losses.check():
            save(pending)
          else:  # skipped: the state is still the snapshot's; checkpoint it at this step
            due = True
          pending = None

        stopping = stop.is_set() or (stop_at_step is not None and step >= stop_at_step)
        due = due or stopping or step == total_steps or step % every == 0
        if step % log_every == 0 or step == total_steps:
          losses.check()
          scalars = losses.scalars(float(schedule(step - 1)))
          scalars.update({f"train/{k}": v
                          for k, v in hook(model, "host_metrics", default={}).items()})
          writer.write(step, scalars)
          if "train/loss" in scalars:
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                            ex_s=f"{scalars['train/examples_per_sec']:.0f}")
        if step == total_steps or (eval_every and step % eval_every == 0):
          last_eval = evaluate(model, config, eval_split, max_batches=config.get("eval_batches"),
                               eval_step=eval_step, placement=placement)
          writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()
                              if isinstance(v, (int, float))})
          bar.write(f"step {step}: eval {json.dumps(last_eval)}")
        if due:
          pending, due = snapshot(step), False
        bar.update()
        if stopping and step < total_steps:
          status = "interrupted"
          break
      if pending is not None:  # the last checkpoint's own loss, on one more batch
        loss, aux, _, _ = run_step(step)
        losses.add(step + 1, loss, aux, 0)
        if not losses.check():
          raise nonfinite(step + 1, "loss or gradient norm", "non-finite")
        save(pending)
      checkpointer.wait()
      if status == "interrupted":
        bar.write(f"stopped at step {step}; checkpoint saved in {checkpointer.directory}. "
                  f"Run the same command again to resume.")
    failed = False
  finally:
    bar.close()
    writer.close()
    checkpointer.close(quiet=failed)
  result = {"step": step, "status": status, "eval": last_eval}
  if skip:
    result["skipped_steps"] = losses.skipped_total
  return result


def pretrained_model(config):
  """(model in eval mode, report record) with `config.init_from`'s weights loaded into
  the config's model (`initialize_from`), for evaluating a pretrained checkpoint without
  training. Raises a one-line error when the config sets no `init_from`."""
  validate_config(config)
  if not config.get("init_from"):
    raise UserError("config.init_from is not set: give the checkpoint to evaluate "
                    "(--config.init_from=NAME_OR_PATH) or a trained --workdir")
  placement = Placement(config)
  model = create_model(config, sharding=placement.sharding)
  placement.put(model)
  record = initialize_from(config, model)
  model.eval()
  return model, record


def restore_model(config, workdir: str, step: int | None = None):
  """(model in eval mode, step) from the workdir's checkpoint at `step` (default: the
  newest that can be read; one line on stderr names each newer one skipped, and the
  step used). Reads only complete checkpoints, takes no lock and writes nothing, so it
  is safe beside a running `train`. Raises a one-line UserError when there is no
  checkpoint (or none readable, or `step` cannot be read) or it is of another model."""
  validate_config(config)
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  train_first = f"train first with `python train.py --config ... --workdir {workdir}`"
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint in {directory}; {train_first}")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  placement = Placement(config)
  model = None

  def load(at: int):
    nonlocal model
    meta = checkpointer.read_meta(at)
    ckpt_lib.check_compatible(meta, _to_dict(config.model), config.task, checkpointer.directory)
    if model is None:
      model = create_model(config, sharding=placement.sharding)
      placement.put(model)
    _restore_model_state(model, meta)
    # Parameters only: evaluation needs no optimiser state.
    abstract = jax.tree.map(_abstract, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    _apply_state(model, None, checkpointer.restore(at, abstract, partial=True))

  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"no checkpoint in {checkpointer.directory}; {train_first}")
    if step is None:
      step, _ = checkpointer.restore_newest(load, move_aside=False, log=_warn)
      if step is None:  # all deleted by a writer since listed
        raise UserError(f"no checkpoint in {checkpointer.directory}; {train_first}")
    elif int(step) not in steps:
      raise UserError(f"no checkpoint at step {step} in {checkpointer.directory}; available "
                      f"steps: {steps}")
    else:
      step = int(step)
      checkpointer.read_step(step, load)
  finally:
    checkpointer.close(quiet=True)
  model.eval()
  return model, step
