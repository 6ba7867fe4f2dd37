"""TFDS builder `digits`: scikit-learn's bundled 8x8 handwritten digits.

The data is the UCI ML hand-written digits test set that ships inside
scikit-learn (`sklearn.datasets.load_digits`): 1797 grey-scale 8x8 images of the
digits 0-9, 43 writers. Nothing is downloaded.

Features:
  image: uint8 [8, 8, 1]. The original pixel values are integers 0..16; they are
    rescaled to 0..255 with `floor(x * 255 / 16 + 0.5)` (round half up), so
    0 -> 0, 8 -> 128 and 16 -> 255. Stored as a raw `tfds.features.Tensor`
    rather than a PNG-encoded `tfds.features.Image`: 64 bytes need no
    compression, preparation then needs no TensorFlow import (~10 s), and reads
    need no PNG decode. Either way readers get a uint8 numpy array.
  label: ClassLabel(num_classes=10), the digit.

Splits (fixed, stratified by label with
`sklearn.model_selection.train_test_split(test_size=360, stratify=label,
random_state=0)` over the original sample order):
  train: 1437 examples, per class 0..9:
    [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
  test:   360 examples, per class 0..9:
    [ 36,  36,  35,  37,  36,  37,  36,  36,  35,  36]

Example keys are the indices into the original `load_digits()` arrays, so each
example can be traced back to scikit-learn.

Usage (files are written in the `array_record` format so grain can random-access
them):

  builder = Digits(data_dir=..., file_format='array_record')
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source('train')
"""

import numpy as np
from sklearn import datasets
import tensorflow_datasets as tfds

from zoo.data.local_builder import ArrayImageBuilder, stratified_split

NUM_TRAIN = 1437
NUM_TEST = 360
SPLIT_SEED = 0


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns all 1797 (images uint8 [N, 8, 8, 1], labels int64 [N])."""
  data = datasets.load_digits()
  images = np.floor(data.images * 255.0 / 16.0 + 0.5).astype(np.uint8)
  return images[..., None], data.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """The fixed, seeded, stratified split: sorted original indices per split."""
  return stratified_split(digits_arrays()[1], NUM_TEST, SPLIT_SEED)


class Digits(ArrayImageBuilder):
  """scikit-learn's 8x8 handwritten digits (1437 train / 360 test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_SHAPE = (8, 8, 1)
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"
  arrays = staticmethod(digits_arrays)
  split_indices = staticmethod(split_indices)
