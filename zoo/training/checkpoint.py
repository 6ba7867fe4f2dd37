"""Orbax checkpoints in MaxText's manner: one `CheckpointManager` per workdir holding

* `state`: model parameters and optimiser state (`PyTreeSave`, async),
* `data_iter`: each process's grain iterator state (`grain.checkpoint.CheckpointHandler`,
  one JSON file per process), so a resumed run reads exactly the batches it would have,
* `meta`: the model and data config and the task, checked before a run resumes from the
  workdir.

The trainer decides when to save (`save` always writes), the latest `keep` are kept, and
`restore_newest` walks back from the newest step past any that cannot be read, naming
each in one line: a writer moves such a step aside to `checkpoints/corrupt-<step>` (never
deletes it), a reader (`read_only=True`, as `eval.py`) only skips it. Orbax writes a
step under a temporary name and renames it when complete, so a reader sees only complete
steps, even while a writer runs.

Failures of an (async) save, e.g. a full disk, surface as one-line `UserError`s from
`save`, `wait` or `close`; Orbax's own tracebacks for them (background threads,
unretrieved futures, "Event loop is closed" after a failed read) are kept off the console.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from zoo import models
from zoo.attention import registry
from zoo.training import workdir as workdir_lib
from zoo.training.workdir import UserError

# Model config keys that do not change the model's function or parameters.
_NON_ARCHITECTURAL = ("dtype",)
# Data config keys that fix the examples and their split (not where prepared data lives,
# how many threads read it, or the batch size).
# Data config keys that change where or how fast data is read, never the examples; every
# other key (name, source_dir, glob, path, heldout_bytes, seq_len, image_size, ...) must
# match for a resume.
NON_IDENTITY_DATA_KEYS = ("data_dir", "download", "num_threads", "prefetch_batches", "cache")
# Phrases of filesystem errors worth naming on their own.
_OS_REASONS = tuple(os.strerror(e) for e in workdir_lib.USER_ERRNOS)


class IteratorSnapshot:
  """The iterator's state frozen at save time (the save itself may run later, async)."""

  def __init__(self, iterator=None, state: Any = None):
    self._iterator = iterator
    self._state = state if iterator is None else iterator.get_state()

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


def _filled(model_config: dict) -> tuple[dict, tuple[str, ...]]:
  """The model config with the model's constructor defaults for the keys it leaves out
  (so a checkpoint written before an argument such as `mlp_activation` existed still
  matches), the attention's options completed by their defaults, and the names of its
  compute-only options."""
  config = dict(model_config)
  if config.get("name") not in models.MODELS:
    return config, ()
  config = {**models.constructor_defaults(config["name"]), **config}
  name = models.attention_name(config)
  if name not in registry.names():
    return config, ()
  cached = models.attention_runs_cached(config)
  family = registry.get(name)
  config["attention_options"] = {**family.option_defaults(cached=cached),
                                 **(config.get("attention_options") or {})}
  return config, tuple(family.options_class_for(cached).compute_only_names())


def architecture(model_config: dict) -> dict:
  """The model config keys that fix its parameters and function: without the dtype, and
  with the attention's options completed by their defaults (so a checkpoint written
  before an option existed still matches) and without the compute-only ones (tiles,
  kernels, implementations: they never change the parameters)."""
  filled, compute_only = _filled(model_config)
  arch = {k: v for k, v in filled.items() if k not in _NON_ARCHITECTURAL}
  if "attention_options" in arch and arch.get("name") in models.MODELS:
    arch["attention_options"] = {k: v for k, v in arch["attention_options"].items()
                                 if k not in compute_only and v is not None}
  return arch


def data_identity(data_config) -> dict:
  """The data config keys that fix the examples and their split (all but
  `NON_IDENTITY_DATA_KEYS`). A checkpoint's meta written before they were saved holds
  only the dataset name."""
  if isinstance(data_config, str):
    return {"name": data_config}
  return {k: v for k, v in dict(data_config).items()
          if k not in NON_IDENTITY_DATA_KEYS and v is not None}


def _flat(tree: dict, prefix: str) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _differences(saved: dict, current: dict) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


def check_compatible(meta: dict, model_config: dict, task: str, directory: str,
                     data_config=None) -> list[str]:
  """Refuses (one-line UserError naming each differing key) a checkpoint of another model
  (its parameters or function), task or data (`data_identity`; with `data_config` given).
  Returns the changes that leave the parameters alone (compute-only attention options,
  dtype), each as 'model.KEY: checkpoint X, config Y'."""
  saved_model, current_model = meta.get("model", {}), model_config
  problems = []
  if meta.get("task") != task:
    problems.append(f"task: checkpoint {meta.get('task')!r}, config {task!r}")
  problems += _differences(_flat(architecture(saved_model), "model."),
                           _flat(architecture(current_model), "model."))
  if data_config is not None and "data" in meta:
    saved_data = data_identity(meta["data"])
    current_data = data_identity(data_config)
    if isinstance(meta["data"], str):  # an older checkpoint: only its dataset's name
      current_data = {"name": current_data.get("name")}
    problems += _differences(_flat(saved_data, "data."), _flat(current_data, "data."))
  if problems:
    raise UserError(
        f"the workdir's checkpoints ({directory}) are of a different model or data than "
        f"this config: {'; '.join(problems)}. Use a fresh --workdir, or the config that "
        f"wrote these checkpoints.")
  return _differences(_flat(_filled(saved_model)[0], "model."),
                      _flat(_filled(current_model)[0], "model."))


def short_reason(error: BaseException, limit: int = 200) -> str:
  """One line about `error`: a filesystem phrase it contains (e.g. 'No space left on
  device'), else its type and the start of its first line."""
  text = str(error)
  for phrase in _OS_REASONS:
    if phrase in text:
      return phrase
  line = (text.strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
  line = f"{type(error).__name__}: {line}" if line else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."


class _QuietOrbax(logging.Filter):
  """Keeps Orbax's log records (and asyncio's unretrieved-future errors, which Orbax's
  failed writes leave) off the console while a Checkpointer is open; the errors are
  kept, and `Checkpointer` raises them as one line."""

  def __init__(self):
    super().__init__()
    self.errors: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
    if not (from_orbax or record.name == "asyncio"):
      return True
    if from_orbax and record.levelno >= logging.ERROR:
      self.errors.append((record.getMessage().splitlines() or [""])[0])
    return False


_default_unraisablehook = sys.unraisablehook


def _unraisablehook(unraisable) -> None:
  """Drops 'Event loop is closed' from the tensorstore callbacks that a failed Orbax read
  or write leaves behind (they fire after Orbax closed its event loop); passes the rest."""
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"):
    return
  _default_unraisablehook(unraisable)


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under `workdir/checkpoints`.

  `read_only=True` (for `eval.py`) creates, deletes and moves nothing; there must be no
  writer without the workdir's lock (`workdir.WorkdirLock`).
  """

  _filter_lock = threading.Lock()
  _open = 0
  _filter = _QuietOrbax()

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.read_only = read_only
    self._in_flight: int | None = None  # the step of the last save, maybe still writing
    self._quiet()
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
          enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                         "data_iter": grain.checkpoint.CheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except OSError as e:
      self._loud()
      raise UserError(f"cannot open the checkpoints in {self.directory}: "
                      f"{short_reason(e)}") from None
    except BaseException:
      self._loud()
      raise

  @classmethod
  def _quiet(cls) -> None:
    with cls._filter_lock:
      if cls._open == 0:
        logging.getLogger("absl").addFilter(cls._filter)
        logging.getLogger("asyncio").addFilter(cls._filter)
        sys.unraisablehook = _unraisablehook
      cls._open += 1

  @classmethod
  def _loud(cls) -> None:
    with cls._filter_lock:
      cls._open -= 1
      if cls._open == 0:
        logging.getLogger("absl").removeFilter(cls._filter)
        logging.getLogger("asyncio").removeFilter(cls._filter)

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _write_error(self, step, error: BaseException) -> UserError:
    return UserError(f"could not write checkpoint {step} to {self.directory}: "
                     f"{short_reason(error)}. The run stopped; make room (or fix the "
                     f"permissions) and run the same command again to resume from the "
                     f"newest complete checkpoint.")

  def wait(self) -> None:
    """Waits for the save in flight; its failure (also one Orbax only logged, leaving the
    step unfinished) is raised as a one-line UserError."""
    step, self._in_flight = self._in_flight, None
    errors = self._filter.errors
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(step, e) from None
    if (step is not None and jax.process_index() == 0
        and not os.path.isdir(self.step_path(step))):
      raise self._write_error(step, RuntimeError(
          errors[0] if errors else "Orbax did not finish writing it"))

  def save(self, step: int, state, data_iter, meta: dict) -> None:
    """Writes a checkpoint of `step` (async: `wait` or the next save sees it finish)."""
    self.wait()
    args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(
          data_iter if isinstance(data_iter, IteratorSnapshot)
          else IteratorSnapshot(data_iter))
    self._in_flight = step
    self._filter.errors.clear()  # from here on, Orbax's errors are this save's
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._in_flight = None
      raise self._write_error(step, e) from None

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, data_iter=None, *, partial: bool = False):
    """Restores `state` onto `abstract_state`'s structure and shardings, and the iterator.

    `partial=True` restores only the subtree that `abstract_state` names (e.g. the
    parameters without the optimiser state).
    """
    args = {"state": ocp.args.PyTreeRestore(
        item=abstract_state, partial_restore=partial,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(IteratorSnapshot(data_iter))
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def move_aside(self, step: int) -> str:
    """Renames the step's directory to `corrupt-<step>` (`-2`, ... when taken)."""
    target, n = os.path.join(self.directory, f"corrupt-{step}"), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.directory, f"corrupt-{step}-{n}")
    try:
      os.rename(self.step_path(step), target)
    except OSError as e:
      raise UserError(f"checkpoint {step} in {self.directory} cannot be read and cannot be "
                      f"moved aside: {short_reason(e)}") from None
    self.manager.reload()
    return target

  def restore_newest(self, load: Callable[[int], Any], *, move_aside: bool,
                     log: Callable[[str], None]) -> tuple[int | None, Any]:
    """(step, load(step)) for the newest step that `load` reads without an exception;
    (None, None) when there is no checkpoint.

    A UserError from `load` (e.g. a different model) is raised as it is. Any other error
    marks the step unreadable: once an older step has been read, `log` gets one line per
    newer one naming it and why, and with `move_aside` (a writer holding the workdir's
    lock) it is moved to `corrupt-<step>`. When no step can be read, raises a UserError
    listing them (nothing moved).
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        value = load(step)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        if os.path.isdir(self.step_path(step)):  # else deleted by a writer while read
          unreadable.append((step, short_reason(e)))
        continue
      for bad, reason in unreadable:
        done = (f"moved it to {self.move_aside(bad)} and resuming from step {step}"
                if move_aside else f"using step {step}")
        log(f"checkpoint {bad} in {self.directory} cannot be read ({reason}); {done}")
      return step, value
    if unreadable:
      listed = "; ".join(f"step {s}: {r}" for s, r in unreadable)
      raise UserError(f"no checkpoint in {self.directory} can be read ({listed}). Move them "
                      f"out of the way (or use a fresh --workdir) to start from scratch.")
    return None, None

  def read_step(self, step: int, load: Callable[[int], Any]) -> Any:
    """load(step), a failure to read it (not a UserError) raised as a one-line UserError."""
    try:
      return load(step)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise UserError(f"checkpoint {step} in {self.directory} cannot be read "
                      f"({short_reason(e)}); choose another step or none (the newest "
                      f"readable)") from None

  def close(self, *, quiet: bool = False) -> None:
    """Waits for the save in flight and closes; `quiet`: a failure is not raised (the
    run is already failing with another error)."""
    if self.manager is None:
      return
    try:
      self.wait()
    except UserError:
      if not quiet:
        raise
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if not quiet:
          raise
      finally:
        self.manager = None
        self._loud()
