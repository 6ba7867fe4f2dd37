"""`zoo.checkpoints.torch_pickle`: torch checkpoint files read without torch.

* The adaptive-span fixture (written by torch's own `torch.save`, zip format): every
  tensor bitwise equal to the npz of the same weights, the checkpoint's top-level keys.
* Files written here in torch's two formats (zip and legacy) by a pickler that emits the
  same opcodes as torch's (globals `torch._utils._rebuild_tensor_v2`, `torch
  FloatStorage`, ..., persistent ids for storages): dtypes (bfloat16 included), views
  (strides, storage offsets, shared storages), big-endian records, scalars, empties.
* Refusals: a pickle that calls `os.system` through a global is refused with the global
  named and the command never runs (zip and legacy); truncated, empty, missing, foreign
  and out-of-bounds files fail with one-line `CheckpointError`s.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from zoo.checkpoints import torch_pickle
from zoo.checkpoints.files import CheckpointError
from zoo.checkpoints.torch_pickle import read_torch

from tests.helpers import fixture_path

TOY = "pretrained/adaspan_toy.pt"
TOY_NPZ = "pretrained/adaspan_toy_model_state_dict.npz"

# ----------------------------------------------------------------------------------------
# A writer of torch's formats (what torch.save emits), to test what the fixture lacks.

_STORAGE_NAMES = {np.dtype(v): k for k, v in torch_pickle.STORAGE_DTYPES.items()
                  if k != "UntypedStorage"}


class _Global:
  """Pickled as the opcode GLOBAL 'module\\nname\\n' (callable, for pickle's checks)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called when writing")


class _Storage:
  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, np.ascontiguousarray(data).ravel()


class _Tensor:
  """A tensor over `storage`: torch's `__reduce_ex__` of a plain tensor."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
             collections.OrderedDict()))


def _tensor(array: np.ndarray, key: str) -> _Tensor:
  """A contiguous tensor with its own storage."""
  array = np.asarray(array)
  stride = [int(s) // array.itemsize for s in np.array(array, order="C").strides]
  return _Tensor(_Storage(key, array), 0, array.shape, stride)


class _Pickler(pickle._Pickler):
  """The pure-Python pickler, with `_Global` as GLOBAL and storages as persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool, storages: dict):
    super().__init__(file, protocol=2)
    self.legacy, self.storages = legacy, storages

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    self.storages[obj.key] = obj.data
    kind = _Global("torch", _STORAGE_NAMES[obj.data.dtype])
    pid = ("storage", kind, obj.key, "cpu", obj.data.size)
    return pid + (None,) if self.legacy else pid


def _pickle(obj, legacy: bool) -> tuple[bytes, dict]:
  buf, storages = io.BytesIO(), {}
  _Pickler(buf, legacy, storages).dump(obj)
  return buf.getvalue(), storages


def _to_order(data: np.ndarray, byteorder: str) -> bytes:
  if byteorder == "little" or data.dtype.itemsize == 1:
    return data.tobytes()
  if data.dtype.kind == "c":
    part = np.dtype(f"f{data.dtype.itemsize // 2}")
    return data.view(part).byteswap().tobytes()
  return data.view(f"u{data.dtype.itemsize}").byteswap().tobytes()


def write_zip(path, obj, *, byteorder: str = "little", pkl: bytes | None = None) -> None:
  """torch.save's zip format: archive/data.pkl, byteorder, data/<key>, version."""
  data, storages = _pickle(obj, legacy=False) if pkl is None else (pkl, {})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/byteorder", byteorder)
    for key in sorted(storages):
      z.writestr(f"archive/data/{key}", _to_order(storages[key], byteorder))
    z.writestr("archive/version", "3\n")


def write_legacy(path, obj, *, pkl: bytes | None = None) -> None:
  """torch.save's legacy format (_use_new_zipfile_serialization=False)."""
  data, storages = _pickle(obj, legacy=True) if pkl is None else (pkl, {})
  with open(path, "wb") as f:
    pickle.dump(torch_pickle.MAGIC_NUMBER, f, protocol=2)
    pickle.dump(torch_pickle.PROTOCOL_VERSION, f, protocol=2)
    pickle.dump(dict(protocol_version=1001, little_endian=True,
                     type_sizes=dict(short=2, int=4, long=8)), f, protocol=2)
    f.write(data)
    keys = sorted(storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      f.write(np.int64(storages[key].size).astype("<i8").tobytes())
      f.write(_to_order(storages[key], "little"))


def _sample():
  """An object with the cases: dtypes, views of one storage, 0-d, empty, containers."""
  rng = np.random.default_rng(0)
  base = rng.standard_normal(24).astype(np.float32)
  shared = _Storage("shared", base)
  arrays = {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f64": rng.standard_normal(5),
      "f16": rng.standard_normal((2, 3)).astype(np.float16),
      "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
      "i64": rng.integers(-2**40, 2**40, (3,)),
      "i32": rng.integers(-9, 9, (2, 2)).astype(np.int32),
      "i16": rng.integers(-9, 9, (2,)).astype(np.int16),
      "i8": rng.integers(-9, 9, (4,)).astype(np.int8),
      "u8": rng.integers(0, 255, (4,)).astype(np.uint8),
      "bool": rng.random(5) > 0.5,
      "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
  }
  obj = collections.OrderedDict(
      (k, _tensor(v, str(i))) for i, (k, v) in enumerate(arrays.items()))
  # Views of one storage: a [4, 6] matrix, its transpose, and a strided slice at offset 3.
  obj["matrix"] = _Tensor(shared, 0, (4, 6), (6, 1))
  obj["transposed"] = _Tensor(shared, 0, (6, 4), (1, 6))
  obj["sliced"] = _Tensor(shared, 3, (3, 2), (7, 2))
  expected = dict(arrays, matrix=base.reshape(4, 6), transposed=base.reshape(4, 6).T,
                  sliced=np.lib.stride_tricks.as_strided(base[3:], (3, 2), (28, 8)))
  top = {"iter_no": 7, "nested": [obj["f32"], (obj["i8"], {"x": obj["bool"]})],
         "text": "é", "raw": b"\x00\xff", "set": {1, 2}, "model": obj}
  return top, expected


def _check_sample(got, expected):
  model = got["model"]
  assert isinstance(model, collections.OrderedDict)
  assert list(model) == list(expected)
  for name, want in expected.items():
    have = model[name]
    assert isinstance(have, np.ndarray), name
    assert have.dtype == want.dtype and have.shape == want.shape, name
    assert have.tobytes() == np.ascontiguousarray(want).tobytes(), name
    assert have.flags.c_contiguous and have.flags.writeable, name
  assert got["iter_no"] == 7 and got["text"] == "é" and got["raw"] == b"\x00\xff"
  assert got["set"] == {1, 2}
  np.testing.assert_array_equal(got["nested"][0], expected["f32"])
  np.testing.assert_array_equal(got["nested"][1][1]["x"], expected["bool"])
  assert got["nested"][0] is model["f32"]  # a tensor saved twice is one array


# ----------------------------------------------------------------------------------------
# The fixture written by torch itself.


def test_reads_the_authors_checkpoint_bitwise():
  obj = read_torch(fixture_path(TOY), use_torch=False)
  assert set(obj) == {"iter_no", "model", "optimizer", "logger", "scheduler_iter"}
  model = obj["model"]
  assert isinstance(model, collections.OrderedDict)
  with np.load(fixture_path(TOY_NPZ)) as f:
    assert list(model) == list(f.files)
    assert all(k.startswith("module.") for k in model)
    for key in f.files:
      assert model[key].dtype == f[key].dtype and model[key].shape == f[key].shape, key
      assert model[key].tobytes() == f[key].tobytes(), key
  assert set(obj["optimizer"]) == {"state", "param_groups"}
  assert isinstance(obj["iter_no"], int)


def test_torch_reader_agrees_when_installed():
  torch = pytest.importorskip("torch")
  del torch
  ours = read_torch(fixture_path(TOY), use_torch=False)["model"]
  theirs = read_torch(fixture_path(TOY), use_torch=True)["model"]
  assert list(ours) == list(theirs)
  for key in ours:
    assert ours[key].tobytes() == np.ascontiguousarray(theirs[key]).tobytes(), key


def test_use_torch_without_torch_says_how_to_install(monkeypatch):
  monkeypatch.setattr(torch_pickle, "torch_available", lambda: False)
  with pytest.raises(CheckpointError, match=r"attention-zoo\[torch\]"):
    read_torch(fixture_path(TOY), use_torch=True)
  assert set(read_torch(fixture_path(TOY))) >= {"model"}  # the default falls back


# ----------------------------------------------------------------------------------------
# Files written here in both formats.


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_zip_format_dtypes_views_byteorder(tmp_path, byteorder):
  obj, expected = _sample()
  path = tmp_path / "sample.pt"
  write_zip(path, obj, byteorder=byteorder)
  _check_sample(read_torch(path, use_torch=False), expected)


def test_legacy_format(tmp_path):
  obj, expected = _sample()
  path = tmp_path / "legacy.pt"
  write_legacy(path, obj)
  _check_sample(read_torch(path, use_torch=False), expected)


def test_parameters_and_size_globals(tmp_path):
  """`_rebuild_parameter` (an nn.Parameter) and `torch.Size` are read as data."""
  weights = np.arange(6, dtype=np.float32).reshape(2, 3)

  class Parameter:
    def __reduce__(self):
      return (_Global("torch._utils", "_rebuild_parameter"),
              (_tensor(weights, "0"), True, collections.OrderedDict()))

  class Size:
    def __reduce__(self):
      return (_Global("torch", "Size"), ((2, 3),))

  path = tmp_path / "param.pt"
  write_zip(path, {"w": Parameter(), "shape": Size()})
  got = read_torch(path, use_torch=False)
  np.testing.assert_array_equal(got["w"], weights)
  assert got["shape"] == (2, 3)


# ----------------------------------------------------------------------------------------
# Refusals.


def _system_pickle(marker) -> bytes:
  """A protocol-0 pickle: {"model": os.system("touch <marker>")} through GLOBAL."""
  command = f"touch {marker}".encode("raw_unicode_escape")
  return b"(dp0\nVmodel\np1\ncos\nsystem\np2\n(V" + command + b"\ntp3\nRp4\ns."


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_refuses_a_global_that_runs_code(tmp_path, fmt):
  marker = tmp_path / "payload_ran"
  payload = _system_pickle(marker)
  proof = tmp_path / "plain_pickle_ran"  # the payload is real: plain pickle runs it
  pickle.loads(_system_pickle(proof))
  assert proof.exists()
  path = tmp_path / "evil.pt"
  (write_zip if fmt == "zip" else write_legacy)(path, None, pkl=payload)
  with pytest.raises(CheckpointError) as err:
    read_torch(path, use_torch=False)
  message = str(err.value)
  assert "os.system" in message and "refusing to run code" in message
  assert "\n" not in message
  assert not marker.exists()


def test_refuses_other_globals_and_module_ids(tmp_path):
  for module, name in [("builtins", "eval"), ("torch.nn.modules.linear", "Linear"),
                       ("numpy", "load"), ("subprocess", "Popen")]:
    path = tmp_path / f"{name}.pt"
    write_zip(path, None, pkl=b"c" + f"{module}\n{name}\n".encode() + b".")
    with pytest.raises(CheckpointError, match=rf"{module}\.{name}.*refusing"):
      read_torch(path, use_torch=False)

  class Module:  # the legacy format's pickled nn.Module class: a ('module', ...) id
    pass

  class P(_Pickler):
    def persistent_id(self, obj):
      return ("module", "Linear", "linear.py", "source") if obj is Module else None

  buf = io.BytesIO()
  P(buf, True, {}).dump({"m": Module})
  path = tmp_path / "module.pt"
  write_legacy(path, None, pkl=buf.getvalue())
  with pytest.raises(CheckpointError, match="torch.nn.Module"):
    read_torch(path, use_torch=False)


def test_bad_files_fail_in_one_line(tmp_path):
  data = fixture_path(TOY).read_bytes()
  cases = {
      "truncated.pt": data[: len(data) // 2],
      "truncated_end.pt": data[:-40],
      "empty.pt": b"",
      "text.pt": b"just some text, not a checkpoint\n",
      "other.zip": None,
  }
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("readme.txt", "hello")
  for name, content in cases.items():
    path = tmp_path / name
    if content is not None:
      path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
      read_torch(path, use_torch=False)
    assert "\n" not in str(err.value) and str(path) in str(err.value), name
  with pytest.raises(CheckpointError, match="no such file"):
    read_torch(tmp_path / "absent.pt")
  # A truncated legacy file: the storage bytes end early.
  obj, _ = _sample()
  write_legacy(tmp_path / "legacy.pt", obj)
  legacy = (tmp_path / "legacy.pt").read_bytes()
  (tmp_path / "legacy_cut.pt").write_bytes(legacy[:-10])
  with pytest.raises(CheckpointError, match="truncated"):
    read_torch(tmp_path / "legacy_cut.pt", use_torch=False)


def test_refuses_views_outside_the_storage(tmp_path):
  storage = _Storage("0", np.zeros(6, np.float32))
  for offset, size, stride in [(0, (7,), (1,)), (4, (2, 2), (2, 1)), (0, (3, 3), (1, 3)),
                               (-1, (2,), (1,)), (0, (2,), (-1,))]:
    path = tmp_path / "oob.pt"
    write_zip(path, {"t": _Tensor(storage, offset, size, stride)})
    with pytest.raises(CheckpointError):
      read_torch(path, use_torch=False)
