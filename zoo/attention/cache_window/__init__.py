"""Attention over a segment cache: the window of positions before each query in
cat(cache, block), as the authors' `SeqAttention` (facebookresearch/adaptive-span,
`models.py`; Sukhbaatar et al. 2019, arXiv 1905.07799).

* `core.py`: the functional window pieces (`window`, `context_logits`, `context_output`,
  the banded skew / unskew per chunk of queries) and the window cores `softmax_window`
  and `pointwise_window`; `window_flops`.
* `parallel.py`: the `halo` strategy of any window core (the block split over the mesh's
  `seq` axis, each shard fetching the window before it from earlier shards and the cache).
* Here: `CacheWindowAttention`, the layer base of every family that runs over a cache
  (`cached = True`, causal only): projections of the block and of the cached inputs,
  `key_pe`, the static `trim_len`, `cache_size()`; and the two layers that a segment
  model (`TransformerSeq`) runs for the plain families, attached to their registry names
  with `registry.set_cached_layer`: `SoftmaxCacheAttention` (`softmax`) and
  `PointwiseCacheAttention` (`pointwise` and each activation name, `relu`, ...).
  Adaptive span (`zoo.attention.adaptive_span`) and persistent memory
  (`zoo.attention.persistent`) derive their layers from the base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import core as core_lib
from zoo.attention import registry
from zoo.attention import softmax as _softmax  # registers "softmax" before its cached layer
from zoo.attention.cache_window import parallel
from zoo.attention.cache_window.core import (QUERY_CHUNK, check_inputs, check_trim_len,
                                             compute_dtype, context_logits, context_output,
                                             pointwise_window, query_chunk, softmax_window,
                                             window, window_attention, window_flops)
from zoo.attention.heads import MultiHeadAttention
from zoo.attention.options import ProjectionOptions, boolean, model_level, positive_int
from zoo.attention.pointwise import ACTIVATIONS, check_options

del _softmax


def window_core_fn(window_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn(q, k, v, *, causal, mask, key_pe, k_cache=None, v_cache=None, **options)` of a
  window core: k, v are cat(cache, block), or the block with its cache's keys and values
  in `k_cache`, `v_cache` (as the `halo` strategy takes them)."""

  def fn(q, k, v, *, causal=True, mask=None, key_pe, k_cache=None, v_cache=None, **options):
    parallel.check_cache_args(causal, k_cache, v_cache)
    if mask is not None:
      raise ValueError("attention over a cache window has a fixed causal window; it takes "
                       "no mask")
    if k_cache is not None:
      k = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
    return window_fn(q, k, v, key_pe, **options)

  return fn


def make_core(name: str, window_fn: Callable[..., jax.Array]) -> core_lib.AttentionCore:
  """The `AttentionCore` of a window core: single-device, `halo`, `window_flops`."""
  return core_lib.AttentionCore(name=name, fn=window_core_fn(window_fn),
                                strategies={"halo": parallel.halo(window_fn)},
                                flops=window_flops)


@dataclasses.dataclass(frozen=True)
class CacheWindowOptions(ProjectionOptions):
  """Options of every layer over a cache window (besides the projection options).

  max_span: S, the distances each query sees (`attn_span`).
  attn_dropout: dropout rate on the attention weights (the authors' `dropout`).
  shared_key_pe: the model passes `key_pe` (TransformerSeq shares one across layers);
    else the layer owns one `[1, head_dim, S]`.
  use_bias: biases on the projections; False, as the authors' bias-free `proj_*`.

  A segment model sets the first three from its own keys (`model_level`).
  """
  use_bias: bool = False
  max_span: int = model_level(256)
  attn_dropout: float = model_level(0.0)
  shared_key_pe: bool = model_level(False)

  def check(self) -> None:
    super().check()
    positive_int("max_span", self.max_span)
    if isinstance(self.attn_dropout, bool) or not 0.0 <= float(self.attn_dropout) < 1.0:
      raise ValueError(f"attn_dropout must lie in [0, 1), got {self.attn_dropout!r}")
    boolean("shared_key_pe", self.shared_key_pe)


class CacheWindowAttention(MultiHeadAttention):
  """Base layer over a cache window: the authors' `MultiHeadSeqAttention` projections.

  `query`, `key`, `value` kernels `[width, heads, head_dim]` and `out` kernel
  `[heads, head_dim, width]` (bias-free by default); `key_pe` `[1, head_dim, S]` unless
  `shared_key_pe`; `attn_dropout` on the weights. Subclasses set `core` (see `make_core`)
  and pass their options to it through `core_kwargs`.

  Called as `layer(x, cache=..., key_pe=..., trim_len=...)` with x the block
  `[batch, M, width]` and `cache` the previous inputs `[batch, C, width]` (None: an
  all-zero cache, the authors' first segment). Through the registry (`layer(x)`) it runs
  each sequence as one block with a zero cache, so it plugs into the plain causal LM
  (without memory across windows; the current token is excluded, as the authors').

  Static (Python) state: `trim_len` (distances skipped; adaptive span sets it from its
  spans) and `cache_size()`.

  Built with a `zoo.parallel.Sharding` whose strategy is `halo`, the block is split along
  its length over the mesh's `seq` axis (`parallel.halo`): each shard gets the
  W = S - trim_len keys / values before it from the previous shards and, for the first
  ones, from the cache (its last W inputs, projected once and replicated); the result
  equals the unsplit layer. Attention dropout then draws per-shard masks.
  """

  Options: ClassVar[type[CacheWindowOptions]] = CacheWindowOptions
  causal_forms: ClassVar[tuple[bool, ...]] = (True,)
  cached: ClassVar[bool] = True
  # The all-attention layer's extra key/value slots take the feed-forward's role: a
  # segment model then builds its block without the feed-forward sublayer.
  replaces_feed_forward: ClassVar[bool] = False

  def __init__(self, width: int, num_heads: int, *, causal: bool = True, **kwargs: Any):
    super().__init__(width, num_heads, causal=causal, **kwargs)

  def build(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
    super().build(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    o = self.options
    self.trim_len = 0
    self.key_pe = None if o.shared_key_pe else nnx.Param(
        jax.random.normal(rngs.params(), (1, self.head_dim, o.max_span), param_dtype))
    self.attn_dropout = nnx.Dropout(o.attn_dropout, rngs=rngs if o.attn_dropout else None)

  @property
  def max_span(self) -> int:
    return self.options.max_span

  def window_len(self, trim_len: int | None = None) -> int:
    """W = S - trim_len, the distances each query sees."""
    return self.max_span - (self.trim_len if trim_len is None else trim_len)

  def cache_size(self) -> int:
    """The cached inputs a segment model keeps for this layer (S)."""
    return self.max_span

  def _key_pe(self, key_pe):
    key_pe = self.key_pe[...] if key_pe is None and self.key_pe is not None else key_pe
    if key_pe is None:
      raise ValueError("this layer was built with shared_key_pe=True: pass key_pe")
    if key_pe.shape[-1] != self.max_span:
      raise ValueError(f"key_pe covers {key_pe.shape[-1]} distances, the layer's max_span "
                       f"is {self.max_span}")
    return key_pe

  def _dropout_kwargs(self, split: bool) -> dict[str, Any]:
    """The weights' dropout: the layer's `nnx.Dropout` unsplit; a rate and a key split
    (each shard folds in its index)."""
    rate, drop = float(self.options.attn_dropout), self.attn_dropout
    if not rate:
      return {}
    if not split:
      return {"attn_dropout": drop}
    if drop.deterministic:
      return {}
    return {"attn_dropout_rate": rate, "dropout_key": drop.rngs()}

  def __call__(self, x: jax.Array, *, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, grid=None, cache: jax.Array | None = None,
               key_pe: jax.Array | None = None, trim_len: int | None = None) -> jax.Array:
    """x: the block `[batch, M, width]`; cache: previous inputs `[batch, C, width]` or None.

    `mask` must be None (the window is fixed); `key_pe` is needed with `shared_key_pe`;
    `trim_len` overrides the layer's static `trim_len`.
    """
    del grid
    if x.ndim != 3:
      raise ValueError(f"attention {self.family!r} expects x [batch, length, width], got "
                       f"shape {x.shape}")
    if inputs_kv is not None:
      raise ValueError(f"attention {self.family!r} over a cache window is self-attention; "
                       f"it takes no inputs_kv")
    if mask is not None:
      raise ValueError(f"attention {self.family!r} has a fixed causal window over its "
                       f"cache; it takes no mask")
    key_pe = self._key_pe(key_pe)
    trim_len = check_trim_len(self.trim_len if trim_len is None else trim_len,
                              self.max_span)
    w = self.max_span - trim_len
    split = self.sharding is not None and self.sharding.strategy is not None
    kwargs = dict(key_pe=key_pe, trim_len=trim_len, **self._dropout_kwargs(split))
    if split:  # the block split over `seq`; the cache's last W inputs replicated
      q, k, v = self.project(x, x)
      if cache is not None:
        tail = cache[:, max(0, cache.shape[1] - w):].astype(x.dtype)
        _, kwargs["k_cache"], kwargs["v_cache"] = self.project(tail[:, :0], tail)
    else:  # only the last W + M inputs matter: project just those
      h = x if cache is None else jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      q, k, v = self.project(x, h[:, max(0, h.shape[1] - (w + x.shape[1])):])
    y = core_lib.dispatch(self.core, q, k, v, causal=True, mask=None,
                          sharding=self.sharding if split else None, **kwargs,
                          **self.core_kwargs(q, k, v, grid=None))
    return self.output(x, y)

  def flops_kwargs(self, length: int, grid=None) -> dict[str, Any]:
    return {"window_len": self.window_len()}

  def projection_flops(self, length: int) -> float:
    """Every kernel over the block's `length` tokens, and the key and value kernels also
    over the W cached positions of the window."""
    kv = sum(math.prod(lin.kernel.get_value().shape) for lin in (self.key, self.value))
    return super().projection_flops(length) + 2.0 * self.window_len() * kv


SOFTMAX_CORE = make_core("softmax_window", softmax_window)
POINTWISE_CORE = make_core("pointwise_window", pointwise_window)


class SoftmaxCacheAttention(CacheWindowAttention):
  """Softmax over the S positions before each query in cat(cache, block): the authors'
  `SeqAttention` without an adaptive span (what a segment model runs for `softmax`)."""

  family = "softmax"
  core = SOFTMAX_CORE


@dataclasses.dataclass(frozen=True)
class PointwiseCacheOptions(CacheWindowOptions):
  """activation: h; alpha: the exponent of S^-alpha (see `core.pointwise_window`)."""
  activation: str = "relu"
  alpha: float = 1.0

  def check(self) -> None:
    super().check()
    check_options(self.activation, self.alpha, None)


class PointwiseCacheAttention(CacheWindowAttention):
  """Pointwise attention (Wortsman et al. 2023, arXiv 2309.08586) over the same window
  and cache: S^-alpha h(logits) instead of the softmax, no normalisation over keys (what a
  segment model runs for `pointwise` and each activation name)."""

  family = "pointwise"
  Options = PointwiseCacheOptions
  core = POINTWISE_CORE

  def core_kwargs(self, q, k, v, *, grid):
    return dict(activation=self.options.activation, alpha=float(self.options.alpha))


registry.set_cached_layer("softmax", SoftmaxCacheAttention)
for _name in ("pointwise", *ACTIVATIONS):
  registry.set_cached_layer(_name, PointwiseCacheAttention)

__all__ = ["CacheWindowAttention", "CacheWindowOptions", "POINTWISE_CORE",
           "PointwiseCacheAttention", "PointwiseCacheOptions", "QUERY_CHUNK", "SOFTMAX_CORE",
           "SoftmaxCacheAttention", "check_inputs", "check_trim_len", "compute_dtype",
           "context_logits", "context_output", "make_core", "parallel", "pointwise_window",
           "query_chunk", "softmax_window", "window", "window_attention", "window_core_fn",
           "window_flops"]
