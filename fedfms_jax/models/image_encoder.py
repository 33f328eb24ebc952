"""SAM's image encoder: a ViT with windowed and global attention, decomposed relative
positions and a convolutional neck; channels-last throughout.

images f32[B, S, S, 3] (normalised and padded) -> image embeddings f32[B, S/16, S/16, 256].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.adapters import Adapter, QkvLoRA
from fedfms_jax.models.common import Linear, MLPBlock, dense, gelu, layer_norm, softmax_f32
from fedfms_jax.models.variants import SamConfig

VIT_LAYER_NORM_EPS = 1e-6

# Rematerialisation of the encoder blocks under differentiation (jax.checkpoint per block):
#   off:    every intermediate of the forward is kept for the backward (fastest, most memory);
#   blocks: the block's linear-layer outputs (matmuls without batch dimensions) are kept, the
#           attention maps ([heads, tokens, tokens] per window or image: 0.8 GB per global
#           block of ViT-B at 1024) are recomputed in the backward;
#   full:   only each block's input is kept; the whole block is recomputed.
# With blocks or full, a global attention over more than QUERY_CHUNK tokens also runs over
# chunks of query rows, each under its own jax.checkpoint (Attention.query_chunk): the
# backward then holds one chunk's maps at a time, not the whole [heads, N, N] four times
# over (logits, probabilities and their gradients), for one more attention forward.
REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
REMAT_MODES = ("off", *REMAT_POLICIES)
QUERY_CHUNK = 1024  # tokens of query rows per chunk (ViT-B at 1024: 4 chunks of 16 x 64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings for every (query, key) pair along one axis.

    rel_pos: f32[L, head_dim] -> f32[q_size, k_size, head_dim]. The table is resized
    linearly (as torch's F.interpolate, no antialiasing) only when L != 2*max(q,k)-1.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = jax.image.resize(rel_pos, (max_rel_dist, rel_pos.shape[1]), "linear",
                                   antialias=False)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.astype(np.int64)]


def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """x: f32[B, H, W, C] -> windows f32[B*nW, ws, ws, C], padded size (Hp, Wp).

    Pads bottom/right with zeros to a multiple of the window, as official SAM does
    (after norm1, and the padding tokens are attended to, not masked).
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: f32[B*nW, ws, ws, C] -> f32[B, H, W, C]."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Attention(nnx.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], *, dtype,
                 rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 1.0):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.qkv_lora = (QkvLoRA(dim, 3 * dim, lora_rank, lora_alpha, dtype=dtype, rngs=rngs)
                         if lora_rank else None)
        self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        # Zero like the official init; pretrained checkpoints fill them.
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim)))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim)))
        # Tokens of query rows per chunk, 0 for one pass (an execution setting, static:
        # ImageEncoder.set_remat sets it on global attention).
        self.query_chunk = 0

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: f32[B, H, W, C] -> f32[B, H, W, C]."""
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        if self.qkv_lora is not None:
            qkv = qkv + self.qkv_lora(x)
        # Heads-major [3, B, heads, H, W, head_dim] as official SAM: with the head axis ahead
        # of the tokens every einsum below is a plain batched matmul, and XLA's CPU backend
        # runs the attention ~3x faster than with tokens-major operands (bench/).
        qkv = qkv.reshape(b, h, w, 3, self.num_heads, -1).transpose(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        k = k.reshape(b, self.num_heads, h * w, -1)
        v = v.reshape(b, self.num_heads, h * w, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h[...]).astype(q.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w[...]).astype(q.dtype)
        rows = query_chunk_rows(h, w, self.query_chunk)
        if rows == h:
            out = self._rows(q, rh, k, v, rw)
        else:
            # [chunks, ...] of `rows` grid rows each; every chunk recomputed in the backward.
            chunks = h // rows
            q_chunks = q.reshape(b, self.num_heads, chunks, rows, w, -1).transpose(2, 0, 1, 3,
                                                                                   4, 5)
            step = jax.checkpoint(lambda args: self._rows(*args, k, v, rw),
                                  policy=jax.checkpoint_policies.nothing_saveable)
            out = jax.lax.map(step, (q_chunks, rh.reshape(chunks, rows, h, -1)))
            out = out.transpose(1, 0, 2, 3, 4).reshape(b, h * w, self.num_heads, -1)
        return self.proj(out.reshape(b, h, w, c))

    def _rows(self, q: jax.Array, rh: jax.Array, k: jax.Array, v: jax.Array,
              rw: jax.Array) -> jax.Array:
        """Attention of some grid rows' queries over every key.

        q: f32[B, heads, r, W, hd] (r rows of the grid), rh: f32[r, H, hd] (those rows'
        relative positions), k, v: f32[B, heads, H*W, hd], rw: f32[W, W, hd]
        -> f32[B, r*W, heads, hd].
        """
        b, heads, r, w, _ = q.shape
        n = k.shape[2]
        attn = jnp.einsum("bnqd,bnkd->bnqk", q.reshape(b, heads, r * w, -1) * self.scale, k)
        # The bias uses the unscaled q, as in the official code.
        rel_h = jnp.einsum("bnyxd,ykd->bnyxk", q, rh)
        rel_w = jnp.einsum("bnyxd,xkd->bnyxk", q, rw)
        attn = attn.reshape(b, heads, r, w, n // w, w)
        attn = attn + rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]
        attn = softmax_f32(attn.reshape(b, heads, r * w, n))
        return jnp.einsum("bnqk,bnkd->bqnd", attn, v)


def query_chunk_rows(h: int, w: int, chunk: int) -> int:
    """Grid rows per query chunk: the most rows, dividing h, of at most `chunk` tokens
    (at least one row); h (one chunk, no loop) when chunk is 0 or the grid fits in one."""
    if not chunk or h * w <= chunk:
        return h
    return max(r for r in range(1, h + 1) if h % r == 0 and (r * w <= chunk or r == 1))


class Block(nnx.Module):
    """ViT block: (windowed or global) attention and MLP, each pre-norm with a residual.

    With the Medical SAM Adapter (adapter_hidden_dim > 0):
        x = x + space_adapter(attn(norm1(x)))                  # serial, with skip
        x = x + mlp(norm2(x)) + scale * mlp_adapter(norm2(x))  # parallel, no skip
    Windows are padded after norm1 as in official SAM (upstream pads before norm1); the
    adapters act per token, so it makes no difference where they sit relative to the windows.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 input_size: tuple[int, int], *, dtype, rngs: nnx.Rngs,
                 adapter_hidden_dim: int = 0, adapter_scale: float = 0.5,
                 adapter_init: str = "torch_default", lora_rank: int = 0,
                 lora_alpha: float = 1.0):
        self.window_size = window_size
        self.norm1 = layer_norm(dim, VIT_LAYER_NORM_EPS, dtype, rngs)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, attn_size, dtype=dtype, rngs=rngs,
                              lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.norm2 = layer_norm(dim, VIT_LAYER_NORM_EPS, dtype, rngs)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), gelu, dtype=dtype, rngs=rngs)
        self.adapter_scale = adapter_scale
        if adapter_hidden_dim:
            self.space_adapter = Adapter(dim, adapter_hidden_dim, skip_connect=True,
                                         init=adapter_init, dtype=dtype, rngs=rngs)
            self.mlp_adapter = Adapter(dim, adapter_hidden_dim, skip_connect=False,
                                       init=adapter_init, dtype=dtype, rngs=rngs)
        else:
            self.space_adapter = self.mlp_adapter = None

    def attention(self, x: jax.Array) -> jax.Array:
        """norm1 then attention, over windows or the whole grid; x: f32[B, H, W, C]."""
        x = self.norm1(x)
        if self.window_size == 0:
            return self.attn(x)
        h, w = x.shape[1], x.shape[2]
        windows, pad_hw = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, pad_hw, (h, w))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: f32[B, H, W, C] -> f32[B, H, W, C]."""
        attended = self.attention(x)
        if self.space_adapter is not None:
            attended = self.space_adapter(attended)
        x = x + attended
        normed = self.norm2(x)
        out = x + self.mlp(normed)
        if self.mlp_adapter is not None:
            out = out + self.adapter_scale * self.mlp_adapter(normed)
        return out


def _remat_blocks(blocks, x: jax.Array, remat: str) -> jax.Array:
    """The blocks applied to x under jax.checkpoint with the remat mode's policy.

    SAM's blocks repeat with a period (ViT-B: window, window, global), so the periods run as
    one lax.scan over groups of blocks: the backward then recomputes one group at a time.
    Unrolled, XLA's CPU scheduler moves every recomputation ahead and keeps all of them
    alive, which saves nothing. A pure function of the blocks' states: the engine calls the
    model inside its own jax.grad, outside any NNX transform.
    """
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    period = next(p for p in range(1, len(blocks) + 1) if len(blocks) % p == 0 and all(
        graphdefs[i] == graphdefs[i % p] for i in range(len(blocks))))
    stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves), *states[i::period])
               for i in range(period)]

    def group(x, group_states):
        for graphdef, state in zip(graphdefs[:period], group_states):
            x = nnx.merge(graphdef, state)(x)
        return x, None

    x, _ = jax.lax.scan(jax.checkpoint(group, policy=REMAT_POLICIES[remat]), x, stacked)
    return x


class ImageEncoder(nnx.Module):
    """SAM's ViT image encoder (ImageEncoderViT)."""

    def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        d, grid = config.embed_dim, config.embedding_size
        p = config.patch_size
        self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                                    rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, d)))
        self.blocks = nnx.List([
            Block(d, config.num_heads, config.mlp_ratio,
                  0 if i in config.global_attn_indexes else config.window_size,
                  (grid, grid), dtype=dtype, rngs=rngs,
                  adapter_hidden_dim=config.adapter_hidden_dim if config.adapter == "msa" else 0,
                  adapter_scale=config.adapter_scale, adapter_init=config.adapter_init,
                  lora_rank=config.lora_rank if config.has_lora(i) else 0,
                  lora_alpha=config.lora_alpha)
            for i in range(config.depth)
        ])
        out = config.prompt_embed_dim
        self.neck_conv1 = nnx.Conv(d, out, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
        self.neck_norm1 = layer_norm(out, VIT_LAYER_NORM_EPS, dtype, rngs)
        self.neck_conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                   dtype=dtype, rngs=rngs)
        self.neck_norm2 = layer_norm(out, VIT_LAYER_NORM_EPS, dtype, rngs)
        # An execution setting, not part of the model: static, so jit retraces on a change.
        self.remat = "off"

    def set_remat(self, mode: str) -> None:
        """The blocks' rematerialisation (REMAT_MODES), and with it the global attention's
        query chunks (QUERY_CHUNK with blocks or full, none with off)."""
        if mode not in REMAT_MODES:
            raise ValueError(f"unknown remat mode {mode!r}; expected one of "
                             f"{', '.join(REMAT_MODES)}")
        self.remat = mode
        for block in self.blocks:
            if block.window_size == 0:
                block.attn.query_chunk = 0 if mode == "off" else QUERY_CHUNK

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """patch_embed (a p x p conv with stride p) as the matmul it is: images f32[B, S, S, 3]
        -> f32[B, S/p, S/p, D]. Same numbers as the conv; ~1.8x faster on XLA's CPU backend."""
        conv = self.patch_embed
        b, height, width, c = images.shape
        p = conv.kernel_size[0]
        dtype = conv.dtype or images.dtype
        patches = images.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, height // p, width // p, p * p * c).astype(dtype)
        kernel = conv.kernel[...].astype(dtype).reshape(p * p * c, -1)  # [p, p, c, D] row-major
        return dense(patches, kernel) + conv.bias[...].astype(dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: f32[B, S, S, 3] -> image_embeddings f32[B, S/p, S/p, prompt_embed_dim]."""
        x = self.embed_patches(images) + self.pos_embed[...].astype(images.dtype)
        if self.remat == "off":
            for block in self.blocks:
                x = block(x)
        else:
            x = _remat_blocks(list(self.blocks), x, self.remat)
        x = self.neck_norm1(self.neck_conv1(x))
        return self.neck_norm2(self.neck_conv2(x))

