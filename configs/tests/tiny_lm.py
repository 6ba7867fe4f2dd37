"""A seconds-long byte-LM run for tests: `configs/tests/tiny_lm.py:attention=softmax`."""

from configs import lm_bytes


def get_config(arg=None):
  config = lm_bytes.get_config(arg)
  config.data.seq_len = 16
  config.model.update(width=16, depth=1, num_heads=2, mlp_dim=32, max_len=16)
  config.batch_size = 8
  config.total_steps = 8
  config.optimizer.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 4
  config.eval_batches = 2
  config.checkpoint_every = 4
  config.keep_checkpoints = 5
  return config
