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

    def set_remat(self, mode: str) -> None:
        """Rematerialise the image encoder's blocks under differentiation: "off", "blocks"
        or "full" (see image_encoder.REMAT_POLICIES). Outputs and gradients are unchanged;
        set it before the model is split, as the setting lives in the graph definition."""
        self.image_encoder.set_remat(mode)

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
        return self.segment_embeddings(self.image_encoder(images), point_coords=point_coords,
                                       point_labels=point_labels, boxes=boxes)

    def segment_embeddings(self, embeddings: jax.Array, *,
                           point_coords: jax.Array | None = None,
                           point_labels: jax.Array | None = None,
                           boxes: jax.Array | None = None) -> jax.Array:
        """`segment` after the image encoder: image embeddings f32[B, h, w, C] -> logits
        f32[B, L, L, C'] (decoder mode reuses each image's embedding across rounds)."""
        b = embeddings.shape[0]
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


def abstract_sam(config: SamConfig) -> Sam:
    """A Sam of `config` with shapes and dtypes only (nnx.eval_shape): nothing is allocated.
    Each call traces anew (ViT-B: ~1 s) and returns Variables of its own to fill."""
    return nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0)))


def extend(base: Sam, config: SamConfig, *, rngs: nnx.Rngs) -> Sam:
    """A model with `config` that starts from `base`: every variable of base is copied and
    the rest (adapters, LoRA, class head) is initialised from rngs. E.g. pretrained SAM ->
    FedMSA's starting model: extend(load_sam(path), config.replace(adapter="msa"), rngs=...).
    """
    key = rngs.params()
    graphdef, state = nnx.split(abstract_sam(config))
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


RESIZE_MODES = ("longest_side", "stretch")
NORMALISATIONS = ("sam", "unit")


def content_shape(height: int, width: int, size: int, resize: str) -> tuple[int, int]:
    """(h, w) the image takes inside a size x size model input: the longest side scaled to
    `size` (SAM's ResizeLongestSide, then zero padding) or stretched to size x size."""
    if resize == "stretch":
        return size, size
    if resize != "longest_side":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    h, w = resized_shape(height, width, size)
    return max(1, h), max(1, w)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """u8 or f32 [H, W, 3] on the 0..255 scale -> [h, w, 3] of the same dtype, PIL bilinear
    (antialiased when shrinking, as SAM's ResizeLongestSide); u8 stays u8 through PIL, as
    SAM's does. Always a new array, which the caller may modify."""
    if image.shape[:2] == tuple(hw):
        return np.array(image, np.uint8 if image.dtype == np.uint8 else np.float32)
    h, w = hw
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h),
                                                                              Image.BILINEAR))
    channels = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
                .resize((w, h), Image.BILINEAR) for c in range(image.shape[-1])]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def resize_pad(image: np.ndarray, image_size: int, *, resize: str = "longest_side"
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """The geometric half of `preprocess`: an image u8 (or f32 on 0..255) [H, W, 3] ->
    (pixels [S, S, 3] of the same dtype, resized (`content_shape`) and zero-padded at the
    bottom and right, content (h, w)). The training streams send these u8 pixels to the
    device, which normalises them (`normalise_pixels`): 4x less to move than model input."""
    h, w = content_shape(image.shape[0], image.shape[1], image_size, resize)
    x = resize_image(image, (h, w))
    if (h, w) != (image_size, image_size):
        x = np.pad(x, ((0, image_size - h), (0, image_size - w), (0, 0)))
    return x, (h, w)


_INV_PIXEL_STD = np.float32(1.0) / PIXEL_STD
_INV_255 = np.float32(1 / 255)


def normalise_pixels(pixels, normalise: str, content=None):
    """The value half of `preprocess`: pixels u8 (or f32 on 0..255) [..., S, S, 3] -> model
    input f32[..., S, S, 3]: SAM's pixel mean/std ('sam') or x / 255 ('unit', as FedFMS),
    zero outside the content i32[..., 2] (h, w) (the padding; None: all content). numpy in,
    numpy out; a jax array (the device, inside a jitted step) likewise, with the same float32
    operations, so both give the same bits."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    xp = np if isinstance(pixels, np.ndarray) else jnp
    x = pixels.astype(np.float32)
    x = (x - PIXEL_MEAN) * _INV_PIXEL_STD if normalise == "sam" else x * _INV_255
    if content is not None:
        content = xp.asarray(content)
        rows = xp.arange(x.shape[-3])[:, None] < content[..., 0, None, None]
        cols = xp.arange(x.shape[-2])[None, :] < content[..., 1, None, None]
        x = xp.where((rows & cols)[..., None], x, np.float32(0))
    return x


def preprocess(image: np.ndarray, image_size: int, *, resize: str = "longest_side",
               normalise: str = "sam") -> tuple[np.ndarray, tuple[int, int]]:
    """An image u8 (or f32 on 0..255) [H, W, 3] -> (model input f32[S, S, 3], content (h, w)).

    The one place where an image becomes model input (training pipeline, evaluation and
    predict all call it, or its two halves: `resize_pad` on the host, `normalise_pixels`
    on the device for training): resize (`content_shape`), normalise with SAM's pixel
    mean/std ('sam') or scale to [0, 1] ('unit', as FedFMS), zero-pad bottom/right to S x S.
    The defaults are official SAM's preprocessing.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    pixels, content = resize_pad(image, image_size, resize=resize)
    return normalise_pixels(pixels, normalise, content), content


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
