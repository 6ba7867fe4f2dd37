"""Sequence-parallel attention and sharded training on 8 simulated CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tests import tiny_lm, tiny_vit
from zoo import parallel
from zoo.attention import pointwise_attention, softmax_attention
from zoo.parallel import sequence
from zoo.training import optim, trainer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

RTOL = 1e-4  # the bar: values and gradients equal single-device to 1e-4 relative


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_close(x, y):
  x, y = np.asarray(x), np.asarray(y)
  scale = np.max(np.abs(y))
  np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL * scale)


REFERENCES = {
    "softmax": lambda q, k, v, causal: softmax_attention(q, k, v, causal=causal),
    "relu": lambda q, k, v, causal: pointwise_attention(q, k, v, causal=causal),
    "gelu": lambda q, k, v, causal: pointwise_attention(q, k, v, activation="gelu",
                                                         causal=causal),
}


GENERIC = ("gspmd", "all_gather", "ring")  # the strategies every dot-product family has


def test_softmax_and_pointwise_register_the_generic_strategies():
  assert sequence.strategies("softmax") == GENERIC
  assert sequence.strategies("pointwise") == GENERIC
  assert set(sequence.strategies()) <= set(parallel.STRATEGIES)


@pytest.mark.parametrize("mesh_shape", [
    {"data": 2, "seq": 4},
    pytest.param({"data": 1, "seq": 8}, marks=pytest.mark.slow)], ids=["2x4", "1x8"])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("strategy", GENERIC)
@pytest.mark.parametrize("causal", [False, True])
def test_strategies_equal_single_device(mesh_shape, kind, strategy, causal):
  mesh = parallel.make_mesh(mesh_shape)
  q, k, v, g = (_rand((2, 32, 2, 8), s) for s in range(4))
  split = lambda q, k, v: parallel.sequence_parallel_attention(
      q, k, v, mesh=mesh, kind=kind, strategy=strategy, causal=causal)
  single = lambda q, k, v: REFERENCES[kind](q, k, v, causal)
  _assert_close(jax.jit(split)(q, k, v), single(q, k, v))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)
  grads = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads, expected):
    _assert_close(a, b)


@pytest.mark.parametrize("strategy", GENERIC)
def test_pointwise_options_and_blockwise_inside_strategies(strategy):
  mesh = parallel.make_mesh({"data": 1, "seq": 8})
  q, k, v = (_rand((1, 48, 2, 8), s) for s in range(3))
  opts = dict(activation="gelu", alpha=0.5, block_size=5, query_block_size=3)
  for causal in (False, True):
    if strategy == "ring" and causal:
      q_, k_, v_ = (_rand((1, 64, 2, 8), s) for s in range(3))
    else:
      q_, k_, v_ = q, k, v
    got = jax.jit(lambda q, k, v: parallel.sequence_parallel_attention(
        q, k, v, mesh=mesh, kind="pointwise", strategy=strategy, causal=causal, **opts))(q_, k_, v_)
    _assert_close(got, pointwise_attention(q_, k_, v_, causal=causal, **opts))


def test_bad_lengths_and_options_fail_clearly():
  mesh = parallel.make_mesh({"data": 2, "seq": 4})
  q = _rand((2, 30, 2, 8), 0)
  with pytest.raises(ValueError, match="length 30 does not divide into 4"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="gspmd")
  q = _rand((2, 36, 2, 8), 0)
  with pytest.raises(ValueError, match="2 chunks per device"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="ring",
                                         causal=True)
  with pytest.raises(ValueError, match="strategy must be one of"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="tree")
  q = _rand((3, 32, 2, 8), 0)
  with pytest.raises(ValueError, match="batch 3 does not divide"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, kind="softmax", strategy="ring")
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh({"data": 4, "seq": 4})
  with pytest.raises(ValueError, match="single-device kernel"):
    parallel.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="ring",
                                         implementation="pallas")
  with parallel.sharding_context(mesh):  # 16 patches + a class token over seq=4
    with pytest.raises(ValueError, match="'seq' dimension of size 17 .*class token"):
      parallel.constrain(jnp.zeros((2, 17, 8)), ("batch", "seq", "embed"))


def test_zigzag_order_balances_causal_work():
  perm = np.asarray(sequence.zigzag_permutation(16, 4))  # 8 chunks of 2
  shards = perm.reshape(4, 4)
  np.testing.assert_array_equal(shards[0], [0, 1, 14, 15])
  # Causal work of a token is its position + 1: every shard does the same total.
  assert len({int((s + 1).sum()) for s in shards}) == 1
  x = _rand((1, 16, 1, 1), 0)
  np.testing.assert_array_equal(sequence.from_zigzag(sequence.to_zigzag(x, 4), 4), x)


def _one_step(config, placement_config):
  """One train step from the same init; sharded if placement_config has a mesh."""
  model = trainer.create_model(config)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer, 10), wrt=nnx.Param)
  batch = next(iter_batches(config))
  key = jax.random.key(0)
  if placement_config is None:
    loss, _ = trainer.make_train_step(config.task)(model, optimizer, batch, key)
  else:
    placement = trainer.Placement(placement_config)
    shardings = placement.put((model, optimizer))
    with placement.context():
      loss, _ = trainer.make_train_step(config.task, shardings)(
          model, optimizer, placement.batch(batch), key)
  return float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def iter_batches(config):
  rng = np.random.default_rng(0)
  while True:
    if config.task == "lm":
      tokens = rng.integers(0, 256, (8, config.data.seq_len + 1)).astype(np.int32)
      yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((8, config.data.seq_len), np.float32)}
    else:
      yield {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32), "mask": np.ones(8, np.float32)}


@pytest.mark.parametrize("which,strategy", [
    ("vit", "gspmd"), ("lm", "ring"),
    *[pytest.param(w, s, marks=pytest.mark.slow)
      for w, s in [("vit", "all_gather"), ("vit", "ring"), ("lm", "gspmd"), ("lm", "all_gather")]]])
def test_sharded_train_step_equals_unsharded(which, strategy):
  config = (tiny_vit if which == "vit" else tiny_lm).get_config("attention=relu")
  config.model.update(depth=2)
  if which == "vit":
    config.model.update(patch_size=2)  # 16 tokens: 4 per device, 2 chunks of 2 for causal
  sharded = config.copy_and_resolve_references()
  sharded.mesh = {"data": 2, "seq": 4}
  sharded.sequence_parallel = strategy
  loss0, params0 = _one_step(config, None)
  loss1, params1 = _one_step(config, sharded)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_placement_shards_parameters():
  config = tiny_vit.get_config()
  config.mesh = {"data": 2, "fsdp": 4}
  placement = trainer.Placement(config)
  model = trainer.create_model(config)
  placement.put(model)
  kernel = model.Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # [16, 32]: 32 % 4
  loss0, params0 = _one_step(config, None)
  loss1, params1 = _one_step(config, config)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
