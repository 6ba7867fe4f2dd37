"""The pointwise activations h of L^-alpha h(q.k / sqrt(d)) (Wortsman et al. 2023, Sec. 3)."""

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "gelu": jax.nn.gelu,  # tanh approximation, jax's default
    "softplus": jax.nn.softplus,
    "identity": lambda x: x,
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
}
