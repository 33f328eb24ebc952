"""Layers shared by SAM's image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x f32[..., in] @ kernel f32[in, out] -> f32[..., out], as `x @ kernel`, with a
    backward that computes the kernel's gradient as x^T @ g over the flattened tokens.

    Autodiff's own rule computes it as (g^T @ x)^T, and XLA's CPU backend then transposes g,
    the residual stream's gradient, fusing into that transpose the whole chain of gradient
    sums that produces g, once per consumer: 28% of a small-variant FedSAM step (bench/).
    Transposing x instead, a layer's materialised input, is a plain copy. Same sums.
    """
    return x @ kernel


def _dense_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_bwd(residuals, gradient):
    x, kernel = residuals
    tokens = x.reshape(-1, x.shape[-1])
    kernel_gradient = tokens.T @ gradient.reshape(-1, gradient.shape[-1])
    return gradient @ kernel.T, kernel_gradient


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, same dtype promotion) computed with `dense`."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = dense(inputs, kernel)
        return y if bias is None else y + bias


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
        self.lin1 = Linear(embedding_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.lin2 = Linear(mlp_dim, embedding_dim, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.activation(self.lin1(x)))


def softmax_f32(logits: jax.Array) -> jax.Array:
    """Softmax in float32 whatever the compute dtype, then back to it."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
