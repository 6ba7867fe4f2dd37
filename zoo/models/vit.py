"""Vision Transformer (Dosovitskiy et al. 2021) with any registered attention.

Mirrors big_vision's `models/vit.py`: the same variant strings, pooling types, position
embeddings, initialisers and parameter names (`embedding`, `pos_embedding`, `cls`,
`Transformer/...`, `MAPHead_0/...`, `pre_logits`, `head`), so a big_vision checkpoint's
parameter tree maps one to one onto `nnx.state(model, nnx.Param)`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention.softmax import SoftmaxAttention
from zoo.parallel import Sharding
from zoo.models.transformer import Encoder, MlpBlock

# Table 2 of Zhai et al. 2022 (arXiv 2106.04560), as big_vision's `decode_variant`.
_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152,
          "H": 1280, "g": 1408, "G": 1664, "e": 1792}
_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27, "H": 32,
          "g": 40, "G": 48, "e": 56}
_MLP_DIM = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304,
            "H": 5120, "g": 6144, "G": 8192, "e": 15360}
_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16, "g": 16,
          "G": 16, "e": 16}


def decode_variant(variant: str) -> dict[str, Any]:
  """'S/16' -> {width: 384, depth: 12, mlp_dim: 1536, num_heads: 6, patch_size: 16}."""
  name, _, patch = variant.partition("/")
  if name not in _WIDTH:
    raise ValueError(f"unknown ViT variant {variant!r}; sizes: {', '.join(_WIDTH)}, "
                     f"written as e.g. 'S/16'")
  spec = dict(width=_WIDTH[name], depth=_DEPTH[name], mlp_dim=_MLP_DIM[name],
              num_heads=_HEADS[name])
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f"bad patch size in ViT variant {variant!r}")
    spec["patch_size"] = int(patch)
  return spec


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embedding `[1, h*w, width]` (MoCo v3, as big_vision)."""
  if width % 4:
    raise ValueError(f"width {width} must be a multiple of 4 for sincos2d")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


class MAPHead(nnx.Module):
  """Multihead attention pooling: one learned probe attends over the tokens (softmax)."""

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *,
               mlp_activation: str = "gelu_tanh", layernorm_epsilon: float = 1e-6,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width),
                                                             param_dtype))
    self.MultiHeadDotProductAttention_0 = SoftmaxAttention(
        width, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.LayerNorm_0 = nnx.LayerNorm(width, epsilon=layernorm_epsilon, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.MlpBlock_0 = MlpBlock(width, mlp_dim, activation=mlp_activation, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = jnp.tile(self.probe[...].astype(x.dtype), (x.shape[0], 1, 1))
    x = self.MultiHeadDotProductAttention_0(probe, inputs_kv=x)
    x = x + self.MlpBlock_0(self.LayerNorm_0(x))
    return x[:, 0]


class ViT(nnx.Module):
  """ViT with any registered attention; `__call__(images)` returns (logits, intermediates).

  Args:
    variant: big_vision size string such as 'S/16' or 'B/32' (sets width, depth,
      mlp_dim, num_heads and patch size); explicit keyword arguments override it.
    num_classes: logits size; 0 for a headless model.
    image_size: int or (h, w), needed to size the learned position embedding.
    pool_type: 'gap' (mean of tokens), 'tok' (class token), 'map' (attention pooling),
      '0' (first token).
    posemb: 'learn', 'sincos2d' or 'none' (no position embedding, as the AFT-conv
      ImageNet models, whose convolutional position bias locates the tokens).
    attention: a registered attention name (see `zoo.attention.names()`), with
      `attention_options` passed to it; an unset `max_len` option (AFT-full, AFT-local) is
      the number of tokens, (image_size / patch_size) ** 2, +1 with pool_type='tok'.
    in_channels: image channels (3 for RGB, 1 for the digits).
    mlp_activation: "gelu_tanh" (big_vision's, the default) or "gelu" (exact erf: timm,
      DeiT, Hugging Face checkpoints).
    layernorm_epsilon: every LayerNorm's epsilon (1e-6; Hugging Face ViTs use 1e-12).
    sharding: a `zoo.parallel.Sharding` for the blocks and attention layers (None: unsplit).
  """

  def __init__(self, variant: str | None = "S/16", *, num_classes: int = 1000,
               image_size: int | tuple[int, int] = 224, in_channels: int = 3,
               pool_type: str = "gap", posemb: str = "learn",
               attention: str = "softmax", attention_options: Mapping[str, Any] | None = None,
               width: int | None = None, depth: int | None = None,
               mlp_dim: int | None = None, num_heads: int | None = None,
               patch_size: int | None = None, rep_size: int | bool = False,
               dropout: float = 0.0, head_zeroinit: bool = True,
               mlp_activation: str = "gelu_tanh", layernorm_epsilon: float = 1e-6,
               sharding: Sharding | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    spec = decode_variant(variant) if variant else {}
    given = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                 patch_size=patch_size)
    spec.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in given if k not in spec]
    if missing:
      raise ValueError(f"ViT needs {missing}: give a variant such as 'S/16' or set them")
    if pool_type not in ("gap", "tok", "map", "0"):
      raise ValueError(f"pool_type must be gap, tok, map or 0, got {pool_type!r}")
    if posemb not in ("learn", "sincos2d", "none"):
      raise ValueError(f"posemb must be learn, sincos2d or none, got {posemb!r}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    p = spec["patch_size"]
    if h % p or w % p:
      raise ValueError(f"image_size {(h, w)} is not divisible by patch size {p}")
    self.grid = (h // p, w // p)
    self.width, self.pool_type, self.posemb = spec["width"], pool_type, posemb
    self.image_size, self.in_channels = (h, w), in_channels
    width = spec["width"]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.embedding = nnx.Conv(in_channels, width, (p, p), strides=(p, p), padding="VALID", **kw)
    num_patches = self.grid[0] * self.grid[1]
    if posemb == "learn":
      init = nnx.initializers.normal(stddev=1 / np.sqrt(width))
      self.pos_embedding = nnx.Param(init(rngs.params(), (1, num_patches, width), param_dtype))
    if pool_type == "tok":
      self.cls = nnx.Param(jnp.zeros((1, 1, width), param_dtype))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.Transformer = Encoder(width, spec["depth"], spec["mlp_dim"], spec["num_heads"],
                               attention=attention, attention_options=attention_options,
                               causal=False, dropout=dropout,
                               max_len=num_patches + (pool_type == "tok"),
                               mlp_activation=mlp_activation,
                               layernorm_epsilon=layernorm_epsilon, sharding=sharding, **kw)
    if pool_type == "map":
      self.MAPHead_0 = MAPHead(width, spec["mlp_dim"], spec["num_heads"],
                               mlp_activation=mlp_activation,
                               layernorm_epsilon=layernorm_epsilon, **kw)
    self.rep_size = int(width if rep_size is True else rep_size)
    if self.rep_size:
      self.pre_logits = nnx.Linear(width, self.rep_size, **kw)
    self.num_classes = num_classes
    if num_classes:
      head_init = nnx.initializers.zeros if head_zeroinit else nnx.initializers.lecun_normal()
      head_width = self.rep_size or width
      self.head = nnx.Linear(head_width, num_classes, kernel_init=head_init, **kw)

  def __call__(self, image: jax.Array):
    """image `[batch, height, width, channels]` -> (logits `[batch, classes]`, intermediates)."""
    if image.ndim != 4 or tuple(image.shape[1:3]) != self.image_size \
        or image.shape[3] != self.in_channels:
      raise ValueError(f"ViT expects images [batch, {self.image_size[0]}, "
                       f"{self.image_size[1]}, {self.in_channels}], got {image.shape}")
    out = {}
    x = out["stem"] = self.embedding(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    if self.posemb == "learn":
      x = x + self.pos_embedding[...].astype(x.dtype)
    elif self.posemb == "sincos2d":
      x = x + posemb_sincos_2d(h, w, c).astype(x.dtype)
    out["with_posemb"] = x
    if self.pool_type == "tok":
      x = jnp.concatenate([jnp.tile(self.cls[...].astype(x.dtype), (n, 1, 1)), x], axis=1)
    x = self.dropout(x)
    x, out["encoder"] = self.Transformer(x, grid=None if self.pool_type == "tok" else (h, w))
    encoded = out["encoded"] = x
    if self.pool_type == "map":
      x = self.MAPHead_0(x)
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "0":
      x = x[:, 0]
    else:  # tok
      x, encoded = x[:, 0], encoded[:, 1:]
    out["head_input"] = x
    x_2d = jnp.reshape(encoded, (n, h, w, -1))
    if self.rep_size:
      x = jnp.tanh(self.pre_logits(x))
      x_2d = jnp.tanh(self.pre_logits(x_2d))
    out["pre_logits"], out["pre_logits_2d"] = x, x_2d
    if self.num_classes:
      out["logits_2d"] = self.head(x_2d)
      x = out["logits"] = self.head(x)
    return x, out
