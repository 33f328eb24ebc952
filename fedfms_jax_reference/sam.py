"""The official PyTorch SAM (PyPI `segment-anything`) built from a SamConfig, with every
parameter and buffer set to random values, for parity tests and benchmarks.

The package's `__init__` imports torchvision, which does not import beside the CPU torch;
only `segment_anything.modeling` is needed, so the package is registered empty first.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedfms_jax.models import SamConfig


def _modeling():
    # Keyed on the package, not on .modeling: importing MONAI leaves segment_anything.modeling
    # in sys.modules without its parent (a failed optional import of the whole package).
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed (pip install -e '.[test]')")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("segment_anything", package)
    import segment_anything.modeling as modeling

    return modeling


def modeling():
    """The official `segment_anything.modeling` module."""
    return _modeling()


def build_torch_sam(config: SamConfig, seed: int = 0, randomise_values: bool = True
                    ) -> torch.nn.Module:
    """The official Sam with the config's shapes, every tensor random (seeded); with
    randomise_values=False the official init (or, under torch.device("meta"), none)."""
    m = _modeling()
    grid = config.embedding_size
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=config.image_size, patch_size=config.patch_size,
            embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, out_chans=config.prompt_embed_dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            window_size=config.window_size, global_attn_indexes=config.global_attn_indexes),
        prompt_encoder=m.PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
                attention_downsample_rate=config.attention_downsample_rate),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
    )
    if randomise_values:
        randomise(sam, seed)
    return sam.eval()


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values for every tensor, scaled so activations stay O(1).

    The official init leaves pos_embed, rel_pos tables, norms and biases at constants, so a
    parity test on it would not check those paths.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if "rel_pos" in name or "pos_embed" in name:
                value = 0.5 * noise
            elif tensor.ndim == 1 and leaf == "weight":  # norm scales
                value = 1.0 + 0.2 * noise
            elif leaf == "bias":
                value = 0.1 * noise
            elif tensor.ndim >= 2 and "embed" not in name and "tokens" not in name \
                    and "gaussian" not in name:
                fan_in = tensor.shape[1] * int(np.prod(tensor.shape[2:]))
                if "output_upscaling" in name:  # ConvTranspose2d: (in, out, kH, kW)
                    fan_in = tensor.shape[0]
                value = noise / np.sqrt(fan_in)
            else:  # embeddings, tokens, the Gaussian PE matrix
                value = noise
            tensor.copy_(value)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state_dict as numpy arrays, as a checkpoint file holds it."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
