"""A seconds-long byte-LM run for tests: `configs/tests/tiny_lm.py:attention=softmax`.

The argument string takes lm_bytes.py's keys, with tiny defaults (8 steps of 8 x 16 bytes,
one layer of width 16 with 2 heads; the MLP is twice the width).
"""

from configs import lm_bytes

_ARGS = dict(lm_bytes._ARGS, total_steps=8, batch_size=8, seq_len=16, width=16, depth=1,  # pylint: disable=protected-access
             num_heads=2)


def get_config(arg=None):
  config = lm_bytes.get_config(arg, **_ARGS)
  config.model.mlp_dim = 2 * config.model.width
  config.optimizer.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 4
  config.eval_batches = 2
  config.checkpoint_every = 4
  config.keep_checkpoints = 5
  return config
