"""Segmentation losses (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping

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


def segmentation_loss(model, batch: Mapping[str, jax.Array], key: jax.Array, *,
                      pos_weight: float = 2.0) -> jax.Array:
    """FedFMS's loss of a SAM on one batch: weighted BCE of `Sam.segment` against
    `mask_low_res` (the engine's default loss_fn(model, batch, key)).

    batch: image f32[B, S, S, 3], mask_low_res f32[B, L, L, C], optional valid bool[B] and
    prompts (boxes f32[B, 4]; point_coords f32[B, N, 2] with point_labels i32[B, N]).
    """
    del key  # SAM has no dropout; kept so a loss with randomness has its key
    logits = model.segment(batch["image"], point_coords=batch.get("point_coords"),
                           point_labels=batch.get("point_labels"), boxes=batch.get("boxes"))
    return weighted_bce(logits, batch["mask_low_res"], pos_weight, valid=batch.get("valid"))
