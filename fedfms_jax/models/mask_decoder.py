"""SAM's mask decoder: a two-way transformer between output tokens and the image
embedding, an upscaling path, hypernetwork heads and an IoU head. Channels-last.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fedfms_jax.models.common import Linear, MLPBlock, dense, gelu, layer_norm, softmax_f32
from fedfms_jax.models.variants import SamConfig

TRANSFORMER_LAYER_NORM_EPS = 1e-5  # torch's default: the decoder uses plain nn.LayerNorm
LAYER_NORM_2D_EPS = 1e-6


class Attention(nnx.Module):
    """Multi-head attention whose internal width may be downsampled (cross-attention)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, *, dtype,
                 rngs: nnx.Rngs):
        internal_dim = embedding_dim // downsample_rate
        if internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the internal width {internal_dim}")
        self.num_heads = num_heads
        self.q_proj = Linear(embedding_dim, internal_dim, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(embedding_dim, internal_dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(embedding_dim, internal_dim, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(internal_dim, embedding_dim, dtype=dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q: f32[B, Nq, C], k and v: f32[B, Nk, C] -> f32[B, Nq, C]."""
        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        attn = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
        out = jnp.einsum("bnqk,bknd->bqnd", softmax_f32(attn), v)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 skip_first_layer_pe: bool, *, dtype, rngs: nnx.Rngs):
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(embedding_dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(embedding_dim, TRANSFORMER_LAYER_NORM_EPS, dtype, rngs)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate,
                                                   dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(embedding_dim, TRANSFORMER_LAYER_NORM_EPS, dtype, rngs)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, jax.nn.relu, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(embedding_dim, TRANSFORMER_LAYER_NORM_EPS, dtype, rngs)
        self.norm4 = layer_norm(embedding_dim, TRANSFORMER_LAYER_NORM_EPS, dtype, rngs)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate,
                                                   dtype=dtype, rngs=rngs)

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            # The first layer replaces the queries (no residual) and skips their PE.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """Alternating token/image attention, then a final token->image attention."""

    def __init__(self, config: SamConfig, *, dtype, rngs: nnx.Rngs):
        d = config.prompt_embed_dim
        self.layers = nnx.List([
            TwoWayAttentionBlock(d, config.decoder_num_heads, config.decoder_mlp_dim,
                                 config.attention_downsample_rate, skip_first_layer_pe=(i == 0),
                                 dtype=dtype, rngs=rngs)
            for i in range(config.decoder_depth)
        ])
        self.final_attn_token_to_image = Attention(d, config.decoder_num_heads,
                                                   config.attention_downsample_rate,
                                                   dtype=dtype, rngs=rngs)
        self.norm_final_attn = layer_norm(d, TRANSFORMER_LAYER_NORM_EPS, dtype, rngs)

    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array,
                 point_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image_embedding, image_pe: f32[B, HW, C]; point_embedding: f32[B, T, C]
        -> (tokens f32[B, T, C], image f32[B, HW, C])."""
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nnx.Module):
    """num_layers Linear layers with ReLU between them (hypernetwork and IoU heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *,
                 dtype, rngs: nnx.Rngs):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List([Linear(a, b, dtype=dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def upsample_2x2(conv: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
    """A 2x2 transposed convolution of stride 2 (`conv`'s weights) as the matmul it is:
    x f32[B, h, w, C] -> f32[B, 2h, 2w, O]. Each output pixel gets one input pixel's
    contribution, so this is the same sum as the convolution. On XLA's CPU backend the
    convolutions' gradients were 27% of a decoder-mode step (bench/), the matmuls' are not
    among its top ops."""
    b, h, w, c = x.shape
    dtype = conv.dtype or x.dtype
    # kernel [2, 2, O, C] (torch's [C, O, 2, 2] transposed, weights/convert.py) -> [C, 2*2*O]
    kernel = conv.kernel[...].astype(dtype)
    out = dense(x.astype(dtype), kernel.transpose(3, 0, 1, 2).reshape(c, -1))
    out = out.reshape(b, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, -1)
    return out + conv.bias[...].astype(dtype)


class MaskDecoder(nnx.Module):
    """Predicts mask logits and their IoU from an image embedding and prompt embeddings."""

    def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
        d = config.prompt_embed_dim
        dtype = jnp.dtype(config.dtype)
        self.num_mask_tokens = config.num_mask_tokens
        self.transformer = TwoWayTransformer(config, dtype=dtype, rngs=rngs)
        self.iou_token = nnx.Embed(1, d, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, d, rngs=rngs)
        self.upscale_conv1 = nnx.ConvTranspose(d, d // 4, (2, 2), strides=(2, 2),
                                               padding="VALID", transpose_kernel=True,
                                               dtype=dtype, rngs=rngs)
        self.upscale_norm = layer_norm(d // 4, LAYER_NORM_2D_EPS, dtype, rngs)
        self.upscale_conv2 = nnx.ConvTranspose(d // 4, d // 8, (2, 2), strides=(2, 2),
                                               padding="VALID", transpose_kernel=True,
                                               dtype=dtype, rngs=rngs)
        self.output_hypernetworks_mlps = nnx.List([
            MLP(d, d, d // 8, 3, dtype=dtype, rngs=rngs) for _ in range(self.num_mask_tokens)
        ])
        self.iou_prediction_head = MLP(d, config.iou_head_hidden_dim, self.num_mask_tokens,
                                       config.iou_head_depth, dtype=dtype, rngs=rngs)

    def upscale(self, image: jax.Array) -> jax.Array:
        """f32[B, h, w, C] -> f32[B, 4h, 4w, C/8]."""
        x = gelu(self.upscale_norm(upsample_2x2(self.upscale_conv1, image)))
        return gelu(upsample_2x2(self.upscale_conv2, x))

    def predict_masks(self, image_embeddings: jax.Array, image_pe: jax.Array,
                      sparse_prompt_embeddings: jax.Array,
                      dense_prompt_embeddings: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
        """All mask tokens' outputs.

        image_embeddings: f32[B or 1, h, w, C] (one image is shared by B prompts, as the
        official decoder does); image_pe: f32[h, w, C]; sparse_prompt_embeddings:
        f32[B, N, C] (N may be 0); dense_prompt_embeddings: f32[B, h, w, C], or None for
        FedFMS's prompt-free mode where nothing is added.
        Returns masks f32[B, 4h, 4w, M] and iou_pred f32[B, M], M = num_mask_tokens.
        """
        b, n, d = sparse_prompt_embeddings.shape
        output_tokens = jnp.concatenate(
            [self.iou_token.embedding[...], self.mask_tokens.embedding[...]])
        tokens = jnp.concatenate(
            [jnp.broadcast_to(output_tokens.astype(sparse_prompt_embeddings.dtype),
                              (b,) + output_tokens.shape), sparse_prompt_embeddings], axis=1)
        _, h, w, _ = image_embeddings.shape
        src = jnp.broadcast_to(image_embeddings, (b, h, w, d))
        if dense_prompt_embeddings is not None:
            src = src + dense_prompt_embeddings
        pos_src = jnp.broadcast_to(image_pe.reshape(1, h * w, d), (b, h * w, d))
        hs, src = self.transformer(src.reshape(b, h * w, d), pos_src, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]
        upscaled = self.upscale(src.reshape(b, h, w, d))
        hyper_in = jnp.stack([mlp(mask_tokens_out[:, i])
                              for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
        masks = jnp.einsum("byxc,bmc->byxm", upscaled, hyper_in)
        return masks, self.iou_prediction_head(iou_token_out)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
                 sparse_prompt_embeddings: jax.Array,
                 dense_prompt_embeddings: jax.Array | None,
                 multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Low-res mask logits f32[B, 4h, 4w, M'] and IoU predictions f32[B, M'];
        M' = 3 (masks 1..3) with multimask_output, else 1 (mask 0)."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                                sparse_prompt_embeddings,
                                                dense_prompt_embeddings)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[..., selected], iou_pred[:, selected]
