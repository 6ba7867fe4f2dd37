"""Image classification batches from any TFDS image dataset.

`data_config` keys read here (besides those of `zoo.data.sources`):

  image_size:  int, optional: resize to image_size^2 (bilinear).
  channels:    int, optional: 1 <-> 3 conversion (RGB -> 1 is ITU-R 601-2 luma).
  image_key / label_key: default "image" / "label".
  cache:       bool, optional: hold the preprocessed split in memory; default:
               only when it is <= 64 MiB of uint8 pixels.

Batches (this process's rows, see `zoo.data.sampling`):

  image float32 [B, H, W, C] in [-1, 1] (uint8 x -> x / 127.5 - 1),
  label int32 [B], mask float32 [B] (eval padding rows: zeros, mask 0).
"""

import math
import os
from typing import Any

import grain
import numpy as np

from zoo.data import sampling
from zoo.data import sources

_AUTO_CACHE_BYTES = 64 * 2**20


class _ImageLoader:
  """Reads examples by index into uint8 [b, H, W, C] images and int32 labels.

  Preprocessing is deterministic (optional resize and channel conversion), so
  a split can be held in memory once preprocessed (`cache`).
  """

  def __init__(self, source, data_config, feature_shape):
    self.source = source
    self.image_key = data_config.get("image_key", "image")
    self.label_key = data_config.get("label_key", "label")
    self.shape = output_image_shape(data_config, feature_shape)
    self.cached = None

  def fill_cache(self) -> None:
    self.cached = self._read(np.arange(len(self.source)))

  def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.cached is not None:
      return self.cached[0][indices], self.cached[1][indices]
    return self._read(indices)

  def _read(self, indices):
    examples = self.source.__getitems__([int(i) for i in indices])
    images = np.stack([self._image(e[self.image_key]) for e in examples])
    labels = np.array([e[self.label_key] for e in examples], np.int32)
    return images, labels

  def _image(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"Expected uint8 images, got {image.dtype}.")
    if image.ndim == 2:
      image = image[..., None]
    have, want = image.shape[-1], self.shape[-1]
    if have != want:
      if have == 1 and want == 3:
        image = np.repeat(image, 3, axis=-1)
      elif have in (3, 4) and want == 1:  # ITU-R 601-2 luma, as PIL "L".
        rgb = image[..., :3].astype(np.float32)
        luma = rgb @ np.float32([0.299, 0.587, 0.114])
        image = np.round(luma)[..., None].astype(np.uint8)
      elif have == 4 and want == 3:
        image = image[..., :3]
      else:
        raise ValueError(f"Cannot convert {have} channels to {want}.")
    if image.shape[:2] != self.shape[:2]:
      # Optional: only resizing needs Pillow (not a declared dependency).
      from PIL import Image  # pylint: disable=g-import-not-at-top
      pil = Image.fromarray(image[..., 0] if want == 1 else image)
      pil = pil.resize(self.shape[1::-1], Image.Resampling.BILINEAR)
      image = np.asarray(pil).reshape(self.shape)
    return image


# Preprocessed in-memory splits (`cache`), kept for the life of the process so
# that repeated eval iterators do not re-read them.
_CACHED_LOADERS: dict[tuple[Any, ...], _ImageLoader] = {}


def output_image_shape(data_config, feature_shape) -> tuple[int, int, int]:
  """(H, W, C) of the images the pipeline yields for `data_config`."""
  size = data_config.get("image_size")
  height, width = (size, size) if size else feature_shape[:2]
  channels = data_config.get("channels") or (
      feature_shape[2] if len(feature_shape) == 3 else 1)
  if height is None or width is None or channels is None:
    raise ValueError(f"Images have variable shape {feature_shape}: set "
                     "data_config.image_size (and channels).")
  return int(height), int(width), int(channels)


def image_dataset(data_config, split, local_bs, train, seed, index,
                  count) -> grain.MapDataset:
  """Image classification batches (see the module docstring).

  `split` takes TFDS slicing such as "train[:90%]".
  """
  builder = sources.get_builder(data_config)
  image_key = data_config.get("image_key", "image")
  feature_shape = tuple(builder.info.features[image_key].shape)
  source = builder.as_data_source(split)
  loader = _ImageLoader(source, data_config, feature_shape)
  cache = data_config.get("cache")
  if cache is None:
    cache = len(source) * math.prod(loader.shape) <= _AUTO_CACHE_BYTES
  if cache:
    key = (os.fspath(builder.data_dir), split,
           *(str(data_config.get(k)) for k in ("image_key", "label_key",
                                               "image_size", "channels")))
    if key not in _CACHED_LOADERS:
      loader.fill_cache()
      _CACHED_LOADERS[key] = loader
    loader = _CACHED_LOADERS[key]

  def make_batch(indices, valid):
    images = np.zeros((len(indices), *loader.shape), np.float32)
    labels = np.zeros(len(indices), np.int32)
    if valid.any():
      valid_images, labels[valid] = loader(indices[valid])
      images[valid] = valid_images.astype(np.float32) / 127.5 - 1.0
    return {"image": images, "label": labels, "mask": valid.astype(np.float32)}

  if train:
    return sampling.train_batches(
        len(source), local_bs, seed, index, count,
        lambda ids, _: make_batch(ids, np.ones(len(ids), bool)))
  return sampling.eval_batches(len(source), local_bs, index, count, make_batch)


def image_info(data_config) -> dict[str, Any]:
  """Sizes and shapes of an image dataset (prepares it if it is ours).

  Returns:
    {"task": "classification", "num_classes": int,
     "image_shape": (H, W, C) as yielded by `image_dataset`,
     "num_examples": {split: int}, "num_train_examples": int,
     "num_test_examples": int, "test_split": "test" (or "validation" when the
     dataset has no test split, e.g. imagenet2012)}
  """
  builder = sources.get_builder(data_config)
  splits = builder.info.splits
  features = builder.info.features
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  num_examples = {s: splits[s].num_examples for s in splits}
  test_split = "test" if "test" in num_examples else "validation"
  return {
      "task": "classification",
      "num_classes": features[label_key].num_classes,
      "image_shape": output_image_shape(data_config,
                                        tuple(features[image_key].shape)),
      "num_examples": num_examples,
      "num_train_examples": num_examples.get("train"),
      "num_test_examples": num_examples.get(test_split),
      "test_split": test_split,
  }
