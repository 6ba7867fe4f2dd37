"""Helpers shared by the tests: float64 scope and the shared fixtures folder."""

import pathlib

import jax
import pytest

# ../shared/fixtures beside the checkout (tests skip with a reason when it is absent).
FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture_path(name: str) -> pathlib.Path:
  """`FIXTURES / name`, or skips the calling test with a reason naming the missing path."""
  path = FIXTURES / name
  if not path.exists():
    pytest.skip(f"fixture {path} is absent: the shared reference fixtures live in "
                f"../shared/fixtures beside the checkout (here {FIXTURES})")
  return path

try:  # older jax
  from jax.experimental import enable_x64 as _experimental_x64

  def x64():
    """A context in which arrays default to 64 bits."""
    return _experimental_x64()
except ImportError:  # jax >= 0.9: jax.enable_x64 is itself a context manager
  def x64():
    """A context in which arrays default to 64 bits."""
    return jax.enable_x64(True)
