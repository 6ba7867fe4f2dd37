"""attention-zoo: efficient and softmax-free attention in JAX / Flax NNX."""

__version__ = "0.1.0"
