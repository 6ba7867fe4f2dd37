"""The pretrained-checkpoint catalog: every entry well formed (URL, format, pins, a model
config the zoo accepts, preprocessing), names looked up with a did-you-mean, and `fetch`
passing the entry's pins to the download."""

import inspect
import math
import re

import jax
import pytest
from flax import nnx

from zoo import models
from zoo.checkpoints import catalog
from zoo.checkpoints import download as download_lib
from zoo.checkpoints.files import CheckpointError
from zoo.models import transformer_seq
from zoo.models.vit import ViT

REQUIRED = (
    [f"augreg_{v}_i21k{ft}" for v in ("ti16", "s16", "b16", "l16") for ft in ("", "_ft_i1k")]
    + [f"bigvision_s16_i1k_{e}ep" for e in (90, 150, 300)]
    + [f"deit_{s}_patch16_224" for s in ("tiny", "small", "base")]
    + [f"adaptive_span_{d}{size}" for d in ("enwik8", "text8") for size in ("", "_large")])


def test_required_entries_present():
  assert sorted(REQUIRED) == catalog.names()


@pytest.mark.parametrize("name", sorted(catalog.ENTRIES))
def test_entry_well_formed(name):
  entry = catalog.get(name)
  assert entry.name == name
  assert re.fullmatch(r"https://[a-z0-9.-]+/\S+", entry.url), entry.url
  assert entry.format in catalog.FORMATS
  assert entry.source and entry.description
  if entry.sha256 is not None:
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
  if entry.sha256_prefix is not None:
    assert re.fullmatch(r"[0-9a-f]{8}", entry.sha256_prefix)
    assert entry.sha256_prefix in download_lib.url_filename(entry.url)  # torch hub naming
  path = entry.cache_path()
  assert path.name == (entry.filename or download_lib.url_filename(entry.url))
  models.validate(entry.model)
  pre = entry.preprocessing
  if entry.model["name"] == "vit":
    assert ("value_range" in pre) != ("mean" in pre and "std" in pre)
    for key in ("mean", "std"):
      assert key not in pre or len(pre[key]) == 3
    assert "resize" in pre or "resize_small" in pre
    assert pre.get("crop", entry.model["image_size"]) == entry.model["image_size"]
    vit_keys = set(inspect.signature(ViT.__init__).parameters)
    assert set(entry.model) - {"name"} <= vit_keys, set(entry.model) - vit_keys
  else:
    assert entry.format == "adaptive_span"
    assert {"dataset", "prep_script", "vocabulary"} <= set(pre)


def test_pins_are_the_publishers():
  """Only the DeiT files carry a hash (in their torch hub names); nothing else is pinned."""
  pinned = {n: e.sha256_prefix for n, e in catalog.ENTRIES.items()
            if e.sha256 or e.sha256_prefix}
  assert pinned == {"deit_tiny_patch16_224": "a1311bcf", "deit_small_patch16_224": "cd65a155",
                    "deit_base_patch16_224": "b5f2ef4d"}


def test_get_suggests_names_and_returns_a_copy():
  with pytest.raises(CheckpointError) as info:
    catalog.get("deit_smal_patch16_224")
  message = str(info.value)
  assert "did you mean 'deit_small_patch16_224'" in message and "\n" not in message
  assert "adaptive_span_enwik8" in message  # the known names are listed
  entry = catalog.get("augreg_ti16_i21k")
  entry.model["num_classes"] = 3
  assert catalog.get("augreg_ti16_i21k").model["num_classes"] == 21843


def test_model_configs_build_with_the_publishers_sizes():
  """Abstract parameter counts (no memory) against the publishers' figures: DeiT-tiny
  5M (5.7M), the adaptive-span enwik8 model 38M (README)."""
  deit = catalog.get("deit_tiny_patch16_224")
  model = nnx.eval_shape(lambda: models.create(deit.model, nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == pytest.approx(5.72e6, rel=0.01)
  lm = catalog.get("adaptive_span_enwik8")
  assert transformer_seq.parameter_count(lm.model) == pytest.approx(38e6, rel=0.02)


def test_fetch_passes_the_entrys_pins(monkeypatch, tmp_path):
  calls = []

  def fake_download(url, **kwargs):
    calls.append((url, kwargs))
    return tmp_path / "x"

  monkeypatch.setattr(download_lib, "download", fake_download)
  assert catalog.fetch("deit_base_patch16_224", progress=False) == tmp_path / "x"
  url, kwargs = calls[0]
  assert url.endswith("deit_base_patch16_224-b5f2ef4d.pth")
  assert kwargs["sha256_prefix"] == "b5f2ef4d" and kwargs["sha256"] is None
  assert kwargs["allow_unpinned"] is False and kwargs["progress"] is False
  catalog.fetch("adaptive_span_text8", allow_unpinned=True)
  assert calls[1][1]["filename"] == "adaptive_span_text8.pt"
  assert calls[1][1]["allow_unpinned"] is True


def test_unpinned_fetch_refused_without_network(monkeypatch, tmp_path):
  monkeypatch.setenv("ZOO_CACHE", str(tmp_path))

  def no_network(*args, **kwargs):
    raise AssertionError("network touched")

  monkeypatch.setattr(download_lib.urllib.request, "urlopen", no_network)
  with pytest.raises(CheckpointError, match="--allow-unpinned"):
    catalog.fetch("augreg_s16_i21k")
  assert not list(tmp_path.iterdir())
