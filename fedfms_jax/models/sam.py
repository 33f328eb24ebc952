"""Segment Anything: image encoder + prompt encoder + mask decoder, with SAM's pre- and
post-processing (resize the longest side, normalise, pad; crop and upsample the masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fedfms_jax.models.adapters import torch_default_init
from fedfms_jax.models.image_encoder import ImageEncoder
from fedfms_jax.models.mask_decoder import MaskDecoder
from fedfms_jax.models.prompt_encoder import PromptEncoder
from fedfms_jax.models.variants import SamConfig

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


class Sam(nnx.Module):
    """SAM predicts mask logits for prompts on images."""

    def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.image_encoder = ImageEncoder(config, rngs=rngs)
        self.prompt_encoder = PromptEncoder(config, rngs=rngs)
        self.mask_decoder = MaskDecoder(config, rngs=rngs)
        if config.num_classes > 1:
            # FedFMS's multi-class head: a new 1x1 conv from the mask tokens' maps to the
            # classes, with torch's default init as the new nn.Conv2d it is there.
            m = config.num_mask_tokens
            self.class_head = nnx.Conv(m, config.num_classes, (1, 1),
                                       kernel_init=torch_default_init(m),
                                       bias_init=torch_default_init(m),
                                       dtype=jnp.dtype(config.dtype), rngs=rngs)
        else:
            self.class_head = None

    def decode(self, image_embeddings: jax.Array, *, point_coords: jax.Array | None = None,
               point_labels: jax.Array | None = None, boxes: jax.Array | None = None,
               mask_inputs: jax.Array | None = None, multimask_output: bool = False
               ) -> tuple[jax.Array, jax.Array]:
        """Prompts on already-encoded images -> (low-res logits f32[B, L, L, M'], iou f32[B, M']).

        image_embeddings: f32[B or 1, h, w, C]; point_coords f32[B, N, 2] (x, y) and
        point_labels i32[B, N], boxes f32[B, 4], all in model-input pixels;
        mask_inputs f32[B, L, L, 1].
        """
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.dense_pe(), sparse,
                                 dense, multimask_output)

    def segment(self, images: jax.Array, *, point_coords: jax.Array | None = None,
                point_labels: jax.Array | None = None,
                boxes: jax.Array | None = None) -> jax.Array:
        """FedFMS's segmentation forward: images f32[B, S, S, 3] -> logits f32[B, L, L, C].

        Without prompts it runs prompt-free as FedFMS does: the decoder sees only its output
        tokens and no dense prompt embedding is added. With one class, C = 1 is mask token 0;
        with C = config.num_classes > 1 the class head maps all mask tokens' maps to C.
        """
        embeddings = self.image_encoder(images)
        b = images.shape[0]
        if point_coords is None and boxes is None:
            sparse = jnp.zeros((b, 0, self.config.prompt_embed_dim), embeddings.dtype)
            dense = None
        else:
            points = None if point_coords is None else (point_coords, point_labels)
            sparse, dense = self.prompt_encoder(points, boxes, None)
        masks, _ = self.mask_decoder.predict_masks(embeddings, self.prompt_encoder.dense_pe(),
                                                   sparse, dense)
        if self.class_head is None:
            return masks[..., :1]
        return self.class_head(masks)

    def __call__(self, images: jax.Array, **prompts) -> tuple[jax.Array, jax.Array]:
        """images: f32[B, S, S, 3] (see `preprocess`) plus the prompts of `decode`."""
        return self.decode(self.image_encoder(images), **prompts)


def extend(base: Sam, config: SamConfig, *, rngs: nnx.Rngs) -> Sam:
    """A model with `config` that starts from `base`: every variable of base is copied and
    the rest (adapters, LoRA, class head) is initialised from rngs. E.g. pretrained SAM ->
    FedMSA's starting model: extend(load_sam(path), config.replace(adapter="msa"), rngs=...).
    """
    key = rngs.params()
    abstract = nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(params=key)))
    graphdef, state = nnx.split(abstract)
    new = dict(nnx.to_flat_state(state))
    old = dict(nnx.to_flat_state(nnx.state(base)))
    problems = [f"{'.'.join(map(str, path))}: not in the new model" for path in old
                if path not in new]
    problems += [f"{'.'.join(map(str, path))}: {old[path].get_value().shape} vs "
                 f"{new[path].get_value().shape} in the new model"
                 for path in old if path in new
                 and old[path].get_value().shape != new[path].get_value().shape]
    if problems:
        raise ValueError("the base model does not fit the new config:\n  "
                         + "\n  ".join(problems[:20]))
    added = [path for path in new if path not in old]

    @jax.jit
    def init_added(key):
        # Only the added variables leave the jit, so XLA drops the initialisation of every
        # base weight: no full-size model is ever materialised.
        variables = dict(nnx.to_flat_state(nnx.state(Sam(config, rngs=nnx.Rngs(params=key)))))
        return [variables[path].get_value() for path in added]

    for path, value in zip(added, init_added(key)):
        new[path].set_value(value)
    for path, variable in old.items():
        new[path].set_value(variable.get_value())
    return nnx.merge(graphdef, state)


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to long_side, rounded as official SAM."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A uint8 image [H, W, 3] -> (model input f32[S, S, 3], resized size (h, w)).

    Resizes the longest side to S with PIL bilinear (as SAM's ResizeLongestSide), normalises
    with SAM's pixel mean/std and pads bottom/right with zeros.
    """
    h, w = resized_shape(image.shape[0], image.shape[1], image_size)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    x = (resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    x = np.pad(x, ((0, image_size - h), (0, image_size - w), (0, 0)))
    return x, (h, w)


def transform_coords(coords: np.ndarray, original_size: tuple[int, int],
                     image_size: int) -> np.ndarray:
    """Pixel coordinates [..., 2] (x, y) of the original image -> model-input pixels."""
    h0, w0 = original_size
    h, w = resized_shape(h0, w0, image_size)
    return np.asarray(coords, np.float32) * np.array([w / w0, h / h0], np.float32)


def postprocess_masks(low_res_logits: jax.Array, input_size: tuple[int, int],
                      original_size: tuple[int, int], image_size: int) -> jax.Array:
    """Low-res logits f32[B, L, L, M] -> logits at the original size f32[B, H0, W0, M].

    Upsamples to the padded input, crops the padding, and resizes to the original size,
    bilinear without antialiasing as torch's F.interpolate(align_corners=False).
    """
    b, _, _, m = low_res_logits.shape
    x = jax.image.resize(low_res_logits, (b, image_size, image_size, m), "bilinear",
                         antialias=False)
    x = x[:, :input_size[0], :input_size[1]]
    return jax.image.resize(x, (b, *original_size, m), "bilinear", antialias=False)
