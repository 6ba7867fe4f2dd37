"""Tasks: what a batch means, what is carried from batch to batch, and what is reported.

The trainer (`zoo.training.trainer`) runs every task with one train step and one eval
loop; a task supplies the parts that differ (the `Task` protocol below). Three tasks:

* `classification` (`vit`): images and integer labels; accuracy.
* `lm` (`lm`): byte windows, next-byte prediction; bits per byte.
* `segment_lm` (`transformer_seq`): B contiguous streams read `data.block_len` bytes at a
  time (`zoo.data.pipeline.SegmentIterator`) with one cache per layer (the previous
  positions' layer inputs) carried from batch to batch, as the adaptive-span authors'
  trainer. The caches are checkpointed beside the parameters, so a resumed run is the
  uninterrupted one; a batch with `reset` = 1 (the first block of a training epoch, which
  starts at a random offset) zeroes them first. Every `trim_every` steps the model's
  host-side `before_step` hook runs (TransformerSeq: the static trimmed windows follow the
  learned spans; the jitted step retraces only when they change; with `trim_every` > 1
  a window can lag a span that grew since).

Every batch carries a `mask` (0 for padding rows or bytes), so evaluation counts every
example exactly once.

What the model adds is read from optional methods on it (`hook(model, name)`), never
from its attention family: `regularization_loss` (added to the training objective),
`after_update`, `before_step`, `checkpoint_state` / `restore_checkpoint_state`,
`host_metrics` and `eval_report`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo import data as data_lib
from zoo import parallel


class Task(Protocol):
  """What the trainer needs of a task (one instance per task, see `get`).

  Carried state ("carry") is whatever the task threads from one batch to the next (None
  for independent batches); it is an input and an output of the jitted steps.
  """
  name: str  # the config.task value
  model: str  # the model.name this task trains
  eval_split: str  # default split of the periodic evaluation (config.eval_split wins)
  regularization_metric: str  # the name the model's regularization_loss is logged under

  def validate(self, config) -> None:
    """Checks the task's own config keys before anything is built."""

  def train_iterator(self, config) -> Iterator[dict]:
    """Endless, checkpointable (get_state / set_state) iterator of this process's rows."""

  def eval_iterator(self, config, split: str, batch_size: int) -> Iterable[dict]:
    """One ordered pass over `split`."""

  def init_carry(self, model, batch_size: int, sharding: parallel.Sharding) -> Any:
    """The carried state before the first batch, laid out on `sharding`'s mesh."""

  def carry_to_save(self, carry) -> dict:
    """Entries to checkpoint beside `params` and `optimizer` ({} when nothing is carried)."""

  def carry_from_saved(self, restored: dict) -> Any:
    """The carried state from a restored checkpoint (what `carry_to_save` wrote)."""

  def before_step(self, model, config, step: int) -> None:
    """Host side, before train step `step` (0-based) runs: calls the model's
    `before_step` hook when the task wants it."""

  def loss(self, model, batch, carry) -> tuple[jax.Array, dict, Any]:
    """(scalar loss, aux metrics, next carry) of a batch; traced inside the train step."""

  def eval_sums(self, model, batch, carry) -> tuple[dict, Any]:
    """(sums over the batch's valid examples, next carry); traced. Includes `count`."""

  def finalize(self, sums: dict) -> dict:
    """The final metrics from the sums over a whole evaluation pass."""

  def examples(self, batch) -> int:
    """Examples (images) or predicted bytes in a batch, for throughput."""


def hook(model, name: str, *args, default=None):
  """Calls the model's optional method `name` (see the module docstring), or returns
  `default` when the model has none."""
  fn = getattr(model, name, None)
  return default if fn is None else fn(*args)


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _seed(config) -> int:
  return int(config.get("seed", 0))


def _bytes_metrics(sums: dict) -> dict:
  count = max(float(sums["count"]), 1.0)
  loss = float(sums["loss"]) / count
  return {"bits_per_byte": loss / math.log(2), "loss": loss, "num_bytes": int(sums["count"])}


class _TaskDefaults:
  regularization_metric = "regularization"

  def validate(self, config) -> None:
    del config

  def before_step(self, model, config, step) -> None:
    del model, config, step

  def examples(self, batch) -> int:
    return int(batch["mask"].sum())


class _IndependentBatches(_TaskDefaults):
  """Tasks whose batches carry nothing from one to the next."""

  def train_iterator(self, config):
    return data_lib.make_iterator(config.data, "train", batch_size=int(config.batch_size),
                                  train=True, seed=_seed(config))

  def eval_iterator(self, config, split, batch_size):
    return data_lib.make_iterator(config.data, split, batch_size=batch_size, train=False,
                                  seed=_seed(config))

  def init_carry(self, model, batch_size, sharding):
    del model, batch_size, sharding

  def carry_to_save(self, carry) -> dict:
    del carry
    return {}

  def carry_from_saved(self, restored):
    del restored


class Classification(_IndependentBatches):
  name, model, eval_split = "classification", "vit", "test"

  def _logits_and_nll(self, model, batch):
    logits, _ = model(batch["image"])
    logits = logits.astype(jnp.float32)
    return logits, optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

  def loss(self, model, batch, carry):
    logits, nll = self._logits_and_nll(model, batch)
    loss = _masked_mean(nll, batch["mask"])
    accuracy = _masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
                            batch["mask"])
    return loss, {"accuracy": accuracy}, carry

  def eval_sums(self, model, batch, carry):
    logits, nll = self._logits_and_nll(model, batch)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    m = batch["mask"]
    return {"loss": jnp.sum(nll * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m)}, carry

  def finalize(self, sums):
    count = max(float(sums["count"]), 1.0)
    return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss"]) / count,
            "num_examples": int(sums["count"])}

  def examples(self, batch) -> int:
    return int(batch["mask"].shape[0])


class ByteLM(_IndependentBatches):
  name, model, eval_split = "lm", "lm", "validation"

  def _nll(self, model, batch):
    logits, _ = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["targets"])

  def loss(self, model, batch, carry):
    loss = _masked_mean(self._nll(model, batch), batch["mask"])
    return loss, {"bits_per_byte": loss / math.log(2)}, carry

  def eval_sums(self, model, batch, carry):
    nll, m = self._nll(model, batch), batch["mask"]
    return {"loss": jnp.sum(nll * m), "count": jnp.sum(m)}, carry

  def finalize(self, sums):
    return _bytes_metrics(sums)


class SegmentLM(_TaskDefaults):
  """`segment_lm`: the carry is one cache `[batch, cache_size, width]` per layer."""
  name, model, eval_split = "segment_lm", "transformer_seq", "test"
  regularization_metric = "span_penalty"

  def block_len(self, config) -> int:
    m = config.data.get("block_len")
    if not isinstance(m, int) or m < 1:
      raise ValueError(f"task 'segment_lm' needs data.block_len (M, a positive int), got {m!r}")
    return m

  def validate(self, config) -> None:
    self.block_len(config)
    streams = data_lib.pipeline.STREAM_SOURCES
    if config.data.name not in streams:
      raise ValueError(f"task 'segment_lm' reads data.name in {streams} (one byte stream "
                       f"per split), got {config.data.name!r}")
    if config.get("sequence_parallel") is not None:
      raise ValueError("task 'segment_lm' runs each block whole: config.sequence_parallel "
                       "must be None")
    mesh = config.get("mesh") or {}
    if mesh.get("seq", 1) not in (1, None):
      raise ValueError(f"task 'segment_lm' needs config.mesh.seq = 1, got {mesh.get('seq')}")
    every = config.get("trim_every", 1)
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"config.trim_every must be a positive int, got {every!r}")

  def train_iterator(self, config):
    return data_lib.pipeline.make_segment_iterator(
        config.data, "train", batch_size=int(config.batch_size),
        block_len=self.block_len(config), train=True, seed=_seed(config))

  def eval_iterator(self, config, split, batch_size):
    return data_lib.pipeline.make_segment_iterator(
        config.data, split, batch_size=batch_size, block_len=self.block_len(config),
        train=False)

  def init_carry(self, model, batch_size, sharding):
    """All-zero caches (the model's `init_caches`), sharded over the batch."""
    dtype = _cache_dtype(model, batch_size)
    layout = parallel.named_sharding(sharding.mesh, ["batch", None, None], sharding.rules)
    return [jax.make_array_from_callback(
        a.shape, layout, lambda idx, a=a: np.zeros(a.shape, a.dtype)[idx])
        for a in jax.eval_shape(lambda: model.init_caches(batch_size, dtype))]

  def carry_to_save(self, carry) -> dict:
    return {"caches": {f"layer_{i}": c for i, c in enumerate(carry)}}

  def carry_from_saved(self, restored):
    tree = restored["caches"]
    return [tree[f"layer_{i}"] for i in range(len(tree))]

  def before_step(self, model, config, step) -> None:
    if step % int(config.get("trim_every", 1)) == 0:
      hook(model, "before_step")

  def _nll(self, model, batch, caches):
    """Per-token NLL from the model's log-probabilities, and the next caches."""
    logp, next_caches = model(batch["inputs"], caches)
    nll = -jnp.take_along_axis(logp.astype(jnp.float32), batch["targets"][..., None],
                               axis=-1)[..., 0]
    return nll, next_caches

  def loss(self, model, batch, carry):
    """Masked mean NLL after zeroing the caches of rows that start a new epoch.

    aux: nll (nats) and bits_per_byte of the NLL (the trainer adds the model's span
    penalty to the objective, logged as span_penalty, and never to evaluation).
    """
    keep = 1.0 - batch["reset"]
    caches = [c * keep[:, None, None].astype(c.dtype) for c in carry]
    nll, next_caches = self._nll(model, batch, caches)
    loss = _masked_mean(nll, batch["mask"])
    return loss, {"nll": loss, "bits_per_byte": loss / math.log(2)}, next_caches

  def eval_sums(self, model, batch, carry):
    nll, next_caches = self._nll(model, batch, carry)
    m = batch["mask"]
    return {"loss": jnp.sum(nll * m), "count": jnp.sum(m)}, next_caches

  def finalize(self, sums):
    return _bytes_metrics(sums)


def _cache_dtype(model, batch_size: int) -> jnp.dtype:
  """The dtype of the caches the model returns (its compute dtype), from an abstract call."""
  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)
  caches = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t)[1], state, tokens)
  return caches[0].dtype


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), ByteLM(), SegmentLM())}
MODEL_FOR_TASK = {name: task.model for name, task in TASKS.items()}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
  return TASKS[name]
