"""Parameter counts and training FLOPs of a config's run, from each attention family's
own formula plus the backbone's dense layers.

Convention (the same as the families' `AttentionCore.flops`): 2 FLOPs per multiply-add of
a matrix product; elementwise work (norms, activations, softmax, residuals) not counted;
a causal layer counts the keys each query sees; a training step is 3x the forward pass
(forward plus a backward of twice its cost), times the examples in the batch.

* ViT, per image: patch embedding 2·N·(p²·c)·w; per block the attention layer's
  `flops(N)` (its projections and core) and the MLP 4·N·w·m; the MAP head (one probe
  attending over the N tokens: 2·w² + 4·N·w² + 4·N·w + 2·w² + 4·w·m); pre-logits 2·w·r; head
  2·w·classes.
* DecoderLM, per sequence of L tokens: the blocks as above (causal) and the logits
  2·L·w·vocab (tied or not); the embedding lookup is free.
* TransformerSeq, per segment of L tokens: each layer's cached attention `flops(L)` over
  its window W = S - trim_len, the feed-forward 4·L·w·inner and the logits. `costs` counts
  the full window S (an upper bound); with learned adaptive spans the trimmed window
  shrinks as training goes, and `span_integrated_flops` sums each logged interval's
  steps at the trim lengths the logged spans give (the trainer's own rule).

Parameters: `total` counts every `nnx.Param` value; `non_embedding` leaves out token
embedding tables, position embeddings and an untied LM head (Kaplan et al. 2020).
"""

from __future__ import annotations

from typing import Any

import json
import os

import numpy as np
from flax import nnx

from zoo import models
from zoo.attention.adaptive_span import core as span_core
from zoo.attention.adaptive_span import model as span_model
from zoo.models import DecoderLM, TransformerSeq, ViT

_EMBEDDING_NAMES = ("pos_embedding", "cls", "in_emb", "key_pe", "out_emb")


def abstract_model(model_config) -> nnx.Module:
  """The config's model with shapes only (nothing allocated)."""
  config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  return nnx.eval_shape(lambda: models.create(config, nnx.Rngs(0)))


def parameter_counts(model: nnx.Module) -> dict[str, int]:
  """{"total", "non_embedding"} numbers of parameter values."""
  total = embedding = 0
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = int(np.prod(getattr(value, "get_value", lambda: value)().shape))
    total += size
    top = str(path[0])
    if top in _EMBEDDING_NAMES or (isinstance(model, DecoderLM) and top in ("embedding", "head")):
      embedding += size
  return {"total": total, "non_embedding": total - embedding}


def _block_flops(block, length: int, grid=None) -> float:
  attention = block.MultiHeadDotProductAttention_0
  mlp = block.MlpBlock_0
  width, mlp_dim = mlp.Dense_0.in_features, mlp.Dense_0.out_features
  return attention.flops(length, grid) + 4.0 * length * width * mlp_dim


def vit_forward_flops(model: ViT) -> float:
  """Forward FLOPs of one image (see the module docstring)."""
  h, w = model.grid
  tokens = h * w
  kernel = model.embedding.kernel.get_value()
  patch_area_channels = int(np.prod(kernel.shape[:3]))
  width = model.width
  total = 2.0 * tokens * patch_area_channels * width
  length = tokens + (model.pool_type == "tok")
  grid = None if model.pool_type == "tok" else (h, w)
  total += sum(_block_flops(b, length, grid) for b in model.Transformer.blocks())
  if model.pool_type == "map":
    mlp_dim = model.MAPHead_0.MlpBlock_0.Dense_0.out_features
    total += (2.0 * width * width + 4.0 * length * width * width + 4.0 * length * width
              + 2.0 * width * width + 4.0 * width * mlp_dim)
  head_in = width
  if model.rep_size:
    total += 2.0 * width * model.rep_size
    head_in = model.rep_size
  if model.num_classes:
    total += 2.0 * head_in * model.num_classes
  return total


def lm_forward_flops(model: DecoderLM, length: int) -> float:
  """Forward FLOPs of one sequence of `length` tokens."""
  vocab = model.embedding.num_embeddings
  total = sum(_block_flops(b, length) for b in model.Transformer.blocks())
  return total + 2.0 * length * model.width * vocab


def transformer_seq_forward_flops(model: TransformerSeq, length: int) -> float:
  """Forward FLOPs of one segment of `length` tokens over the layers' caches."""
  total = 0.0
  for layer in model.layers():
    total += layer.attn.flops(length)
    if layer.ff is not None:
      total += 4.0 * length * model.width * layer.ff.fc1.out_features
  return total + 2.0 * length * model.width * model.out_emb.out_features


def costs(config) -> dict[str, Any]:
  """Parameters and training FLOPs of `config`'s run (an ml_collections config as
  train.py takes it): {"params": {"total", "non_embedding"}, "flops_per_example"
  (forward), "flops_per_step" (3x forward x batch), "steps", "flops" (the whole run),
  "examples_per_step", "tokens_per_step" (None for images)}."""
  model = abstract_model(config.model)
  batch, steps = int(config.batch_size), int(config.total_steps)
  tokens = None
  if isinstance(model, ViT):
    forward = vit_forward_flops(model)
  else:
    data = config.data
    length = int(data.get("seq_len") or data.get("block_len") or 0) if hasattr(data, "get") \
        else 0
    if not length:
      raise ValueError("config.data.seq_len is needed to count a language model's FLOPs")
    forward = (lm_forward_flops(model, length) if isinstance(model, DecoderLM)
               else transformer_seq_forward_flops(model, length))
    tokens = batch * length
  per_step = 3.0 * forward * batch
  return {"params": parameter_counts(model), "flops_per_example": forward,
          "flops_per_step": per_step, "steps": steps, "flops": per_step * steps,
          "examples_per_step": batch, "tokens_per_step": tokens}


def span_integrated_flops(config, workdir: str, steps: int) -> float | None:
  """Training FLOPs of a TransformerSeq run with learned adaptive spans, integrated over
  its steps: each interval between rows of `workdir/metrics.jsonl` that log
  `train/span_max/layer_<i>` (the trimmed window's size per layer, ramp included) counts
  its steps at the window those sizes give (trim_len = floor(min(S - 1, S - size) / 64)
  * 64, as the trainer trims), the first interval at the full window. None when the run is
  not such a model or logged no spans."""
  if config.model.get("name") != "transformer_seq":
    return None
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  logged = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      sizes = [row[k] for k in sorted((k for k in row if k.startswith("train/span_max/layer_")),
                                      key=lambda k: int(k.rsplit("_", 1)[1]))]
      if sizes:
        logged.append((int(row["step"]), sizes))
  if not logged:
    return None
  model = abstract_model(config.model)
  layers = [layer for layer in span_model.span_layers(model) if layer.adapt_span]
  length = int(config.data.get("block_len") or config.data.get("seq_len"))
  batch = int(config.batch_size)
  total, done = 0.0, 0
  for step, sizes in sorted(logged):
    step = min(step, steps)
    if step <= done:
      continue
    per_step = 3.0 * transformer_seq_forward_flops(model, length) * batch
    total += per_step * (step - done)
    done = step
    if len(sizes) == len(layers):  # the next interval runs at these spans' windows
      for layer, size in zip(layers, sizes):
        trim = min(layer.max_span - 1, layer.max_span - int(size))
        layer.trim_len = (trim // span_core.TRIM_GRANULARITY) * span_core.TRIM_GRANULARITY
  if done < steps:
    total += 3.0 * transformer_seq_forward_flops(model, length) * batch * (steps - done)
  return total


__all__ = ["abstract_model", "costs", "span_integrated_flops", "lm_forward_flops", "parameter_counts",
           "transformer_seq_forward_flops", "vit_forward_flops"]
