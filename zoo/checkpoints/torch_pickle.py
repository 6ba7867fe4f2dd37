"""PyTorch checkpoint files (`torch.save`: .pt / .pth / .bin) read into numpy arrays.

`read_torch(path)` returns the object the file holds, with every tensor a numpy array
(bfloat16 and float8 through `ml_dtypes`) and containers kept (dict, OrderedDict, list,
tuple). With torch importable it is `torch.load(path, map_location="cpu",
weights_only=True)`; otherwise (or with `use_torch=False`) a reader of the file formats
written here, which needs no torch and runs no code from the file:

* The zip format (torch >= 1.6): `<archive>/data.pkl` is a pickle whose tensors are
  `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` calls,
  and whose storages are persistent ids `('storage', storage_type, key, location,
  numel)` whose bytes are the record `<archive>/data/<key>` in the byte order of the
  `<archive>/byteorder` record (little when absent).
* The legacy format (torch < 1.6, `_use_new_zipfile_serialization=False`): three small
  pickles (magic number 0x1950a86a20f9469cfc6c, protocol version 1001, system info), the
  object's pickle with persistent ids `('storage', storage_type, key, location, numel,
  view_metadata)`, a pickle of the sorted storage keys, then per key an int64 element
  count and the storage's bytes, both little-endian.

The unpickler resolves only a whitelist of globals: `collections.OrderedDict`, the torch
tensor / parameter rebuild functions, the torch storage classes (as markers of a dtype),
`torch.Size` (a tuple), torch dtypes (numpy dtypes), `builtins` set / frozenset / slice /
complex, `_codecs.encode` for latin-1 (how protocol 2 writes bytes) and numpy scalars of a
plain dtype. Any other global raises `CheckpointError` naming it before anything from the
file runs. A tensor's view is checked to lie inside its storage before it is read with
`np.lib.stride_tricks.as_strided` and copied.

Not read without torch (a `CheckpointError` says to install torch, the `torch` extra of
attention-zoo): the tar format of torch < 0.4, pickled `torch.nn.Module` classes,
TorchScript archives, quantized and sparse tensors.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from zoo.checkpoints.files import CheckpointError

INSTALL_TORCH = ("install torch (`pip install 'attention-zoo[torch]'`, the `torch` extra, or "
                 "`pip install torch`)")
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (legacy format)
PROTOCOL_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION (legacy format)

# torch's `<Name>Storage` classes -> the element dtype of their bytes.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UInt16Storage": np.dtype(np.uint16), "UInt32Storage": np.dtype(np.uint32),
    "UInt64Storage": np.dtype(np.uint64),
    "Float8_e5m2Storage": np.dtype(ml_dtypes.float8_e5m2),
    "Float8_e4m3fnStorage": np.dtype(ml_dtypes.float8_e4m3fn),
    "Float8_e5m2fnuzStorage": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "Float8_e4m3fnuzStorage": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "UntypedStorage": np.dtype(np.uint8),
}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")

# torch dtypes (`torch.float32` pickles as the global `torch float32`) -> numpy dtypes.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}


# ----------------------------------------------------------------------------------------
# Placeholders built while unpickling; the arrays are made once all storage bytes are read.


class _Marker:
  """Refuses pickle's BUILD (`__setstate__`), so a file cannot set fields of the reader's
  own objects."""

  __slots__ = ()

  def __setstate__(self, state):
    raise CheckpointError(f"the pickle tries to set the state of a {type(self).__name__}")


class _StorageType(_Marker):
  """What the global `torch.<Name>Storage` resolves to: the storage's element dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage(_Marker):
  """A storage: `numel` elements of `dtype` from element `offset` of root storage `root`."""

  __slots__ = ("root", "dtype", "numel", "offset")

  def __init__(self, root: str, dtype: np.dtype, numel: int, offset: int = 0):
    self.root, self.dtype, self.numel, self.offset = root, dtype, numel, offset


class _Tensor(_Marker):
  """A tensor to build: `size` elements with element `stride` from `offset` of `storage`."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    self.storage, self.offset = storage, _int(offset, "storage offset")
    self.size = tuple(_int(s, "size") for s in size)
    self.stride = tuple(_int(s, "stride") for s in stride)


class _TensorType(_Marker):
  """What `torch.Tensor` / `torch.nn.Parameter` resolve to (for `_rebuild_from_type_v2`)."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name


def _int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise CheckpointError(f"a tensor's {what} is {value!r}, not an int")
  return int(value)


# ----------------------------------------------------------------------------------------
# The whitelisted callables.


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """`torch._utils._rebuild_tensor_v2`: requires_grad, hooks and metadata are dropped."""
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  """`torch._utils._rebuild_tensor` (older files)."""
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """`torch._utils._rebuild_parameter`: a Parameter is its data."""
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  """`torch._utils._rebuild_parameter_with_state`: a Parameter is its data (state dropped)."""
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state=None):
  """`torch._tensor._rebuild_from_type_v2` for plain tensors and parameters only."""
  del state
  if not isinstance(new_type, _TensorType):
    raise CheckpointError(f"_rebuild_from_type_v2 with type {new_type!r}: only torch.Tensor "
                          "and torch.nn.Parameter are read")
  if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter,
                  _rebuild_parameter_with_state):
    raise CheckpointError(f"_rebuild_from_type_v2 with function {func!r}")
  return func(*args)


def _torch_size(dims=()):
  """`torch.Size` -> a tuple of ints."""
  return tuple(_int(d, "size") for d in dims)


def _codecs_encode(text, encoding="utf-8"):
  """`_codecs.encode(str, "latin1")`, which protocol-2 pickles use for `bytes`."""
  if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
    raise CheckpointError(f"_codecs.encode is read for latin-1 text only, got {encoding!r}")
  return text.encode("latin-1")


def _numpy_dtype(spec, align=False, copy=False):
  """`numpy.dtype` from a string spec (no object dtypes)."""
  if not isinstance(spec, str):
    raise CheckpointError(f"numpy.dtype({spec!r}): only string specs are read")
  del copy  # always a fresh descriptor, so a later BUILD cannot change a shared one
  dtype = np.dtype(spec, align=bool(align), copy=True)
  if dtype.hasobject:
    raise CheckpointError(f"numpy.dtype({spec!r}): object dtypes are not read")
  return dtype


def _numpy_scalar(dtype, data=b""):
  """`numpy.core.multiarray.scalar(dtype, bytes)`: a numpy scalar of a plain dtype."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise CheckpointError(f"numpy scalar of dtype {dtype!r}: only plain dtypes are read")
  if isinstance(data, str):
    data = data.encode("latin-1")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise CheckpointError(f"numpy scalar of dtype {dtype} with {len(data)} bytes of data")
  return np.frombuffer(data, dtype, count=1)[0]


_ALLOWED = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch._tensor.Tensor": _TensorType("torch.Tensor"),
    "torch.Tensor": _TensorType("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TensorType("torch.nn.Parameter"),
    "torch.Size": _torch_size,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "_codecs.encode": _codecs_encode,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
}


class _Unpickler(pickle.Unpickler):
  """An unpickler that resolves only the whitelisted globals and torch storage ids.

  `storages` (root key -> `_Storage`) collects the storages the pickle refers to;
  `legacy` selects the legacy persistent-id layout (with view metadata).
  """

  def __init__(self, file, source: str, storages: dict[str, _Storage], legacy: bool):
    super().__init__(file, encoding="utf-8")
    self.source, self.storages, self.legacy = source, storages, legacy

  def find_class(self, module, name):
    module = "builtins" if module == "__builtin__" else module
    if module in _STORAGE_MODULES and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    found = _ALLOWED.get(f"{module}.{name}")
    if found is None:
      raise CheckpointError(
          f"{self.source}: the pickle references the global {module}.{name}, which is not a "
          "tensor, storage or plain container; refusing to run code from the file")
    return found

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise CheckpointError(f"{self.source}: unknown persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module":
      raise CheckpointError(
          f"{self.source}: the file pickles a torch.nn.Module class (code), not only tensors; "
          f"to read it {INSTALL_TORCH} and load it with torch yourself if you trust it")
    if kind != "storage" or len(pid) != (6 if self.legacy else 5):
      raise CheckpointError(f"{self.source}: unknown persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self.source}: storage type {storage_type!r} is not a torch "
                            "storage class")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    numel = _int(numel, "storage size")
    root = self.storages.get(key)
    if root is None:
      root = self.storages[key] = _Storage(key, storage_type.dtype, numel)
    elif root.dtype != storage_type.dtype:
      raise CheckpointError(f"{self.source}: storage {key} is read as {root.dtype} and "
                            f"{storage_type.dtype}")
    view = pid[5] if self.legacy else None
    if view is None:
      return root
    _view_key, offset, view_numel = view  # an old torch's storage view (legacy format)
    return _Storage(key, root.dtype, _int(view_numel, "view size"), _int(offset, "view offset"))


# ----------------------------------------------------------------------------------------
# Arrays from storages.


def _native(array: np.ndarray, big_endian: bool) -> np.ndarray:
  """The storage's elements in this machine's byte order (from little or big endian)."""
  if big_endian != np.little_endian or array.dtype.itemsize == 1:  # already this order
    return array
  if array.dtype.kind == "c":
    part = np.dtype(f"f{array.dtype.itemsize // 2}")
    return array.view(part).byteswap().view(array.dtype)
  return array.view(np.dtype(f"u{array.dtype.itemsize}")).byteswap().view(array.dtype)


def _storage_array(data: bytes, storage: _Storage, big_endian: bool, source: str) -> np.ndarray:
  """A root storage's bytes as a 1-D array of its dtype (checked to be complete)."""
  want = storage.numel * storage.dtype.itemsize
  if len(data) != want:
    raise CheckpointError(f"{source}: storage {storage.root} has {len(data)} bytes, expected "
                          f"{want} ({storage.numel} x {storage.dtype}); the file is truncated "
                          "or corrupt")
  return _native(np.frombuffer(data, storage.dtype), big_endian)


def _array(t: _Tensor, roots: dict[str, np.ndarray], source: str) -> np.ndarray:
  """The tensor as a C-contiguous copy, after checking its view lies inside its storage."""
  storage = t.storage
  base = roots[storage.root]
  if len(t.size) != len(t.stride) or min(t.size + t.stride + (t.offset,), default=0) < 0:
    raise CheckpointError(f"{source}: a tensor has size {t.size}, stride {t.stride}, offset "
                          f"{t.offset}")
  if math.prod(t.size) == 0:
    return np.zeros(t.size, storage.dtype)
  first = storage.offset + t.offset
  last = first + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  end = min(len(base), storage.offset + storage.numel)
  if last >= end:
    raise CheckpointError(f"{source}: a tensor of size {t.size} (stride {t.stride}, offset "
                          f"{t.offset}) reaches element {last} of a storage of {end}")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(base[first:], shape=t.size,
                                         strides=tuple(s * item for s in t.stride),
                                         writeable=False)
  return np.array(view, copy=True, order="C")


def _materialize(obj, roots: dict[str, np.ndarray], source: str, memo: dict[int, Any]):
  """`obj` with every `_Tensor` replaced by its array (shared tensors stay shared)."""
  if isinstance(obj, _Tensor):
    if id(obj) not in memo:
      memo[id(obj)] = _array(obj, roots, source)
    return memo[id(obj)]
  if isinstance(obj, _Marker):
    raise CheckpointError(f"{source}: a bare {type(obj).__name__} in the checkpoint")
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v, roots, source, memo)
    return out
  if isinstance(obj, list):
    return [_materialize(v, roots, source, memo) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, roots, source, memo) for v in obj)
  return obj


# ----------------------------------------------------------------------------------------
# The two file formats.


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or
               (n.count("/") == 1 and n.endswith("/data.pkl"))]
    if len(pickles) != 1:
      if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a "
                              "torch.save checkpoint")
      raise CheckpointError(f"{path} is a zip archive but not a torch checkpoint "
                            f"({len(pickles)} data.pkl records)")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = b"little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").strip()
      if byteorder not in (b"little", b"big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder[:20]!r}")
    storages: dict[str, _Storage] = {}
    with archive.open(pickles[0]) as f:
      obj = _Unpickler(f, path, storages, legacy=False).load()
    roots = {}
    for key, storage in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise CheckpointError(f"{path}: the storage record {record} is missing")
      size = archive.getinfo(record).file_size
      if size != storage.numel * storage.dtype.itemsize:  # checked before inflating it
        raise CheckpointError(f"{path}: storage record {record} holds {size} bytes, the "
                              f"pickle says {storage.numel} x {storage.dtype}; the file is "
                              "corrupt")
      roots[key] = _storage_array(archive.read(record), storage, byteorder == b"big", path)
  return _materialize(obj, roots, path, {})


def _read_legacy(path: str) -> Any:
  storages: dict[str, _Storage] = {}
  with open(path, "rb") as f:
    if _Unpickler(f, path, {}, legacy=True).load() != MAGIC_NUMBER:
      raise CheckpointError(f"{path} is not a torch checkpoint (a pickle without torch's "
                            "magic number)")
    version = _Unpickler(f, path, {}, legacy=True).load()
    if version != PROTOCOL_VERSION:
      raise CheckpointError(f"{path}: legacy torch protocol version {version!r} "
                            f"(not {PROTOCOL_VERSION}); to read it {INSTALL_TORCH}")
    _Unpickler(f, path, {}, legacy=True).load()  # sys_info: the data is little-endian anyway
    obj = _Unpickler(f, path, storages, legacy=True).load()
    keys = _Unpickler(f, path, {}, legacy=True).load()
    if not isinstance(keys, list):
      raise CheckpointError(f"{path}: the storage key list is a {type(keys).__name__}")
    roots = {}
    for key in keys:
      key = key.decode("ascii") if isinstance(key, bytes) else str(key)
      if key not in storages:
        raise CheckpointError(f"{path}: storage {key} is listed but never used")
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path}: the file ends before storage {key}; it is truncated")
      numel = int.from_bytes(head, "little", signed=True)
      storage = storages[key]
      if numel != storage.numel:
        raise CheckpointError(f"{path}: storage {key} has {numel} elements on disk, "
                              f"{storage.numel} in the pickle")
      want = numel * storage.dtype.itemsize
      if os.fstat(f.fileno()).st_size - f.tell() < want:
        raise CheckpointError(f"{path}: the file ends inside storage {key} ({want} bytes); it "
                              "is truncated")
      roots[key] = _storage_array(f.read(want), storage, False, path)
    unread = sorted(set(storages) - set(roots))
    if unread:
      raise CheckpointError(f"{path}: storages {unread[:5]} have no data in the file")
  return _materialize(obj, roots, path, {})


def _is_tar(head: bytes) -> bool:
  return len(head) >= 262 and head[257:262] == b"ustar"


def _read_builtin(path: str) -> Any:
  with open(path, "rb") as f:
    head = f.read(512)
  if head.startswith(b"PK\x03\x04"):
    reader = _read_zip
  elif head.startswith(b"\x80"):  # a pickle: torch's legacy format
    reader = _read_legacy
  elif _is_tar(head):
    raise CheckpointError(f"{path} is a tar-format torch checkpoint (torch < 0.4); to read it "
                          f"{INSTALL_TORCH}")
  else:
    raise CheckpointError(f"{path} is not a torch checkpoint (neither torch's zip format nor "
                          "its legacy pickle format)")
  try:
    return reader(path)
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, EOFError, ValueError,
          TypeError, KeyError, IndexError, AttributeError, OverflowError, MemoryError,
          RecursionError, OSError, UnicodeError) as e:
    detail = str(e).splitlines()[0] if str(e) else ""
    raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                          f"{detail[:200]})") from e


# ----------------------------------------------------------------------------------------
# torch, when installed.


def torch_available() -> bool:
  """Whether `import torch` would find a torch installation."""
  return importlib.util.find_spec("torch") is not None


def _from_torch(obj, torch_module, memo: dict[int, Any]):
  """`torch.load`'s result with tensors as numpy arrays (containers kept)."""
  if isinstance(obj, torch_module.Tensor):
    if id(obj) not in memo:
      t = obj.detach().cpu()
      if t.dtype == torch_module.bfloat16:
        memo[id(obj)] = t.view(torch_module.int16).numpy().view(ml_dtypes.bfloat16)
      elif str(t.dtype).startswith("torch.float8_"):
        name = str(t.dtype).removeprefix("torch.")
        memo[id(obj)] = t.view(torch_module.uint8).numpy().view(getattr(ml_dtypes, name))
      else:
        memo[id(obj)] = t.resolve_conj().numpy()
    return memo[id(obj)]
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _from_torch(v, torch_module, memo)
    return out
  if isinstance(obj, list):
    return [_from_torch(v, torch_module, memo) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_from_torch(v, torch_module, memo) for v in obj)
  return obj


def _read_with_torch(path: str) -> Any:
  import torch  # optional dependency

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointError(f"{path}: torch.load(weights_only=True) failed "
                          f"({type(e).__name__}: {detail[:300]})") from e
  return _from_torch(obj, torch, {})


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """The parameter dict of a torch checkpoint, its keys without DataParallel's `module.`.

  Args:
    obj: what `read_torch` returns: a training checkpoint that holds the state dict
      under `model`, `state_dict`, `state_dict_ema` or `model_ema` (the first found, in
      that order: timm's and DeiT's files, the adaptive-span authors' `{"iter_no",
      "model", "optimizer", ...}`), or a state dict itself (keys "." or "/" separated).

  Returns:
    {key: array} with one leading `module.` (or `module/`) removed from every key; entries
    that are not arrays are left out.

  Raises:
    CheckpointError: not a dict, no arrays inside, or two keys that are the same after
      unwrapping.
  """
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"a checkpoint's state dict is a dict, got {type(obj).__name__}")
  state = obj
  for key in ("model", "state_dict", "state_dict_ema", "model_ema"):
    if isinstance(obj.get(key), Mapping):
      state = obj[key]
      break
  out: dict[str, np.ndarray] = {}
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      continue
    name = re.sub(r"^module[./]", "", key)
    if name in out:
      raise CheckpointError(f"the state dict has {name!r} both with and without 'module.'")
    out[name] = value
  if not out:
    tops = sorted(str(k) for k in obj)[:10]
    raise CheckpointError(f"no state dict inside: no arrays under 'model' nor at the top "
                          f"level (top-level keys {tops})")
  return out


def read_torch(path: str | os.PathLike, *, use_torch: bool | None = None) -> Any:
  """The object a torch checkpoint file holds, its tensors as numpy arrays.

  Args:
    path: a file written by `torch.save` (.pt / .pth / .bin), zip or legacy format.
    use_torch: True: `torch.load(path, map_location="cpu", weights_only=True)` (torch
      must be installed); False: this module's own restricted reader (no torch); None
      (default): torch when it is installed, else the own reader.

  Returns:
    The saved object with containers kept (dict, OrderedDict, list, tuple) and every tensor
    a numpy array in its dtype (bfloat16 / float8 as `ml_dtypes`), C-contiguous, copied
    from the file. Parameters are read as their data (requires_grad and hooks dropped).

  Raises:
    CheckpointError (one line): a missing file, a file that is no torch checkpoint, a
    truncated or corrupt one, a pickle that references a global outside the whitelist
    (the own reader names it and runs nothing), or a format the own reader does not read
    (tar format, pickled modules, TorchScript), with how to install torch.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory, not a torch checkpoint file")
  if use_torch is None:
    use_torch = torch_available()
  if use_torch:
    if not torch_available():
      raise CheckpointError(f"reading {path} with torch needs torch: {INSTALL_TORCH}")
    return _read_with_torch(path)
  return _read_builtin(path)


__all__ = ["read_torch", "torch_available", "STORAGE_DTYPES", "INSTALL_TORCH"]
