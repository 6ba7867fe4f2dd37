"""Adaptive-span / all-attention byte LM with segment memory on the embedded corpus (the
Python standard library's sources), small enough for a 2-core CPU in minutes.

    python train.py --config configs/lm_adaptive_span.py
    python train.py --config configs/lm_adaptive_span.py:attention=persistent_memory
    python train.py --config configs/lm_adaptive_span.py:attention=softmax
    python train.py --config configs/lm_adaptive_span.py:attention=relu,alpha=1.0
    python eval.py  --config configs/lm_adaptive_span.py   # full test split, in order, cached

The authors' `TransformerSeq` (post-LN, bias-free projections, shared `key_pe`, untied
embeddings) reads `batch_size` contiguous streams `block_len` bytes at a time and attends
over the `max_span` bytes before each position through per-layer caches carried across
batches. `attention` is one of adaptive_span, persistent_memory (all-attention layers:
persistent vectors instead of the feed-forward), softmax or a pointwise name (relu, ...):
the last two use the same window and cache with a fixed span. Optimiser: the authors'
Adagrad with per-tensor clipping and linear warmup (`optim=adamw` for AdamW).

Any option of the chosen attention goes in the argument string too (`ramp=16`,
`span_loss=1e-5`, `persistent_size=32`, `alpha=0.5`): those of the name's layer over a
segment cache in the registry (`zoo.config.attention_option_defaults(name, cached=True)`).
"""

from zoo.config import add_init_fields, attention_options_from_arg, overridable, parse_arg

_ARGS = dict(attention="adaptive_span", total_steps=600, batch_size=16, block_len=64,
             max_span=512, width=128, depth=4, num_heads=4, lr=0.07, optim="adagrad",
             dtype="float32")

# Per attention: options that differ from the cached layers' defaults here.
_PRESETS = {
    "adaptive_span": dict(ramp=32, span_init=0.0, span_loss=2e-6),
    "persistent_memory": dict(ramp=32, span_init=0.0, span_loss=2e-6, persistent_size=64),
}


def get_config(arg=None):
  arg = parse_arg(arg, **_ARGS)
  config = parse_arg(None)
  config.seed = 0
  config.task = "segment_lm"

  config.data = dict(name="byte_text", data_dir=overridable(None, str),
                     source_dir=overridable(None, str), glob="**/*.py",
                     block_len=arg.block_len)

  config.model = dict(
      name="transformer_seq", vocab_size=256, width=arg.width, depth=arg.depth,
      num_heads=arg.num_heads, max_span=arg.max_span, inner_size=4 * arg.width,
      dropout=0.0, emb_dropout=0.0, attention=arg.attention,
      attention_options=attention_options_from_arg(
          arg.attention, arg, set(_ARGS), cached=True, overrides=_PRESETS.get(arg.attention)),
      dtype=arg.dtype)

  config.mesh = dict(data=-1, fsdp=1, seq=1)
  config.sequence_parallel = overridable(None, str)

  config.batch_size = arg.batch_size
  config.eval_batch_size = 16
  config.total_steps = arg.total_steps
  if arg.optim == "adagrad":  # the authors' (lr 0.07, per-tensor clip 0.03)
    config.optimizer = dict(name="adagrad", lr=arg.lr, warmup_steps=100, grad_clip=0.03)
  elif arg.optim == "adamw":
    config.optimizer = dict(name="adamw", lr=arg.lr, warmup_steps=100, min_lr_ratio=0.01,
                            weight_decay=0.0, b1=0.9, b2=0.98, grad_clip_norm=1.0)
  else:
    raise ValueError(f"optim must be adagrad or adamw, got {arg.optim!r}")
  config.trim_every = 50  # recompute the static trimmed windows every 50 steps (the segment_lm task in zoo/training/tasks.py)

  config.log_every = 50
  config.eval_every = 0  # only at the end (eval_batches); eval.py reads the whole test split
  config.eval_batches = 20
  config.checkpoint_every = 200
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
