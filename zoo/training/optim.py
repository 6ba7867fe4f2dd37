"""Optax optimiser: AdamW, linear warmup then cosine decay, global-norm clipping.

Weight decay applies to kernels only (dense, conv and attention projections), not to
biases, LayerNorm scales, embeddings or position embeddings, as big_vision's default
`wd_mults` (`.*/kernel$`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  warmup = int(cfg.get("warmup_steps", 0))
  if warmup >= total_steps:
    raise ValueError(f"optimizer.warmup_steps ({warmup}) must be below total_steps ({total_steps})")
  peak = float(cfg["lr"])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
      end_value=peak * float(cfg.get("min_lr_ratio", 0.0)))


def decay_mask(params) -> Any:
  """True for leaves whose name is `kernel`."""
  def is_kernel(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if n != "value"]
    return bool(names) and names[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping, from `config.optimizer`."""
  for key in ("lr",):
    if key not in cfg:
      raise ValueError(f"config.optimizer.{key} is required")
  if float(cfg["lr"]) <= 0:
    raise ValueError(f"config.optimizer.lr must be > 0, got {cfg['lr']}")
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
  parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                           eps=float(cfg.get("eps", 1e-8)),
                           weight_decay=float(cfg.get("weight_decay", 0.0)), mask=decay_mask))
  return optax.chain(*parts)
