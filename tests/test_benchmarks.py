"""Smoke test of benchmarks/attention.py: tiny lengths, every default kind, JSON written."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_attention_benchmark_writes_json(tmp_path):
  bench = _load("attention")
  out = tmp_path / "attention.json"
  bench.main(["--lengths", "64", "128", "--kinds", "softmax", "relu_blockwise", "aft_simple",
              "--heads", "2", "--head-dim", "8", "--block-size", "16", "--repeats", "1",
              "--matmul-size", "64", "--no-nearby-matmul", "--out", str(out)])
  result = json.loads(out.read_text())
  assert "glibc_tunables" in result["machine"]
  rows = {(r["kind"], r["length"]): r for r in result["results"]}
  assert set(rows) == {(k, n) for k in ("softmax", "relu_blockwise", "aft_simple")
                       for n in (64, 128)}
  for row in rows.values():
    assert row["seconds"] > 0 and row["temp_bytes"] >= 0
  assert set(result["time_slope"]) >= {"softmax", "relu_blockwise", "aft_simple"}
