"""The ReLU-attention paper's Fig. 2 in small (Wortsman et al. 2023, arXiv 2309.08586):
test accuracy against the exponent alpha of the L^-alpha scaling of ReLU attention, at two
sequence lengths, with softmax attention as the reference band.

    python sweep.py --sweep sweeps/relu_alpha.py --out docs/studies/relu_alpha
    python sweep.py --sweep sweeps/relu_alpha.py:steps=1000,seeds=3 --out DIR

Every run is configs/vit_mnist5k.py (4,000 training and 1,000 test images of real MNIST,
a 4-block ViT of width 64) with `steps` steps of 128 images. The sequence length is set
by the patch size: 7x7 patches make 16 tokens, 4x4 patches 49 (the paper's S/32 token
count). alpha in {0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2} for ReLU/L^alpha, and softmax, each
with `seeds` seeds. Argument keys: `steps` (default 300), `seeds` (2), `activation`
(relu; any pointwise activation name).
"""

from zoo.config import parse_arg
from zoo.scaling import grid

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
PATCHES = (7, 4)  # 28x28 images: 16 and 49 tokens


def get_sweep(arg=None):
  arg = parse_arg(arg, steps=300, seeds=2, activation="relu")
  unknown = sorted(set(arg) - {"steps", "seeds", "activation"})
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown}; sweeps/relu_alpha.py takes steps, "
                     f"seeds, activation")
  seeds = {"config.seed": list(range(int(arg.seeds)))}
  patches = {"config.model.patch_size": list(PATCHES)}
  pointwise = grid.product({"arg.attention": [arg.activation], "arg.alpha": list(ALPHAS)},
                           patches, seeds)
  softmax = grid.product({"arg.attention": ["softmax"]}, patches, seeds)
  return {
      "name": "relu_alpha",
      "config": f"configs/vit_mnist5k.py:total_steps={int(arg.steps)}",
      "runs": grid.chain(pointwise, softmax),
      "metric": "accuracy",
      "plot": {"kind": "alpha"},
  }
