"""SAM's prompt encoder: points and boxes -> sparse tokens, mask prompts -> dense embeddings,
and the dense positional encoding of the image embedding grid. Channels-last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedfms_jax.models.common import Buffer, gelu, layer_norm
from fedfms_jax.models.variants import SamConfig

LAYER_NORM_2D_EPS = 1e-6


class PositionEmbeddingRandom(nnx.Module):
    """Fourier features of (x, y) coordinates through a fixed random Gaussian matrix."""

    def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
        # A buffer, never trained: it defines the coordinate frame every prompt lives in.
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (2, num_pos_feats)))

    def encode(self, coords: jax.Array) -> jax.Array:
        """coords: f32[..., 2] in [0, 1], (x, y) order -> f32[..., 2*num_pos_feats]."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix[...]
        coords = 2 * jnp.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def grid(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of every cell centre of an h x w grid: f32[h, w, C]."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)
        return self.encode(xy)

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """coords: f32[B, N, 2] in input-image pixels (x, y) -> f32[B, N, C]."""
        h, w = image_size
        normalised = coords.astype(jnp.float32) / jnp.array([w, h], jnp.float32)
        return self.encode(normalised)


class PromptEncoder(nnx.Module):
    """Encodes point, box and mask prompts for the mask decoder."""

    def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
        d = config.prompt_embed_dim
        dtype = jnp.dtype(config.dtype)
        grid = config.embedding_size
        self.embed_dim = d
        self.image_embedding_size = (grid, grid)
        self.input_image_size = (config.image_size, config.image_size)
        self.pe_layer = PositionEmbeddingRandom(d // 2, rngs=rngs)
        # 0/1: negative/positive point, 2/3: box top-left/bottom-right corner.
        self.point_embeddings = nnx.List([nnx.Embed(1, d, rngs=rngs) for _ in range(4)])
        self.not_a_point_embed = nnx.Embed(1, d, rngs=rngs)
        self.no_mask_embed = nnx.Embed(1, d, rngs=rngs)
        c = config.mask_in_chans
        self.mask_conv1 = nnx.Conv(1, c // 4, (2, 2), strides=(2, 2), padding="VALID",
                                   dtype=dtype, rngs=rngs)
        self.mask_norm1 = layer_norm(c // 4, LAYER_NORM_2D_EPS, dtype, rngs)
        self.mask_conv2 = nnx.Conv(c // 4, c, (2, 2), strides=(2, 2), padding="VALID",
                                   dtype=dtype, rngs=rngs)
        self.mask_norm2 = layer_norm(c, LAYER_NORM_2D_EPS, dtype, rngs)
        self.mask_conv3 = nnx.Conv(c, d, (1, 1), dtype=dtype, rngs=rngs)

    def dense_pe(self) -> jax.Array:
        """Positional encoding of the image embedding grid: f32[h, w, C]."""
        return self.pe_layer.grid(self.image_embedding_size)

    def embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """coords: f32[B, N, 2], labels: i32[B, N] (1 pos, 0 neg, -1 none) -> f32[B, N(+1), C].

        Without a box, a padding point (label -1) is appended, as the official model does.
        """
        coords = coords + 0.5  # centre of the pixel
        if pad:
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), coords.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
        embedding = self.pe_layer.with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        embedding = jnp.where(labels == -1, self.not_a_point_embed.embedding[...], embedding)
        embedding = embedding + jnp.where(labels == 0, self.point_embeddings[0].embedding[...], 0.0)
        embedding = embedding + jnp.where(labels == 1, self.point_embeddings[1].embedding[...], 0.0)
        return embedding

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes: f32[B, 4] as (x0, y0, x1, y1) -> two corner tokens f32[B, 2, C]."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.with_coords(corners, self.input_image_size)
        corner_embeddings = jnp.concatenate(
            [self.point_embeddings[2].embedding[...], self.point_embeddings[3].embedding[...]])
        return embedding + corner_embeddings

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks: f32[B, 4h, 4w, 1] low-res logits -> f32[B, h, w, C]."""
        x = gelu(self.mask_norm1(self.mask_conv1(masks)))
        x = gelu(self.mask_norm2(self.mask_conv2(x)))
        return self.mask_conv3(x)

    def __call__(self, points: tuple[jax.Array, jax.Array] | None = None,
                 boxes: jax.Array | None = None,
                 masks: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Sparse embeddings f32[B, N, C] (N may be 0) and dense embeddings f32[B, h, w, C].

        points: (coords f32[B, N, 2], labels i32[B, N]) in input-image pixels;
        boxes: f32[B, 4]; masks: f32[B, 4h, 4w, 1].
        """
        if points is not None:
            b = points[0].shape[0]
        elif boxes is not None:
            b = boxes.shape[0]
        elif masks is not None:
            b = masks.shape[0]
        else:
            b = 1
        sparse = [jnp.zeros((b, 0, self.embed_dim), jnp.float32)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse_embeddings = jnp.concatenate(sparse, axis=1)
        if masks is not None:
            dense_embeddings = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = jnp.broadcast_to(
                self.no_mask_embed.embedding[...].reshape(1, 1, 1, -1), (b, h, w, self.embed_dim))
        return sparse_embeddings, dense_embeddings
