"""A byte-level causal LM on the embedded corpus: the Python standard library's sources.

    python train.py --config configs/lm_bytes.py --workdir workdirs/lm_relu
    python eval.py  --workdir workdirs/lm_relu   # the config train.py wrote there
    python train.py --config configs/lm_bytes.py:attention=softmax --workdir workdirs/lm_softmax

Point `data.source_dir` at any folder of text files to train on your own corpus
(`--config.data.source_dir=/path --config.data.glob='*.txt'`).
"""

from zoo.config import add_init_fields, attention_options_from_arg, overridable, parse_arg

_ARGS = dict(attention="relu", total_steps=1500, batch_size=16, seq_len=128, width=128,
             depth=3, num_heads=4, lr=2e-3, dtype="float32")


def get_config(arg=None, **defaults):
  """The config for the argument string `arg`; `defaults` replace those of `_ARGS`
  (configs/tests/tiny_lm.py)."""
  arg = parse_arg(arg, **{**_ARGS, **defaults})
  config = parse_arg(None)
  config.seed = 0
  config.task = "lm"

  config.data = dict(name="byte_text", data_dir=overridable(None, str),
                     source_dir=overridable(None, str), glob="**/*.py", seq_len=arg.seq_len)

  config.model = dict(
      name="lm",
      width=arg.width, depth=arg.depth, num_heads=arg.num_heads, mlp_dim=4 * arg.width,
      max_len=arg.seq_len, vocab_size=256, posemb="learn", tied_embedding=True,
      attention=arg.attention,
      attention_options=attention_options_from_arg(arg.attention, arg, set(_ARGS)),
      dtype=arg.dtype,
  )

  # Devices: a (data, fsdp, seq) mesh, -1 = the remaining devices; `sequence_parallel`
  # splits attention along the sequence: None, "gspmd", "all_gather", "ring" or "halo"
  # (each family registers the ones it has).
  config.mesh = dict(data=-1, fsdp=1, seq=1)
  config.sequence_parallel = overridable(None, str)

  config.batch_size = arg.batch_size
  config.total_steps = arg.total_steps
  config.optimizer = dict(lr=arg.lr, warmup_steps=100, min_lr_ratio=0.01,
                          weight_decay=1e-4, b1=0.9, b2=0.98, grad_clip_norm=1.0)

  config.log_every = 50
  config.eval_every = 1000
  config.eval_batches = 50  # periodic eval on a prefix of the validation split; eval.py runs all
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
