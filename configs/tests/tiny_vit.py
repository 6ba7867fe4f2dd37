"""A seconds-long ViT run on digits for tests: `configs/tests/tiny_vit.py:attention=softmax`.

The argument string takes vit_digits.py's keys, with tiny defaults (12 steps of 32).
"""

from configs import vit_digits

_ARGS = dict(vit_digits._ARGS, total_steps=12, batch_size=32)  # pylint: disable=protected-access


def get_config(arg=None):
  config = vit_digits.get_config(arg, **_ARGS)
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)
  config.optimizer.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 6
  config.checkpoint_every = 4
  config.keep_checkpoints = 5
  return config
