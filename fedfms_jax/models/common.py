"""Layers shared by SAM's image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """Fixed state saved with the weights but never trained (e.g. the Gaussian PE matrix)."""


def gelu(x: jax.Array) -> jax.Array:
    # SAM uses torch's exact GELU; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def layer_norm(num_features: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis, computed like torch (two-pass variance).

    Used for token LayerNorms and SAM's LayerNorm2d alike: in channels-last layout a
    LayerNorm2d is a plain LayerNorm over the last axis.
    """
    return nnx.LayerNorm(num_features, epsilon=eps, dtype=dtype, use_fast_variance=False,
                         rngs=rngs)


class MLPBlock(nnx.Module):
    """Linear -> activation -> Linear (the transformer MLPs of both encoder and decoder)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, activation, *, dtype, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(embedding_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(mlp_dim, embedding_dim, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.activation(self.lin1(x)))


def softmax_f32(logits: jax.Array) -> jax.Array:
    """Softmax in float32 whatever the compute dtype, then back to it."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
