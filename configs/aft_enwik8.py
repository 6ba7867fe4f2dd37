"""AFT byte-level LMs on enwik8 shaped as Zhai et al. 2021 (arXiv 2105.14103), Sec. 4.2:
24 layers of width 256, context 1024, causal AFT-local with a local span of 32
("AFT-local-32") or AFT-simple.

    python train.py --config configs/aft_enwik8.py:aft_local --config.data.path=/data/enwik8
    python train.py --config configs/aft_enwik8.py:aft_simple,batch_size=64 \\
        --config.data.path=/data/enwik8

The first item of the argument string (or `variant=KEY`) picks the attention: `aft_local`
(window 32, factorised bias w = u v^T with d' = `bias_rank`, 128 by default) or
`aft_simple`; any option of that attention can follow (`aft_local,window=64`). Other keys:
`total_steps`, `batch_size`, `seq_len`, `lr`, `dtype`. Parameters: local-32 25,573,888
(of which 6,291,456 are the 24 layers' u, v `[1024, 128]` bias factors), simple
19,282,432; tied byte embedding. The number of heads only matters for
AFT-conv and is unused here.

Data: the raw 100 MB enwik8 file (unzipped http://mattmahoney.net/dc/enwik8.zip, never
downloaded here) with the standard split, the last 5M bytes test, the 5M before them
validation (`data.name="byte_file"`, `data.path=FILE`); or any folder of text with
`--config.data.name=byte_text --config.data.source_dir=DIR`. The optimiser settings are
this zoo's AdamW defaults scaled to the model, not a reproduction of the paper's schedule.
"""

from zoo.config import (add_init_fields, attention_options_from_arg, key_first, overridable,
                        parse_arg)

VARIANTS = {"aft_local": dict(window=32), "aft_simple": {}}

_ARGS = dict(variant="aft_local", total_steps=200_000, batch_size=32, seq_len=1024, lr=1e-3,
             dtype="float32")


def get_config(arg=None):
  arg = parse_arg(key_first(arg, "variant"), **_ARGS)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {arg.variant!r}")
  options = attention_options_from_arg(arg.variant, arg, set(_ARGS))
  options.update({k: v for k, v in VARIANTS[arg.variant].items() if k not in arg})

  config = parse_arg(None)
  config.seed = 0
  config.task = "lm"
  config.data = dict(name="byte_file", path=overridable(None, str), heldout_bytes=5_000_000,
                     data_dir=overridable(None, str), source_dir=overridable(None, str),
                     glob="**/*", seq_len=arg.seq_len)
  config.model = dict(
      name="lm", width=256, depth=24, num_heads=4, mlp_dim=1024, max_len=arg.seq_len,
      vocab_size=256, posemb="learn", tied_embedding=True, attention=arg.variant,
      attention_options=options, dtype=arg.dtype)

  config.mesh = dict(data=-1, fsdp=1, seq=1)
  config.sequence_parallel = overridable(None, str)

  config.batch_size = arg.batch_size
  config.total_steps = arg.total_steps
  config.optimizer = dict(lr=arg.lr, warmup_steps=4000, min_lr_ratio=0.01,
                          weight_decay=1e-4, b1=0.9, b2=0.98, grad_clip_norm=1.0)

  config.log_every = 100
  config.eval_every = 5000
  config.eval_batches = 50
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
