"""Causal decoder language model over bytes (vocabulary 256) with any causal attention.

The same `Encoder` as the ViT with `causal=True`: token embedding `embedding`, learned
(`pos_embedding`) or sinusoidal positions, blocks `Transformer/encoderblock_{i}`, final
`Transformer/encoder_norm`, and either tied output logits (x @ embedding^T) or an untied
`head`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models.transformer import Encoder
from zoo.parallel import Sharding


def posemb_sincos_1d(length: int, width: int, max_timescale: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """Sinusoidal position embedding `[1, length, width]` (Vaswani et al. 2017, Sec. 3.5)."""
  if width % 2:
    raise ValueError(f"width {width} must be even for sinusoidal positions")
  pos = np.arange(length)[:, None]
  inv = 1.0 / max_timescale ** (np.arange(0, width, 2) / width)
  pe = np.zeros((length, width))
  pe[:, 0::2], pe[:, 1::2] = np.sin(pos * inv), np.cos(pos * inv)
  return jnp.asarray(pe, dtype)[None]


class DecoderLM(nnx.Module):
  """Byte-level causal LM; `__call__(tokens)` returns (logits, intermediates).

  Args:
    width, depth, mlp_dim, num_heads: transformer size.
    max_len: the longest sequence (sizes the learned position table, and the position
      bias of attentions with a `max_len` option, e.g. AFT-full, when they set none).
    vocab_size: 256 for bytes.
    posemb: 'learn' or 'sincos'.
    tied_embedding: logits from the input embedding's transpose (True) or a separate head.
    attention, attention_options: any registered attention with a causal form.
    sharding: a `zoo.parallel.Sharding` for the blocks and attention layers (None: unsplit).
  """

  def __init__(self, *, width: int = 256, depth: int = 4, mlp_dim: int | None = None,
               num_heads: int = 4, max_len: int = 256, vocab_size: int = 256,
               posemb: str = "learn", tied_embedding: bool = True,
               attention: str = "softmax", attention_options: Mapping[str, Any] | None = None,
               dropout: float = 0.0, sharding: Sharding | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if posemb not in ("learn", "sincos"):
      raise ValueError(f"posemb must be learn or sincos, got {posemb!r}")
    self.max_len, self.width, self.posemb = max_len, width, posemb
    self.tied_embedding = tied_embedding
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embedding = nnx.Embed(vocab_size, width,
                               embedding_init=nnx.initializers.normal(stddev=1.0), **kw)
    if posemb == "learn":
      self.pos_embedding = nnx.Param(
          nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, max_len, width), param_dtype))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.Transformer = Encoder(width, depth, mlp_dim or 4 * width, num_heads,
                               attention=attention, attention_options=attention_options,
                               causal=True, dropout=dropout, max_len=max_len,
                               sharding=sharding, **kw)
    if not tied_embedding:
      self.head = nnx.Linear(width, vocab_size, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None):
    """tokens `[batch, length]` int -> (logits `[batch, length, vocab]`, intermediates)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds the model's max_len {self.max_len}")
    out = {}
    x = self.embedding(tokens)
    pe = (self.pos_embedding[:, :length] if self.posemb == "learn"
          else posemb_sincos_1d(length, self.width))
    x = self.dropout(x + pe.astype(x.dtype))
    x, out["encoder"] = self.Transformer(x, mask=mask)
    out["encoded"] = x
    if self.tied_embedding:
      logits = self.embedding.attend(x) / np.sqrt(self.width)
    else:
      logits = self.head(x)
    out["logits"] = logits
    return logits, out
