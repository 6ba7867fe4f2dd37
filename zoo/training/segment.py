"""Segment-memory training and evaluation for `task: segment_lm` (`TransformerSeq`).

The model reads B contiguous streams M tokens at a time (`zoo.data.pipeline.SegmentIterator`)
and carries one cache per layer (the previous positions' layer inputs) from batch to batch,
as the adaptive-span authors' trainer:

* The caches are part of the training state: saved in every checkpoint beside the
  parameters, optimiser state and data position, so a resumed run is exactly the
  uninterrupted one. A batch with `reset` = 1 (the first block of a training epoch, which
  starts at a random offset) zeroes them first.
* The objective is the NLL plus the span penalty (`tasks.segment_lm_loss`); after every
  update the spans are clamped to [0, 1] inside the jitted step (`clamp_spans`).
* Trimming (compute follows the span) needs static window sizes: on the host, every
  `trim_every` steps (default 1, the authors' behaviour), `update_trim_lengths` recomputes
  the trim lengths (multiples of 64) from the current spans; the jitted step retraces only
  when they change. The trim lengths in force are saved in each checkpoint's metadata.
  With `trim_every` > 1 the window can lag a span that grew since the last update (the
  mask beyond it then acts as 0 until the next update).
* Evaluation walks a split in order with the caches (`evaluate`; the paper's full
  evaluation when it runs the whole test split), without the penalty.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from zoo import parallel
from zoo.attention import adaptive_span as span_lib
from zoo.data import pipeline as data_pipeline
from zoo.training import tasks


def block_len(config) -> int:
  m = config.data.get("block_len")
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"task 'segment_lm' needs data.block_len (M, a positive int), got {m!r}")
  return m


def validate(config) -> None:
  """Fails early on settings the segment trainer cannot honour."""
  block_len(config)
  if config.data.name not in data_pipeline.STREAM_SOURCES:
    raise ValueError(f"task 'segment_lm' reads data.name in {data_pipeline.STREAM_SOURCES} "
                     f"(one byte stream per split), got {config.data.name!r}")
  if config.get("sequence_parallel") is not None:
    raise ValueError("task 'segment_lm' runs each block whole: config.sequence_parallel "
                     "must be None")
  mesh = config.get("mesh") or {}
  if mesh.get("seq", 1) not in (1, None):
    raise ValueError(f"task 'segment_lm' needs config.mesh.seq = 1, got {mesh.get('seq')}")
  every = config.get("trim_every", 1)
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"config.trim_every must be a positive int, got {every!r}")


def cache_dtype(model) -> jnp.dtype:
  """The dtype of the layer inputs the model caches (its compute dtype)."""
  return jax.eval_shape(lambda: model.in_emb(jnp.zeros((1, 1), jnp.int32))).dtype


def _cache_sharding(placement):
  return parallel.named_sharding(placement.mesh, ["batch", None, None], placement.rules)


def abstract_caches(model, batch_size: int, placement) -> list[jax.ShapeDtypeStruct]:
  dtype, sharding = cache_dtype(model), _cache_sharding(placement)
  return [jax.ShapeDtypeStruct((batch_size, size, model.width), dtype, sharding=sharding)
          for size in model.cache_sizes()]


def init_caches(model, batch_size: int, placement) -> list[jax.Array]:
  """All-zero caches `[batch_size, cache_size, width]` per layer, sharded over the batch."""
  return [jax.make_array_from_callback(
      a.shape, a.sharding, lambda idx, a=a: np.zeros(a.shape, a.dtype)[idx])
      for a in abstract_caches(model, batch_size, placement)]


def caches_to_tree(caches) -> dict[str, jax.Array]:
  return {f"layer_{i}": c for i, c in enumerate(caches)}


def caches_from_tree(tree) -> list[jax.Array]:
  return [tree[f"layer_{i}"] for i in range(len(tree))]


def trim_lengths(model) -> list[int]:
  return [int(layer.trim_len) for layer in span_lib.span_layers(model)]


def set_trim_lengths(model, lengths) -> None:
  layers = span_lib.span_layers(model)
  if len(lengths) != len(layers):
    raise ValueError(f"{len(lengths)} trim lengths for {len(layers)} layers")
  for layer, n in zip(layers, lengths):
    layer.trim_len = int(n)


def span_scalars(model) -> dict[str, float]:
  """The authors' span_avg / span_max (ramp included) and the same per layer."""
  stats = span_lib.span_stats(model)
  if not stats["avg"]:
    return {}
  out = {"span_avg": stats["span_avg"], "span_max": stats["span_max"]}
  for i, (a, m) in enumerate(zip(stats["avg"], stats["max"])):
    out[f"span_avg/layer_{i}"] = float(a)
    out[f"span_max/layer_{i}"] = float(m)
  return out


def spans_per_head(model) -> list[list[float]]:
  """Learned spans z (tokens, = z/S * S) per layer and head; [] without adaptive spans."""
  return [[round(float(v) * layer.max_span, 2) for v in layer.span_values()]
          for layer in span_lib.span_layers(model) if layer.adapt_span]


# Jitted steps by sharding layout: runs in one process (tests, a resumed run) reuse the
# compiled programs (nnx.jit's cache keys on the model's structure and the input shapes).
_TRAIN_STEPS: dict[Any, Any] = {}
_EVAL_STEP = None


def make_train_step(state_shardings=None):
  """`train_step(model, optimizer, batch, caches, key) -> (objective, aux, next caches)`."""
  leaves, treedef = jax.tree.flatten(state_shardings)
  key = (treedef, tuple(leaves))
  if key not in _TRAIN_STEPS:
    if len(_TRAIN_STEPS) >= 8:
      _TRAIN_STEPS.clear()
    _TRAIN_STEPS[key] = _make_train_step(state_shardings)
  return _TRAIN_STEPS[key]


def _make_train_step(state_shardings):
  @nnx.jit
  def train_step(model, optimizer, batch, caches, dropout_key):
    nnx.reseed(model, dropout=dropout_key)
    keep = 1.0 - batch["reset"]
    caches = [c * keep[:, None, None].astype(c.dtype) for c in caches]
    (objective, (aux, next_caches)), grads = nnx.value_and_grad(
        lambda m: tasks.segment_lm_loss(m, batch, caches), has_aux=True)(model)
    optimizer.update(model, grads)
    span_lib.clamp_spans(model)
    if state_shardings is not None:
      nodes = (model, optimizer)
      nnx.update(nodes, jax.lax.with_sharding_constraint(nnx.state(nodes), state_shardings))
    return objective, {**aux, "grad_norm": optax.tree.norm(grads)}, next_caches

  return train_step


def make_eval_step():
  global _EVAL_STEP
  if _EVAL_STEP is None:
    _EVAL_STEP = nnx.jit(
        lambda model, batch, caches: tasks.segment_lm_eval_sums(model, batch, caches))
  return _EVAL_STEP


def evaluate(model, config, split: str, *, placement, max_batches: int | None = None,
             eval_step=None, progress: bool = False) -> dict[str, Any]:
  """Bits per byte of `split` read in order with the caches (every target byte once).

  `max_batches` limits the blocks per row (a prefix of every row). The trim lengths in
  force are recomputed from the spans for the pass and put back afterwards (so evaluation
  inside a training run does not change the run). Returns finalize_eval's dict plus
  `spans` (per layer and head, in tokens) when the model has adaptive spans.
  """
  eval_step = eval_step or make_eval_step()
  batch_size = int(config.get("eval_batch_size", config.batch_size))
  placement.check_batch_size(batch_size, "config.eval_batch_size")
  it = data_pipeline.make_segment_iterator(config.data, split, batch_size=batch_size,
                                           block_len=block_len(config), train=False)
  saved_trims = trim_lengths(model)
  span_lib.update_trim_lengths(model)
  model.eval()
  caches = init_caches(model, batch_size, placement)
  totals = {"loss": 0.0, "count": 0.0}
  total = len(it) if max_batches is None else min(len(it), max_batches)
  bar = tqdm(total=total, desc=f"eval {split}", unit="block", disable=not progress,
             leave=False)
  try:
    for i, batch in enumerate(it):
      if max_batches is not None and i >= max_batches:
        break
      with placement.context():
        sums, caches = eval_step(model, placement.batch(batch), caches)
      for k, v in jax.device_get(sums).items():
        totals[k] += float(v)
      bar.update()
  finally:
    bar.close()
    model.train()
    set_trim_lengths(model, saved_trims)
  if not totals["count"]:
    raise ValueError(f"split {split!r} of {config.data.name!r} gave no evaluation bytes")
  result = tasks.finalize_eval("segment_lm", totals)
  spans = spans_per_head(model)
  if spans:
    result["spans"] = spans
  return result
