"""Where the data comes from: prepared TFDS builders and raw byte streams.

`data_config` keys read here (an `ml_collections.ConfigDict`; a plain dict
works too):

  name:       "digits", "mnist5k", "byte_text", "byte_file", or any TFDS name ("mnist",
              "cifar10", "imagenet2012", "cifar10:3.0.2", ...).
  data_dir:   TFDS data dir; None -> TFDS default (~/tensorflow_datasets or
              $TFDS_DATA_DIR).
  download:   (other TFDS names only, default False) allow
              `download_and_prepare` when the dataset is not prepared yet.
  byte_text:  source_dir / glob (optional: own text, see
              zoo/data/byte_text.py).
  byte_file:  path (a raw byte file such as enwik8), heldout_bytes (optional).

No network: GCS probing in TFDS is switched off on import, and nothing is ever
downloaded unless `data_config.download` is True.
"""

import difflib
import importlib.resources
import importlib.resources.abc  # pylint: disable=unused-import
import importlib.util
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from zoo.data import byte_text
from zoo.data import digits
from zoo.data import local_builder
from zoo.data import mnist5k

# tfds 4.9.10 already defaults to this; we rely on it: `tfds.builder` must
# never look for prepared data or dataset_info on gs://tfds-data.
gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

OWN_DATASETS = ("digits", "mnist5k", "byte_text")
# The byte LM sources: `load_token_stream` reads them; every other name is an
# image classification dataset.
STREAM_SOURCES = ("byte_text", "byte_file")
# The authors' enwik8 split (prep_enwik8.py): the last 2 x 5M bytes are
# validation, test.
ENWIK8_HELDOUT_BYTES = 5_000_000
_FILE_FORMAT = "array_record"


def get_builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder named by `data_config.name`.

  Our own builders (digits, mnist5k, byte_text) are prepared in array_record format on
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
  elif name == "mnist5k":
    builder = mnist5k.Mnist5k(data_dir=data_dir, file_format=_FILE_FORMAT)
  elif name == "byte_text":
    config = byte_text.make_config(data_config.get("source_dir"),
                                   data_config.get("glob"))
    builder = byte_text.ByteText(config=config, data_dir=data_dir,
                                 file_format=_FILE_FORMAT)
  else:
    return _get_tfds_builder(name, data_dir, data_config.get("download", False))
  if not local_builder.is_prepared(builder):
    with local_builder.progress_bars_on_terminal_only():
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
        "(then copy the directory over if needed), or set data.download = True "
        "(--config.data.download=True) to download and prepare it here.")
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


def load_token_stream(data_config, split: str) -> np.ndarray:
  """A split of a `STREAM_SOURCES` dataset as one uint8 byte stream.

  `byte_text`: `byte_text.load_stream` (a separator before every file).
  `byte_file`: one raw file `data_config.path` (e.g. enwik8) split as the
    adaptive-span authors' `prep_enwik8.py`: test = the last `heldout_bytes`
    bytes (default 5,000,000), validation = the `heldout_bytes` before them,
    train = the rest. Memory-mapped; nothing is downloaded.
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
