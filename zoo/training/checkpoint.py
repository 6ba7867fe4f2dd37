"""Orbax checkpoints in MaxText's manner: one `CheckpointManager` per workdir holding

* `state`: model parameters and optimiser state (`PyTreeSave`, async),
* `data_iter`: each process's grain iterator state (`grain.checkpoint.CheckpointHandler`,
  one JSON file per process), so a resumed run reads exactly the batches it would have,
* `meta`: the model config and task, checked before a run resumes from the workdir.

Saves happen every `every` steps (interval policy), the latest `keep` are kept, and the
newest checkpoint in the workdir is restored automatically.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from zoo import models
from zoo.attention import registry

# Model config keys that do not change the model's function or parameters.
_NON_ARCHITECTURAL = ("dtype",)


class _IteratorSnapshot:
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


def architecture(model_config: dict) -> dict:
  """The model config keys that fix its parameters and function: without the dtype, and
  with the attention's options completed by their defaults (so a checkpoint written
  before an option existed still matches) and without the compute-only ones (tiles,
  kernels, implementations: they never change the parameters)."""
  arch = {k: v for k, v in model_config.items() if k not in _NON_ARCHITECTURAL}
  if arch.get("name") not in models.MODELS:
    return arch
  name = models.attention_name(arch)
  if name not in registry.names():
    return arch
  cached = models.attention_runs_cached(arch)
  family = registry.get(name)
  options = {**family.option_defaults(cached=cached), **(arch.get("attention_options") or {})}
  compute_only = family.options_class_for(cached).compute_only_names()
  arch["attention_options"] = {k: v for k, v in options.items()
                               if k not in compute_only and v is not None}
  return arch


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, every: int = 1000, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every = max(int(every), 1)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every), 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
    """Saves if the interval policy says so (or `force`); returns whether it saved."""
    args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

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
      args["data_iter"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot(data_iter))
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_compatible(meta: dict, model_config: dict, task: str, directory: str) -> None:
  """Fails with a clear message when a workdir holds a checkpoint of a different model."""
  saved, current = architecture(meta.get("model", {})), architecture(model_config)
  problems = []
  if meta.get("task") != task:
    problems.append(f"task: checkpoint {meta.get('task')!r}, config {task!r}")
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      problems.append(f"model.{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}")
  if problems:
    raise ValueError(
        f"the workdir's checkpoints ({directory}) are of a different model than this config:\n  "
        + "\n  ".join(problems)
        + "\nUse a fresh --workdir, or the config that wrote these checkpoints.")
