"""What the network sees, as one record: how raw pixels or voxels became its input, and what
its output channels mean. `train` writes a `Preprocessing` into the weights file's metadata;
`evaluate` and `predict` read it back, so a model is always applied as it was trained.

Raw data -> model input, in one chain that the readers, the pipeline, evaluation and
predict share:
  image file / array --to_uint8_image (records.py; percentiles for 16-bit)--> u8[H,W,3]
  volume f32[Z,H,W] --volume_to_uint8 (records.window_volume: window or per-volume
      percentiles)--> u8[Z,H,W]
      --slab_image (2.5-D: slices z-1, z, z+1)--> u8[H,W,3] per slice
  u8[H,W,3] --models.sam.preprocess (resize, normalise, pad)--> f32[S,S,3]
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from fedfms_jax.data.records import to_uint8_image, window_volume
from fedfms_jax.data.nifti import slab_image  # noqa: F401 (part of the chain above)
from fedfms_jax.models.sam import NORMALISATIONS, RESIZE_MODES, preprocess

PROMPTS = ("none", "box", "points", "any")
DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Every setting that changes what the network sees or what its outputs mean.

    image_size S, low_res_size L: model input side and decoder output side.
    normalise: 'sam' (ImageNet mean/std on 0..255) or 'unit' (x / 255, as FedFMS).
    resize: 'stretch' (to S x S) or 'longest_side' (SAM's: keep the aspect, zero-pad).
    prompt: what it was trained with: 'none' (prompt-free, FedFMS), 'box', 'points', or
      'any' (official SAM: boxes and/or points).
    num_classes C and class_head: output channels (channel c = class c + 1) and whether
      they come from FedFMS's multi-class head (else mask token 0).
    label_map: raw label value -> class pairs the training labels went through (None: the
      identity; 255 counts as 1 for binary masks).
    percentiles: intensity window of 16-bit images and (without `window`) of each volume.
    window: a fixed (low, high) intensity window for volumes (CT), or None.
    slab: 3 for 2.5-D context (slices z-1, z, z+1 as RGB) or 1 (the slice replicated).
    modality: which volume of a 4-D file (or nnU-Net channel) it was trained on.
    """

    image_size: int
    low_res_size: int
    normalise: str = "sam"
    resize: str = "longest_side"
    prompt: str = "any"
    num_classes: int = 1
    class_head: bool = False
    label_map: tuple[tuple[int, int], ...] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    window: tuple[float, float] | None = None
    slab: int = 3
    modality: int | None = None

    def __post_init__(self):
        checks = [
            (self.image_size > 0 and self.low_res_size > 0, "sizes must be positive"),
            (self.normalise in NORMALISATIONS, f"normalise={self.normalise!r}; known: "
                                               f"{', '.join(NORMALISATIONS)}"),
            (self.resize in RESIZE_MODES, f"resize={self.resize!r}; known: "
                                          f"{', '.join(RESIZE_MODES)}"),
            (self.prompt in PROMPTS, f"prompt={self.prompt!r}; known: {', '.join(PROMPTS)}"),
            (self.num_classes >= 1, f"num_classes={self.num_classes} must be >= 1"),
            (self.slab in (1, 3), f"slab={self.slab} must be 1 or 3"),
            (self.class_head == (self.num_classes > 1),
             f"class_head={self.class_head} does not fit num_classes={self.num_classes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def prompt_free(self) -> bool:
        return self.prompt == "none"

    @classmethod
    def official_sam(cls, image_size: int, low_res_size: int) -> "Preprocessing":
        """Official SAM's: longest side to S, ImageNet mean/std, prompted, one mask."""
        return cls(image_size=image_size, low_res_size=low_res_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        """Raises ValueError naming what is wrong (unknown or missing fields, bad values)."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"preprocessing metadata is not JSON: {error}") from None
        if not isinstance(fields, dict):
            raise ValueError("preprocessing metadata is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown} (written by a newer "
                             "fedfms_jax?)")
        tuples: dict[str, Any] = {}
        for name in ("percentiles", "window"):
            if fields.get(name) is not None:
                tuples[name] = tuple(float(v) for v in fields[name])
        if fields.get("label_map") is not None:
            tuples["label_map"] = tuple((int(a), int(b)) for a, b in fields["label_map"])
        try:
            return cls(**{**fields, **tuples})
        except TypeError as error:
            raise ValueError(f"preprocessing metadata: {error}") from None

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)


def image_to_uint8(image: np.ndarray, path: Any, prep: Preprocessing) -> np.ndarray:
    """A raw image array (8/16-bit, float, grey or RGB) -> u8[H,W,3] as the readers make it."""
    return to_uint8_image(image, path, prep.percentiles)


def volume_to_uint8(voxels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """f32[Z,H,W] intensities -> u8[Z,H,W], windowed as the volume readers window a case:
    the fixed window, else the volume's own percentiles."""
    return window_volume(voxels, prep.window, prep.percentiles)


def model_input(image: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """u8[H,W,3] -> (f32[S,S,3] model input, content (h, w) inside it)."""
    return preprocess(image, prep.image_size, resize=prep.resize, normalise=prep.normalise)
