"""Deterministic, per-process-sharded grain input pipelines over TFDS data.

Three public functions; the trainer relies on exactly these:

  get_builder(data_config)            -> a prepared tfds.core.DatasetBuilder
  make_iterator(data_config, split, *, batch_size, train, seed=0)
                                      -> grain DatasetIterator of numpy batches
  dataset_info(data_config)           -> dict of sizes / shapes / baselines

`data_config` is an `ml_collections.ConfigDict` (a plain dict works too):

  name:       "digits", "byte_text", or any TFDS name ("mnist", "cifar10",
              "imagenet2012", "cifar10:3.0.2", ...).
  data_dir:   TFDS data dir; None -> TFDS default (~/tensorflow_datasets or
              $TFDS_DATA_DIR).
  download:   (other TFDS names only, default False) allow
              `download_and_prepare` when the dataset is not prepared yet.
  Images:     image_size (int, optional: resize to image_size^2, bilinear),
              channels (int, optional: 1 <-> 3 conversion),
              image_key / label_key (default "image" / "label"),
              cache (bool, optional: hold the preprocessed split in memory;
              default: only when it is <= 64 MiB of uint8 pixels).
  byte_text:  seq_len (int, required), source_dir / glob (optional: own text,
              see zoo/data/byte_text.py).
  Reading:    num_threads (default 4), prefetch_batches (default 4).

Batches are dicts of numpy arrays holding this process's rows only
(`batch_size // jax.process_count()`):

  Images:   image float32 [B, H, W, C] in [-1, 1] (uint8 x -> x / 127.5 - 1),
            label int32 [B], mask float32 [B].
  byte_text: inputs int32 [B, seq_len], targets int32 [B, seq_len],
            mask float32 [B, seq_len]; targets[:, t] == inputs[:, t + 1].

train=True: every process computes the same global batches (a permutation of
all examples, or text windows, seeded with (seed, epoch), repeated forever) and
takes its own rows of each, so the global batch sequence does not depend on the
process count; batches never contain padding (mask all ones). Batches run across epoch boundaries, so the
only "remainder" dropped is the never-ending tail.

train=False: one pass in order. Process p takes the p-th contiguous block of
ceil(N / process_count) examples (windows); every process yields the same
number of batches, ceil(ceil(N / process_count) / B), the rows past its block
are zeros with mask 0. Over all processes every example (every target byte) is
covered exactly once with mask 1.

Checkpointing: the iterators' `get_state()` is a small JSON-serialisable dict
(`{"next_index": k}`); `set_state()` on a fresh iterator made with the same
arguments continues with exactly the batches the saved one would have yielded.
The pipelines are pure functions of (data, seed, index): no RNG state to save.

No network: GCS probing in TFDS is switched off on import, and nothing is ever
downloaded unless `data_config.download` is True.
"""

import difflib
import functools
import importlib.resources
import importlib.resources.abc  # pylint: disable=unused-import
import importlib.util
import math
import os
import sys
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from zoo.data import byte_text
from zoo.data import digits

# tfds 4.9.10 already defaults to this; we rely on it: `tfds.builder` must
# never look for prepared data or dataset_info on gs://tfds-data.
gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

OWN_DATASETS = ("digits", "byte_text")
_FILE_FORMAT = "array_record"
_AUTO_CACHE_BYTES = 64 * 2**20


def _is_byte_lm(data_config) -> bool:
  return data_config["name"] in ("byte_text", "byte_file")


def local_batch_size(batch_size: int) -> int:
  """The rows of a global batch that this process produces."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"Global batch_size={batch_size} is not divisible by "
                     f"jax.process_count()={count}.")
  return batch_size // count


################################################################################
# Builders.
################################################################################


def get_builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder named by `data_config.name`.

  Our own builders (digits, byte_text) are prepared in array_record format on
  first use (no network). Any other name goes through
  `tfds.builder(name, data_dir=data_dir)` and must already be prepared in a
  random-access format (array_record), unless `data_config.download` is True.

  Args:
    data_config: see the module docstring.

  Returns:
    A builder whose `as_data_source(split)` works.

  Raises:
    ValueError: unknown dataset name.
    FileNotFoundError: a TFDS dataset that is not prepared (or not prepared in
      array_record format) and `download` is not set.
  """
  name = data_config["name"]
  data_dir = data_config.get("data_dir")
  if name == "digits":
    builder = digits.Digits(data_dir=data_dir, file_format=_FILE_FORMAT)
  elif name == "byte_text":
    config = byte_text.make_config(data_config.get("source_dir"),
                                   data_config.get("glob"))
    builder = byte_text.ByteText(config=config, data_dir=data_dir,
                                 file_format=_FILE_FORMAT)
  else:
    return _get_tfds_builder(name, data_dir, data_config.get("download", False))
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format=_FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _get_tfds_builder(name: str, data_dir: str | None, download: bool):
  """Any other TFDS dataset: must be prepared unless `download`."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = list(OWN_DATASETS) + tfds.list_builders(
        with_community_datasets=False)
    close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known)
    raise ValueError(
        f"Unknown dataset {name!r}: not one of ours {OWN_DATASETS}, not a "
        "registered TFDS builder, and no prepared copy in data_dir="
        f"{data_dir!r}. Close names: {close}.") from None

  random_access = {f.value for f in tfds.core.FileFormat.with_random_access()}
  if builder.is_prepared():
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats & random_access:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is prepared in {builder.data_dir} as "
          f"{sorted(formats)}, but grain needs random access "
          f"({sorted(random_access)}). Convert it once with:\n"
          f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
          f"--out_file_format={_FILE_FORMAT}")
    return builder

  if not download:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir="
        f"{os.fspath(builder.data_dir_root)!r} and this pipeline does not "
        "download by default. Prepare it once on a machine with network "
        "access:\n"
        f"  tfds build {name} --data_dir={os.fspath(builder.data_dir_root)} "
        f"--file_format={_FILE_FORMAT}\n"
        "(then copy the directory over if needed), or set "
        "data_config.download = True to download and prepare it here.")
  _alias_importlib_resources()
  builder.download_and_prepare(file_format=_FILE_FORMAT)
  return builder


def _alias_importlib_resources() -> None:
  """Lets tfds 4.9.10 `download_and_prepare` run without the backport.

  It imports `importlib_resources` but does not install it on Python >= 3.9
  (tensorflow/datasets#11212); the stdlib `importlib.resources` has what it
  uses (`abc.Traversable`). Our own builders avoid the issue (`code_path`).
  """
  if importlib.util.find_spec("importlib_resources") is None:
    sys.modules["importlib_resources"] = importlib.resources


################################################################################
# Iterators.
################################################################################


def make_iterator(data_config, split: str, *, batch_size: int, train: bool,
                  seed: int = 0) -> grain.DatasetIterator:
  """Returns a checkpointable iterator of this process's batches.

  Args:
    data_config: see the module docstring.
    split: TFDS split ("train", "test", "validation"; image datasets also take
      TFDS slicing such as "train[:90%]").
    batch_size: the GLOBAL batch size; each process yields
      `batch_size // jax.process_count()` rows.
    train: True: shuffled, repeated forever, no padding. False: one ordered
      pass, last batch padded with mask-0 rows.
    seed: shuffling seed (train only), 0 <= seed < 2**32.

  Returns:
    A `grain.DatasetIterator` of dicts of numpy arrays (formats in the module
    docstring) with `get_state()` / `set_state()`.
  """
  local_bs = local_batch_size(batch_size)
  index, count = jax.process_index(), jax.process_count()
  if _is_byte_lm(data_config):
    ds = _byte_lm_dataset(data_config, split, local_bs, train, seed, index, count)
  else:
    ds = _image_dataset(get_builder(data_config), data_config, split, local_bs, train,
                        seed, index, count)
  read_options = grain.ReadOptions(
      num_threads=data_config.get("num_threads", 4),
      prefetch_buffer_size=data_config.get("prefetch_batches", 4))
  return iter(ds.to_iter_dataset(read_options))


def _train_batches(n: int, local_bs: int, seed: int, index: int, count: int,
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


def _eval_batches(n: int, local_bs: int, index: int, count: int,
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


# -- Images. -------------------------------------------------------------------


class _ImageLoader:
  """Reads examples by index into uint8 [b, H, W, C] images and int32 labels.

  Preprocessing is deterministic (optional resize and channel conversion), so
  a split can be held in memory once preprocessed (`cache`).
  """

  def __init__(self, source, data_config, feature_shape):
    self.source = source
    self.image_key = data_config.get("image_key", "image")
    self.label_key = data_config.get("label_key", "label")
    self.shape = output_image_shape(data_config, feature_shape)
    self.cached = None

  def fill_cache(self) -> None:
    self.cached = self._read(np.arange(len(self.source)))

  def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.cached is not None:
      return self.cached[0][indices], self.cached[1][indices]
    return self._read(indices)

  def _read(self, indices):
    examples = self.source.__getitems__([int(i) for i in indices])
    images = np.stack([self._image(e[self.image_key]) for e in examples])
    labels = np.array([e[self.label_key] for e in examples], np.int32)
    return images, labels

  def _image(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"Expected uint8 images, got {image.dtype}.")
    if image.ndim == 2:
      image = image[..., None]
    have, want = image.shape[-1], self.shape[-1]
    if have != want:
      if have == 1 and want == 3:
        image = np.repeat(image, 3, axis=-1)
      elif have in (3, 4) and want == 1:  # ITU-R 601-2 luma, as PIL "L".
        rgb = image[..., :3].astype(np.float32)
        luma = rgb @ np.float32([0.299, 0.587, 0.114])
        image = np.round(luma)[..., None].astype(np.uint8)
      elif have == 4 and want == 3:
        image = image[..., :3]
      else:
        raise ValueError(f"Cannot convert {have} channels to {want}.")
    if image.shape[:2] != self.shape[:2]:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      pil = Image.fromarray(image[..., 0] if want == 1 else image)
      pil = pil.resize(self.shape[1::-1], Image.Resampling.BILINEAR)
      image = np.asarray(pil).reshape(self.shape)
    return image


# Preprocessed in-memory splits (`cache`), kept for the life of the process so
# that repeated eval iterators do not re-read them.
_CACHED_LOADERS: dict[tuple[Any, ...], _ImageLoader] = {}


def output_image_shape(data_config, feature_shape) -> tuple[int, int, int]:
  """(H, W, C) of the images the pipeline yields for `data_config`."""
  size = data_config.get("image_size")
  height, width = (size, size) if size else feature_shape[:2]
  channels = data_config.get("channels") or (
      feature_shape[2] if len(feature_shape) == 3 else 1)
  if height is None or width is None or channels is None:
    raise ValueError(f"Images have variable shape {feature_shape}: set "
                     "data_config.image_size (and channels).")
  return int(height), int(width), int(channels)


def _image_dataset(builder, data_config, split, local_bs, train, seed, index,
                   count) -> grain.MapDataset:
  """Image classification batches (see module docstring)."""
  image_key = data_config.get("image_key", "image")
  feature_shape = tuple(builder.info.features[image_key].shape)
  source = builder.as_data_source(split)
  loader = _ImageLoader(source, data_config, feature_shape)
  cache = data_config.get("cache")
  if cache is None:
    cache = len(source) * math.prod(loader.shape) <= _AUTO_CACHE_BYTES
  if cache:
    key = (os.fspath(builder.data_dir), split,
           *(str(data_config.get(k)) for k in ("image_key", "label_key",
                                               "image_size", "channels")))
    if key not in _CACHED_LOADERS:
      loader.fill_cache()
      _CACHED_LOADERS[key] = loader
    loader = _CACHED_LOADERS[key]

  def make_batch(indices, valid):
    images = np.zeros((len(indices), *loader.shape), np.float32)
    labels = np.zeros(len(indices), np.int32)
    if valid.any():
      valid_images, labels[valid] = loader(indices[valid])
      images[valid] = valid_images.astype(np.float32) / 127.5 - 1.0
    return {"image": images, "label": labels, "mask": valid.astype(np.float32)}

  if train:
    return _train_batches(
        len(source), local_bs, seed, index, count,
        lambda ids, _: make_batch(ids, np.ones(len(ids), bool)))
  return _eval_batches(len(source), local_bs, index, count, make_batch)


# -- Bytes. --------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
  """Where epoch `epoch`'s training windows start in the stream."""
  return int(np.random.default_rng([seed, epoch]).integers(seq_len))


def _byte_lm_dataset(data_config, split, local_bs, train, seed, index,
                     count) -> grain.MapDataset:
  """Byte LM batches (see module docstring and zoo/data/byte_text.py) from the split's
  byte stream (`load_token_stream`: byte_text, or a raw byte_file such as enwik8).

  The stream of n bytes has n - 1 targets. Window w at offset o covers stream
  bytes [o + w * L, o + w * L + L] (L + 1 bytes: inputs are the first L,
  targets the last L), so consecutive windows share one byte and their
  targets tile the stream.

  train: o is drawn per epoch from [0, L) with (seed, epoch), so every epoch
    sees different cuts; W = n // L - 1 windows fit for any o.
  eval: o = 0 and ceil((n - 1) / L) windows; the last one is zero-padded with
    mask 0, so each target byte is scored exactly once.
  """
  seq_len = int(data_config["seq_len"])
  stream = load_token_stream(data_config, split)
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

    return _train_batches(num_windows, local_bs, seed, index, count,
                          train_batch)

  def eval_batch(windows, valid):
    begin = windows[:, None] * seq_len + steps
    valid = valid[:, None] & (begin < n)
    chunk = np.where(valid, stream[np.minimum(begin, n - 1)], 0)
    chunk = chunk.astype(np.int32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:],
            "mask": valid[:, 1:].astype(np.float32)}

  num_windows = -(-(n - 1) // seq_len)
  return _eval_batches(num_windows, local_bs, index, count, eval_batch)


################################################################################
# Info.
################################################################################


def dataset_info(data_config) -> dict[str, Any]:
  """Sizes, shapes and baselines of the dataset (prepares it if it is ours).

  Images:
    {"task": "classification", "num_classes": int,
     "image_shape": (H, W, C) as yielded by make_iterator,
     "num_examples": {split: int}, "num_train_examples": int,
     "num_test_examples": int, "test_split": "test" (or "validation" when the
     dataset has no test split, e.g. imagenet2012)}
  byte_text:
    {"task": "byte_lm", "vocab_size": 256, "separator": 0,
     "num_files": {split: int},
     "num_bytes": {split: number of target bytes = stream length - 1},
     "test_unigram_entropy_bits": entropy in bits of the byte histogram of the
       test split's target bytes, i.e. the bits-per-byte of the best
       context-free model fitted to the test set (a baseline to beat)}
  """
  if _is_byte_lm(data_config):
    file_counts = {}
    if data_config["name"] == "byte_text":
      splits = get_builder(data_config).info.splits
      file_counts = {s: splits[s].num_examples for s in splits}
    names = file_counts or ("train", "validation", "test")
    streams = {s: load_token_stream(data_config, s) for s in names}
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
  builder = get_builder(data_config)
  splits = builder.info.splits
  features = builder.info.features
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  num_examples = {s: splits[s].num_examples for s in splits}
  test_split = "test" if "test" in num_examples else "validation"
  return {
      "task": "classification",
      "num_classes": features[label_key].num_classes,
      "image_shape": output_image_shape(data_config,
                                        tuple(features[image_key].shape)),
      "num_examples": num_examples,
      "num_train_examples": num_examples.get("train"),
      "num_test_examples": num_examples.get(test_split),
      "test_split": test_split,
  }


################################################################################
# Contiguous segment streams (adaptive-span / Transformer-XL style LMs).
################################################################################

# The authors' enwik8 split (prep_enwik8.py): the last 2 x 5M bytes are validation, test.
ENWIK8_HELDOUT_BYTES = 5_000_000
STREAM_SOURCES = ("byte_text", "byte_file")


def load_token_stream(data_config, split: str) -> np.ndarray:
  """A split as one uint8 byte stream, for the segment iterators.

  `byte_text`: `byte_text.load_stream` (a separator before every file).
  `byte_file`: one raw file `data_config.path` (e.g. enwik8) split as the adaptive-span
    authors' `prep_enwik8.py`: test = the last `heldout_bytes` bytes (default 5,000,000),
    validation = the `heldout_bytes` before them, train = the rest. Memory-mapped; nothing
    is downloaded.
  """
  name = data_config["name"]
  if name == "byte_text":
    return byte_text.load_stream(get_builder(data_config), split)
  if name != "byte_file":
    raise ValueError(f"segment streams read data.name in {STREAM_SOURCES}, got {name!r}")
  path = data_config.get("path")
  if not path or not os.path.isfile(os.path.expanduser(path)):
    raise FileNotFoundError(
        f"data.name='byte_file' needs data.path pointing at a raw byte file (e.g. the "
        f"unzipped enwik8 from http://mattmahoney.net/dc/enwik8.zip), got {path!r}")
  data = np.memmap(os.path.expanduser(path), dtype=np.uint8, mode="r")
  held = int(data_config.get("heldout_bytes") or ENWIK8_HELDOUT_BYTES)
  if len(data) <= 2 * held:
    raise ValueError(f"{path} has {len(data)} bytes, too few for two held-out splits of "
                     f"{held} (set data.heldout_bytes)")
  splits = {"train": data[:-2 * held], "validation": data[-2 * held:-held],
            "test": data[-held:]}
  if split not in splits:
    raise ValueError(f"byte_file split must be one of {sorted(splits)}, got {split!r}")
  return splits[split]


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
    if batch_size % count:
      raise ValueError(f"Global batch_size={batch_size} is not divisible by "
                       f"the process count {count}.")
    if not isinstance(block_len, (int, np.integer)) or block_len < 1:
      raise ValueError(f"block_len must be a positive int, got {block_len!r}")
    local = batch_size // count
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
    return 0 if epoch == 0 else int(
        np.random.default_rng([self.seed, epoch]).integers(self.block_len))

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
  """A `SegmentIterator` over `load_token_stream(data_config, split)`."""
  return SegmentIterator(load_token_stream(data_config, split), batch_size=batch_size,
                         block_len=block_len, train=train, seed=seed)
