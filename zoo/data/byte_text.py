"""TFDS builder `byte_text`: the raw bytes of local text files, for byte LMs.

Every file under `source_dir` that matches `glob` becomes one example:

  text: the raw file contents (no decoding, so any encoding is fine).
  path: the file's path relative to `source_dir`, POSIX style.
Both are `tfds.features.Text`; `as_data_source` returns them as `bytes`.

Split assignment is per file and deterministic: `split_of(path)` takes the
first 8 bytes of sha256(relative path) modulo 100 and maps [0, 90) -> train,
[90, 95) -> validation, [95, 100) -> test. Since only the relative path enters
the hash, the same tree gives the same splits on every machine, and adding or
removing a file never moves another file between splits.

Default corpus (config `stdlib`): the `.py` files of the Python standard
library of the interpreter that prepares the data
(`sysconfig.get_paths()['stdlib']`, recursively, sorted), skipping any
directory named `site-packages` or `__pycache__`. The stdlib's own test
suites (`test/`, `idlelib/idle_test/`, ...) are *kept*: they are ordinary
Python code and make up ~60% of the bytes. For CPython 3.11.7 this is 1790
files, 31.5 MB (12.1 MB without the tests). The exact numbers depend on the
Python version; `dataset_info()` in `zoo.data.pipeline` reports them.

Own text: `ByteText(config=make_config(source_dir, glob))`. Custom configs are
named `dir_<hash of (absolute source_dir, glob)>`, so different sources never
share prepared files in one data_dir. Data is read when the dataset is
prepared; later changes to the source tree need a fresh data_dir (or deleting
the prepared directory).

Byte streams. A byte LM sees one split as a single stream:
`stream(split) = concat(SEPARATOR + file.text for files sorted by path)`, i.e.
a single NUL byte (0x00) *before* every file, acting as a begin-of-document
marker (Python source does not contain NUL bytes). Every byte of the stream
except the very first leading separator is a prediction target, so the
targets are all file bytes plus one separator per file after the first.
`load_stream()` caches the stream as `<split>.stream.npy` next to the prepared
array_record files and memory-maps it, so opening a split is instant after
the first call.
"""

import dataclasses
import hashlib
import os
import pathlib
import sysconfig

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from zoo.data.local_builder import LocalFilesMessages

SPLITS = ("train", "validation", "test")
SEPARATOR = 0  # Byte placed before every file in the stream.
DEFAULT_GLOB = "**/*.py"
EXCLUDE_DIRS = ("site-packages", "__pycache__")


def stdlib_dir() -> str:
  """The default source directory: this interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def split_of(relpath: str) -> str:
  """Deterministic 90/5/5 split of a file by a hash of its relative path."""
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 100
  if bucket < 90:
    return "train"
  return "validation" if bucket < 95 else "test"


def list_files(source_dir: str, glob: str = DEFAULT_GLOB,
               exclude_dirs: tuple[str, ...] = EXCLUDE_DIRS) -> list[str]:
  """Sorted POSIX paths (relative to source_dir) of the files to include."""
  root = pathlib.Path(source_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"byte_text source_dir {source_dir!r} is not a "
                            "directory.")
  paths = []
  for p in root.glob(glob):
    rel = p.relative_to(root)
    if any(part in exclude_dirs for part in rel.parts[:-1]):
      continue
    if p.is_file():
      paths.append(rel.as_posix())
  return sorted(paths)


@dataclasses.dataclass(eq=False)
class ByteTextConfig(tfds.core.BuilderConfig):
  """Where the text comes from.

  Attributes:
    source_dir: directory to read; None: the Python stdlib (`stdlib_dir()`).
    glob: pathlib glob pattern relative to source_dir.
    exclude_dirs: files below a directory with one of these names are skipped.
  """
  source_dir: str | None = None
  glob: str = DEFAULT_GLOB
  exclude_dirs: tuple[str, ...] = EXCLUDE_DIRS


STDLIB_CONFIG = ByteTextConfig(
    name="stdlib",
    description="The .py files of the Python standard library (with tests).")


def make_config(source_dir: str | None = None,
                glob: str | None = None) -> ByteTextConfig:
  """Returns the `stdlib` config, or a config named after (source_dir, glob)."""
  glob = glob or DEFAULT_GLOB
  if source_dir is None and glob == DEFAULT_GLOB:
    return STDLIB_CONFIG
  source_dir = os.path.abspath(source_dir or stdlib_dir())
  key = hashlib.sha1(f"{source_dir}\n{glob}".encode("utf-8")).hexdigest()
  return ByteTextConfig(
      name=f"dir_{key[:12]}", source_dir=source_dir, glob=glob,
      description=f"Files {glob!r} under {source_dir!r}.")


class ByteText(LocalFilesMessages, tfds.core.GeneratorBasedBuilder):
  """Raw bytes of local text files with a per-file hashed 90/5/5 split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [STDLIB_CONFIG]

  # See zoo/data/digits.py: tfds 4.9.10 needs `importlib_resources` otherwise.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # Not `dataset_info_from_configs`: it would read README.md / CITATIONS.bib
    # / TAGS.txt of whatever sits next to this file in zoo/data.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),  # Raw bytes; decodes to `bytes`.
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    root = config.source_dir or stdlib_dir()
    files = {split: [] for split in SPLITS}
    for rel in list_files(root, config.glob, config.exclude_dirs):
      files[split_of(rel)].append(rel)
    if not any(files.values()):
      raise FileNotFoundError(f"No files match {config.glob!r} under {root!r}.")
    # TFDS cannot write a split without examples: a split that gets no file (a
    # tiny corpus) is left out and `load_stream` says so when it is asked for.
    return {split: self._generate_examples(root, rels)
            for split, rels in files.items() if rels}

  def _generate_examples(self, root, relpaths):
    for rel in relpaths:
      yield rel, {"text": pathlib.Path(root, rel).read_bytes(), "path": rel}


def load_stream(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """The split's byte stream (see module docstring) as a uint8 array.

  Built from the prepared array_record files on first use and cached as
  `<builder.data_dir>/<split>.stream.npy` (written atomically, so concurrent
  processes are safe); later calls memory-map the cache.

  Args:
    builder: a prepared `ByteText` builder.
    split: "train", "validation" or "test" (no TFDS slicing syntax).

  Returns:
    uint8 array [num_bytes + 1]; element 0 is the leading SEPARATOR.
  """
  if split not in SPLITS:
    raise ValueError(f"byte_text split must be one of {SPLITS}, got {split!r}.")
  if split not in builder.info.splits:
    raise ValueError(
        f"byte_text config {builder.builder_config.name!r} has no {split!r} "
        "split: no file hashed into it (see `split_of`); the corpus is too "
        "small.")
  path = os.path.join(os.fspath(builder.data_dir), f"{split}.stream.npy")
  if not os.path.exists(path):
    source = builder.as_data_source(split)
    records = sorted((source[i] for i in range(len(source))),
                     key=lambda r: r["path"])
    sep = bytes([SEPARATOR])
    stream = np.frombuffer(b"".join(sep + r["text"] for r in records),
                           dtype=np.uint8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, stream)
    os.replace(tmp, path)
  return np.load(path, mmap_mode="r")
