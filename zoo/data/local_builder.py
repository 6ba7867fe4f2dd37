"""What our own TFDS builders (digits, mnist5k, byte_text) share.

They read local files only, so TFDS's "Downloading and preparing dataset ..." is wrong
for them; `LocalFilesMessages` says that the data is being prepared from local files and
where it goes (`data_dir`: `data.data_dir`, else $TFDS_DATA_DIR or ~/tensorflow_datasets).
TFDS's own progress bars show only when stderr is a terminal (in a log file their nested
bars are escape sequences). `ArrayImageBuilder` is the builder of a labelled image set held
in memory (digits, mnist5k) with a fixed stratified split (`stratified_split`).
"""

import contextlib
import sys

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from sklearn import model_selection
from tensorflow_datasets.core.utils import tqdm_utils


class LocalFilesMessages:
  """Mixin for a `tfds.core.GeneratorBasedBuilder` built from local files."""

  def _log_download_bytes(self) -> None:
    print(f"Preparing dataset {self.name} from local files (nothing is downloaded) "
          f"in {self.data_dir} ...", flush=True)

  def _log_download_done(self) -> None:
    print(f"Dataset {self.name} prepared in {self.data_dir}; later runs reuse it.",
          flush=True)


@contextlib.contextmanager
def progress_bars_on_terminal_only():
  """TFDS's progress bars on while stderr is a terminal, off otherwise."""
  previous = getattr(tqdm_utils, "_active", True)
  tqdm_utils.display_progress_bar(previous and sys.stderr.isatty())
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(previous)


def is_prepared(builder) -> bool:
  """`builder.is_prepared()` without TFDS's warning that the (new, empty) version folder
  has no dataset_info.json yet."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return builder.is_prepared()
  finally:
    logging.set_verbosity(verbosity)


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> dict[str, np.ndarray]:
  """The fixed, seeded, stratified split: sorted example indices per split
  (`sklearn.model_selection.train_test_split` over the original order)."""
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed,
      shuffle=True)
  return {"train": np.sort(train), "test": np.sort(test)}


class ArrayImageBuilder(LocalFilesMessages, tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """A TFDS builder of labelled uint8 images held in memory: subclasses set
  `IMAGE_SHAPE`, `HOMEPAGE`, and `arrays()` -> (images [N, h, w, c], labels [N]) and
  `split_indices()` -> {split: indices}; the description is the subclass module's
  docstring and the example keys are the indices into `arrays()`."""

  IMAGE_SHAPE: tuple[int, int, int]
  HOMEPAGE: str

  # tfds 4.9.10 resolves `code_path` via `importlib_resources`, which it does not install
  # on Python >= 3.9 (tensorflow/datasets#11212) and which makes `download_and_prepare`
  # crash. The code path is simply the subclass's file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(sys.modules[cls.__module__].__file__)

  @staticmethod
  def arrays() -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  @staticmethod
  def split_indices() -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # Not `dataset_info_from_configs`: it would read README.md / CITATIONS.bib / TAGS.txt
    # of whatever sits next to the builder's file in zoo/data.
    return tfds.core.DatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(idx)
            for split, idx in self.split_indices().items()}

  def _generate_examples(self, indices):
    images, labels = self.arrays()
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
