"""Optax optimisers, chosen by `config.optimizer.name`:

* `adamw` (default): AdamW, linear warmup then cosine decay, global-norm clipping. Weight
  decay applies to kernels only (dense, conv and attention projections), not to biases,
  LayerNorm scales, embeddings or position embeddings, as big_vision's default
  `wd_mults` (`.*/kernel$`).
* `adagrad`: the adaptive-span authors' optimiser (facebookresearch/adaptive-span,
  `AdagradWithGradClip` + `LambdaLR` warmup), `adagrad_per_tensor_clip` below: torch's
  Adagrad (accumulator starts at 0, eps 1e-10 added after the square root) whose step for
  a parameter tensor is scaled by clip / (|g| + 1e-10) when that tensor's gradient norm
  |g| exceeds `grad_clip`; the learning rate rises linearly over `warmup_steps` and then
  stays constant. Keys: lr, warmup_steps, grad_clip, eps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adagrad")
_ADAGRAD_KEYS = ("name", "lr", "warmup_steps", "grad_clip", "eps")


def _name(cfg: Mapping[str, Any]) -> str:
  name = cfg.get("name", "adamw") or "adamw"
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
  return name


def _check_warmup(warmup: int, total_steps: int) -> None:
  """AdamW's cosine schedule needs warm-up to end before the last step. Warm-up is a fixed
  step count (not scaled with total_steps), so a shorter run names the override to give."""
  if warmup >= total_steps:
    raise ValueError(
        f"config.optimizer.warmup_steps ({warmup}) must be below config.total_steps "
        f"({total_steps}): add --config.optimizer.warmup_steps={total_steps // 10} "
        f"(any value below {total_steps}; 0 for none)")


def validate(cfg: Mapping[str, Any], total_steps: int) -> None:
  """Checks `config.optimizer` against `total_steps` before anything is built or written."""
  name = _name(cfg)
  if "lr" not in cfg:
    raise ValueError("config.optimizer.lr is required")
  if float(cfg["lr"]) <= 0:
    raise ValueError(f"config.optimizer.lr must be > 0, got {cfg['lr']}")
  if name == "adagrad":
    unknown = sorted(set(cfg) - set(_ADAGRAD_KEYS))
    if unknown:
      raise ValueError(f"config.optimizer key(s) {unknown} do not apply to adagrad; it takes "
                       f"{list(_ADAGRAD_KEYS)}")
    if float(cfg.get("grad_clip", 0.0)) < 0:
      raise ValueError(f"config.optimizer.grad_clip must be >= 0, got {cfg['grad_clip']}")
  else:
    _check_warmup(int(cfg.get("warmup_steps", 0)), int(total_steps))


def linear_warmup(lr: float, warmup_steps: int) -> optax.Schedule:
  """The authors' LambdaLR: update i (0-based) uses lr * min(1, (i + 1) / warmup_steps).

  (torch's scheduler steps before the optimiser, so the first update already has
  lr / warmup_steps.)
  """
  warmup = int(warmup_steps)
  if warmup <= 0:
    return lambda count: jnp.asarray(lr, jnp.float32)
  return lambda count: lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warmup)


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """lr of update i (0-based) for the configured optimiser."""
  if _name(cfg) == "adagrad":
    return linear_warmup(float(cfg["lr"]), int(cfg.get("warmup_steps", 0)))
  warmup = int(cfg.get("warmup_steps", 0))
  _check_warmup(warmup, total_steps)
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


class AdagradState(NamedTuple):
  count: jax.Array  # updates done so far (int32)
  sum: Any  # running sum of squared gradients, like the parameters


def adagrad_per_tensor_clip(learning_rate: float | Callable[[jax.Array], jax.Array],
                            grad_clip: float = 0.0, eps: float = 1e-10,
                            initial_accumulator_value: float = 0.0
                            ) -> optax.GradientTransformation:
  """The authors' `AdagradWithGradClip` as an Optax transformation (returns the updates).

  For every parameter tensor with gradient g (update i, 0-based, lr_i = learning_rate(i)):
    sum <- sum + g * g               (the unclipped gradient)
    c   <- grad_clip / (|g| + 1e-10) if grad_clip > 0 and |g| > grad_clip, else 1
    update = -lr_i * c * g / (sqrt(sum) + eps)
  |g| is the tensor's own L2 norm (per-tensor clipping: only the step shrinks; the
  accumulator sees g unscaled, as in the authors' code).
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  clip = float(grad_clip)

  def init_fn(params):
    return AdagradState(
        count=jnp.zeros([], jnp.int32),
        sum=jax.tree.map(lambda p: jnp.full(jnp.shape(p), initial_accumulator_value,
                                            jnp.result_type(p)), params))

  def update_fn(updates, state, params=None):
    del params
    lr = schedule(state.count)
    sums = jax.tree.map(lambda s, g: s + jnp.square(g).astype(s.dtype), state.sum, updates)

    def step(g, s):
      scale = jnp.asarray(1.0, jnp.float32)
      if clip > 0:
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
        scale = jnp.where(norm > clip, clip / (norm + 1e-10), 1.0)
      return (-(lr * scale) * g / (jnp.sqrt(s) + eps)).astype(g.dtype)

    new_updates = jax.tree.map(step, updates, sums)
    return new_updates, AdagradState(count=optax.safe_increment(state.count), sum=sums)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """The optimiser `config.optimizer` names (see the module docstring), after `validate`."""
  validate(cfg, total_steps)
  schedule = learning_rate_schedule(cfg, total_steps)
  if _name(cfg) == "adagrad":
    return adagrad_per_tensor_clip(schedule, grad_clip=float(cfg.get("grad_clip", 0.0)),
                                   eps=float(cfg.get("eps", 1e-10)))
  parts = []
  if cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
  parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                           eps=float(cfg.get("eps", 1e-8)),
                           weight_decay=float(cfg.get("weight_decay", 0.0)), mask=decay_mask))
  return optax.chain(*parts)
