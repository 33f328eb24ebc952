"""Parameter-efficient additions to SAM's image encoder: the Medical SAM Adapter and LoRA.

Their parameters are their own `nnx.Param` subclasses (`AdapterParam`, `LoRAParam`), so a
training mode selects them by type (see `fedfms_jax.fed.partition`), whatever their path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from fedfms_jax.models.common import dense, gelu


class AdapterParam(nnx.Param):
    """A Medical SAM Adapter weight: trained by FedMSA while the encoder stays frozen."""


# Flax's own LoRA parameter type, so nnx.LoRA layers and ours are selected alike.
LoRAParam = nnx.LoRAParam


def torch_default_init(fan_in: int):
    """torch's nn.Linear / nn.Conv2d default for weights and biases alike:
    kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class AdapterLinear(nnx.Module):
    """A Linear layer whose kernel f32[in, out] and bias f32[out] are AdapterParams."""

    def __init__(self, in_features: int, out_features: int, *, zero: bool, dtype,
                 rngs: nnx.Rngs):
        init = nnx.initializers.zeros if zero else torch_default_init(in_features)
        self.kernel = AdapterParam(init(rngs.params(), (in_features, out_features)))
        self.bias = AdapterParam(init(rngs.params(), (out_features,)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = promote_dtype(
            (x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return dense(x, kernel) + bias


class Adapter(nnx.Module):
    """Medical SAM Adapter: Linear(D -> D*ratio), exact GELU, Linear(D*ratio -> D), with an
    optional skip connection (x + adapter(x)). Names follow upstream (D_fc1, D_fc2 -> fc1, fc2).
    """

    def __init__(self, dim: int, hidden_dim: int, *, skip_connect: bool, init: str, dtype,
                 rngs: nnx.Rngs):
        if init not in ("torch_default", "zero"):
            raise ValueError(f"unknown adapter init {init!r}; known: torch_default, zero")
        self.skip_connect = skip_connect
        self.fc1 = AdapterLinear(dim, hidden_dim, zero=False, dtype=dtype, rngs=rngs)
        # Zeroing only the up-projection keeps fc1 random, so its gradient is non-zero as
        # soon as fc2 moves, while the output starts exactly at 0.
        self.fc2 = AdapterLinear(hidden_dim, dim, zero=init == "zero", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: f32[..., D] -> f32[..., D]."""
        out = self.fc2(gelu(self.fc1(x)))
        return x + out if self.skip_connect else out


class QkvLoRA(nnx.Module):
    """Low-rank update of a qkv projection: (alpha / rank) * x A B, A f32[D, r], B f32[r, 3D].

    A starts as torch's default Linear init (as PEFT's LoRA), B at zero, so the update is
    exactly zero at step 0.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, dtype,
                 rngs: nnx.Rngs):
        self.scaling = alpha / rank
        self.lora_a = LoRAParam(torch_default_init(in_features)(rngs.params(),
                                                                (in_features, rank)))
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: f32[..., D] -> f32[..., 3D]."""
        x, a, b = promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return self.scaling * dense(dense(x, a), b)
