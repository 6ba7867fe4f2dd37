"""Checkpoint file formats: safetensors read against the real library-written fixtures,
npz with big_vision's bfloat16 convention, round trips, atomic writes, and one-line errors
for missing, truncated and corrupt files."""

import json
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from tests.helpers import fixture_path
from zoo.checkpoints import files
from zoo.checkpoints.files import CheckpointError


def _one_line(error_info, *needles):
  message = str(error_info.value)
  assert "\n" not in message, message
  for needle in needles:
    assert str(needle) in message, (needle, message)


# ------------------------------------------------------------------------- real fixtures

def test_timm_safetensors_fixture_matches_its_manifest():
  manifest = json.loads(fixture_path("pretrained/timm_manifest.json").read_text())
  for entry in manifest["timm_files"]:
    path = fixture_path(f"pretrained/{entry['file']}")
    assert files.sha256(path) == entry["sha256"]
    assert path.stat().st_size == entry["bytes"]
    tensors, metadata = files.read_safetensors(path)
    assert {k: list(v.shape) for k, v in tensors.items()} == entry["keys"]
    assert tensors["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert metadata["model"] == "vit_tiny_patch16_224"
    assert json.loads(metadata["kwargs"]) == entry["kwargs"]
    # The arrays hold the file's bytes, read-only, without a file handle kept open.
    qkv = tensors["blocks.0.attn.qkv.weight"]
    assert not qkv.flags.writeable and np.isfinite(qkv).all() and np.abs(qkv).max() > 0


def test_hf_safetensors_fixture_and_its_config():
  path = fixture_path("pretrained/hf_vit_w32d2_32px.safetensors")
  config = json.loads(fixture_path("pretrained/hf_vit_w32d2_32px_config.json").read_text())
  tensors, metadata = files.read_safetensors(path)
  assert metadata == {"format": "pt"}
  assert tensors["classifier.weight"].shape == (10, config["hidden_size"])
  layers = {k.split(".")[3] for k in tensors if k.startswith("vit.encoder.layer.")}
  assert len(layers) == config["num_hidden_layers"]


def test_big_vision_npz_fixtures_match_their_manifest():
  manifest = json.loads(fixture_path("pretrained/bigvision_manifest.json").read_text())
  for entry in manifest["files"]:
    path = fixture_path(f"pretrained/{entry['file']}")
    assert files.sha256(path) == entry["sha256"]
    flat = files.read_npz(path)
    params = {k: v for k, v in flat.items() if not k.startswith("__")}
    assert len(params) == entry["n_param_arrays"]
    assert sum(v.size for v in params.values()) == entry["n_params"]
    assert "__input__" in flat and flat["__input__"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(flat["__logits__"][0], entry["logits_row0"], atol=1e-5)


# ------------------------------------------------------------------------------ hashes

def test_sha256_and_atomic_write(tmp_path):
  path = tmp_path / "sub" / "a.bin"
  files.atomic_write(path, lambda f: f.write(b"abc"))
  assert path.read_bytes() == b"abc"
  assert files.sha256(path, chunk=2) == (
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")

  def failing(f):
    f.write(b"partial")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    files.atomic_write(path, failing)
  assert path.read_bytes() == b"abc"  # untouched
  assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]  # no temporary left
  with pytest.raises(CheckpointError, match="no file"):
    files.sha256(tmp_path / "absent")


# --------------------------------------------------------------------------------- npz

def test_npz_round_trip_with_bfloat16_as_big_vision_stores_it(tmp_path):
  rng = np.random.default_rng(0)
  flat = {
      "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel":
          rng.normal(size=(4, 8)).astype(ml_dtypes.bfloat16),
      "Transformer/encoder_norm/scale": rng.normal(size=(4,)).astype(np.float32),
      "head/bias": np.zeros((3,), np.float64),
      "step": np.array(7, np.int32),
      "file": np.ones((2,), np.int8),  # a name np.savez itself cannot take
  }
  path = files.write_npz(tmp_path / "ckpt.npz", flat)
  # On disk as big_vision's np.savez: bfloat16 is numpy's raw "|V2".
  with np.load(path) as raw:
    assert raw["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].dtype == np.dtype("V2")
    assert raw["step"].shape == ()
  back = files.read_npz(path)
  assert set(back) == set(flat)
  for name, value in flat.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
    np.testing.assert_array_equal(back[name], value)
  # A file written by np.savez itself (big_vision's save_checkpoint) reads the same way.
  np.savez(tmp_path / "savez.npz", **{k: v for k, v in flat.items() if k != "file"})
  again = files.read_npz(tmp_path / "savez.npz")
  assert again["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].dtype == (
      ml_dtypes.bfloat16)
  compressed = files.read_npz(files.write_npz(tmp_path / "z.npz", flat, compressed=True))
  np.testing.assert_array_equal(compressed["head/bias"], flat["head/bias"])


def test_npz_refuses_what_it_cannot_store(tmp_path):
  with pytest.raises(ValueError, match="object"):
    files.write_npz(tmp_path / "o.npz", {"x": np.array([{}], dtype=object)})
  with pytest.raises(ValueError, match="float8"):
    files.write_npz(tmp_path / "f8.npz", {"x": np.zeros(2, ml_dtypes.float8_e4m3fn)})
  assert not list(tmp_path.iterdir())


def test_npz_errors_are_one_line_and_name_the_file(tmp_path):
  with pytest.raises(CheckpointError) as info:
    files.read_npz(tmp_path / "absent.npz")
  _one_line(info, tmp_path / "absent.npz")

  text = tmp_path / "text.npz"
  text.write_text("hello\nworld\n")
  with pytest.raises(CheckpointError, match="not an npz") as info:
    files.read_npz(text)
  _one_line(info, text)

  single = tmp_path / "single.npy"
  np.save(single, np.zeros(3))
  with pytest.raises(CheckpointError, match="single .npy"):
    files.read_npz(single)

  good = files.write_npz(tmp_path / "good.npz", {"a": np.arange(10000.0)})
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:-300])  # the zip directory is gone
  with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
    files.read_npz(truncated)
  _one_line(info, truncated)

  corrupt = tmp_path / "corrupt.npz"  # intact directory, member bytes overwritten
  data = bytearray(good.read_bytes())
  with zipfile.ZipFile(good) as archive:
    start = archive.getinfo("a.npy").header_offset
  data[start + 60:start + 200] = b"\xff" * 140  # inside the .npy header
  corrupt.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
    files.read_npz(corrupt)
  _one_line(info, corrupt)

  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, x=np.array([{}], dtype=object))
  with pytest.raises(CheckpointError, match="Python objects") as info:
    files.read_npz(pickled)
  _one_line(info, pickled)


# ------------------------------------------------------------------------- safetensors

ALL_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E4M3": ml_dtypes.float8_e4m3fn,
}


def _all_dtype_tensors():
  rng = np.random.default_rng(1)
  tensors = {}
  for name, dtype in ALL_DTYPES.items():
    if dtype is np.bool_:
      value = rng.random((3, 2)) > 0.5
    elif np.dtype(dtype).kind in "iu":
      value = rng.integers(0, 100, size=(3, 2)).astype(dtype)
    else:
      value = rng.normal(size=(3, 2)).astype(dtype)
    tensors[f"t.{name.lower()}"] = value
  tensors["scalar"] = np.array(2.5, np.float32)
  tensors["empty"] = np.zeros((0, 4), np.float32)
  tensors["big_endian"] = np.arange(4, dtype=">i4")
  return tensors


def test_safetensors_round_trip_all_dtypes(tmp_path):
  tensors = _all_dtype_tensors()
  path = files.write_safetensors(tmp_path / "all.safetensors", tensors,
                                 {"format": "np", "note": "ünïcode"})
  back, metadata = files.read_safetensors(path)
  assert metadata == {"format": "np", "note": "ünïcode"}
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    assert back[name].shape == value.shape, name
    assert back[name].dtype == value.dtype.newbyteorder("<"), name
    np.testing.assert_array_equal(back[name].astype(np.float64), value.astype(np.float64))
  _, empty_meta = files.read_safetensors(files.write_safetensors(tmp_path / "n.st", {}))
  assert empty_meta == {}


def test_safetensors_layout_is_the_reference_writers(tmp_path):
  tensors = {"b": np.zeros(3, np.float32), "a": np.zeros(2, np.float32),
             "c": np.zeros(2, np.int8), "d": np.zeros(1, np.float64)}
  data = files.write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"}).read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  assert n % 8 == 0 and data[8 + n - 1:8 + n] in (b" ", b"}")
  header = data[8:8 + n].decode().rstrip(" ")
  # Compact JSON, __metadata__ first, then by descending dtype and by name, back to back.
  assert header == ('{"__metadata__":{"k":"v"},'
                    '"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},'
                    '"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
                    '"b":{"dtype":"F32","shape":[3],"data_offsets":[16,28]},'
                    '"c":{"dtype":"I8","shape":[2],"data_offsets":[28,30]}}')
  assert len(data) == 8 + n + 30
  with pytest.raises(ValueError, match="cannot store"):
    files.write_safetensors(tmp_path / "s.st", {"s": np.array(["x"])})
  with pytest.raises(ValueError, match="strings"):
    files.write_safetensors(tmp_path / "m.st", {}, {"k": 1})


def _raw(header: dict, body: bytes, pad: bytes = b"") -> bytes:
  blob = json.dumps(header).encode() + pad
  return struct.pack("<Q", len(blob)) + blob + body


@pytest.mark.parametrize("case", [
    "empty", "short", "header_past_end", "huge_header", "not_json", "not_object",
    "truncated_data", "trailing", "gap", "overlap", "size_mismatch", "unknown_dtype",
    "bad_shape", "bad_metadata", "missing_field",
])
def test_safetensors_corrupt_files_give_one_error_naming_the_file(tmp_path, case):
  f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
  body = np.arange(4, dtype="<f4").tobytes()
  two = {"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
  blobs = {
      "empty": b"",
      "short": b"\x05\x00\x00",
      "header_past_end": struct.pack("<Q", 1000) + b"{}",
      "huge_header": struct.pack("<Q", 10**9) + b"{}",
      "not_json": struct.pack("<Q", 4) + b"{no}",
      "not_object": _raw([1, 2], b""),
      "truncated_data": _raw(two, body[:12]),
      "trailing": _raw(two, body + b"\0\0\0\0"),
      "gap": _raw({"a": f32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                  body),
      "overlap": _raw({"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                      body[:12]),
      "size_mismatch": _raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                            body[:8]),
      "unknown_dtype": _raw({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
                            body[:8]),
      "bad_shape": _raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                        body[:8]),
      "bad_metadata": _raw({"__metadata__": {"k": 1}}, b""),
      "missing_field": _raw({"a": {"dtype": "F32", "shape": [2]}}, body[:8]),
  }
  path = tmp_path / f"{case}.safetensors"
  path.write_bytes(blobs[case])
  with pytest.raises(CheckpointError) as info:
    files.read_safetensors(path)
  _one_line(info, path)


def test_safetensors_truncated_real_file_and_missing_file(tmp_path):
  path = tmp_path / "x.safetensors"
  files.write_safetensors(path, {"w": np.ones((64, 64), np.float32)})
  data = path.read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated") as info:
    files.read_safetensors(cut)
  _one_line(info, cut)
  with pytest.raises(CheckpointError, match="no checkpoint file"):
    files.read_safetensors(tmp_path / "absent.safetensors")
  # Padding spaces after the JSON (as the reference writer adds) are accepted.
  padded = tmp_path / "padded.safetensors"
  padded.write_bytes(_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                          b"\x01\x02", pad=b"     "))
  assert files.read_safetensors(padded)[0]["a"].tolist() == [1, 2]
