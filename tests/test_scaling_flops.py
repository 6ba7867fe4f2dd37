"""Run costs for scaling studies: parameter counts and training FLOPs against XLA.

XLA's `cost_analysis()` also counts elementwise work (norms, GELU, softmax, residual adds),
which the zoo's convention leaves out, so the formula sits a few percent below it: within
6% for the digits ViT and 12% for the byte LM, whose vocabulary softmax and norms are a
larger share at width 128.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_adaptive_span, lm_bytes, vit_digits
from zoo import models
from zoo.scaling import flops


def _xla_forward_flops(config):
  model = models.create(config.model.to_dict(), nnx.Rngs(0))
  if config.model.name == "vit":
    x = jnp.zeros((1, config.model.image_size, config.model.image_size,
                   config.model.in_channels))
  else:
    x = jnp.zeros((1, config.data.seq_len), jnp.int32)
  graph, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x)[0])
  cost = forward.lower(state, x).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"], model


@pytest.mark.parametrize("config,tolerance", [
    (vit_digits.get_config("attention=softmax"), 0.06),
    (vit_digits.get_config("attention=relu"), 0.06),
    (lm_bytes.get_config("attention=softmax"), 0.12)])
def test_forward_flops_against_cost_analysis_and_params_against_the_model(config, tolerance):
  run = flops.costs(config)
  xla, model = _xla_forward_flops(config)
  assert run["flops_per_example"] == pytest.approx(xla, rel=tolerance)
  assert run["flops_per_example"] < xla  # elementwise work is not counted
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert run["params"]["total"] == sum(int(np.prod(x.shape)) for x in leaves)
  assert run["flops_per_step"] == 3 * run["flops_per_example"] * config.batch_size
  assert run["flops"] == run["flops_per_step"] * config.total_steps


def test_costs_scale_with_the_model():
  small = flops.costs(vit_digits.get_config("attention=softmax"))
  config = vit_digits.get_config("attention=softmax")
  config.model.depth = 2 * config.model.depth
  deep = flops.costs(config)
  stem_and_head = 2 * small["flops_per_example"] - deep["flops_per_example"]
  assert 0 < stem_and_head < 0.1 * small["flops_per_example"]
  lm = flops.costs(lm_bytes.get_config("attention=softmax"))
  assert lm["tokens_per_step"] == lm["examples_per_step"] * lm_bytes.get_config().data.seq_len
  assert lm["params"]["non_embedding"] < lm["params"]["total"]
  # causal attention counts the keys each query sees: fewer FLOPs than a full square
  model = flops.abstract_model(lm_bytes.get_config("attention=softmax").model)
  layer = model.Transformer.encoderblock_0.MultiHeadDotProductAttention_0
  assert layer.core_flops(256) < 4 * layer.num_heads * 256 * 256 * (model.width // layer.num_heads)


def test_adaptive_span_flops_integrate_the_trimmed_windows(tmp_path):
  config = lm_adaptive_span.get_config()
  full = flops.costs(config)
  steps = 100
  layers = config.model.get("depth") or 4
  S = config.model.max_span
  rows = [{"step": 10, **{f"train/span_max/layer_{i}": S for i in range(layers)}},
          {"step": 50, **{f"train/span_max/layer_{i}": 40 for i in range(layers)}}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  integrated = flops.span_integrated_flops(config, str(tmp_path), steps)
  model = flops.abstract_model(config.model)
  for layer in model.layers():  # size 40 -> trim floor((S - 40) / 64) * 64
    layer.attn.trim_len = ((S - 40) // 64) * 64
  length = config.data.block_len
  trimmed = 3 * flops.transformer_seq_forward_flops(model, length) * config.batch_size
  assert integrated == pytest.approx(full["flops_per_step"] * 50 + trimmed * 50)
  assert integrated < full["flops_per_step"] * steps
  assert flops.span_integrated_flops(vit_digits.get_config(), str(tmp_path), steps) is None
