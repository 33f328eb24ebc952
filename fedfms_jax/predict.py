"""Segment one image with SAM from box and/or point prompts given in original pixels.

    python -m fedfms_jax.predict --weights sam_vit_b.safetensors --image scan.png \
        --box 40,60,200,220 [--point 120,140,1 ...] [--multimask] --out mask.png \
        [--save-logits logits.npy]

Writes the binary mask at the image's original size (the highest-IoU mask with
--multimask), prints the predicted IoUs, and optionally saves the selected low-resolution
logits as float32 [N, L, L] (N = 3 with --multimask, else 1; L = 256 for a 1024 model).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from fedfms_jax.models import Sam, postprocess_masks, preprocess, transform_coords
from fedfms_jax.weights_file import WeightsError, load_sam


class InputError(ValueError):
    """A bad image or prompt; the message names it."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    masks: np.ndarray  # bool[H, W, M] at the original size
    iou_predictions: np.ndarray  # f32[M]
    low_res_logits: np.ndarray  # f32[L, L, M]


def read_image(path: Path) -> np.ndarray:
    """Any PIL-readable image (grey, RGB, 16-bit) -> uint8 [H, W, 3]."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"cannot read image {path}: {error}") from None
    array = np.asarray(image)
    if array.dtype != np.uint8:  # 16-bit or float: stretch the value range to 0..255
        array = array.astype(np.float64)
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError(f"image {path} has shape {array.shape}; expected grey, RGB or RGBA")
    return np.ascontiguousarray(array[..., :3])


def parse_numbers(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{what} {text!r}: expected {count} comma-separated numbers")
    return values


def check_prompts(boxes: np.ndarray | None, points: np.ndarray | None,
                  labels: np.ndarray | None, size: tuple[int, int]) -> None:
    """Raises InputError naming the first prompt outside the image or malformed."""
    h, w = size
    if boxes is not None:
        x0, y0, x1, y1 = boxes
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise InputError(f"box {x0:g},{y0:g},{x1:g},{y1:g} must satisfy 0 <= x0 < x1 <= {w} "
                             f"and 0 <= y0 < y1 <= {h} (the image is {w}x{h})")
    if points is not None:
        for (x, y), label in zip(points, labels):
            if not (0 <= x <= w and 0 <= y <= h):
                raise InputError(f"point {x:g},{y:g} lies outside the {w}x{h} image")
            if label not in (0, 1):
                raise InputError(f"point {x:g},{y:g} has label {label:g}; use 1 (foreground) or "
                                 "0 (background)")


@nnx.jit(static_argnames=("multimask_output",))
def _forward(model: Sam, image, point_coords, point_labels, boxes, multimask_output: bool):
    return model(image, point_coords=point_coords, point_labels=point_labels, boxes=boxes,
                 multimask_output=multimask_output)


def predict(model: Sam, image: np.ndarray, *, box: np.ndarray | None = None,
            points: np.ndarray | None = None, labels: np.ndarray | None = None,
            multimask_output: bool = False) -> Prediction:
    """Prompts in original pixel coordinates on a uint8 image [H, W, 3] -> Prediction."""
    size = model.config.image_size
    original_size = image.shape[:2]
    check_prompts(box, points, labels, original_size)
    model_input, input_size = preprocess(image, size)
    coords = None if points is None else jnp.asarray(transform_coords(points, original_size, size))[None]
    point_labels = None if labels is None else jnp.asarray(labels, jnp.int32)[None]
    boxes = None
    if box is not None:
        boxes = jnp.asarray(transform_coords(np.reshape(box, (2, 2)), original_size, size))
        boxes = boxes.reshape(1, 4)
    logits, iou = _forward(model, jnp.asarray(model_input)[None], coords, point_labels, boxes,
                           multimask_output)
    masks = postprocess_masks(logits, input_size, original_size, size) > 0.0
    return Prediction(np.asarray(masks[0]), np.asarray(iou[0]), np.asarray(logits[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="fedfms_jax .safetensors")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--box", help="x0,y0,x1,y1 in original pixels")
    parser.add_argument("--point", action="append", default=[],
                        help="x,y,label (1 foreground, 0 background); repeatable")
    parser.add_argument("--multimask", action="store_true", help="predict 3 candidate masks")
    parser.add_argument("--out", type=Path, required=True, help="binary mask PNG to write")
    parser.add_argument("--save-logits", type=Path, help="write low-res logits f32[N, L, L] (.npy)")
    parser.add_argument("--variant", help="refuse weights of any other variant")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype")
    args = parser.parse_args(argv)
    if args.box is None and not args.point:
        parser.error("give at least one prompt: --box and/or --point")
    try:
        box = None if args.box is None else np.array(parse_numbers(args.box, 4, "--box"))
        point_values = [parse_numbers(p, 3, "--point") for p in args.point]
        points = np.array([p[:2] for p in point_values]) if point_values else None
        labels = np.array([p[2] for p in point_values]) if point_values else None
        image = read_image(args.image)
        model = load_sam(args.weights, dtype=args.dtype)
        if args.variant and model.config.variant != args.variant:
            raise WeightsError(f"{args.weights} holds a {model.config.variant} model, "
                               f"not {args.variant}")
        result = predict(model, image, box=box, points=points, labels=labels,
                         multimask_output=args.multimask)
    except (InputError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    best = int(np.argmax(result.iou_predictions))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((result.masks[..., best] * 255).astype(np.uint8)).save(args.out)
    if args.save_logits:
        np.save(args.save_logits, result.low_res_logits.transpose(2, 0, 1).astype(np.float32))
    ious = ", ".join(f"{v:.4f}" for v in result.iou_predictions)
    print(f"predicted IoU: {ious}" + (f" (wrote mask {best})" if args.multimask else ""))
    print(f"mask {result.masks.shape[1]}x{result.masks.shape[0]}, "
          f"{int(result.masks[..., best].sum())} foreground pixels -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
