"""Converts official Segment Anything checkpoints (PyTorch state_dicts) to fedfms_jax
weights files, and back.

    python weights/convert.py sam_vit_b_01ec64.pth sam_vit_b.safetensors [--variant auto]
    python weights/convert.py sam_vit_b.safetensors sam_vit_b.pth --to-torch

One table (MODULES) says where each torch module lands in the Flax model and what kind
of layer it is; the kind says how each of its tensors is renamed and transposed. The
same table runs both ways, so the round trip is exact. Conversion is strict: every source
tensor must be consumed and every model leaf filled with the right shape.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from fedfms_jax.models import VARIANTS, SamConfig
from fedfms_jax.weights_file import (WeightsError, check_shapes, expected_shapes,
                                     read_weights, save_weights)

# Layer kinds: (torch leaf, flax leaf, torch -> flax axis permutation or None).
# Linear (out, in) -> kernel (in, out); Conv OIHW -> HWIO; ConvTranspose2d stores
# (in, out, kH, kW), and (2, 3, 1, 0) with transpose_kernel=True reproduces torch.
LEAVES = {
    "linear": [("weight", "kernel", (1, 0)), ("bias", "bias", None)],
    "conv": [("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", None)],
    "conv_transpose": [("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", None)],
    "norm": [("weight", "scale", None), ("bias", "bias", None)],
    "embedding": [("weight", "embedding", None)],
    "param": [("", "", None)],
}

# Placeholders in MODULES patterns.
FIELDS = {
    "i": r"\d+",
    "n": r"\d+",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "proj": r"q_proj|k_proj|v_proj|out_proj",
}

# (torch module, flax module, kind).
MODULES = [
    ("image_encoder.patch_embed.proj", "image_encoder.patch_embed", "conv"),
    ("image_encoder.pos_embed", "image_encoder.pos_embed", "param"),
    ("image_encoder.blocks.{i}.norm{n}", "image_encoder.blocks.{i}.norm{n}", "norm"),
    ("image_encoder.blocks.{i}.attn.qkv", "image_encoder.blocks.{i}.attn.qkv", "linear"),
    ("image_encoder.blocks.{i}.attn.proj", "image_encoder.blocks.{i}.attn.proj", "linear"),
    ("image_encoder.blocks.{i}.attn.rel_pos_h", "image_encoder.blocks.{i}.attn.rel_pos_h", "param"),
    ("image_encoder.blocks.{i}.attn.rel_pos_w", "image_encoder.blocks.{i}.attn.rel_pos_w", "param"),
    ("image_encoder.blocks.{i}.mlp.lin{n}", "image_encoder.blocks.{i}.mlp.lin{n}", "linear"),
    ("image_encoder.neck.0", "image_encoder.neck_conv1", "conv"),
    ("image_encoder.neck.1", "image_encoder.neck_norm1", "norm"),
    ("image_encoder.neck.2", "image_encoder.neck_conv2", "conv"),
    ("image_encoder.neck.3", "image_encoder.neck_norm2", "norm"),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "param"),
    ("prompt_encoder.point_embeddings.{i}", "prompt_encoder.point_embeddings.{i}", "embedding"),
    ("prompt_encoder.not_a_point_embed", "prompt_encoder.not_a_point_embed", "embedding"),
    ("prompt_encoder.no_mask_embed", "prompt_encoder.no_mask_embed", "embedding"),
    ("prompt_encoder.mask_downscaling.0", "prompt_encoder.mask_conv1", "conv"),
    ("prompt_encoder.mask_downscaling.1", "prompt_encoder.mask_norm1", "norm"),
    ("prompt_encoder.mask_downscaling.3", "prompt_encoder.mask_conv2", "conv"),
    ("prompt_encoder.mask_downscaling.4", "prompt_encoder.mask_norm2", "norm"),
    ("prompt_encoder.mask_downscaling.6", "prompt_encoder.mask_conv3", "conv"),
    ("mask_decoder.transformer.layers.{i}.{attn}.{proj}",
     "mask_decoder.transformer.layers.{i}.{attn}.{proj}", "linear"),
    ("mask_decoder.transformer.layers.{i}.norm{n}", "mask_decoder.transformer.layers.{i}.norm{n}",
     "norm"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin{n}",
     "mask_decoder.transformer.layers.{i}.mlp.lin{n}", "linear"),
    ("mask_decoder.transformer.final_attn_token_to_image.{proj}",
     "mask_decoder.transformer.final_attn_token_to_image.{proj}", "linear"),
    ("mask_decoder.transformer.norm_final_attn", "mask_decoder.transformer.norm_final_attn", "norm"),
    ("mask_decoder.iou_token", "mask_decoder.iou_token", "embedding"),
    ("mask_decoder.mask_tokens", "mask_decoder.mask_tokens", "embedding"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1", "conv_transpose"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_norm", "norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2", "conv_transpose"),
    ("mask_decoder.output_hypernetworks_mlps.{i}.layers.{n}",
     "mask_decoder.output_hypernetworks_mlps.{i}.layers.{n}", "linear"),
    ("mask_decoder.iou_prediction_head.layers.{i}", "mask_decoder.iou_prediction_head.layers.{i}",
     "linear"),
]


class ConversionError(WeightsError):
    """A checkpoint that does not convert cleanly; the message lists every culprit."""


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for name, field in FIELDS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{field})")
    return re.compile(regex + r"\Z")


def _rules(reverse: bool) -> list[tuple[re.Pattern, str, tuple | None]]:
    """(source regex, target template, permutation) for every module leaf, in one direction."""
    rules = []
    for torch_module, flax_module, kind in MODULES:
        for torch_leaf, flax_leaf, perm in LEAVES[kind]:
            source, target = _join(torch_module, torch_leaf), _join(flax_module, flax_leaf)
            if reverse:
                source, target = target, source
                perm = None if perm is None else tuple(np.argsort(perm))
            rules.append((_compile(source), target, perm))
    return rules


def rename(tensors: dict[str, np.ndarray], reverse: bool = False
           ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Applies the table: torch keys -> Flax paths (or back with reverse=True).

    Returns the converted tensors and the source keys that no rule matched.
    """
    rules = _rules(reverse)
    converted, unmatched = {}, []
    for key, value in tensors.items():
        for regex, template, perm in rules:
            match = regex.match(key)
            if match:
                value = np.asarray(value)
                converted[template.format(**match.groupdict())] = (
                    value if perm is None else np.ascontiguousarray(value.transpose(perm)))
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def infer_config(state_dict: dict[str, np.ndarray]) -> SamConfig:
    """The SAM variant whose shapes the torch state_dict has.

    Every shape that the official variants differ in is read off the tensors; a state_dict
    that matches none of them raises, naming what was found.
    """
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]
        pos_embed = state_dict["image_encoder.pos_embed"]
    except KeyError as error:
        raise ConversionError(f"not a SAM checkpoint: no {error.args[0]} tensor") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict
                    if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    grid = pos_embed.shape[1]
    global_blocks = tuple(i for i in range(depth)
                          if state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]
                          == 2 * grid - 1)
    found = {"embed_dim": patch.shape[0], "patch_size": patch.shape[2],
             "image_size": grid * patch.shape[2], "depth": depth,
             "global_attn_indexes": global_blocks}
    for variant, config in VARIANTS.items():
        if all(getattr(config, name) == value for name, value in found.items()):
            return config
    raise ConversionError(f"the checkpoint's shapes {found} match no known variant "
                          f"({', '.join(VARIANTS)}); pass --variant")


def load_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as float32 numpy arrays. Accepts a plain state_dict or one
    wrapped under 'model'/'state_dict', with or without DataParallel's 'module.' prefix."""
    import torch  # only needed here: the rest of the project runs without torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise ConversionError(f"{path} is not a state_dict of tensors")
    return {k.removeprefix("module."): v.detach().float().numpy() for k, v in checkpoint.items()}


def torch_to_flax(state_dict: dict[str, np.ndarray], variant: str = "auto"
                  ) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Official SAM state_dict -> (flat Flax tensors, config), checked strictly."""
    config = infer_config(state_dict) if variant == "auto" else VARIANTS[variant]
    tensors, unmatched = rename(state_dict)
    expected = expected_shapes(config)
    try:
        check_shapes(tensors, expected, f"checkpoint (as {config.variant})")
    except WeightsError as error:
        message = str(error)
    else:
        message = None
    if unmatched or message:
        lines = [message or f"checkpoint (as {config.variant}):"]
        if unmatched:
            lines.append(f"  {len(unmatched)} source tensors no rule consumes:\n    "
                         + "\n    ".join(sorted(unmatched)[:20]))
        raise ConversionError("\n".join(lines))
    return tensors, config


def flax_to_torch(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat Flax tensors -> official SAM state_dict (exact inverse of torch_to_flax)."""
    state_dict, unmatched = rename(tensors, reverse=True)
    if unmatched:
        raise ConversionError("no torch name for: " + ", ".join(sorted(unmatched)))
    return state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="official SAM .pth (or, with --to-torch, a .safetensors)")
    parser.add_argument("dst", type=Path, help="output .safetensors (or .pth with --to-torch)")
    parser.add_argument("--variant", default="auto", choices=["auto", *VARIANTS],
                        help="model variant; auto reads it off the tensor shapes")
    parser.add_argument("--to-torch", action="store_true",
                        help="write a fedfms_jax weights file back as a PyTorch state_dict")
    args = parser.parse_args(argv)
    try:
        if args.to_torch:
            import torch

            config, tensors = read_weights(args.src)
            state_dict = {k: torch.from_numpy(v) for k, v in flax_to_torch(tensors).items()}
            args.dst.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state_dict, args.dst)
            print(f"wrote {len(state_dict)} tensors ({config.variant}) to {args.dst}")
        else:
            if not args.src.is_file():
                raise ConversionError(f"checkpoint {args.src} does not exist")
            tensors, config = torch_to_flax(load_torch_state_dict(args.src), args.variant)
            save_weights(args.dst, tensors, config,
                         {"source": args.src.name})
            count = sum(v.size for v in tensors.values())
            print(f"wrote {len(tensors)} tensors, {count:,} values ({config.variant}) to {args.dst}")
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
