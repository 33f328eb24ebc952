"""Segmentation losses (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fedfms_jax.models.sam import normalise_pixels


def weighted_bce(logits: jax.Array, targets: jax.Array, pos_weight: float = 2.0,
                 valid: jax.Array | None = None) -> jax.Array:
    """FedFMS's BCE-with-logits with pos_weight, as torch's BCEWithLogitsLoss.

    logits: f32[B, H, W, C]; targets: f32 or u8 [B, H, W, C] of 0 / 1; valid: bool[B] masks padding examples out of the mean.
    loss = -(pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))).
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)  # the training streams send them as u8
    per_pixel = (pos_weight * targets * -jax.nn.log_sigmoid(logits)
                 + (1.0 - targets) * -jax.nn.log_sigmoid(-logits))
    per_example = per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)
    if valid is None:
        return per_example.mean()
    weights = valid.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(weights.sum(), 1.0)


def segmentation_loss(model, batch: Mapping[str, jax.Array], key: jax.Array, *,
                      pos_weight: float = 2.0, normalise: str = "unit") -> jax.Array:
    """FedFMS's loss of a SAM on one batch: weighted BCE of `Sam.segment` against
    `mask_low_res` (the engine's default loss_fn(model, batch, key)).

    batch: the model's input as one of image f32[B, S, S, 3] (model input, see
    `models.sam.preprocess`), pixels u8[B, S, S, 3] with content i32[B, 2] (the training
    streams': resized and padded on the host, normalised here by `normalise`) or
    image_embeddings f32[B, h, w, C] (decoder mode's cached encoder outputs); mask_low_res
    f32 or u8 [B, L, L, C], optional valid bool[B] and prompts (boxes f32[B, 4]; point_coords
    f32[B, N, 2] with point_labels i32[B, N]).
    """
    del key  # SAM has no dropout; kept so a loss with randomness has its key
    prompts = dict(point_coords=batch.get("point_coords"),
                   point_labels=batch.get("point_labels"), boxes=batch.get("boxes"))
    if "image_embeddings" in batch:
        logits = model.segment_embeddings(batch["image_embeddings"], **prompts)
    else:
        images = batch["image"] if "image" in batch else normalise_pixels(
            batch["pixels"], normalise, batch.get("content"))
        logits = model.segment(images, **prompts)
    return weighted_bce(logits, batch["mask_low_res"], pos_weight, valid=batch.get("valid"))
