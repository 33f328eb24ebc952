"""Apply a model exactly as it was trained: to images (PNG, JPG, TIFF, BMP) and volumes
(NIfTI, NRRD, MetaImage, a DICOM series folder), one file, several, or folders of them.

    python -m fedfms_jax.predict --weights runs/prostate/final.safetensors \
        --input scan.nii.gz --out scan_label.nii.gz [--overlay] [--force]
    python -m fedfms_jax.predict --weights W --input images/ --input more.png --out masks/
    python -m fedfms_jax.predict --weights sam_vit_b.safetensors --input scan.png \
        --box 40,60,200,220 [--point 120,140,1 ...] [--multimask] --out mask.png \
        [--save-logits logits.npy]

The weights file records how the model was trained (`Preprocessing`: normalisation, resize,
2.5-D slab, intensity window, prompts, classes); predict reads it and applies the same
chain the training pipeline and `evaluate` use, so its masks are the ones evaluation
scored. A model trained prompt-free takes no prompt; a prompted one (and official SAM)
needs --box and/or --point in the original image's pixels (single images only).

Outputs: an image gets a PNG mask at its original size (0/255 for one class, else the
label values 0..C); a volume gets a label volume (u8, values 0..C) with the input's shape,
affine and header geometry, predicted slice by slice with the trained 2.5-D context.
A single input writes `--out` itself; several inputs or a folder write into the folder
`--out`, mirroring each input's path below its folder (label files such as label.nii.gz or
masks/ folders are skipped). `--overlay` adds `<output>_overlay.png`: the predicted contour
over the image (for a volume, over its slice with the most foreground).
An existing output is never overwritten without --force; bad input (an unreadable file, a
volume the model cannot take, weights without preprocessing metadata) stops with a message
naming the file and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from fedfms_jax import evaluation
from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.data import volumes
from fedfms_jax.data.preprocessing import (Preprocessing, model_input, slab_image,
                                           volume_to_uint8)
from fedfms_jax.data.records import DataError
from fedfms_jax.data.readers import IMAGE_SUFFIXES, load_image_file
from fedfms_jax.metrics import label_map, surface
from fedfms_jax.models import Sam, postprocess_masks, transform_coords
from fedfms_jax.weights_file import WeightsError, load_trained

VOLUME_SUFFIXES = volumes.SUFFIXES
# Files and folders a data set keeps its labels in: not inputs when a folder is given.
LABEL_STEMS = ("label", "labels", "mask", "seg")
LABEL_FOLDERS = ("masks", "labels", "labelsTr", "labelsTs")
CONTOUR_COLOURS = np.array([[255, 255, 0], [0, 255, 255], [255, 0, 255], [255, 128, 0],
                            [0, 255, 0], [255, 0, 0]], np.uint8)


class InputError(ValueError):
    """A bad input file, prompt or output path; the message names it."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    masks: np.ndarray  # bool[H, W, M] at the original size
    iou_predictions: np.ndarray  # f32[M]
    low_res_logits: np.ndarray  # f32[L, L, M]


def volume_suffix(path: Path) -> str | None:
    return volumes.volume_suffix(path)


def is_dicom_series(path: Path) -> bool:
    """A folder with files but no image or volume file in it: a DICOM series to read."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and not any(is_input_file(p) for p in path.rglob("*"))


def is_input_file(path: Path) -> bool:
    """An image or a volume file; a .dcm file is one slice of a series, read through its
    folder (a single-file DICOM volume can still be given as --input itself)."""
    suffix = volume_suffix(path)
    return (suffix is not None and suffix != ".dcm") or path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path, prep: Preprocessing) -> np.ndarray:
    """An image file -> u8[H, W, 3] exactly as the training readers make it."""
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        return load_image_file(path, prep.percentiles)
    except DataError as error:
        raise InputError(f"cannot read image {error}") from None


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


# --- the model as it was trained ---------------------------------------------------------


def segment_fn(model: Sam) -> Callable[[dict], np.ndarray]:
    """batch (make_example fields) -> logits f32[B, L, L, C]: the trained forward
    (`Sam.segment`, prompt-free or with the batch's prompts), as evaluation calls it."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        return nnx.merge(graphdef, state).segment(
            batch["image"], point_coords=batch.get("point_coords"),
            point_labels=batch.get("point_labels"), boxes=batch.get("boxes"))

    return lambda batch: run(state, batch)


def predict_image(predict_fn, image: np.ndarray, prep: Preprocessing, batch_size: int,
                  prompts: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u8[H, W, 3] -> (labels u8[H, W], low-res logits f32[L, L, C]); prompts in
    model-input pixels, without the batch axis."""
    x, _ = model_input(image, prep)
    batch = {"image": x[None], **{k: v[None] for k, v in (prompts or {}).items()}}
    logits = evaluation.forward(batch, predict_fn, batch_size)
    labels = label_map(evaluation.to_original(logits, image.shape[:2], prep))[0]
    return labels, logits[0]


def predict_volume(predict_fn, voxels: np.ndarray, prep: Preprocessing, batch_size: int,
                   progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """Intensities f32[Z, H, W] (the volume readers' slice layout) -> labels u8[Z, H, W],
    each slice predicted with its trained 2.5-D context."""
    volume = volume_to_uint8(voxels, prep)

    def batch_for(indices):
        return {"image": np.stack([model_input(slab_image(volume, z, prep.slab), prep)[0]
                                   for z in indices])}

    return evaluation.predict_labels(len(volume), batch_for, predict_fn, prep, volume.shape[1:],
                                     (0.0,), batch_size, progress)[0]


@nnx.jit(static_argnames=("multimask_output",))
def _forward(model: Sam, image, point_coords, point_labels, boxes, multimask_output: bool):
    return model(image, point_coords=point_coords, point_labels=point_labels, boxes=boxes,
                 multimask_output=multimask_output)


def predict(model: Sam, image: np.ndarray, *, box: np.ndarray | None = None,
            points: np.ndarray | None = None, labels: np.ndarray | None = None,
            multimask_output: bool = False, prep: Preprocessing | None = None) -> Prediction:
    """Official SAM's prompted forward: prompts in original pixel coordinates on a uint8
    image [H, W, 3] -> Prediction (masks for each of the decoder's candidate outputs)."""
    size = model.config.image_size
    prep = prep or Preprocessing.official_sam(size, model.config.low_res_size)
    original_size = image.shape[:2]
    check_prompts(box, points, labels, original_size)
    x, input_size = model_input(image, prep)
    coords = None if points is None else jnp.asarray(transform_coords(points, original_size, size))[None]
    point_labels = None if labels is None else jnp.asarray(labels, jnp.int32)[None]
    boxes = None
    if box is not None:
        boxes = jnp.asarray(transform_coords(np.reshape(box, (2, 2)), original_size, size))
        boxes = boxes.reshape(1, 4)
    logits, iou = _forward(model, jnp.asarray(x)[None], coords, point_labels, boxes,
                           multimask_output)
    masks = postprocess_masks(logits, input_size, original_size, size) > 0.0
    return Prediction(np.asarray(masks[0]), np.asarray(iou[0]), np.asarray(logits[0]))


# --- volumes ------------------------------------------------------------------------------


def read_volume(path: Path, modality: int | None) -> volumes.Volume:
    """The volume (voxels f32[Z, H, W] in the readers' slice layout, spacing, geometry);
    InputError naming the file for anything the model cannot take."""
    try:
        return volumes.read_volume(path, modality)
    except DataError as error:
        raise InputError(f"cannot read volume {error}") from None


# --- outputs ------------------------------------------------------------------------------


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """u8[H, W, 3] with each class's predicted contour drawn in its colour."""
    out = np.array(image, np.uint8, copy=True)
    for c in range(1, int(labels.max(initial=0)) + 1):
        out[surface(labels == c)] = CONTOUR_COLOURS[(c - 1) % len(CONTOUR_COLOURS)]
    return out


def mask_png(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Binary masks as 0/255 (visible in any viewer); label maps keep their values 0..C."""
    return (labels * 255).astype(np.uint8) if num_classes == 1 else labels.astype(np.uint8)


def overlay_path(out: Path) -> Path:
    suffix = volume_suffix(out) or out.suffix
    return out.with_name(out.name[: len(out.name) - len(suffix)] + "_overlay.png")


@dataclasses.dataclass(frozen=True)
class Job:
    source: Path
    out: Path
    volume: bool


def collect_jobs(inputs: Sequence[Path], out: Path) -> list[Job]:
    """(input, output) pairs: one file -> `out` itself; else each file below `out`."""
    if not inputs:
        raise InputError("no input: give --input FILE or FOLDER")
    files: list[tuple[Path, Path]] = []  # (file, path relative to the output folder)
    for path in inputs:
        if path.is_dir() and is_dicom_series(path):
            files.append((path, Path(path.name)))
        elif path.is_dir():
            # Files, and folders below that hold a DICOM series (GDCM finds one in them).
            found = [p for p in sorted(path.rglob("*"))
                     if (is_input_file(p) if p.is_file() else
                         p.is_dir() and is_dicom_series(p) and volumes.has_dicom_series(p))
                     and not p.name.startswith(".")
                     and p.name.split(".")[0].lower() not in LABEL_STEMS
                     and not set(p.relative_to(path).parts[:-1]) & set(LABEL_FOLDERS)]
            if not found:
                raise InputError(f"folder {path} holds no image or volume file "
                                 f"({', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)})")
            files += [(p, p.relative_to(path)) for p in found]
        elif path.exists() or is_input_file(path):
            if not (is_input_file(path) or volume_suffix(path) == ".dcm"):
                raise InputError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a "
                                 f"volume ({', '.join(VOLUME_SUFFIXES)})")
            files.append((path, Path(path.name)))
        else:
            raise InputError(f"input {path} does not exist")
    single = len(files) == 1 and not (inputs[0].is_dir() and not is_dicom_series(inputs[0]))
    jobs = []
    for source, relative in files:
        dicom = source.is_dir() or volume_suffix(source) == ".dcm"
        volume = dicom or volume_suffix(source) is not None
        if single:
            target = out
        elif dicom:  # DICOM in, NIfTI out (volumes.default_label_suffix)
            name = relative.name[: -4] if source.is_file() else relative.name
            target = out / relative.parent / (name + ".nii.gz")
        else:
            suffix = volume_suffix(source) if volume else source.suffix
            stem = relative.name[: len(relative.name) - len(suffix)]
            target = out / relative.parent / (stem + (suffix if volume else ".png"))
        jobs.append(Job(source, target, volume))
    if single and jobs[0].volume and volume_suffix(out) not in volumes.LABEL_SUFFIXES:
        raise InputError(f"--out {out}: a volume's labels are written as a volume file "
                         f"({', '.join(volumes.LABEL_SUFFIXES)})")
    targets = [j.out for j in jobs]
    if len(set(targets)) != len(targets):
        raise InputError("two inputs would write the same output; give them separately")
    return jobs


def check_outputs(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(map(str, existing[:5])) + (" ..." if len(existing) > 5 else "")
        raise InputError(f"{len(existing)} output(s) exist already: {shown}; pass --force to "
                         "overwrite them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.predict",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="fedfms_jax .safetensors")
    parser.add_argument("--input", "--image", dest="inputs", type=Path, action="append",
                        default=[], help="an image, a volume or a folder of them; repeatable")
    parser.add_argument("--out", type=Path, required=True,
                        help="output file (one input) or folder (several, or a folder)")
    parser.add_argument("--box", help="x0,y0,x1,y1 in original pixels (prompted models)")
    parser.add_argument("--point", action="append", default=[],
                        help="x,y,label (1 foreground, 0 background); repeatable")
    parser.add_argument("--multimask", action="store_true",
                        help="official SAM: predict 3 candidate masks, write the best")
    parser.add_argument("--save-logits", type=Path, help="write low-res logits f32[N, L, L] (.npy)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <output>_overlay.png with the contour over the image")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--variant", help="refuse weights of any other variant")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    try:
        return run(args)
    except (InputError, WeightsError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    prompted = args.box is not None or bool(args.point)
    box = None if args.box is None else np.array(parse_numbers(args.box, 4, "--box"))
    point_values = [parse_numbers(p, 3, "--point") for p in args.point]
    points = np.array([p[:2] for p in point_values]) if point_values else None
    labels = np.array([p[2] for p in point_values]) if point_values else None
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be >= 1")
    jobs = collect_jobs(args.inputs, args.out)
    outputs = [j.out for j in jobs] + ([overlay_path(j.out) for j in jobs] if args.overlay
                                       else []) + ([args.save_logits] if args.save_logits else [])
    check_outputs(outputs, args.force)
    model, prep = load_trained(args.weights, dtype=args.dtype)
    if args.variant and model.config.variant != args.variant:
        raise WeightsError(f"{args.weights} holds a {model.config.variant} model, "
                           f"not {args.variant}")
    if prep.prompt_free and prompted:
        raise InputError(f"{args.weights} was trained prompt-free: it takes no --box/--point "
                         "(prompts would change what it computes)")
    if not prep.prompt_free:
        if not prompted:
            raise InputError(f"{args.weights} needs prompts (trained with prompt="
                             f"{prep.prompt!r}): give --box and/or --point")
        if len(jobs) != 1 or jobs[0].volume:
            raise InputError("prompts are in one image's pixels: a prompted model takes one "
                             "image per call, not a folder or a volume")
    if (args.multimask or args.save_logits) and (len(jobs) != 1 or jobs[0].volume):
        raise InputError("--multimask and --save-logits apply to a single image")
    if args.multimask and prep.prompt != "any":
        raise InputError(f"--multimask is official SAM's; {args.weights} was trained with "
                         f"prompt={prep.prompt!r} and has one output per class")

    if prep.prompt == "any":
        return _official(model, prep, jobs[0], box, points, labels, args)
    predict_fn = segment_fn(model)
    progress = tqdm(jobs, desc="predict", unit="file", disable=None, file=sys.stderr)
    for job in progress:
        progress.set_postfix_str(job.source.name)
        if job.volume:
            volume = read_volume(job.source, prep.modality)
            voxels = volume.voxels
            result = predict_volume(predict_fn, voxels, prep, args.batch_size)
            volumes.write_label_volume(result, volume, job.out)
            if args.overlay:
                z = int(np.argmax(result.reshape(len(result), -1).sum(1))) if result.any() \
                    else len(result) // 2
                image = slab_image(volume_to_uint8(voxels, prep), z, 1)
                Image.fromarray(overlay(image, result[z])).save(overlay_path(job.out))
            summary = (f"{job.source}: {result.shape[0]}x{result.shape[1]}x{result.shape[2]} "
                       f"slices, {int((result > 0).sum())} foreground voxels -> {job.out}")
        else:
            image = read_image(job.source, prep)
            prompts = _segment_prompts(box, points, labels, image.shape[:2], prep)
            result, logits = predict_image(predict_fn, image, prep, args.batch_size, prompts)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask_png(result, prep.num_classes)).save(job.out)
            if args.overlay:
                Image.fromarray(overlay(image, result)).save(overlay_path(job.out))
            if args.save_logits:
                np.save(args.save_logits, np.moveaxis(logits, -1, 0).astype(np.float32))
            summary = (f"{job.source}: {result.shape[1]}x{result.shape[0]}, "
                       f"{int((result > 0).sum())} foreground pixels -> {job.out}")
        if len(jobs) == 1:
            print(summary)
    if len(jobs) > 1:
        print(f"wrote {len(jobs)} predictions under {args.out}")
    return 0


def _segment_prompts(box, points, labels, size, prep: Preprocessing) -> dict | None:
    """The prompts of a model trained with them, in model-input pixels."""
    if prep.prompt_free:
        return None
    check_prompts(box, points, labels, size)
    if prep.resize == "stretch":
        scale = np.array([prep.image_size / size[1], prep.image_size / size[0]], np.float32)
        to_input = lambda xy: np.asarray(xy, np.float32) * scale
    else:
        to_input = lambda xy: transform_coords(xy, size, prep.image_size)
    prompts = {}
    if box is not None:
        prompts["boxes"] = to_input(np.reshape(box, (2, 2))).reshape(4)
    if points is not None:
        prompts["point_coords"] = to_input(points)
        prompts["point_labels"] = np.asarray(labels, np.int32)
    return prompts


def _official(model, prep, job: Job, box, points, labels, args) -> int:
    """Official SAM's prompted, multimask-capable forward on one image."""
    if job.volume:
        raise InputError(f"{job.source}: official SAM segments one image from prompts, "
                         "not a volume")
    image = read_image(job.source, prep)
    result = predict(model, image, box=box, points=points, labels=labels,
                     multimask_output=args.multimask, prep=prep)
    best = int(np.argmax(result.iou_predictions))
    job.out.parent.mkdir(parents=True, exist_ok=True)
    mask = result.masks[..., best]
    Image.fromarray((mask * 255).astype(np.uint8)).save(job.out)
    if args.overlay:
        Image.fromarray(overlay(image, mask.astype(np.uint8))).save(overlay_path(job.out))
    if args.save_logits:
        np.save(args.save_logits, result.low_res_logits.transpose(2, 0, 1).astype(np.float32))
    ious = ", ".join(f"{v:.4f}" for v in result.iou_predictions)
    print(f"predicted IoU: {ious}" + (f" (wrote mask {best})" if args.multimask else ""))
    print(f"mask {result.masks.shape[1]}x{result.masks.shape[0]}, "
          f"{int(mask.sum())} foreground pixels -> {job.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
