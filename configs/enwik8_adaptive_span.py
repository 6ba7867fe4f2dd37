"""The adaptive-span papers' enwik8 models (Sukhbaatar et al. 2019, arXiv 1905.07799 and
1907.01470), with the authors' hyperparameters (facebookresearch/adaptive-span,
`experiments/enwik8_small.sh`, `enwik8.sh`, `enwik8_pers_small.sh`).

    python train.py --config configs/enwik8_adaptive_span.py:enwik8_small \\
        --config.data.path=/data/enwik8
    python eval.py  --config configs/enwik8_adaptive_span.py:enwik8_small \\
        --config.data.path=/data/enwik8

Keys (the argument string's first item, or `model=KEY`):

| key | layers x width | heads | S | block | params (here) | paper |
|---|---|---|---|---|---|---|
| `enwik8_small` | 8 x 256, ff 1024 | 4 | 1024 | 256 | 6.5M | (authors' small script; ~1.3 bpc) |
| `enwik8_large_12l` | 12 x 512, ff 2048 | 8 | 8192 | 512 | 38.6M | 39M, 1.02 bpc (text8: 38M) |
| `enwik8_all_attention` | 18 x 512, no ff, N 1024 | 8 | 8192 | 512 | 38.5M | 39M, 1.01 bpc |

Data: enwik8 is not downloaded. Either the raw 100 MB file (unzipped
http://mattmahoney.net/dc/enwik8.zip) with `--config.data.path=FILE` (`byte_file`: the
authors' split, last 5M bytes test, the 5M before validation, the rest train), or
`--config.data.name=byte_text --config.data.source_dir=DIR --config.data.glob=...` for a
folder of text files (split per file by hash). The vocabulary is all 256 byte values (the
authors map enwik8's 205 distinct bytes to ids; the extra rows add 2 x 51 x width
parameters).

Training as the authors: batch 64, Adagrad (lr 0.07, per-tensor clip 0.03) with linear
warmup, span penalty per layer, adaptive span caches; `total_steps` = niter x 1000 batches.
The all-attention script then fine-tunes with lr 0.007 to 480k steps (run again with
`--config.optimizer.lr=0.007 --config.total_steps=480000`). Eval: the whole test split in
order with the caches, batch 8 (the authors' `--full-eval-mode --batch-sz 8`).
"""

from zoo.config import add_init_fields, did_you_mean, key_first, overridable, parse_arg

# The authors' scripts (facebookresearch/adaptive-span/experiments/*.sh).
MODELS = {
    "enwik8_small": dict(
        depth=8, width=256, inner_size=1024, num_heads=4, max_span=1024, block_len=256,
        dropout=0.0, emb_dropout=0.0, warmup_steps=8000, total_steps=150_000,
        attention="adaptive_span", span_loss=2e-6),
    "enwik8_large_12l": dict(
        depth=12, width=512, inner_size=2048, num_heads=8, max_span=8192, block_len=512,
        dropout=0.3, emb_dropout=0.0, warmup_steps=32000, total_steps=600_000,
        attention="adaptive_span", span_loss=5e-7),
    "enwik8_all_attention": dict(
        depth=18, width=512, inner_size=None, num_heads=8, max_span=8192, block_len=512,
        dropout=0.3, emb_dropout=0.0, warmup_steps=32000, total_steps=450_000,
        attention="persistent_memory", span_loss=1e-7, persistent_size=1024),
}
# Parameter counts in the papers, rounded to millions there (1905.07799 Table 1: 12-layer
# enwik8 model 39M (text8, vocabulary 27: 38M); 1907.01470 Table 1: small all-attention 39M).
PAPER_PARAMS = {"enwik8_large_12l": 39e6, "enwik8_all_attention": 39e6}

_ARGS = dict(model="enwik8_small", batch_size=64, lr=0.07, dtype="float32")


def get_config(arg=None):
  arg = parse_arg(key_first(arg, "model"), **_ARGS)
  unknown = sorted(set(arg) - set(_ARGS))
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}{did_you_mean(unknown, _ARGS)}; "
                     f"accepted: {sorted(_ARGS)}")
  if arg.model not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {arg.model!r}"
                     f"{did_you_mean([arg.model], MODELS)}")
  m = MODELS[arg.model]

  config = parse_arg(None)
  config.seed = 0
  config.task = "segment_lm"
  config.data = dict(name="byte_file", path=overridable(None, str),
                     heldout_bytes=5_000_000, data_dir=overridable(None, str),
                     source_dir=overridable(None, str), glob="**/*", block_len=m["block_len"])

  options = dict(ramp=32, span_init=0.0, span_loss=m["span_loss"], adapt_cache=True)
  if m["attention"] == "persistent_memory":
    options["persistent_size"] = m["persistent_size"]
  config.model = dict(
      name="transformer_seq", vocab_size=256, width=m["width"], depth=m["depth"],
      num_heads=m["num_heads"], max_span=m["max_span"],
      inner_size=overridable(m["inner_size"], int), dropout=m["dropout"],
      emb_dropout=m["emb_dropout"], attention=m["attention"], attention_options=options,
      dtype=arg.dtype)

  config.mesh = dict(data=-1, fsdp=1, seq=1)
  config.sequence_parallel = overridable(None, str)
  config.batch_size = arg.batch_size
  config.eval_batch_size = 8
  config.total_steps = m["total_steps"]
  config.optimizer = dict(name="adagrad", lr=arg.lr, warmup_steps=m["warmup_steps"],
                          grad_clip=0.03)
  config.trim_every = 1  # the authors trim at every step

  config.log_every = 1000
  config.eval_every = 10_000
  config.eval_batches = 100  # blocks per row of validation during training; eval.py: all
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
