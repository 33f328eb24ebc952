"""Segmentation losses (pure functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp



def weighted_bce(logits: jax.Array, targets: jax.Array, pos_weight: float = 2.0,
                 valid: jax.Array | None = None) -> jax.Array:
    """FedFMS's BCE-with-logits with pos_weight, as torch's BCEWithLogitsLoss.

    logits, targets: f32[B, H, W, C]; valid: bool[B] masks padding examples out of the mean.
    loss = -(pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))).
    """
    logits = logits.astype(jnp.float32)
    per_pixel = (pos_weight * targets * -jax.nn.log_sigmoid(logits)
                 + (1.0 - targets) * -jax.nn.log_sigmoid(-logits))
    per_example = per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)
    if valid is None:
        return per_example.mean()
    weights = valid.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(weights.sum(), 1.0)



