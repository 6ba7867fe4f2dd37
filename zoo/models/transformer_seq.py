"""The authors' `TransformerSeq` (facebookresearch/adaptive-span, `models.py`) in Flax NNX.

A character / word LM that reads a long stream block by block (M tokens per call) and
carries, per layer, a cache of the previous blocks' layer inputs, so each token attends
to the S = `max_span` tokens before it across block boundaries. Adaptive span
(arXiv 1905.07799) and persistent memory / all-attention (arXiv 1907.01470).

Architecture (as the authors' code, not the usual pre-LN transformer):

* `in_emb` (token embedding, N(0, 1) init) and an untied `out_emb` (Linear with bias);
  no absolute positions: a learned per-distance key embedding `key_pe` `[1, head_dim, S]`
  is shared by all layers and heads (`zoo.attention.cache_window`).
* Post-LayerNorm blocks (torch's LayerNorm, epsilon 1e-5):
  h = norm1(h + attn(h, cache)); h = norm2(h + ff(h)) with ff = fc2(relu(fc1(h))).
  The all-attention layer (`persistent_memory`) has no ff and no norm2.
* The attention is any registered name with a layer over a segment cache
  (`zoo.attention.names(cached=True)`: adaptive_span, persistent_memory, softmax,
  pointwise and each pointwise activation name), built from the registry's
  `cached_layer` with bias-free q/k/v/out projections.
* Output: log-softmax over the vocabulary.
* Cache: layer l's next cache is the last `cache_size` of cat(cache_l, h_l) with h_l the
  layer's INPUT for this block (`cache_size` = S, or the trimmed window + 64 with
  `adapt_cache`). It is data, not a parameter; gradients do not flow into it (the authors
  `.detach()` it). The first block's cache is zeros (`init_caches`).
* Dropout: on the embeddings and before `out_emb` (`emb_dropout`), on the attention
  weights and in the ff hidden layer (`dropout`); none on the residual branches.

The trainer hooks (`regularization_loss`, `after_update`, `before_step`,
`checkpoint_state` / `restore_checkpoint_state`, `host_metrics`, `eval_report`) carry
the adaptive-span bookkeeping (`zoo.attention.adaptive_span`: penalty, clamping,
trimming, statistics), so the trainer knows no attention family.

`load_authors_state_dict(model, npz_or_dict)` loads the authors' `state_dict()` ("." or
"/" separated keys).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import attention as attention_lib
from zoo.attention import adaptive_span as span_lib
from zoo.parallel import Sharding


class FeedForwardLayer(nnx.Module):
  """fc2(dropout(relu(fc1(h)))), the authors' `FeedForwardLayer`."""

  def __init__(self, width: int, inner_size: int, *, dropout: float = 0.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, inner_size, **kw)
    self.fc2 = nnx.Linear(inner_size, width, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)

  def __call__(self, h):
    return self.fc2(self.dropout(jax.nn.relu(self.fc1(h))))


def attention_options_for(attention: str, options: Mapping[str, Any] | None, *, max_span: int,
                      dropout: float = 0.0) -> dict[str, Any]:
  """The cached layer's options for `attention` in a TransformerSeq: the config's
  `options` (None values dropped) with the model's max_span, dropout and shared key_pe.

  Raises ValueError for a name without a layer over a segment cache, an option that the
  cached layer does not take or that the model sets itself (max_span, attn_dropout,
  shared_key_pe), or a bad value (the options dataclass's checks).
  """
  accepted_names = attention_lib.names(cached=True)
  if attention not in accepted_names:
    raise ValueError(f"transformer_seq attention must be one of {accepted_names}, got "
                     f"{attention!r}")
  family = attention_lib.get(attention)
  given = {k: v for k, v in dict(options or {}).items() if v is not None}
  accepted = family.option_defaults(cached=True)
  bad = sorted(set(given) - set(accepted))
  if bad:
    raise ValueError(f"unknown option(s) {bad} for attention {attention!r} in "
                     f"transformer_seq; accepted: {sorted(accepted)}")
  model_level = dict(max_span=max_span, attn_dropout=float(dropout or 0.0), shared_key_pe=True)
  return family.options({**given, **model_level}, cached=True).as_dict()


class TransformerSeqLayer(nnx.Module):
  """Post-LN block: norm1(h + attn(h, cache)), then norm2(h + ff(h)) unless all-attention."""

  def __init__(self, width: int, num_heads: int, inner_size: int, *, attention: str,
               attention_options: Mapping[str, Any], dropout: float,
               sharding: Sharding | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    layer_cls = attention_lib.get(attention).cached_layer
    self.attn = layer_cls(width, num_heads, causal=True, sharding=sharding, **kw,
                          **attention_options)
    ln = dict(epsilon=1e-5, **kw)
    self.norm1 = nnx.LayerNorm(width, **ln)
    # All-attention: the persistent vectors replace the feed-forward sublayer.
    self.all_attention = layer_cls.replaces_feed_forward
    if self.all_attention:
      self.ff = None
      self.norm2 = None
    else:
      self.ff = FeedForwardLayer(width, inner_size, dropout=dropout, **kw)
      self.norm2 = nnx.LayerNorm(width, **ln)

  def __call__(self, h, cache, key_pe):
    h = self.norm1(h + self.attn(h, cache=cache, key_pe=key_pe))
    if self.ff is not None:
      h = self.norm2(h + self.ff(h))
    return h


class TransformerSeq(nnx.Module):
  """The authors' `TransformerSeq`; `model(tokens, caches)` -> (log-probs, next caches).

  Args:
    vocab_size, width, num_heads, depth: sizes (the authors' vocab_size, hidden_size,
      nb_heads, nb_layers).
    max_span: S, the attention span limit (`attn_span`).
    inner_size: the ff's hidden size (`inner_hidden_size`); default 4 * width.
    dropout, emb_dropout: the authors' `dropout` (attention weights and ff) and
      `emb_dropout`.
    attention: a registered name with a layer over a segment cache
      (`zoo.attention.names(cached=True)`); its `cached_layer` is built in every block.
    attention_options: that layer's options besides max_span, attn_dropout and
      shared_key_pe, which the model sets (see `attention_options`); e.g. for
      adaptive_span ramp, span_init, span_loss, adapt_cache (the authors'
      `adapt_span_ramp`, `adapt_span_init`, `adapt_span_loss`, `adapt_span_cache`), for
      persistent_memory also persistent_size, for relu alpha.
    sharding: a `zoo.parallel.Sharding` for the attention layers (with strategy `halo`
      each block is split along its length over the mesh's `seq` axis).

  From a config use `model_kwargs(model_config)`, which `zoo.models.create` does for
  `name: transformer_seq`.
  """

  def __init__(self, *, vocab_size: int, width: int, num_heads: int, depth: int,
               max_span: int, inner_size: int | None = None, dropout: float = 0.0,
               emb_dropout: float = 0.0, attention: str = "adaptive_span",
               attention_options: Mapping[str, Any] | None = None,
               sharding: Sharding | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
    options = attention_options_for(attention, attention_options, max_span=max_span,
                                    dropout=dropout)
    self.vocab_size, self.width, self.num_heads, self.depth = vocab_size, width, num_heads, depth
    self.max_span, self.head_dim = max_span, width // num_heads
    self.attention = attention
    self.sharding = sharding
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_emb = nnx.Embed(vocab_size, width,
                            embedding_init=nnx.initializers.normal(stddev=1.0), **kw)
    self.out_emb = nnx.Linear(width, vocab_size, **kw)
    self.key_pe = nnx.Param(
        jax.random.normal(rngs.params(), (1, self.head_dim, max_span), param_dtype))
    self.emb_dropout = nnx.Dropout(emb_dropout, rngs=rngs if emb_dropout else None)
    for i in range(depth):
      setattr(self, f"layers_{i}", TransformerSeqLayer(
          width, num_heads, inner_size or 4 * width, attention=attention,
          attention_options=options, dropout=dropout, sharding=sharding, **kw))

  def layers(self) -> list[TransformerSeqLayer]:
    return [getattr(self, f"layers_{i}") for i in range(self.depth)]

  def cache_sizes(self) -> list[int]:
    return [layer.attn.cache_size() for layer in self.layers()]

  def init_caches(self, batch_size: int, dtype=None) -> list[jax.Array]:
    """All-zero caches `[batch, cache_size, width]` per layer (the authors' first block)."""
    dtype = dtype or self.key_pe[...].dtype
    return [jnp.zeros((batch_size, c, self.width), dtype) for c in self.cache_sizes()]

  def __call__(self, tokens: jax.Array, caches: Sequence[jax.Array] | None = None):
    """tokens `[batch, M]` -> (log-probs `[batch, M, vocab]`, next caches, one per layer).

    `caches`: per layer `[batch, C, width]` inputs of the previous positions (None: zeros).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, M], got shape {tokens.shape}")
    if caches is None:
      caches = [None] * self.depth
    if len(caches) != self.depth:
      raise ValueError(f"need one cache per layer ({self.depth}), got {len(caches)}")
    h = self.emb_dropout(self.in_emb(tokens))
    key_pe = self.key_pe[...]
    next_caches = []
    for layer, cache in zip(self.layers(), caches):
      size = layer.attn.cache_size()
      prev = (jnp.zeros((h.shape[0], 0, self.width), h.dtype) if cache is None
              else cache.astype(h.dtype))
      nxt = jnp.concatenate([prev, h], axis=1)[:, -size:]
      if nxt.shape[1] < size:  # a short first cache: pad with zeros in front
        nxt = jnp.pad(nxt, ((0, 0), (size - nxt.shape[1], 0), (0, 0)))
      next_caches.append(jax.lax.stop_gradient(nxt))
      h = layer(h, cache, key_pe)
    h = self.emb_dropout(h)
    return jax.nn.log_softmax(self.out_emb(h), axis=-1), next_caches

  # -- Trainer hooks (see the trainer's "Model hooks"): the adaptive-span bookkeeping.

  def regularization_loss(self) -> jax.Array:
    """The summed span penalties, lambda * mean_heads(z) per layer (the authors'
    `get_loss`); added to the training loss, not to evaluation. 0 without spans."""
    return span_lib.span_penalty(self).astype(jnp.float32)

  def after_update(self) -> None:
    """Clamps the spans z/S to [0, 1] after every optimiser update (traced)."""
    span_lib.clamp_spans(self)

  def before_step(self) -> None:
    """Host: the static trimmed windows (and adaptive cache sizes) from the current spans;
    an `nnx.jit`ted step retraces when they change."""
    span_lib.update_trim_lengths(self)

  def checkpoint_state(self) -> dict[str, Any]:
    return {"trim_lengths": span_lib.trim_lengths(self)}

  def restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
    if "trim_lengths" in state:
      span_lib.set_trim_lengths(self, state["trim_lengths"])

  def host_metrics(self) -> dict[str, float]:
    """The authors' span_avg / span_max (ramp included), also per layer; {} without spans."""
    return span_lib.span_scalars(self)

  def eval_report(self) -> dict[str, Any]:
    """{"spans": learned spans z in tokens per layer and head} when spans are learned."""
    spans = span_lib.spans_per_head(self)
    return {"spans": spans} if spans else {}


# ----------------------------------------------------------------------------------------
# From a config: `attention` name + `attention_options` -> constructor arguments.

# Model-level keys of a `transformer_seq` config besides name / attention / options.
MODEL_KEYS = ("vocab_size", "width", "num_heads", "depth", "max_span", "inner_size",
              "dropout", "emb_dropout", "dtype", "param_dtype")
REQUIRED_KEYS = ("vocab_size", "width", "num_heads", "depth", "max_span")


def model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """`TransformerSeq` keyword arguments from a config (validates it; no rngs, no dtypes).

  The config holds `name: transformer_seq`, the `MODEL_KEYS`, `attention` (a registered
  name with a layer over a segment cache, `zoo.attention.names(cached=True)`:
  adaptive_span, persistent_memory, softmax, pointwise or a pointwise activation name
  such as relu) and `attention_options` (that layer's options, see `attention_options_for`).
  Softmax and pointwise attention use the same S-token window and cache with a fixed
  span (no mask).
  """
  config = dict(model_config)
  config.pop("name", None)
  attention = config.pop("attention", "adaptive_span")
  options = dict(config.pop("attention_options", None) or {})
  unknown = sorted(set(config) - set(MODEL_KEYS))
  if unknown:
    raise ValueError(f"unknown model key(s) {unknown} for transformer_seq; accepted: "
                     f"{sorted(MODEL_KEYS + ('name', 'attention', 'attention_options'))}")
  missing = [k for k in REQUIRED_KEYS if config.get(k) is None]
  if missing:
    raise ValueError(f"transformer_seq needs model.{', model.'.join(missing)}")
  for key in ("vocab_size", "width", "num_heads", "depth", "max_span"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"model.{key} must be a positive int, got {config[key]!r}")
  if config["width"] % config["num_heads"]:
    raise ValueError(f"model.width {config['width']} must be a multiple of model.num_heads "
                     f"{config['num_heads']}")
  for key in ("dropout", "emb_dropout"):
    if not 0.0 <= float(config.get(key) or 0.0) < 1.0:
      raise ValueError(f"model.{key} must lie in [0, 1), got {config[key]!r}")
  attention_options_for(attention, options, max_span=config["max_span"],
                        dropout=config.get("dropout") or 0.0)
  return {**{k: v for k, v in config.items() if v is not None}, "attention": attention,
          "attention_options": {k: v for k, v in options.items() if v is not None}}

def parameter_count(model_config: Mapping[str, Any]) -> int:
  """Parameters of the config's model, counted abstractly (`nnx.eval_shape`, no memory)."""
  kwargs = model_kwargs(model_config)
  kwargs.pop("dtype", None)
  kwargs.pop("param_dtype", None)
  model = nnx.eval_shape(lambda: TransformerSeq(**kwargs, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------------------
# The authors' state dicts.


def _read(npz_or_dict) -> dict[str, np.ndarray]:
  if isinstance(npz_or_dict, (str, os.PathLike)):
    with np.load(npz_or_dict) as f:
      raw = {k: f[k] for k in f.files}
  else:
    raw = dict(npz_or_dict)
  out = {}
  for k, v in raw.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu().numpy()
    out[k.replace(".", "/")] = np.asarray(v)
  return out


def _set(param: nnx.Param, value: np.ndarray, name: str) -> None:
  old = param.get_value()  # an array, or a ShapeDtypeStruct for an `nnx.eval_shape` model
  if tuple(old.shape) != tuple(value.shape):
    raise ValueError(f"{name}: shape {value.shape} does not fit the model's {old.shape}")
  param.set_value(jnp.asarray(value, old.dtype))


def load_authors_state_dict(model: TransformerSeq, npz_or_dict,
                            *, strict: bool = True) -> list[str]:
  """Loads the authors' `TransformerSeq.state_dict()` into `model`.

  Accepts a path to an `.npz`, or a mapping (numpy arrays or torch tensors) with "." or
  "/" separated keys. Keys that are not parameters of a state dict (e.g. the fixtures'
  `x`, `cache0`, `logp`) are ignored. Layouts: torch `Linear.weight` `[out, in]` ->
  kernel `[in, out]` (`[in, heads, head_dim]` for q/k/v, `[heads, head_dim, out]` for the
  output projection); `current_val` `[heads, 1, 1]` -> `span` `[heads]`; persistent
  `key` `[heads, head_dim, N]` and `val` `[heads, N, head_dim]` -> `[N, heads, head_dim]`.
  The buffers `mask_template` are checked against linspace(1 - S, 0, S), and the
  persistent memory's alias of the span (`.../persistent_memory/adaptive_span/...`)
  against the layer's span.

  Returns the list of model parameter names loaded. With `strict`, raises when a model
  parameter is missing from the dict or a layer/embedding key is left unused.
  """
  sd = _read(npz_or_dict)
  used: set[str] = set()
  loaded: list[str] = []
  w, h, d = model.width, model.num_heads, model.head_dim

  def take(key):
    if key not in sd:
      raise KeyError(f"the state dict has no {key!r}")
    used.add(key)
    return sd[key]

  def put(param, key, fn=lambda a: a, name=None):
    if key not in sd and not strict:
      return
    _set(param, fn(take(key)), name or key)
    loaded.append(name or key)

  put(model.in_emb.embedding, "in_emb/weight")
  put(model.out_emb.kernel, "out_emb/weight", lambda a: a.T)
  put(model.out_emb.bias, "out_emb/bias")
  put(model.key_pe, "key_pe")
  template = np.linspace(1 - model.max_span, 0, model.max_span)
  for i, layer in enumerate(model.layers()):
    p = f"layers/{i}"
    attn = layer.attn
    put(attn.query.kernel, f"{p}/attn/proj_query/weight", lambda a: a.T.reshape(w, h, d))
    put(attn.key.kernel, f"{p}/attn/proj_key/weight", lambda a: a.T.reshape(w, h, d))
    put(attn.value.kernel, f"{p}/attn/proj_val/weight", lambda a: a.T.reshape(w, h, d))
    put(attn.out.kernel, f"{p}/attn/proj_out/weight", lambda a: a.T.reshape(h, d, w))
    put(layer.norm1.scale, f"{p}/norm1/weight")
    put(layer.norm1.bias, f"{p}/norm1/bias")
    if layer.ff is not None:
      for fc in ("fc1", "fc2"):
        lin = getattr(layer.ff, fc)
        put(lin.kernel, f"{p}/ff/{fc}/weight", lambda a: a.T)
        put(lin.bias, f"{p}/ff/{fc}/bias")
      put(layer.norm2.scale, f"{p}/norm2/weight")
      put(layer.norm2.bias, f"{p}/norm2/bias")
    span_prefixes = [f"{p}/attn/attn/adaptive_span/_mask"]
    learned = getattr(attn, "span", None) is not None
    if learned:
      put(attn.span, f"{span_prefixes[0]}/current_val", lambda a: a.reshape(h))
    if layer.all_attention:
      pm = f"{p}/attn/attn/persistent_memory"
      put(attn.pers_key, f"{pm}/key", lambda a: a.transpose(2, 0, 1))
      put(attn.pers_val, f"{pm}/val", lambda a: a.transpose(1, 0, 2))
      span_prefixes.append(f"{pm}/adaptive_span/_mask")
    for j, prefix in enumerate(span_prefixes):
      tkey = f"{prefix}/mask_template"
      if tkey in sd:
        if not np.allclose(take(tkey), template, rtol=0, atol=1e-12):
          raise ValueError(f"{tkey} is not linspace(1 - S, 0, S) for S = {model.max_span}")
      ckey = f"{prefix}/current_val"
      if j > 0 and ckey in sd and learned:
        if not np.array_equal(take(ckey), sd[f"{span_prefixes[0]}/current_val"]):
          raise ValueError(f"{ckey} must equal the layer's span (one shared parameter)")
  if strict:
    model_keys = ("in_emb/", "out_emb/", "key_pe", "layers/")
    unused = sorted(k for k in sd if k not in used and k.startswith(model_keys))
    if unused:
      raise ValueError(f"state dict keys not used by the model: {unused}")
  return loaded


__all__ = ["TransformerSeq", "TransformerSeqLayer", "FeedForwardLayer", "MODEL_KEYS",
           "attention_options_for", "model_kwargs", "parameter_count",
           "load_authors_state_dict"]
