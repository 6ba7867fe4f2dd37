"""Tests for the `mnist5k` TFDS builder (zoo/data/mnist5k.py) and configs/vit_mnist5k.py.

Everything runs offline in temporary data dirs; `no_network` makes any socket connection
attempt fail loudly.
"""

from __future__ import annotations

import gzip
import hashlib
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import vit_mnist5k
from zoo import data
from zoo import training
from zoo.attention import __main__ as attention_main
from zoo.data import mnist5k

tfds.display_progress_bar(False)

# The first ten CSV rows of the fixed test split.
FIRST_TEST_ROWS = [9, 25, 28, 31, 32, 38, 39, 42, 47, 53]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise RuntimeError(f"Network access attempted in a test: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def config(data_dir):
  config = ml_collections.ConfigDict({"name": "mnist5k", "data_dir": data_dir})
  data.get_builder(config)  # Prepares once for the module.
  return config


def csv_table() -> np.ndarray:
  """The CSV as shipped, read independently of the builder: int64 [5000, 785]."""
  with gzip.open(mnist5k.CSV_PATH, "rt") as f:
    return np.loadtxt(f, delimiter=",", dtype=np.int64)


def split_rows(source, pixels_to_row) -> np.ndarray:
  """The CSV row of every example of a data source, found by its pixels."""
  return np.array([pixels_to_row[source[i]["image"].tobytes()]
                   for i in range(len(source))])


@pytest.fixture(scope="module")
def rows_of_splits(config):
  """{split: CSV rows of the prepared examples, in the source's order}."""
  table = csv_table()
  pixels_to_row = {row[:-1].astype(np.uint8).tobytes(): i for i, row in enumerate(table)}
  assert len(pixels_to_row) == 5000  # every image is distinct, so pixels name the row
  builder = data.get_builder(config)
  return {split: split_rows(builder.as_data_source(split), pixels_to_row)
          for split in ("train", "test")}


def test_csv_is_the_pinned_file_and_layout():
  with open(mnist5k.CSV_PATH, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == mnist5k.SHA256
  table = csv_table()
  assert table.shape == (5000, 785)
  np.testing.assert_array_equal(table[:, -1], np.repeat(np.arange(10), 500))
  images, labels = mnist5k.mnist5k_arrays()
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images.reshape(5000, -1), table[:, :-1])
  np.testing.assert_array_equal(labels, table[:, -1])
  assert not images.flags.writeable


def test_other_csv_is_refused(tmp_path, monkeypatch):
  fake = tmp_path / "mnist_5k.csv.gz"
  fake.write_bytes(gzip.compress(b"0," * 784 + b"3\n"))
  monkeypatch.setattr(mnist5k, "CSV_PATH", str(fake))
  with pytest.raises(ValueError, match="has sha256 .* not the 846f6cad"):
    mnist5k.mnist5k_arrays.__wrapped__()


def test_split_sizes_and_per_class_counts(config):
  info = data.dataset_info(config)
  assert info["num_classes"] == 10 and info["image_shape"] == (28, 28, 1)
  assert info["num_examples"] == {"train": 4000, "test": 1000}
  builder = data.get_builder(config)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  for split, per_class in (("train", 400), ("test", 100)):
    source = builder.as_data_source(split)
    labels = [source[i]["label"] for i in range(len(source))]
    assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_split_is_fixed_and_disjoint():
  indices = mnist5k.split_indices()
  assert indices["test"][:10].tolist() == FIRST_TEST_ROWS
  assert (len(indices["train"]), len(indices["test"])) == (4000, 1000)
  assert not set(indices["train"]) & set(indices["test"])
  assert sorted(set(indices["train"]) | set(indices["test"])) == list(range(5000))
  again = mnist5k.split_indices()
  for split in indices:
    np.testing.assert_array_equal(indices[split], again[split])


def test_examples_trace_back_to_their_csv_rows(config, rows_of_splits):
  indices = mnist5k.split_indices()
  table = csv_table()
  builder = data.get_builder(config)
  for split, rows in rows_of_splits.items():
    # Each split holds exactly its rows of the split, once each, with their labels.
    np.testing.assert_array_equal(np.sort(rows), indices[split])
    source = builder.as_data_source(split)
    labels = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(labels, table[rows, -1])
  assert not set(rows_of_splits["train"]) & set(rows_of_splits["test"])
  # Example keys are the row indices: what `_generate_examples` yields.
  builder = mnist5k.Mnist5k(data_dir=config.data_dir)
  keys = [key for key, _ in builder._generate_examples(indices["test"][:3])]  # pylint: disable=protected-access
  assert keys == FIRST_TEST_ROWS[:3]


def test_preparation_is_deterministic(config, tmp_path):
  other = ml_collections.ConfigDict({"name": "mnist5k", "data_dir": str(tmp_path)})
  for split in ("train", "test"):
    a = data.get_builder(config).as_data_source(split)
    b = data.get_builder(other).as_data_source(split)
    assert len(a) == len(b)
    for i in range(0, len(a), 97):
      np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
      assert a[i]["label"] == b[i]["label"]


def test_pixels_and_batches(config):
  source = data.get_builder(config).as_data_source("test")
  pixels = np.stack([source[i]["image"] for i in range(len(source))])
  assert pixels.dtype == np.uint8 and pixels.shape == (1000, 28, 28, 1)
  assert pixels.min() == 0 and pixels.max() == 255
  assert 0.05 < (pixels > 0).mean() < 0.4  # dark background, bright strokes
  batch = next(data.make_iterator(config, "train", batch_size=64, train=True))
  assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  np.testing.assert_array_equal(batch["mask"], 1.0)


def test_config_lists_and_keeps_vit_digits_keys():
  lines = attention_main.describe_config("configs/vit_mnist5k.py")
  assert lines[0].startswith("configs/vit_mnist5k.py: A small ViT")
  assert "configs/vit_mnist5k.py" in attention_main.config_files()
  config = vit_mnist5k.get_config("attention=relu,alpha=0.5,total_steps=7")
  assert config.total_steps == 7 and config.model.attention_options.alpha == 0.5
  assert config.data.name == "mnist5k"
  model = config.model
  assert (model.image_size // model.patch_size) ** 2 == 49 and model.in_channels == 1
  assert "init_from" in config


def test_vit_trains_a_few_steps(data_dir, config, tmp_path):
  del config  # prepared
  run = vit_mnist5k.get_config("attention=softmax,total_steps=4,batch_size=16")
  run.data.data_dir = data_dir
  run.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  run.optimizer.warmup_steps = 2
  run.update(log_every=2, eval_every=4, checkpoint_every=4)
  result = training.train(run, str(tmp_path), progress=False)
  assert result["status"] == "done" and result["step"] == 4
  assert 0.0 <= result["eval"]["accuracy"] <= 1.0
