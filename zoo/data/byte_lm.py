"""Byte language-model batches over a split's byte stream.

The stream is `sources.load_token_stream(data_config, split)` (`byte_text`, or
a raw `byte_file` such as enwik8). Two ways to cut it:

* Windows (`byte_lm_dataset`, task `lm`): independent windows of
  `data_config.seq_len` (required) bytes, sampled as `zoo.data.sampling`
  describes. Batches (this process's rows): inputs int32 [B, seq_len],
  targets int32 [B, seq_len], mask float32 [B, seq_len];
  targets[:, t] == inputs[:, t + 1].
* Segments (`SegmentIterator`, task `segment_lm`): B contiguous rows read M
  tokens at a time, for models that carry a cache from one batch to the next;
  batches add `reset` float32 [B].
"""

import functools
from typing import Any

import grain
import jax
import numpy as np

from zoo.data import byte_text
from zoo.data import sampling
from zoo.data import sources


@functools.lru_cache(maxsize=64)
def _epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
  """Where epoch `epoch`'s training windows start in the stream."""
  return int(np.random.default_rng([seed, epoch]).integers(seq_len))


def byte_lm_dataset(data_config, split, local_bs, train, seed, index,
                    count) -> grain.MapDataset:
  """Byte LM windows (see the module docstring and zoo/data/byte_text.py).

  The stream of n bytes has n - 1 targets. Window w at offset o covers stream
  bytes [o + w * L, o + w * L + L] (L + 1 bytes: inputs are the first L,
  targets the last L), so consecutive windows share one byte and their
  targets tile the stream.

  train: o is drawn per epoch from [0, L) with (seed, epoch), so every epoch
    sees different cuts; W = n // L - 1 windows fit for any o. No padding
    (mask all ones).
  eval: o = 0 and ceil((n - 1) / L) windows; the last one is zero-padded with
    mask 0, so each target byte is scored exactly once.
  """
  seq_len = int(data_config["seq_len"])
  stream = sources.load_token_stream(data_config, split)
  n = len(stream)
  steps = np.arange(seq_len + 1)

  if train:
    num_windows = n // seq_len - 1
    if num_windows < 1:
      raise ValueError(f"{data_config['name']} {split!r} has {n} bytes, too few for "
                       f"seq_len={seq_len}.")

    def train_batch(windows, epochs):
      offsets = np.array([_epoch_offset(seed, int(e), seq_len) for e in epochs])
      chunk = stream[(offsets + windows * seq_len)[:, None] + steps]
      chunk = chunk.astype(np.int32)
      return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:],
              "mask": np.ones((len(windows), seq_len), np.float32)}

    return sampling.train_batches(num_windows, local_bs, seed, index, count,
                                  train_batch)

  def eval_batch(windows, valid):
    begin = windows[:, None] * seq_len + steps
    valid = valid[:, None] & (begin < n)
    chunk = np.where(valid, stream[np.minimum(begin, n - 1)], 0)
    chunk = chunk.astype(np.int32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:],
            "mask": valid[:, 1:].astype(np.float32)}

  num_windows = -(-(n - 1) // seq_len)
  return sampling.eval_batches(num_windows, local_bs, index, count, eval_batch)


def byte_lm_info(data_config) -> dict[str, Any]:
  """Sizes and a baseline of a byte LM dataset (prepares it if it is ours).

  Returns:
    {"task": "byte_lm", "vocab_size": 256,
     "separator": 0 (byte_text) or None (byte_file),
     "num_files": {split: int},
     "num_bytes": {split: number of target bytes = stream length - 1},
     "test_unigram_entropy_bits": entropy in bits of the byte histogram of the
       test split's target bytes, i.e. the bits-per-byte of the best
       context-free model fitted to the test set (a baseline to beat)}
  """
  file_counts = {}
  if data_config["name"] == "byte_text":
    splits = sources.get_builder(data_config).info.splits
    file_counts = {s: splits[s].num_examples for s in splits}
  names = file_counts or ("train", "validation", "test")
  streams = {s: sources.load_token_stream(data_config, s) for s in names}
  counts = np.bincount(np.asarray(streams["test"][1:]), minlength=256)
  p = counts[counts > 0] / counts.sum()
  return {
      "task": "byte_lm",
      "vocab_size": 256,
      "separator": byte_text.SEPARATOR if file_counts else None,
      "num_files": file_counts or {s: 1 for s in names},
      "num_bytes": {s: len(streams[s]) - 1 for s in names},
      "test_unigram_entropy_bits": float(-(p * np.log2(p)).sum()),
  }


class SegmentIterator:
  """Consecutive blocks of M tokens per batch row, for LMs that carry a cache.

  As the adaptive-span authors' `_batchify` and `train_iteration`: the split's stream is
  cut into B = batch_size contiguous rows, and batch j holds, for every row r, inputs
  row_r[p : p + M] and targets row_r[p + 1 : p + M + 1] with p the row position of block
  j; so row r of batch j + 1 continues row r of batch j, and a model's cache carried from
  one batch to the next holds the tokens just before.

  train=True (endless): rows of L = n // B bytes (the tail n mod B dropped, as the
    authors). Epoch 0 starts at p = 0; a block is taken while p + M < L; at the end the
    next epoch starts at a random offset p in [0, M) drawn from (seed, epoch) (the
    authors' `random.randrange(block_size)`), and the batch carries `reset` = 1 so the
    trainer zeroes the caches, as the authors do. Otherwise `reset` = 0.
  train=False (one pass): rows of L = ceil((n - 1) / B) targets, so every target byte of
    the split is scored exactly once (the authors drop the tail that does not fill a
    whole block; here it is padded with mask 0), ceil(L / M) batches, `reset` = 1 on the
    first.

  Batches (this process's rows of the global batch, `batch_size // process_count`):
  inputs, targets int32 [b, M], mask float32 [b, M], reset float32 [b].
  `get_state()` is {"epoch": e, "pos": p} (train) or {"block": j} (eval); `set_state()` on
  a fresh iterator with the same arguments continues exactly.
  """

  def __init__(self, stream: np.ndarray, *, batch_size: int, block_len: int, train: bool,
               seed: int = 0, process_index: int | None = None,
               process_count: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    local = sampling.local_batch_size(batch_size, count)
    if not isinstance(block_len, (int, np.integer)) or block_len < 1:
      raise ValueError(f"block_len must be a positive int, got {block_len!r}")
    self.rows = np.arange(index * local, (index + 1) * local)
    self.stream, self.block_len, self.train, self.seed = stream, int(block_len), train, seed
    n = len(stream)
    if train:
      self.row_len = n // batch_size
      if self.row_len < block_len + 1:
        raise ValueError(f"the stream has {n} tokens: {batch_size} rows of "
                         f"{self.row_len} are too short for blocks of {block_len} (+1 target)")
      self.num_blocks = None
      self._state = {"epoch": 0, "pos": 0}
    else:
      self.row_len = max(1, -(-(n - 1) // batch_size))
      self.num_blocks = -(-self.row_len // block_len)
      self._state = {"block": 0}

  def epoch_offset(self, epoch: int) -> int:
    return 0 if epoch == 0 else _epoch_offset(self.seed, epoch, self.block_len)

  def __iter__(self):
    return self

  def __len__(self):
    if self.num_blocks is None:
      raise TypeError("a training SegmentIterator is endless")
    return self.num_blocks

  def get_state(self) -> dict:
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    want = {"epoch", "pos"} if self.train else {"block"}
    if set(state) != want:
      raise ValueError(f"SegmentIterator state must have keys {sorted(want)}, got {state}")
    self._state = {k: int(v) for k, v in state.items()}

  def _read(self, starts: np.ndarray, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens stream[starts + t] for t in [0, M], valid where start + t < limit."""
    idx = starts[:, None] + np.arange(self.block_len + 1)
    valid = idx < limit[:, None]
    chunk = np.where(valid, self.stream[np.minimum(idx, len(self.stream) - 1)], 0)
    return chunk.astype(np.int32), valid

  def __next__(self) -> dict:
    m = self.block_len
    if self.train:
      epoch, pos = self._state["epoch"], self._state["pos"]
      starts = self.rows * self.row_len + pos
      chunk, _ = self._read(starts, np.full(len(self.rows), len(self.stream)))
      reset = float(pos == self.epoch_offset(epoch))
      mask = np.ones((len(self.rows), m), np.float32)
      pos += m
      if pos + m >= self.row_len:  # the authors' `train_pos >= data.size(1) - block_size`
        epoch, pos = epoch + 1, self.epoch_offset(epoch + 1)
      self._state = {"epoch": epoch, "pos": pos}
    else:
      j = self._state["block"]
      if j >= self.num_blocks:
        raise StopIteration
      pos = j * m
      begin = self.rows * self.row_len
      end = np.minimum(begin + self.row_len + 1, len(self.stream))  # row r's last target + 1
      chunk, valid = self._read(begin + pos, end)
      mask = valid[:, 1:].astype(np.float32)
      reset = float(j == 0)
      self._state = {"block": j + 1}
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:], "mask": mask,
            "reset": np.full(len(self.rows), reset, np.float32)}


def make_segment_iterator(data_config, split: str, *, batch_size: int, block_len: int,
                          train: bool, seed: int = 0) -> SegmentIterator:
  """A `SegmentIterator` over `sources.load_token_stream(data_config, split)`."""
  return SegmentIterator(sources.load_token_stream(data_config, split),
                         batch_size=batch_size, block_len=block_len, train=train,
                         seed=seed)
