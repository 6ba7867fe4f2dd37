"""Losses and evaluation sums for the tasks: image classification, byte LM, and the
segment LM (`segment_lm`: a `TransformerSeq` reading contiguous blocks with per-layer
caches carried from batch to batch).

Each batch carries a `mask` (0 for padding rows or bytes) so evaluation counts every
example exactly once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from zoo.attention import adaptive_span as span_lib


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_loss(model, batch):
  logits, _ = model(batch["image"])
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  loss = _masked_mean(nll, batch["mask"])
  accuracy = _masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
                          batch["mask"])
  return loss, {"accuracy": accuracy}


def lm_loss(model, batch):
  logits, _ = model(batch["inputs"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                        batch["targets"])
  loss = _masked_mean(nll, batch["mask"])
  return loss, {"bits_per_byte": loss / math.log(2)}


def classification_eval_sums(model, batch):
  logits, _ = model(batch["image"])
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  m = batch["mask"]
  return {"loss": jnp.sum(nll * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m)}


def lm_eval_sums(model, batch):
  logits, _ = model(batch["inputs"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                        batch["targets"])
  m = batch["mask"]
  return {"loss": jnp.sum(nll * m), "count": jnp.sum(m)}


def _segment_nll(model, batch, caches):
  """Per-token NLL from the model's log-probabilities, and the next caches."""
  logp, next_caches = model(batch["inputs"], caches)
  nll = -jnp.take_along_axis(logp.astype(jnp.float32), batch["targets"][..., None],
                             axis=-1)[..., 0]
  return nll, next_caches


def segment_lm_loss(model, batch, caches):
  """(objective, (aux, next caches)): masked mean NLL plus the span penalty.

  The objective adds `span_penalty(model)` (lambda * mean over heads of z, summed over
  layers, the authors' `get_loss`) to the NLL; the penalty is never part of evaluation.
  aux: nll (nats), bits_per_byte (of the NLL alone), span_penalty.
  """
  nll, next_caches = _segment_nll(model, batch, caches)
  loss = _masked_mean(nll, batch["mask"])
  penalty = span_lib.span_penalty(model).astype(jnp.float32)
  aux = {"nll": loss, "bits_per_byte": loss / math.log(2), "span_penalty": penalty}
  return loss + penalty, (aux, next_caches)


def segment_lm_eval_sums(model, batch, caches):
  """({loss: summed NLL, count: scored bytes}, next caches); no span penalty."""
  nll, next_caches = _segment_nll(model, batch, caches)
  m = batch["mask"]
  return {"loss": jnp.sum(nll * m), "count": jnp.sum(m)}, next_caches


def finalize_eval(task: str, sums: dict) -> dict:
  count = max(float(sums["count"]), 1.0)
  loss = float(sums["loss"]) / count
  if task == "classification":
    return {"accuracy": float(sums["correct"]) / count, "loss": loss,
            "num_examples": int(sums["count"])}
  return {"bits_per_byte": loss / math.log(2), "loss": loss, "num_bytes": int(sums["count"])}


TASKS = {
    "classification": (classification_loss, classification_eval_sums),
    "lm": (lm_loss, lm_eval_sums),
    "segment_lm": (segment_lm_loss, segment_lm_eval_sums),
}
# The model each task trains.
MODEL_FOR_TASK = {"classification": "vit", "lm": "lm", "segment_lm": "transformer_seq"}


def get(task: str):
  if task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {task!r}")
  return TASKS[task]


def example_count(task: str, batch) -> int:
  """Examples (images) or predicted bytes in a batch, for throughput."""
  return int(batch["mask"].sum()) if task != "classification" else int(batch["mask"].shape[0])


def check_batch(task: str, batch) -> None:
  want = {"classification": ("image", "label", "mask"), "lm": ("inputs", "targets", "mask"),
          "segment_lm": ("inputs", "targets", "mask", "reset")}[task]
  missing = [k for k in want if k not in batch]
  if missing:
    raise ValueError(f"task {task!r} needs batch keys {want}, the data gives {sorted(batch)}")


def leaves_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
