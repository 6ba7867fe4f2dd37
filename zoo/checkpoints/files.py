"""Checkpoint file formats in plain numpy: big_vision's npz, safetensors, hashes and atomic
writes. No model knowledge: names map to arrays, nothing more.

* `CheckpointError`: a checkpoint file or source the user has to fix (missing, truncated,
  corrupt, wrong hash, not downloadable), told in one line.
* `sha256(path)`: the file's hex digest, read in chunks.
* `atomic_file(path)` / `atomic_write(path, write_fn)`: write through a temporary file in
  the same folder, fsync, then `os.replace`; on any failure (KeyboardInterrupt included)
  the temporary file goes and `path` is untouched.
* `read_npz` / `write_npz`: big_vision's checkpoints (`big_vision/utils.py`
  `save_checkpoint`: `np.savez` of the parameter tree flattened to "a/b/c" names). numpy
  stores ml_dtypes' bfloat16 as the raw void type "|V2"; `read_npz` views those as
  bfloat16 again (big_vision's `recover_dtype`), `write_npz` writes bfloat16 that way.
* `read_safetensors` / `write_safetensors`: the safetensors format
  (github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
  of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
  {str: str}}` padded with spaces, then the tensors' bytes, C order, little-endian, back
  to back. Read with the reference implementation's checks (header size, offsets that
  tile the data exactly, sizes that match dtype x shape); written as it writes (tensors
  ordered by descending dtype, then name; header padded to a multiple of 8 bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype names -> numpy dtypes (little-endian), in the reference
# implementation's `Dtype` order (its writer sorts tensors by this order, descending).
# The 4- and 6-bit types (F4, F6_E2M3, F6_E3M2) pack several values per byte and are not
# read here.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": BFLOAT16,
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_SAFETENSORS_RANK = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}
# The reference reader refuses larger headers.
SAFETENSORS_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
  """A checkpoint file or source the user fixes (missing, corrupt, wrong hash, offline),
  told in one line.

  A ValueError, so code that already catches the config errors catches it too.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # always one line


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """The sha256 hex digest of the file at `path`, read `chunk` bytes at a time."""
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      while block := f.read(chunk):
        digest.update(block)
  except FileNotFoundError:
    raise CheckpointError(f"no file {path}") from None
  return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """A binary file open for writing that becomes `path` when the block ends normally.

  It is a temporary file in `path`'s folder (created if missing); on success it is
  flushed, fsynced and renamed over `path` (`os.replace`, atomic), so readers see the old
  file or the whole new one. On any exception, KeyboardInterrupt included, the temporary
  file is removed and `path` is left as it was. Its mode follows the umask (as `open`).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  with contextlib.suppress(OSError):  # make the rename itself durable (best effort)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def atomic_write(path: str | os.PathLike,
                 write_fn: Callable[[BinaryIO], Any]) -> pathlib.Path:
  """Calls `write_fn(f)` on a binary file that replaces `path` only if it returns
  (see `atomic_file`); returns `path`."""
  with atomic_file(path) as f:
    write_fn(f)
  return pathlib.Path(path)


# ---------------------------------------------------------------------------------- npz


def _recover_dtype(name: str, array: np.ndarray, path) -> np.ndarray:
  """big_vision's `recover_dtype`: numpy stores bfloat16 as raw 2-byte voids."""
  if array.dtype.type is np.void and array.dtype.names is None:
    if array.dtype.itemsize != 2:
      raise CheckpointError(f"{path}: array {name!r} has the raw type {array.dtype.str} "
                            f"({array.dtype.itemsize} bytes), which is not bfloat16; "
                            f"unknown dtype")
    return array.view(BFLOAT16)
  return array


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of the npz file at `path` by its stored name ("__input__"-style extras
  included; the caller skips them), bfloat16 recovered from numpy's "|V2".

  Raises CheckpointError for a missing file, a file that is not an npz archive (a lone
  .npy, a pickle, a truncated or corrupt zip) or one holding Python objects.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint file {path}")
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise CheckpointError(f"{path} holds a single .npy array, not an npz archive of "
                            f"named arrays")
    with loaded:
      return {name: _recover_dtype(name, loaded[name], path) for name in loaded.files}
  except CheckpointError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != b"PK\x03\x04":  # a zip file's first local header
      reason = "not an npz (zip) archive"
    elif isinstance(e, ValueError) and "allow_pickle" in str(e):
      reason = "an npz archive holding Python objects (pickled arrays), which are not loaded"
    else:
      reason = f"a truncated or corrupt npz archive ({type(e).__name__}: {e})"
    raise CheckpointError(f"{path} is {reason}") from None


def _npz_array(name: str, value) -> np.ndarray:
  array = np.asarray(value, order="C")
  if array.dtype == BFLOAT16:
    return array.view(np.dtype("V2"))  # as np.savez stores it; read_npz recovers it
  if array.dtype.kind == "O" or array.dtype.isbuiltin == 2 or array.dtype.kind == "V":
    raise ValueError(f"array {name!r} has dtype {array.dtype}, which an npz file cannot "
                     f"store without pickling or losing the type (only bfloat16 among "
                     f"the ml_dtypes types is recovered by readers)")
  return array


def write_npz(path: str | os.PathLike, flat: Mapping[str, Any], *,
              compressed: bool = False) -> pathlib.Path:
  """Writes `flat` ({"a/b/c": array}) as big_vision's `save_checkpoint` does (an
  `np.savez` archive, one NAME.npy member per array, bfloat16 as "|V2"), atomically.

  Any name is allowed (np.savez itself refuses names such as "file"). Raises ValueError
  for arrays of Python objects or of ml_dtypes types other than bfloat16.
  """
  arrays = {str(name): _npz_array(str(name), value) for name, value in flat.items()}
  compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED

  def write(f):
    with zipfile.ZipFile(f, mode="w", compression=compression, allowZip64=True) as archive:
      for name, array in arrays.items():
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
          np.lib.format.write_array(member, array, allow_pickle=False)

  return atomic_write(path, write)


# --------------------------------------------------------------------------- safetensors


def _safetensors_header(path, data: bytes) -> tuple[dict, int]:
  """(the parsed JSON header, where the tensor bytes start), after the size checks."""
  if len(data) < 8:
    raise CheckpointError(f"{path} is not a safetensors file: {len(data)} bytes, shorter "
                          f"than the 8-byte header length")
  (n,) = struct.unpack("<Q", data[:8])
  if n > SAFETENSORS_MAX_HEADER:
    raise CheckpointError(f"{path} is not a safetensors file: its header length {n} is "
                          f"over the format's limit of {SAFETENSORS_MAX_HEADER} bytes")
  if 8 + n > len(data):
    raise CheckpointError(f"{path} is truncated or not a safetensors file: its header "
                          f"length {n} runs past the end of the file ({len(data)} bytes)")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON "
                          f"({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON "
                          f"object")
  return header, 8 + n


def _tensor_info(path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise CheckpointError(f"{path}: header entry {name!r} lacks dtype, shape or "
                          f"data_offsets")
  dtype = SAFETENSORS_DTYPES.get(info["dtype"])
  if dtype is None:
    raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which is "
                          f"not supported (supported: {', '.join(SAFETENSORS_DTYPES)})")
  shape, offsets = info["shape"], info["data_offsets"]
  if (not isinstance(shape, list)
      or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
    raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
  if (not isinstance(offsets, list) or len(offsets) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
    raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
  return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path: str | os.PathLike
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors by name, the header's "__metadata__" or {}) of the safetensors file at
  `path`. The file is read into memory once; the arrays are read-only views of that
  buffer (no memory map keeps the file open).

  Checks as the reference reader: the header length lies within the file and under
  100 MB, every dtype is known, each tensor's byte range is dtype size x shape, and the
  ranges tile the data section exactly (no gap, overlap or trailing bytes). A missing,
  truncated or corrupt file raises one CheckpointError naming it.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint file {path}")
  data = path.read_bytes()
  header, start = _safetensors_header(path, data)
  metadata = header.pop("__metadata__", None) or {}
  if (not isinstance(metadata, dict)
      or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
    raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
  infos = sorted(((name, *_tensor_info(path, name, info)) for name, info in header.items()),
                 key=lambda t: (t[3], t[4]))
  body = memoryview(data)[start:]
  tensors, end = {}, 0
  for name, dtype, shape, begin, stop in infos:
    size = math.prod(shape) * dtype.itemsize
    if begin != end or stop - begin != size:
      raise CheckpointError(
          f"{path}: tensor {name!r} ({_SAFETENSORS_NAMES[dtype]} {list(shape)}, "
          f"{size} bytes) has data_offsets [{begin}, {stop}], expected [{end}, "
          f"{end + size}]: the file is corrupt")
    if stop > len(body):
      raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte "
                            f"{start + stop} of a {len(data)}-byte file")
    end = stop
    tensors[name] = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize,
                                  offset=begin).reshape(shape)
  if end != len(body):
    raise CheckpointError(f"{path}: {len(body) - end} bytes after the last tensor; the "
                          f"file is corrupt (or not a safetensors file)")
  return tensors, dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes `tensors` ({name: array}) and string `metadata` as a safetensors file,
  atomically, laid out as the reference writer does (readable by the `safetensors`
  library and by `read_safetensors`).

  Raises ValueError for a dtype the format lacks (e.g. Python objects, strings) or
  metadata that is not str -> str.
  """
  arrays = {}
  for name, value in tensors.items():
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                       f"store (supported: {', '.join(SAFETENSORS_DTYPES)})")
    arrays[str(name)] = np.asarray(array, dtype=dtype, order="C")
  if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                      for k, v in metadata.items()):
    raise ValueError("safetensors metadata must map strings to strings")
  rank = {name: _SAFETENSORS_RANK[_SAFETENSORS_NAMES[a.dtype]] for name, a in arrays.items()}
  order = sorted(arrays, key=lambda name: (-rank[name], name))
  header: dict[str, Any] = {}
  if metadata is not None:
    header["__metadata__"] = dict(sorted(metadata.items()))
  offset = 0
  for name in order:
    array = arrays[name]
    header[name] = {"dtype": _SAFETENSORS_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  blob += b" " * (-len(blob) % 8)

  def write(f):
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      f.write(arrays[name].reshape(-1).view(np.uint8))

  return atomic_write(path, write)


__all__ = ["CheckpointError", "SAFETENSORS_DTYPES", "atomic_file", "atomic_write", "sha256",
           "read_npz", "write_npz", "read_safetensors", "write_safetensors"]
