"""SAM model settings: the official ViT-B/L/H variants and small test variants.

A `SamConfig` fully describes a model's shapes, so a weights file that stores one in its
metadata can rebuild its model with no other argument.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


ADAPTERS = ("none", "msa")
ADAPTER_INITS = ("torch_default", "zero")


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Shapes and options of one SAM model (image encoder, prompt encoder, mask decoder)."""

    variant: str = "vit_b"
    # Image encoder (ViT).
    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    # Shared prompt/decoder width (the neck's out_chans).
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    # Mask decoder.
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Compute dtype ("float32" or "bfloat16"); parameters always stay float32.
    dtype: str = "float32"
    # Medical SAM Adapter in every encoder block: "none" (plain SAM) or "msa" (a serial
    # space adapter after attention and a parallel MLP adapter, as upstream).
    adapter: str = "none"
    adapter_ratio: float = 0.25  # hidden width / embed_dim (192 for ViT-B)
    adapter_scale: float = 0.5   # weight of the parallel MLP adapter
    # "torch_default": torch's nn.Linear init, as upstream; "zero": the up-projections start at
    # zero, so the adapted model computes exactly the pretrained function at step 0.
    adapter_init: str = "torch_default"
    # LoRA on the attention qkv projection; rank 0 means none. The update is
    # (alpha / rank) * x A B with B zero at init, so step 0 is the base model.
    lora_rank: int = 0
    lora_alpha: float = 4.0
    lora_blocks: tuple[int, ...] | None = None  # encoder blocks with LoRA; None = all
    # Output classes of `Sam.segment`: 1 uses mask token 0; more add FedFMS's 1x1 conv
    # from the mask tokens' maps to the classes.
    num_classes: int = 1

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; known: {', '.join(ADAPTERS)}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; "
                             f"known: {', '.join(ADAPTER_INITS)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        bad_blocks = [i for i in self.lora_blocks or () if not 0 <= i < self.depth]
        if bad_blocks:
            raise ValueError(f"lora_blocks {bad_blocks} are outside the {self.depth} "
                             "encoder blocks")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def adapter_hidden_dim(self) -> int:
        """Width of each adapter's bottleneck (upstream: int(embed_dim * ratio))."""
        # The epsilon keeps a ratio read back from a checkpoint (hidden / D) from flooring
        # to hidden - 1 through float rounding.
        return int(self.embed_dim * self.adapter_ratio + 1e-6)

    def has_lora(self, block: int) -> bool:
        """Whether encoder block `block` carries LoRA on its qkv projection."""
        return self.lora_rank > 0 and (self.lora_blocks is None or block in self.lora_blocks)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for a 1024 input)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (256 for a 1024 input)."""
        return 4 * self.embedding_size

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    def replace(self, **changes: Any) -> "SamConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields {unknown}; is the file from a newer fedfms_jax?")
        fields["global_attn_indexes"] = tuple(fields.get("global_attn_indexes", ()))
        if fields.get("lora_blocks") is not None:
            fields["lora_blocks"] = tuple(fields["lora_blocks"])
        return cls(**fields)


VARIANTS: dict[str, SamConfig] = {
    "vit_b": SamConfig(variant="vit_b", embed_dim=768, depth=12, num_heads=12,
                       global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamConfig(variant="vit_l", embed_dim=1024, depth=24, num_heads=16,
                       global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(variant="vit_h", embed_dim=1280, depth=32, num_heads=16,
                       global_attn_indexes=(7, 15, 23, 31)),
    # Small variants for tests and the CPU demo: every code path of the big ones
    # (window padding 8 -> 9, global blocks, multimask) at a fraction of the cost.
    "tiny": SamConfig(variant="tiny", image_size=128, patch_size=16, embed_dim=64, depth=2,
                      num_heads=4, window_size=3, global_attn_indexes=(1,),
                      prompt_embed_dim=32, decoder_num_heads=4, decoder_mlp_dim=64,
                      iou_head_hidden_dim=32),
    "small": SamConfig(variant="small", image_size=256, patch_size=16, embed_dim=128, depth=4,
                       num_heads=4, window_size=7, global_attn_indexes=(1, 3),
                       prompt_embed_dim=64, decoder_num_heads=8, decoder_mlp_dim=256,
                       iou_head_hidden_dim=64),
}


def get_config(variant: str, **overrides: Any) -> SamConfig:
    """The named variant's settings, with any field overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant].replace(**overrides)
