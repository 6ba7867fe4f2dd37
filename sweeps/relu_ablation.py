"""The ReLU-attention paper's Figs. 3-4 in small (arXiv 2309.08586): qk-LayerNorm and the
output gate switched on and off, across alpha, with softmax attention as the reference.

    python sweep.py --sweep sweeps/relu_ablation.py --out docs/studies/relu_ablation

configs/vit_mnist5k.py at `tokens` tokens (patch 7: 16, patch 4: 49), `steps` steps,
ReLU/L^alpha with alpha in {0, 1} (or `alphas`, slash-separated) x qk_layernorm x
output_gate, plus softmax; `seeds` seeds. Argument keys: `steps` (300), `seeds` (1),
`tokens` (16), `alphas` ("0/1").
"""

from zoo.config import parse_arg
from zoo.scaling import grid

PATCH_FOR_TOKENS = {16: 7, 49: 4}


def get_sweep(arg=None):
  arg = parse_arg(arg, steps=300, seeds=1, tokens=16, alphas="0/1")
  unknown = sorted(set(arg) - {"steps", "seeds", "tokens", "alphas"})
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown}; sweeps/relu_ablation.py takes steps, "
                     f"seeds, tokens, alphas")
  if int(arg.tokens) not in PATCH_FOR_TOKENS:
    raise ValueError(f"tokens must be one of {sorted(PATCH_FOR_TOKENS)}, got {arg.tokens}")
  alphas = [float(a) for a in str(arg.alphas).split("/")]
  seeds = {"config.seed": list(range(int(arg.seeds)))}
  relu = grid.product({"arg.attention": ["relu"], "arg.alpha": alphas,
                       "arg.qk_layernorm": [False, True], "arg.output_gate": [False, True]},
                      seeds)
  softmax = grid.product({"arg.attention": ["softmax"]}, seeds)
  patch = PATCH_FOR_TOKENS[int(arg.tokens)]
  return {
      "name": "relu_ablation",
      "config": f"configs/vit_mnist5k.py:total_steps={int(arg.steps)}",
      "runs": grid.product(grid.chain(relu, softmax), {"config.model.patch_size": [patch]}),
      "metric": "accuracy",
      "plot": {"kind": "facets", "facet_keys": ["qk_layernorm", "gate"]},
  }
