"""AFT ImageNet-1K ViTs shaped as Zhai et al. 2021 (arXiv 2105.14103), Table 7: DeiT's
tiny / small transformers (Touvron et al. 2021) with the attention replaced by AFT-full or
AFT-conv.

    python train.py --config configs/aft_imagenet.py:conv_small_h384_k11 \\
        --config.data.data_dir=~/tensorflow_datasets
    python train.py --config configs/aft_imagenet.py:full_tiny,batch_size=256 \\
        --config.data.data_dir=...

The first item of the argument string (or `model=KEY`) picks the model:

| key | backbone | attention | heads | kernel | class token / position embedding |
|---|---|---|---|---|---|
| `full_tiny` | Ti/16 (192 x 12, mlp 768) | AFT-full, w = u v^T, d' 128 | - | - | yes / none |
| `full_small` | S/16 (384 x 12, mlp 1536) | AFT-full, w = u v^T, d' 128 | - | - | yes / none |
| `conv_tiny_h32_k11` | Ti/16 | AFT-conv 2-D | 32 | 11 x 11 | no / none, GAP |
| `conv_tiny_h192_k11` | Ti/16 | AFT-conv 2-D | 192 | 11 x 11 | no / none, GAP |
| `conv_small_h16_k11` | S/16 | AFT-conv 2-D | 16 | 11 x 11 | no / none, GAP |
| `conv_small_h384_k11` | S/16 | AFT-conv 2-D | 384 | 11 x 11 | no / none, GAP |
| `conv_small_h384_k15` | S/16 | AFT-conv 2-D | 384 | 15 x 15 | no / none, GAP |

AFT-conv drops the class token and the position embedding and pools by global average,
as the paper's ImageNet models (`pool_type="gap"`, `posemb="none"`: its convolutional
bias locates the tokens); K has one channel per head (`key_per_head`). AFT-full keeps
DeiT's class token (read out by `pool_type="tok"`) but not its position embedding: the
learned bias w = u v^T (u, v `[197, 128]` per layer; `max_len` filled from the backbone)
already carries position. The paper does not say so in words; its parameter counts do:
with DeiT's learned embedding AFT-full small would have 22,655,464 parameters (22.7M),
without it 22,580,200 (Table 7: 22.6M); tiny has 6.32M or 6.28M, 6.3M either way. Set
`--config.model.posemb=learn` for the DeiT embedding.

`PARAMS` holds this zoo's parameter counts; tests/test_aft.py checks them, and against
Table 7 ("#Params (MB)", millions to one decimal): six of the seven rows agree. The
seventh, `conv_tiny_h192_k11`, has 5,962,792 (6.0M) against the table's 5.9M; it cannot
agree together with `conv_tiny_h32_k11` (5,356,072, table 5.4M): the two differ only by
the K projection (192 x 192 + 192 against 192 x 32 + 32) and 160 more 11 x 11 filters
with their gain and bias, 606,720 parameters in all, more than the table's rounding
allows (< 0.6M).

Data: `imagenet2012` from TFDS, already prepared in `data.data_dir` (array_record; this
config never downloads: TFDS cannot fetch ImageNet), resized to 224 x 224, evaluated on the
validation split. Training follows the zoo's trainer (AdamW, warmup + cosine, batch 1024,
300 epochs' worth of steps as DeiT), without DeiT's augmentation, mixup, label smoothing
and stochastic depth, which the paper's runs used; accuracy will fall short of Table 7.
"""

from zoo.config import (add_init_fields, attention_options_from_arg, key_first, overridable,
                        parse_arg)

_TINY = dict(variant="Ti/16")
_SMALL = dict(variant="S/16")
_FULL = dict(attention="aft_full", pool_type="tok", posemb="none", options={})


def _conv(heads, kernel):
  return dict(attention="aft_conv", pool_type="gap", posemb="none",
              options=dict(kernel_size=kernel, conv_dims=2), num_heads=heads)


MODELS = {
    "full_tiny": {**_TINY, **_FULL},
    "full_small": {**_SMALL, **_FULL},
    "conv_tiny_h32_k11": {**_TINY, **_conv(32, 11)},
    "conv_tiny_h192_k11": {**_TINY, **_conv(192, 11)},
    "conv_small_h16_k11": {**_SMALL, **_conv(16, 11)},
    "conv_small_h384_k11": {**_SMALL, **_conv(384, 11)},
    "conv_small_h384_k15": {**_SMALL, **_conv(384, 15)},
}

# Parameters of this zoo's models (224 px, 1000 classes).
PARAMS = {
    "full_tiny": 6_284_776, "full_small": 22_580_200,
    "conv_tiny_h32_k11": 5_356_072, "conv_tiny_h192_k11": 5_962_792,
    "conv_small_h16_k11": 20_298_088, "conv_small_h384_k11": 22_541_416,
    "conv_small_h384_k15": 23_020_648,
}

_ARGS = dict(model="conv_small_h384_k11", total_steps=375_000, batch_size=1024, lr=1e-3,
             warmup_steps=6_250, dtype="float32")


def get_config(arg=None):
  arg = parse_arg(key_first(arg, "model"), **_ARGS)
  if arg.model not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {arg.model!r}")
  m = MODELS[arg.model]
  options = attention_options_from_arg(m["attention"], arg, set(_ARGS))
  options.update({k: v for k, v in m["options"].items() if k not in arg})

  config = parse_arg(None)
  config.seed = 0
  config.task = "classification"
  config.data = dict(name="imagenet2012", data_dir=overridable(None, str), image_size=224,
                     download=False)
  config.model = dict(
      name="vit", variant=m["variant"], num_heads=m.get("num_heads", overridable(None, int)),
      image_size=224, in_channels=3, num_classes=1000, pool_type=m["pool_type"],
      posemb=m["posemb"], attention=m["attention"], attention_options=options,
      dtype=arg.dtype)

  config.mesh = dict(data=-1, fsdp=1, seq=1)
  config.sequence_parallel = overridable(None, str)

  config.batch_size = arg.batch_size
  config.total_steps = arg.total_steps
  config.optimizer = dict(lr=arg.lr, warmup_steps=arg.warmup_steps, min_lr_ratio=0.01,
                          weight_decay=0.05, b1=0.9, b2=0.999, grad_clip_norm=1.0)

  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.skip_nonfinite_updates = False  # True: skip a non-finite update and go on
  add_init_fields(config)  # init_from, init_dont_load, init_strict
  return config
