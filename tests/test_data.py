"""Tests for zoo.data: TFDS builders `digits` / `byte_text` and grain pipelines.

Everything runs offline in temporary data dirs; `no_network` makes any socket
connection attempt fail loudly.
"""

import json
import pathlib
import socket

import grain
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo import data
from zoo.data import byte_text
from zoo.data import digits
from zoo.data import sampling

tfds.display_progress_bar(False)

TRAIN_LABEL_COUNTS = [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
TEST_LABEL_COUNTS = [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise RuntimeError(f"Network access attempted in a test: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def mock_processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


################################################################################
# digits
################################################################################


@pytest.fixture(scope="session")
def digits_config(tmp_path_factory):
  config = ml_collections.ConfigDict({
      "name": "digits", "data_dir": str(tmp_path_factory.mktemp("tfds"))})
  data.get_builder(config)  # Prepares once for the session.
  return config


def test_digits_splits_and_label_counts(digits_config):
  info = data.dataset_info(digits_config)
  assert info["num_classes"] == 10
  assert info["image_shape"] == (8, 8, 1)
  assert info["num_examples"] == {"train": 1437, "test": 360}
  assert (info["num_train_examples"], info["num_test_examples"]) == (1437, 360)

  builder = data.get_builder(digits_config)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  for split, counts in [("train", TRAIN_LABEL_COUNTS),
                        ("test", TEST_LABEL_COUNTS)]:
    source = builder.as_data_source(split)
    labels = [source[i]["label"] for i in range(len(source))]
    assert np.bincount(labels, minlength=10).tolist() == counts
  indices = digits.split_indices()
  assert not set(indices["train"]) & set(indices["test"])
  assert len(set(indices["train"]) | set(indices["test"])) == 1797


def test_digits_pixels_rescaled(digits_config):
  source = data.get_builder(digits_config).as_data_source("test")
  pixels = np.concatenate([source[i]["image"].ravel() for i in range(50)])
  assert pixels.dtype == np.uint8
  # Original levels 0..16 map to round(x * 255 / 16).
  levels = {int(np.floor(x * 255 / 16 + 0.5)) for x in range(17)}
  assert set(pixels.tolist()) <= levels and {0, 255} <= set(pixels.tolist())


def test_digits_train_batches(digits_config):
  it = data.make_iterator(digits_config, "train", batch_size=64, train=True)
  batch = next(it)
  assert batch["image"].shape == (64, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (64,)
  assert batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["mask"], 1.0)
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert isinstance(it, grain.DatasetIterator)


def test_digits_eval_covers_every_example_once(digits_config):
  builder = data.get_builder(digits_config)
  source = builder.as_data_source("test")
  expected = np.array([source[i]["label"] for i in range(len(source))])
  batches = list(data.make_iterator(digits_config, "test", batch_size=128,
                                    train=False))
  assert len(batches) == 3  # ceil(360 / 128)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360
  np.testing.assert_array_equal(mask, np.arange(384) < 360)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:360], expected)  # In order, once each.
  padding = batches[-1]
  np.testing.assert_array_equal(padding["image"][mask[256:] == 0], 0.0)
  np.testing.assert_array_equal(padding["label"][mask[256:] == 0], 0)
  first = np.asarray(source[0]["image"], np.float32) / 127.5 - 1
  np.testing.assert_allclose(batches[0]["image"][0], first)


def test_digits_train_deterministic_per_seed(digits_config):
  def first_batches(seed):
    it = data.make_iterator(digits_config, "train", batch_size=32, train=True,
                            seed=seed)
    return take(it, 3)
  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_train_epochs_are_permutations_reshuffled():
  n, bs = 10, 4
  ds = sampling.train_batches(n, bs, seed=3, index=0, count=1,
                              make_batch=lambda ids, epochs: (ids, epochs))
  ids = np.concatenate([ds[i][0] for i in range(10)])  # 40 rows: 4 epochs.
  epochs = np.concatenate([ds[i][1] for i in range(10)])
  np.testing.assert_array_equal(epochs, np.repeat(np.arange(4), n))
  orders = ids.reshape(4, n)
  for order in orders:
    assert sorted(order.tolist()) == list(range(n))
  assert len({tuple(o) for o in orders}) == 4


@pytest.mark.parametrize("train", [True, False])
def test_digits_checkpoint_state_roundtrip(digits_config, train):
  kwargs = dict(batch_size=16, train=train, seed=7)
  split = "train" if train else "test"
  it = data.make_iterator(digits_config, split, **kwargs)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  expected = take(it, 4)
  fresh = data.make_iterator(digits_config, split, **kwargs)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def test_digits_sharding_two_processes(digits_config, monkeypatch):
  builder = data.get_builder(digits_config)
  source = builder.as_data_source("test")
  expected = np.array([source[i]["label"] for i in range(len(source))])
  labels, num_batches = [], []
  for index in range(2):
    mock_processes(monkeypatch, index, 2)
    batches = list(data.make_iterator(digits_config, "test", batch_size=128,
                                      train=False))
    assert all(b["image"].shape == (64, 8, 8, 1) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    labels.append(np.concatenate([b["label"] for b in batches])[mask])
    num_batches.append(len(batches))
  assert num_batches == [3, 3]  # Same number of eval steps on every process.
  np.testing.assert_array_equal(np.concatenate(labels), expected)

  # Each process takes its rows of the same global batch: together they equal
  # the single-process batch, so loss curves do not depend on the process count.
  single = sampling.train_batches(1437, 16, 0, 0, 1, lambda i, e: i)
  shards = [sampling.train_batches(1437, 8, 0, index, 2, lambda i, e: i)
            for index in range(2)]
  for b in (0, 1, 89, 90):  # 90 * 16 = 1440 > 1437: batch 89 crosses an epoch
    np.testing.assert_array_equal(np.concatenate([s[b] for s in shards]), single[b])
  rows = [set(np.concatenate([s[b] for b in range(89)]).tolist()) for s in shards]
  assert not rows[0] & rows[1]  # within epoch 0 the processes' rows are disjoint

  mock_processes(monkeypatch, 1, 2)
  batch = next(data.make_iterator(digits_config, "train", batch_size=128,
                                  train=True))
  assert batch["image"].shape == (64, 8, 8, 1)
  with pytest.raises(ValueError, match="not divisible"):
    data.make_iterator(digits_config, "train", batch_size=63, train=True)


def test_digits_resize_and_channels(digits_config):
  config = ml_collections.ConfigDict(digits_config.to_dict())
  config.update(image_size=16, channels=3, cache=False)
  assert data.dataset_info(config)["image_shape"] == (16, 16, 3)
  batch = next(data.make_iterator(config, "train", batch_size=8, train=True))
  assert batch["image"].shape == (8, 16, 16, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


################################################################################
# byte_text
################################################################################


def write_corpus(root: pathlib.Path) -> dict[str, bytes]:
  """A few files, chosen so that every split gets at least two."""
  files, counts = {}, {"train": 0, "validation": 0, "test": 0}
  i = 0
  while min(counts.values()) < 2 or counts["train"] < 4:
    rel = f"pkg{i % 3}/mod_{i}.txt"
    split = byte_text.split_of(rel)
    if counts[split] < (4 if split == "train" else 2):
      rng = np.random.default_rng(i)
      text = (f"def f{i}(x):\n    return x * {i}\n" * int(rng.integers(3, 9))
              ).encode() + rng.integers(1, 256, 7, dtype=np.uint8).tobytes()
      path = root / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(text)
      files[rel] = text
      counts[split] += 1
    i += 1
  (root / "skip.py").write_text("not matched by the glob")
  (root / "__pycache__").mkdir()
  (root / "__pycache__" / "x.txt").write_text("excluded directory")
  return files


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return root, write_corpus(root)


def text_config(corpus, data_dir, **kwargs):
  return ml_collections.ConfigDict({
      "name": "byte_text", "data_dir": str(data_dir),
      "source_dir": str(corpus[0]), "glob": "**/*.txt", "seq_len": 16,
      **kwargs})


def expected_stream(files, split):
  return b"".join(b"\0" + files[rel] for rel in sorted(files)
                  if byte_text.split_of(rel) == split)


def test_byte_text_splits_disjoint_and_deterministic(corpus, tmp_path):
  _, files = corpus
  paths = {}
  for run in ("a", "b"):
    builder = data.get_builder(text_config(corpus, tmp_path / run))
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert builder.builder_config.name.startswith("dir_")
    paths[run] = {}
    for split in byte_text.SPLITS:
      source = builder.as_data_source(split)
      records = [source[i] for i in range(len(source))]
      paths[run][split] = {r["path"].decode() for r in records}
      for r in records:  # Text features read back as bytes.
        assert byte_text.split_of(r["path"].decode()) == split
        assert r["text"] == files[r["path"].decode()]
  assert paths["a"] == paths["b"]
  a = paths["a"]
  assert not (a["train"] & a["validation"] or a["train"] & a["test"] or
              a["validation"] & a["test"])
  assert a["train"] | a["validation"] | a["test"] == set(files)


def test_byte_text_stream_and_info(corpus, tmp_path):
  _, files = corpus
  config = text_config(corpus, tmp_path)
  builder = data.get_builder(config)
  for split in byte_text.SPLITS:
    stream = byte_text.load_stream(builder, split)
    assert bytes(stream) == expected_stream(files, split)
  info = data.dataset_info(config)
  test = np.frombuffer(expected_stream(files, "test")[1:], np.uint8)
  p = np.bincount(test, minlength=256) / len(test)
  p = p[p > 0]
  assert info["num_bytes"]["test"] == len(test)
  assert info["test_unigram_entropy_bits"] == pytest.approx(
      -(p * np.log2(p)).sum())
  assert sum(info["num_files"].values()) == len(files)
  assert info["vocab_size"] == 256


def test_byte_text_train_windows(corpus, tmp_path):
  _, files = corpus
  stream = expected_stream(files, "train")
  config = text_config(corpus, tmp_path)
  it = data.make_iterator(config, "train", batch_size=8, train=True, seed=0)
  batches = take(it, 3)
  for batch in batches:
    assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["mask"], 1.0)
    np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                  batch["targets"][:, :-1])
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      window = bytes(inputs.tolist() + targets[-1:].tolist())
      assert window in stream
  again = take(data.make_iterator(config, "train", batch_size=8, train=True,
                                  seed=0), 3)
  other = take(data.make_iterator(config, "train", batch_size=8, train=True,
                                  seed=1), 3)
  assert_batches_equal(batches, again)
  assert not np.array_equal(batches[0]["inputs"], other[0]["inputs"])

  it = data.make_iterator(config, "train", batch_size=8, train=True, seed=5)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  fresh = data.make_iterator(config, "train", batch_size=8, train=True, seed=5)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 5), expected)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_byte_text_eval_covers_every_byte_once(corpus, tmp_path, monkeypatch,
                                               num_processes):
  _, files = corpus
  config = text_config(corpus, tmp_path)
  scored, counts = [], set()
  for index in range(num_processes):
    mock_processes(monkeypatch, index, num_processes)
    batches = list(data.make_iterator(config, "validation", batch_size=4,
                                      train=False))
    counts.add(len(batches))
    for b in batches:
      assert b["inputs"].shape == (4 // num_processes, 16)
      np.testing.assert_array_equal(b["inputs"][:, 1:] * b["mask"][:, 1:],
                                    b["targets"][:, :-1] * b["mask"][:, 1:])
      np.testing.assert_array_equal(b["targets"] * (1 - b["mask"]), 0)
      scored.append(b["targets"][b["mask"] == 1])
  assert len(counts) == 1
  stream = expected_stream(files, "validation")
  assert bytes(np.concatenate(scored).astype(np.uint8)) == stream[1:]


def test_byte_file_feeds_the_lm_task(tmp_path):
  """A raw byte file (enwik8's layout): test = last heldout bytes, validation before."""
  raw = np.random.default_rng(0).integers(0, 256, 1000).astype(np.uint8)
  path = tmp_path / "enwik_tiny"
  path.write_bytes(raw.tobytes())
  config = {"name": "byte_file", "path": str(path), "heldout_bytes": 100, "seq_len": 16}
  scored = [b["targets"][b["mask"] == 1] for b in
            data.make_iterator(config, "test", batch_size=2, train=False)]
  assert bytes(np.concatenate(scored).astype(np.uint8)) == raw[-100:][1:].tobytes()
  batch = next(data.make_iterator(config, "train", batch_size=2, train=True))
  assert batch["inputs"].shape == (2, 16)
  for row_in, row_t in zip(batch["inputs"], batch["targets"]):  # contiguous windows
    start = bytes(raw[:800]).find(bytes(row_in.astype(np.uint8)))
    assert start >= 0 and raw[start + 16] == row_t[-1]
  info = data.dataset_info(config)
  assert info["num_bytes"] == {"train": 799, "validation": 99, "test": 99}


def test_unknown_dataset_raises_clear_error(tmp_path):
  config = ml_collections.ConfigDict({"name": "no_such_dataset_xyz",
                                      "data_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'"):
    data.get_builder(config)


def test_unprepared_tfds_dataset_raises_clear_error(tmp_path):
  config = ml_collections.ConfigDict({"name": "mnist",
                                      "data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="tfds build mnist"):
    data.get_builder(config)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.make_iterator(config, "train", batch_size=8, train=True)
  assert not any(tmp_path.iterdir())  # Nothing was written or downloaded.


def test_byte_text_default_stdlib_corpus(tmp_path):
  config = ml_collections.ConfigDict({"name": "byte_text",
                                      "data_dir": str(tmp_path),
                                      "seq_len": 128})
  builder = data.get_builder(config)
  assert builder.builder_config.name == "stdlib"
  files = byte_text.list_files(byte_text.stdlib_dir())
  assert files and not any("site-packages" in f for f in files)
  info = data.dataset_info(config)
  assert sum(info["num_files"].values()) == len(files)
  assert info["num_bytes"]["train"] > 5 * 2**20
  assert 3.0 < info["test_unigram_entropy_bits"] < 6.0
  batch = next(data.make_iterator(config, "train", batch_size=4, train=True))
  assert batch["inputs"].shape == (4, 128)


################################################################################
# Other TFDS datasets (offline stand-in)
################################################################################


class ToyTfds(tfds.core.GeneratorBasedBuilder):
  """Stands in for a third-party TFDS image dataset (registered as toy_tfds)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=2)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6),
            "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 3), 40 * i, np.uint8), "label": i % 2}


def test_other_tfds_dataset_download_flag(tmp_path):
  config = ml_collections.ConfigDict({"name": "toy_tfds",
                                      "data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="download = True"):
    data.get_builder(config)
  config.download = True
  builder = data.get_builder(config)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  config.channels = 1
  info = data.dataset_info(config)
  assert info["image_shape"] == (4, 4, 1) and info["num_test_examples"] == 3
  batches = list(data.make_iterator(config, "test", batch_size=2, train=False))
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0])
  images = np.concatenate([b["image"] for b in batches])[:3]
  np.testing.assert_allclose(sorted(images[:, 0, 0, 0]),
                             np.array([0, 40, 80]) / 127.5 - 1, atol=1e-6)


def test_other_tfds_dataset_tfrecord_needs_conversion(tmp_path):
  ToyTfds(data_dir=tmp_path).download_and_prepare()  # TFDS default: tfrecord.
  config = ml_collections.ConfigDict({"name": "toy_tfds",
                                      "data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="convert_format"):
    data.get_builder(config)
