"""Sequence-parallel attention and sharded training on 8 simulated CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tests import tiny_lm, tiny_vit
from zoo import attention, parallel
from zoo.attention import pointwise_attention, softmax_attention
from zoo.parallel import sequence
from zoo.training import optim, tasks, trainer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

RTOL = 1e-4  # the bar: values and gradients equal single-device to 1e-4 relative


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_close(x, y):
  x, y = np.asarray(x), np.asarray(y)
  scale = np.max(np.abs(y))
  np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL * scale)


def _assert_same_values_and_grads(split, single, q, k, v, g):
  """The split function equals the single-device one in values and in the gradients of
  sum(out * g) with respect to q, k and v."""
  _assert_close(jax.jit(split)(q, k, v), single(q, k, v))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)
  grads = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads, expected):
    _assert_close(a, b)


REFERENCES = {
    "softmax": lambda q, k, v, causal: softmax_attention(q, k, v, causal=causal),
    "relu": lambda q, k, v, causal: pointwise_attention(q, k, v, causal=causal),
    "gelu": lambda q, k, v, causal: pointwise_attention(q, k, v, activation="gelu",
                                                         causal=causal),
}


GENERIC = ("gspmd", "all_gather", "ring")  # the strategies every dot-product family has


def test_softmax_and_pointwise_register_the_generic_strategies():
  assert attention.strategies("softmax") == GENERIC
  assert attention.strategies("pointwise") == GENERIC
  assert attention.strategies("relu") == GENERIC
  for name in attention.names():
    assert set(attention.strategies(name)) <= set(parallel.STRATEGIES)


@pytest.mark.parametrize("mesh_shape", [
    {"data": 2, "seq": 4},
    pytest.param({"data": 1, "seq": 8}, marks=pytest.mark.slow)], ids=["2x4", "1x8"])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("strategy", GENERIC)
@pytest.mark.parametrize("causal", [False, True])
def test_strategies_equal_single_device(mesh_shape, kind, strategy, causal):
  mesh = parallel.make_mesh(mesh_shape)
  q, k, v, g = (_rand((2, 32, 2, 8), s) for s in range(4))
  split = lambda q, k, v: attention.sequence_parallel_attention(
      q, k, v, mesh=mesh, kind=kind, strategy=strategy, causal=causal)
  single = lambda q, k, v: REFERENCES[kind](q, k, v, causal)
  _assert_same_values_and_grads(split, single, q, k, v, g)


@pytest.mark.parametrize("strategy", GENERIC)
def test_pointwise_options_and_blockwise_inside_strategies(strategy):
  """The blockwise core (custom VJP) inside each strategy, forward and backward, against
  the single-device blockwise core (itself tested against the dense NumPy reference)."""
  mesh = parallel.make_mesh({"data": 1, "seq": 8})
  opts = dict(activation="gelu", alpha=0.5, block_size=5, query_block_size=3)
  for causal in (False, True):
    length = 64 if strategy == "ring" and causal else 48
    q, k, v, g = (_rand((1, length, 2, 8), s) for s in range(4))
    split = lambda q, k, v: attention.sequence_parallel_attention(
        q, k, v, mesh=mesh, kind="pointwise", strategy=strategy, causal=causal, **opts)
    single = lambda q, k, v: pointwise_attention(q, k, v, causal=causal, **opts)
    _assert_same_values_and_grads(split, single, q, k, v, g)


def test_bad_lengths_and_options_fail_clearly():
  mesh = parallel.make_mesh({"data": 2, "seq": 4})
  q = _rand((2, 30, 2, 8), 0)
  with pytest.raises(ValueError, match="length 30 does not divide into 4"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="gspmd")
  q = _rand((2, 36, 2, 8), 0)
  with pytest.raises(ValueError, match="2 chunks per device"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="ring",
                                         causal=True)
  with pytest.raises(ValueError, match="strategy must be one of"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="tree")
  q = _rand((3, 32, 2, 8), 0)
  with pytest.raises(ValueError, match="batch 3 does not divide"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="softmax", strategy="ring")
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh({"data": 4, "seq": 4})
  with pytest.raises(ValueError, match="single-device kernel"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="relu", strategy="ring",
                                         implementation="pallas")
  with pytest.raises(ValueError, match="'seq' dimension of size 17 .*class token"):
    # 16 patches + a class token over seq=4
    parallel.constrain(jnp.zeros((2, 17, 8)), ("batch", "seq", "embed"), parallel.Sharding(mesh))
  with pytest.raises(ValueError, match="has no sequence-parallel 'halo' strategy"):
    attention.sequence_parallel_attention(q, q, q, mesh=mesh, kind="softmax", strategy="halo")


def test_zigzag_order_balances_causal_work():
  perm = np.asarray(sequence.zigzag_permutation(16, 4))  # 8 chunks of 2
  shards = perm.reshape(4, 4)
  np.testing.assert_array_equal(shards[0], [0, 1, 14, 15])
  # Causal work of a token is its position + 1: every shard does the same total.
  assert len({int((s + 1).sum()) for s in shards}) == 1
  x = _rand((1, 16, 1, 1), 0)
  np.testing.assert_array_equal(sequence.from_zigzag(sequence.to_zigzag(x, 4), 4), x)


def _train_steps(config, placement_config, steps=3):
  """From the same init, sharded when `placement_config` is given: the loss and gradients
  of the first batch through the train step's own path (`trainer.loss_and_grads`), then
  the parameters before and after `steps` train steps on successive batches."""
  task = tasks.get(config.task)
  placement = None if placement_config is None else trainer.Placement(placement_config)
  model = trainer.create_model(config, sharding=placement.sharding if placement else None)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer, 10), wrt=nnx.Param)
  shardings = placement.put((model, optimizer)) if placement else None
  place = placement.batch if placement else (lambda batch: batch)
  params = lambda: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  initial = params()
  batches = iter_batches(config)
  key = jax.random.key(0)
  batch = place(next(batches))
  loss, _, _, grads = nnx.jit(lambda m, b, k: trainer.loss_and_grads(task, m, b, None, k))(
      model, batch, key)
  grads = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
  train_step = trainer.make_train_step(task, shardings)
  for i in range(steps):
    train_step(model, optimizer, batch, None, jax.random.fold_in(key, i))
    batch = place(next(batches))
  return float(loss), grads, initial, params()


def _assert_sharded_training_equals_unsharded(config, sharded):
  """Same loss and gradients, and after 3 steps with a non-zero learning rate the same
  parameters, which moved away from the (equal) initial ones."""
  config.optimizer.warmup_steps = 0  # the first update already has the peak lr
  loss0, grads0, initial0, params0 = _train_steps(config, None)
  loss1, grads1, initial1, params1 = _train_steps(config, sharded)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    _assert_close(a, b)
  for a, b in zip(jax.tree.leaves(initial1), jax.tree.leaves(initial0)):
    np.testing.assert_array_equal(a, b)
  for a, b, start in zip(jax.tree.leaves(params1), jax.tree.leaves(params0),
                         jax.tree.leaves(initial0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(b - start)) > 1e-4  # every parameter tensor was updated


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
  _assert_sharded_training_equals_unsharded(config, sharded)


def test_fsdp_placement_shards_parameters():
  config = tiny_vit.get_config()
  config.mesh = {"data": 2, "fsdp": 4}
  placement = trainer.Placement(config)
  model = trainer.create_model(config, sharding=placement.sharding)
  placement.put(model)
  kernel = model.Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # [16, 32]: 32 % 4
  _assert_sharded_training_equals_unsharded(config, config)
