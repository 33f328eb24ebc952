"""Converts official Segment Anything checkpoints (PyTorch state_dicts) to fedfms_jax
weights files, and back.

    python weights/convert.py sam_vit_b_01ec64.pth sam_vit_b.safetensors [--variant auto]
    python weights/convert.py sam_vit_b.safetensors sam_vit_b.pth --to-torch

FedFMS / Medical-SAM-Adapter checkpoints convert the same way: their Space_Adapter and
MLP_Adapter weights land in the adapter model (the config, stored in the file, records the
adapter settings read off the tensors), and the 3-D-only Depth_Adapter is reported and skipped.

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

from fedfms_jax.data.preprocessing import Preprocessing
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
    # A bias-free Linear stored as a bare (in, out) matrix: LoRA's A and B.
    "lora": [("weight", "", (1, 0))],
}

# Placeholders in MODULES patterns.
FIELDS = {
    "i": r"\d+",
    "n": r"\d+",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "proj": r"q_proj|k_proj|v_proj|out_proj",
    "leaf": r"weight|bias",
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
    # Medical SAM Adapter (FedMSA) and LoRA on qkv (PEFT's lora_A / lora_B names).
    ("image_encoder.blocks.{i}.Space_Adapter.D_fc{n}",
     "image_encoder.blocks.{i}.space_adapter.fc{n}", "linear"),
    ("image_encoder.blocks.{i}.MLP_Adapter.D_fc{n}", "image_encoder.blocks.{i}.mlp_adapter.fc{n}",
     "linear"),
    ("image_encoder.blocks.{i}.attn.qkv.lora_A", "image_encoder.blocks.{i}.attn.qkv_lora.lora_a",
     "lora"),
    ("image_encoder.blocks.{i}.attn.qkv.lora_B", "image_encoder.blocks.{i}.attn.qkv_lora.lora_b",
     "lora"),
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
    # FedFMS's multi-class head: a 1x1 conv from the mask tokens' maps to the classes.
    ("class_head", "class_head", "conv"),
]

# Source tensors that are known and deliberately not converted: (pattern, why). They are
# reported, never silently dropped; anything else unmatched is an error.
SKIPPED = [
    ("image_encoder.blocks.{i}.Depth_Adapter.D_fc{n}.{leaf}",
     "Depth_Adapter (Medical SAM Adapter's 3-D branch, unused by 2-D FedFMS)"),
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


def infer_peft(state_dict: dict[str, np.ndarray], embed_dim: int, depth: int) -> dict:
    """Config settings for the adapters, LoRA and class head found in a torch state_dict
    (none found: {}). Settings that no tensor shows (adapter_scale, lora_alpha) keep their
    defaults."""
    def matches(pattern: str) -> dict[int, tuple[int, ...]]:
        return {int(m.group(1)): value.shape for key, value in state_dict.items()
                if (m := re.fullmatch(pattern, key))}

    found = {}
    adapters = matches(r"image_encoder\.blocks\.(\d+)\.(?:Space|MLP)_Adapter\.D_fc1\.weight")
    if adapters:
        widths = sorted({shape[0] for shape in adapters.values()})
        if len(widths) > 1:
            raise ConversionError(f"adapters of different widths {widths}; expected one")
        found.update(adapter="msa", adapter_ratio=widths[0] / embed_dim)
    lora = matches(r"image_encoder\.blocks\.(\d+)\.attn\.qkv\.lora_A\.weight")
    if lora:
        ranks = sorted({shape[0] for shape in lora.values()})
        if len(ranks) > 1:
            raise ConversionError(f"LoRA of different ranks {ranks}; expected one")
        blocks = tuple(sorted(lora))
        found.update(lora_rank=ranks[0],
                     lora_blocks=None if blocks == tuple(range(depth)) else blocks)
    if "class_head.weight" in state_dict:
        found["num_classes"] = state_dict["class_head.weight"].shape[0]
    return found


def infer_config(state_dict: dict[str, np.ndarray]) -> SamConfig:
    """The SAM variant whose shapes the torch state_dict has, with its adapters, LoRA and
    class head if it has them.

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
            return config.replace(**infer_peft(state_dict, config.embed_dim, config.depth))
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


def skip_known_unused(state_dict: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Splits off the SKIPPED tensors: (the rest, {reason: skipped keys})."""
    rules = [(_compile(pattern), reason) for pattern, reason in SKIPPED]
    kept, skipped = {}, {}
    for key, value in state_dict.items():
        reason = next((why for regex, why in rules if regex.match(key)), None)
        if reason is None:
            kept[key] = value
        else:
            skipped.setdefault(reason, []).append(key)
    return kept, skipped


def torch_to_flax(state_dict: dict[str, np.ndarray], variant: str = "auto", *,
                  lora_alpha: float | None = None, report=print
                  ) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Official SAM (or FedFMS / Medical-SAM-Adapter) state_dict -> (flat Flax tensors,
    config), checked strictly. Known-unused tensors (SKIPPED) are passed to `report`, one
    line per kind; lora_alpha, which no tensor shows, sets the LoRA scaling."""
    state_dict, skipped = skip_known_unused(state_dict)
    for reason, keys in skipped.items():
        report(f"skipped {len(keys)} tensors of the {reason}: {', '.join(sorted(keys)[:4])}"
               + (", ..." if len(keys) > 4 else ""))
    try:
        if variant == "auto":
            config = infer_config(state_dict)
        else:
            base = VARIANTS[variant]
            config = base.replace(**infer_peft(state_dict, base.embed_dim, base.depth))
        if lora_alpha is not None:
            config = config.replace(lora_alpha=lora_alpha)
    except ConversionError:
        raise
    except ValueError as error:  # settings read off the tensors that no model can have
        raise ConversionError(f"checkpoint: {error}") from None
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
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA alpha of a checkpoint with LoRA (the tensors do not show it)")
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
            tensors, config = torch_to_flax(load_torch_state_dict(args.src), args.variant,
                                            lora_alpha=args.lora_alpha)
            # A plain SAM checkpoint is applied as official SAM applies it; one with
            # adapters, LoRA or a class head was trained elsewhere in ways its tensors do not
            # record, so it carries no preprocessing and predict asks for it.
            plain = (config.adapter == "none" and not config.lora_rank
                     and config.num_classes == 1)
            preprocessing = (Preprocessing.official_sam(config.image_size, config.low_res_size)
                             if plain else None)
            save_weights(args.dst, tensors, config, {"source": args.src.name},
                         preprocessing=preprocessing)
            count = sum(v.size for v in tensors.values())
            extras = [f"adapter={config.adapter}"] if config.adapter != "none" else []
            extras += [f"lora_rank={config.lora_rank}"] if config.lora_rank else []
            extras += [f"num_classes={config.num_classes}"] if config.num_classes > 1 else []
            print(f"wrote {len(tensors)} tensors, {count:,} values "
                  f"({', '.join([config.variant] + extras)}) to {args.dst}")
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
