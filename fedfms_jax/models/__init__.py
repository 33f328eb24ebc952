"""SAM in Flax NNX: image encoder, prompt encoder, mask decoder and the assembled model."""

from fedfms_jax.models.sam import (Sam, abstract_sam, postprocess_masks, preprocess,
                                   transform_coords)
from fedfms_jax.models.variants import VARIANTS, SamConfig, get_config

__all__ = ["Sam", "SamConfig", "abstract_sam", "VARIANTS", "get_config", "preprocess",
           "postprocess_masks", "transform_coords"]
