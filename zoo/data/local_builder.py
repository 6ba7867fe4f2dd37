"""What our own TFDS builders (digits, mnist5k, byte_text) say while they prepare data.

They read local files only, so TFDS's "Downloading and preparing dataset ..." is wrong
for them; this mixin says that the data is being prepared from local files and where it
goes (`data_dir`: `data.data_dir`, else $TFDS_DATA_DIR or ~/tensorflow_datasets). TFDS's
own progress bars show only when stderr is a terminal (in a log file their nested bars
are escape sequences).
"""

import contextlib
import sys

from absl import logging
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
