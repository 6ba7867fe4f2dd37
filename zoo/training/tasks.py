"""Losses and evaluation sums for the two tasks: image classification and byte LM.

Each batch carries a `mask` (0 for padding rows or bytes) so evaluation counts every
example exactly once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


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
}


def get(task: str):
  if task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {task!r}")
  return TASKS[task]


def example_count(task: str, batch) -> int:
  """Examples (images) or predicted bytes in a batch, for throughput."""
  return int(batch["mask"].sum()) if task == "lm" else int(batch["mask"].shape[0])


def check_batch(task: str, batch) -> None:
  want = {"classification": ("image", "label", "mask"), "lm": ("inputs", "targets", "mask")}[task]
  missing = [k for k in want if k not in batch]
  if missing:
    raise ValueError(f"task {task!r} needs batch keys {want}, the data gives {sorted(batch)}")


def leaves_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
