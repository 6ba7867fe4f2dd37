"""Which examples each process reads: deterministic, per-process index sampling.

Pure functions of (n, seed, batch index, process index, process count); the
loaders (`zoo.data.images`, `zoo.data.byte_lm`) turn the example ids they give
into batches. `batch_size` is GLOBAL: each process yields its
`local_batch_size(batch_size) = batch_size // process_count` rows.

train (`train_batches`): every process computes the same global batches (a
permutation of all examples, or text windows, seeded with (seed, epoch),
repeated forever) and takes its own rows of each, so the global batch sequence
does not depend on the process count; batches never contain padding. Batches
run across epoch boundaries, so the only "remainder" dropped is the
never-ending tail.

eval (`eval_batches`): one pass in order. Process p takes the p-th contiguous
block of ceil(N / process_count) examples (windows); every process yields the
same number of batches, ceil(ceil(N / process_count) / B), and the rows past
its block are marked invalid (the loaders zero them, mask 0). Over all
processes every example (every target byte) is covered exactly once with
mask 1.

Checkpointing: a batch is a pure function of its index, so grain's iterator
state `{"next_index": k}` (small, JSON-serialisable) is complete: `set_state()`
on a fresh iterator made with the same arguments continues with exactly the
batches the saved one would have yielded. There is no RNG state to save.
"""

import functools
import sys

import grain
import jax
import numpy as np


def local_batch_size(batch_size: int, count: int | None = None) -> int:
  """The rows of a global batch that one of `count` processes produces.

  Args:
    batch_size: the GLOBAL batch size.
    count: the process count; None -> `jax.process_count()`.
  """
  count = jax.process_count() if count is None else count
  if batch_size % count:
    raise ValueError(f"Global batch_size={batch_size} is not divisible by "
                     f"the process count {count}.")
  return batch_size // count


def train_batches(n: int, local_bs: int, seed: int, index: int, count: int,
                  make_batch) -> grain.MapDataset:
  """Infinite dataset of training batches: `make_batch(ids, epochs)`.

  Epoch e visits range(n) in the order of a numpy permutation seeded with
  (seed, e); GLOBAL batch b holds positions [b * B, (b + 1) * B) of the endless
  concatenation of epochs (B = local_bs * count), and process `index` takes its
  rows [index * local_bs, (index + 1) * local_bs). So the global batches, and a
  run's loss curve, are the same whatever the number of processes, and a batch
  is a pure function of (seed, b): grain's `{"next_index": b}` is a complete
  checkpoint.

  (grain's own `shuffle` costs ~35 us per element for its index cipher, i.e.
  ~10 ms per 256-row batch on one core; a cached permutation is ~free.)
  """
  if n < 1:
    raise ValueError("the training split has no examples")
  global_bs = local_bs * count

  @functools.lru_cache(maxsize=2)
  def permutation(epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

  def batch(batch_index):
    positions = batch_index * global_bs + index * local_bs + np.arange(local_bs)
    epochs, within = np.divmod(positions, n)
    ids = np.empty(local_bs, np.int64)
    for epoch in np.unique(epochs):
      ids[epochs == epoch] = permutation(int(epoch))[within[epochs == epoch]]
    return make_batch(ids, epochs)

  return grain.MapDataset.range(sys.maxsize).map(batch)


def eval_batches(n: int, local_bs: int, index: int, count: int,
                 make_batch) -> grain.MapDataset:
  """One ordered pass over process `index`'s block: `make_batch(ids, valid)`.

  Process p owns the contiguous block [p * K, (p + 1) * K) of range(n), with
  K = ceil(n / count). Every process yields the same number of batches,
  ceil(K / B), so all run the same number of eval steps; rows past the
  process's block (or past n) have valid=False.
  """
  per_process = -(-n // count)
  start = min(n, index * per_process)
  stop = min(n, start + per_process)
  num_batches = max(1, -(-per_process // local_bs))

  def batch(batch_index):
    ids = start + batch_index * local_bs + np.arange(local_bs)
    return make_batch(ids, ids < stop)

  return grain.MapDataset.range(num_batches).map(batch)
