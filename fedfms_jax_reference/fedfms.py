"""A PyTorch reference for the FedFMS model: the official SAM (fedfms_jax_reference/sam.py) with the
upstream Medical SAM Adapter formula in every encoder block, PEFT-style LoRA on qkv and the
multi-class 1x1 conv, built from a SamConfig with random weights.

Checkpoint key names are upstream's: blocks.N.{Space_Adapter,MLP_Adapter,Depth_Adapter}.
{D_fc1,D_fc2}, attn.qkv.{lora_A,lora_B}, class_head.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfms_jax.models import SamConfig
from fedfms_jax_reference.sam import build_torch_sam, modeling, randomise


class TorchAdapter(nn.Module):
    """Medical-SAM-Adapter's Adapter: D_fc2(GELU(D_fc1(x))), plus x when skip_connect."""

    def __init__(self, dim: int, hidden: int, skip_connect: bool = True):
        super().__init__()
        self.skip_connect = skip_connect
        self.act = nn.GELU()
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        xs = self.D_fc2(self.act(self.D_fc1(x)))
        return x + xs if self.skip_connect else xs


class TorchLoRAQkv(nn.Linear):
    """The qkv Linear plus (alpha / rank) * lora_B(lora_A(x)), with PEFT's names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x):
        return super().forward(x) + self.scaling * self.lora_B(self.lora_A(x))


def adapter_block_class():
    """The official ViT Block with upstream's adapter forward. Windows are padded after norm1
    as official SAM does (upstream pads before); the space adapter runs inside the windows,
    as upstream."""
    image_encoder = modeling().image_encoder

    class AdapterBlock(image_encoder.Block):
        def forward(self, x):
            shortcut = x
            x = self.norm1(x)
            if self.window_size > 0:
                h, w = x.shape[1], x.shape[2]
                x, pad_hw = image_encoder.window_partition(x, self.window_size)
            x = self.Space_Adapter(self.attn(x))
            if self.window_size > 0:
                x = image_encoder.window_unpartition(x, self.window_size, pad_hw, (h, w))
            x = shortcut + x
            xn = self.norm2(x)
            return x + self.mlp(xn) + self.scale * self.MLP_Adapter(xn)

    return AdapterBlock


def build_torch_fedfms(config: SamConfig, seed: int = 0, depth_adapter: bool = False
                       ) -> nn.Module:
    """Official SAM plus the config's adapters / LoRA / class head, every tensor random.
    depth_adapter adds upstream's (unused in 2-D) Depth_Adapter to every adapted block."""
    sam = build_torch_sam(config, seed)
    block_class = adapter_block_class()
    d, hidden = config.embed_dim, config.adapter_hidden_dim
    for i, block in enumerate(sam.image_encoder.blocks):
        if config.adapter == "msa":
            block.__class__ = block_class
            block.Space_Adapter = TorchAdapter(d, hidden, skip_connect=True)
            block.MLP_Adapter = TorchAdapter(d, hidden, skip_connect=False)
            if depth_adapter:
                block.Depth_Adapter = TorchAdapter(d, hidden, skip_connect=False)
            block.scale = config.adapter_scale
        if config.has_lora(i):
            block.attn.qkv = TorchLoRAQkv(block.attn.qkv, config.lora_rank, config.lora_alpha)
    if config.num_classes > 1:
        sam.class_head = nn.Conv2d(config.num_mask_tokens, config.num_classes, 1)
    randomise(sam, seed)
    return sam.eval()


@torch.no_grad()
def torch_segment(sam: nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FedFMS's prompt-free forward: images [B, 3, S, S] -> logits [B, C, L, L].

    One image at a time: the official decoder repeats the embedding per prompt set.
    """
    outputs = []
    for image in images:
        embedding = sam.image_encoder(image[None])
        sparse = torch.zeros(1, 0, embedding.shape[1])
        masks, _ = sam.mask_decoder.predict_masks(
            embedding, sam.prompt_encoder.get_dense_pe(), sparse, torch.zeros_like(embedding))
        outputs.append(sam.class_head(masks) if num_classes > 1 else masks[:, :1])
    return torch.cat(outputs)
