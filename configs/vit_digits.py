"""The default job: a small ViT on scikit-learn's 8x8 handwritten digits (no download).

    python train.py                                         # ReLU attention, alpha = 1
    python train.py --config configs/vit_digits.py:attention=softmax
    python train.py --config configs/vit_digits.py:attention=relu,alpha=0.5,qk_layernorm=True
    python train.py --config.total_steps=500 --config.model.attention_options.alpha=0.5

Any option of the chosen attention can be given in the argument string
(`zoo.config.attention_option_defaults(name)` lists them).
"""

from zoo.config import add_init_fields, attention_options_from_arg, overridable, parse_arg

_ARGS = dict(attention="relu", total_steps=1500, batch_size=128, lr=1e-3, dtype="float32")


def get_config(arg=None, **defaults):
  """The config for the argument string `arg`; `defaults` replace those of `_ARGS`
  (configs/tests/tiny_vit.py)."""
  arg = parse_arg(arg, **{**_ARGS, **defaults})
  config = parse_arg(None)
  config.seed = 0
  config.task = "classification"

  # `download` lets TFDS download and prepare another dataset (`data.name`) that is not
  # prepared in `data_dir` yet; digits is built from local files either way.
  config.data = dict(name="digits", data_dir=overridable(None, str), download=False)

  config.model = dict(
      name="vit",
      variant=None,
      width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2,
      image_size=8, in_channels=1, num_classes=10,
      pool_type="gap", posemb="learn",
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
                          weight_decay=1e-4, b1=0.9, b2=0.999, grad_clip_norm=1.0)

  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
