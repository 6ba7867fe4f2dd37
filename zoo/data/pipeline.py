"""The data API: deterministic, per-process-sharded input pipelines.

What the rest of the repository calls (all batch sizes are GLOBAL; each process
yields its `batch_size // jax.process_count()` rows):

  make_iterator(data_config, split, *, batch_size, train, seed=0)
      -> grain DatasetIterator of numpy batches, with `get_state()` /
         `set_state()`. The trainer's train and eval loops (via `zoo.data`);
         tests/test_data.py.
  make_segment_iterator(data_config, split, *, batch_size, block_len, train,
                        seed=0) -> SegmentIterator. The `segment_lm` task
         (zoo/training/tasks.py).
  STREAM_SOURCES: the data.name values of byte streams (the segment_lm task checks it).
  get_builder(data_config) -> a prepared tfds.core.DatasetBuilder.
         tests/test_data.py, tests/test_multihost.py (via `zoo.data`).
  dataset_info(data_config) -> dict of sizes / shapes / baselines.
         tests/test_data.py (via `zoo.data`).
  load_token_stream(data_config, split), SegmentIterator.
         tests/test_segment_lm.py.
  local_batch_size(batch_size): this process's rows of a global batch (part of
         the `zoo.data` API).

Where each part lives:

  zoo.data.sources   data_config keys (name, data_dir, download, ...); TFDS
                     builders and byte streams; no network.
  zoo.data.sampling  which example ids each process reads, train and eval;
                     checkpoint state.
  zoo.data.images    image batches and their data_config keys.
  zoo.data.byte_lm   byte LM windows and segment streams.

`data_config` names an image dataset (any TFDS name, "digits" or "mnist5k") or a byte
stream (`STREAM_SOURCES`); `make_iterator` and `dataset_info` dispatch on it.
Reading options for `make_iterator`: num_threads (default 4),
prefetch_batches (default 4).
"""

from typing import Any

import grain
import jax

from zoo.data import byte_lm
from zoo.data import images
from zoo.data import sampling
from zoo.data import sources

# Re-exported: the public names of the data modules.
SegmentIterator = byte_lm.SegmentIterator
make_segment_iterator = byte_lm.make_segment_iterator
STREAM_SOURCES = sources.STREAM_SOURCES
get_builder = sources.get_builder
load_token_stream = sources.load_token_stream
local_batch_size = sampling.local_batch_size


def make_iterator(data_config, split: str, *, batch_size: int, train: bool,
                  seed: int = 0) -> grain.DatasetIterator:
  """Returns a checkpointable iterator of this process's batches.

  Args:
    data_config: see `zoo.data.sources`, `zoo.data.images`,
      `zoo.data.byte_lm`.
    split: TFDS split ("train", "test", "validation"; image datasets also take
      TFDS slicing such as "train[:90%]").
    batch_size: the GLOBAL batch size; each process yields
      `batch_size // jax.process_count()` rows.
    train: True: shuffled, repeated forever, no padding. False: one ordered
      pass, last batch padded with mask-0 rows (`zoo.data.sampling`).
    seed: shuffling seed (train only), 0 <= seed < 2**32.

  Returns:
    A `grain.DatasetIterator` of dicts of numpy arrays (formats in
    `zoo.data.images` / `zoo.data.byte_lm`) with `get_state()` /
    `set_state()`.
  """
  local_bs = local_batch_size(batch_size)
  index, count = jax.process_index(), jax.process_count()
  if data_config["name"] in STREAM_SOURCES:
    make = byte_lm.byte_lm_dataset
  else:
    make = images.image_dataset
  ds = make(data_config, split, local_bs, train, seed, index, count)
  read_options = grain.ReadOptions(
      num_threads=data_config.get("num_threads", 4),
      prefetch_buffer_size=data_config.get("prefetch_batches", 4))
  return iter(ds.to_iter_dataset(read_options))


def dataset_info(data_config) -> dict[str, Any]:
  """Sizes, shapes and baselines of the dataset (prepares it if it is ours).

  The dict of `zoo.data.byte_lm.byte_lm_info` (task "byte_lm") for
  `STREAM_SOURCES`, else `zoo.data.images.image_info` (task "classification").
  """
  if data_config["name"] in STREAM_SOURCES:
    return byte_lm.byte_lm_info(data_config)
  return images.image_info(data_config)
