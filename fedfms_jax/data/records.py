"""Per-site records, sites and the bad-input error every reader shares.

A `Record` is one 2-D example: `image` u8[H,W,3] (grey replicated, or slices i-1,i,i+1 for
2.5-D) and `mask` u8[H,W] class indices (0 = background) or u8[H,W,C] binary channels.
Readers that keep pixels on disk give a `Record` loaders instead of arrays, so a hospital's
data set is decoded one example at a time by the pipeline, not held in memory.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray
ArrayOrLoader = Array | Callable[[], Array]


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One input that could not be used: the file and what is wrong with it."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class DataError(ValueError):
    """Bad input data; the message starts with the file (or folder) at fault."""

    def __init__(self, path: Any, problem: str):
        self.bad = BadInput(str(path), problem)
        super().__init__(str(self.bad))

    def __reduce__(self):  # errors cross process boundaries in data-loader workers
        return DataError, (self.bad.path, self.bad.problem)

    @property
    def path(self) -> str:
        return self.bad.path

    @property
    def problem(self) -> str:
        return self.bad.problem


class Record:
    """One 2-D example of a site.

    `image` and `mask` are given as arrays or as zero-argument callables returning them
    (picklable, e.g. `functools.partial`), and always read back as arrays:
      image: u8[H,W,3] (or f32[H,W,3] on the 0..255 scale)
      mask:  u8[H,W] class indices, or u8[H,W,C] binary channels (multi-label data)
    `slice_index` is -1 for 2-D data; `spacing` is the pixel size in mm when known: (row, col)
    for images, (z, row, col) for slices of a volume (evaluation scores those per volume,
    in 3-D); `path` is the source file, for error messages.
    """

    __slots__ = ("_image", "_mask", "case_id", "slice_index", "spacing", "path")

    def __init__(self, image: ArrayOrLoader, mask: ArrayOrLoader, case_id: str,
                 slice_index: int = -1, spacing: tuple[float, ...] | None = None,
                 path: str = ""):
        self._image = image
        self._mask = mask
        self.case_id = str(case_id)
        self.slice_index = int(slice_index)
        if spacing is not None and len(spacing) not in (2, 3):
            raise ValueError(f"spacing {tuple(spacing)}: expected (row, col) or (z, row, col)")
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.path = str(path)

    @property
    def image(self) -> Array:
        return self._image() if callable(self._image) else self._image

    @property
    def mask(self) -> Array:
        return self._mask() if callable(self._mask) else self._mask

    @property
    def in_memory(self) -> bool:
        return not (callable(self._image) or callable(self._mask))

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else self.path
        return (f"Record(case_id={self.case_id!r}, slice_index={self.slice_index}, "
                f"spacing={self.spacing}, source={where!r})")


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """One case of a volume layout as it was read: formats, grid, and how its label fits.

    spacing: the image's (z, row, col) voxel size in mm; shape: its slices (Z, H, W);
      label_shape: the label's (smaller when it lies on a crop of the image grid).
    orientation, label_orientation: axis codes of the stored arrays ('RAS', 'LPS', ...).
    geometry: what differs between the label's and the image's grids in world space
      (None: they coincide); resampled: the label was resampled onto the image grid.
    """

    case: str
    image: str
    label: str
    image_format: str
    label_format: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    label_shape: tuple[int, int, int]
    orientation: str
    label_orientation: str
    geometry: str | None = None
    resampled: bool = False


@dataclasses.dataclass
class Site:
    """One client of the federation: its name and its train/val records.

    The test set of leave-one-site-out is the unseen site's `val` (the engine decides).
    `skipped` lists the inputs left out with `skip_bad=True`; `volumes` the cases of a
    volume layout as read (skipped ones included).
    """

    name: str
    train: list[Record]
    val: list[Record]
    skipped: list[BadInput] = dataclasses.field(default_factory=list)
    volumes: list[VolumeInfo] = dataclasses.field(default_factory=list)

    @property
    def num_train(self) -> int:
        """Training examples n_k, the site's FedAvg weight numerator."""
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val)

    def __repr__(self) -> str:
        return (f"Site({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"skipped={len(self.skipped)})")


def steps_per_epoch(num_records: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches in one pass over `num_records` (a local epoch in FedFMS)."""
    if drop_remainder:
        return num_records // batch_size
    return -(-num_records // batch_size)


# ---------------------------------------------------------------------------------------
# Checks and conversions shared by the readers.


class Collector:
    """Raises on a bad input, or with `skip_bad` records it and lets the reader go on; also
    keeps what a volume reader learnt of each case (`volumes`)."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[BadInput] = []
        self.volumes: list[VolumeInfo] = []

    def bad(self, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(error.bad)


def natural_key(text: str) -> list:
    """Sort key that puts 'case2' before 'case10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# A trailing slice number such as "_s012" or "_slice12": slices of one case stay together
# when a validation split is drawn, so no case leaks from train into val.
DEFAULT_CASE_PATTERN = r"^(?P<case>.+?)(?:_(?:s|slice)(?P<slice>\d+))?$"


def case_and_slice(stem: str, pattern: str = DEFAULT_CASE_PATTERN) -> tuple[str, int]:
    """(case id, slice index or -1) parsed from a file stem."""
    match = re.match(pattern, stem)
    if match is None:
        return stem, -1
    groups = match.groupdict()
    slice_text = groups.get("slice")
    return groups.get("case") or stem, int(slice_text) if slice_text else -1


def split_cases(records: Sequence[Record], val_fraction: float, seed: int | Sequence[int],
                ) -> tuple[list[Record], list[Record]]:
    """Seeded train/val split by case, so all slices of a case land on one side.

    At least one case goes to val when there are two or more cases.
    """
    cases = sorted({r.case_id for r in records}, key=natural_key)
    if len(cases) < 2 or val_fraction <= 0:
        return list(records), []
    num_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    order = np.random.default_rng(seed).permutation(len(cases))
    val_cases = {cases[i] for i in order[:num_val]}
    train = [r for r in records if r.case_id not in val_cases]
    val = [r for r in records if r.case_id in val_cases]
    return train, val


def image_to_rgb(image: Array, path: Any) -> Array:
    """u8/f32[H,W] | [H,W,1] | [H,W,3] | [H,W,4] -> [H,W,3]; grey is replicated, alpha dropped."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise DataError(path, f"image has shape {tuple(image.shape)}; expected [H,W], "
                              "[H,W,1], [H,W,3] or [H,W,4] (channels last)")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def window_to_uint8(values: Array, low: float, high: float) -> Array:
    """Linear map of [low, high] to 0..255, clipped."""
    values = np.asarray(values, np.float32)
    scale = 255.0 / max(float(high) - float(low), 1e-6)
    return np.clip((values - low) * scale + 0.5, 0, 255).astype(np.uint8)


def percentile_window(values: Array, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Clipping window from intensity percentiles.

    Exact zeros are left out when they fill much of the array: skull-stripped MRI and padded
    scans would otherwise put the lower percentile at the padding value.
    """
    values = np.asarray(values)
    nonzero = values[values != 0]
    sample = nonzero if nonzero.size >= 0.05 * values.size and nonzero.size else values.ravel()
    low, high = np.percentile(sample, percentiles)
    return float(low), float(high)


def window_volume(voxels: Array, window: tuple[float, float] | None,
                  percentiles: tuple[float, float]) -> Array:
    """A volume's intensities -> u8 of the same shape: the fixed `window` (e.g. CT's), else
    the volume's own `percentiles` (so each scan is windowed on its own range)."""
    low, high = window if window is not None else percentile_window(voxels, percentiles)
    return window_to_uint8(voxels, low, high)


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How raw mask values become classes.

    num_classes: foreground classes C (binary: 1).
    label_map: raw value -> class (0..C), e.g. {1: 1, 2: 1} merges two labels; None means
      identity for 0..C and, when C == 1, any of {1, 255} -> 1 (masks saved as 0/255).
    unmapped: 'error' rejects raw values not in the map; 'background' sends them to 0
      (picking a few structures from an atlas).
    """

    num_classes: int = 1
    label_map: tuple[tuple[int, int], ...] | None = None
    unmapped: str = "error"

    @classmethod
    def make(cls, num_classes: int = 1, label_map: Mapping[Any, Any] | None = None,
             unmapped: str = "error") -> "LabelSpec":
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if unmapped not in ("error", "background"):
            raise ValueError(f"unmapped must be 'error' or 'background', got {unmapped!r}")
        pairs = None
        if label_map is not None:
            pairs = tuple(sorted((int(k), int(v)) for k, v in dict(label_map).items()))
            for raw, cls_ in pairs:
                if not 0 <= cls_ <= num_classes:
                    raise ValueError(f"label_map sends {raw} to class {cls_}, outside "
                                     f"0..{num_classes} (num_classes={num_classes})")
        return cls(num_classes, pairs, unmapped)

    def allowed(self) -> dict[int, int]:
        """Allowed raw value -> class; unmapped='background' also allows every other value."""
        if self.label_map is not None:
            return {0: 0, **dict(self.label_map)}
        if self.num_classes == 1:
            return {0: 0, 1: 1, 255: 1}
        return {v: v for v in range(self.num_classes + 1)}

    def apply(self, raw: Array, path: Any) -> Array:
        """Raw mask [H,W] | [H,W,1] | [H,W,C] -> u8[H,W] classes or u8[H,W,C] binary channels.

        Raises DataError naming `path` for non-integer or unexpected values, or a channel
        count that does not match num_classes.
        """
        raw = np.asarray(raw)
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if raw.ndim == 3:
            return self._apply_channels(raw, path)
        if raw.ndim != 2:
            raise DataError(path, f"mask has shape {tuple(raw.shape)}; expected [H,W] or [H,W,C]")
        return self.apply_values(raw, path)

    def apply_values(self, raw: Array, path: Any) -> Array:
        """Label-valued array of any shape (a 2-D mask or a 3-D label volume) -> u8 classes."""
        values = self._integer_values(raw, path)
        allowed = self.allowed()
        unexpected = [v for v in values.tolist() if v not in allowed]
        if unexpected and self.unmapped == "error":
            raise DataError(path, f"unexpected label values {unexpected[:10]}; allowed "
                                  f"{sorted(allowed)} for num_classes={self.num_classes}. "
                                  "Map them with label_map (e.g. {1: 1, 2: 1}) or set "
                                  "unmapped='background'")
        lut = np.zeros(int(values.max(initial=0)) + 1, np.uint8)
        for raw_value, cls_ in allowed.items():
            if raw_value < lut.size:
                lut[raw_value] = cls_
        return lut[raw.astype(np.int64)]

    def _apply_channels(self, raw: Array, path: Any) -> Array:
        channels = raw.shape[-1]
        if channels != self.num_classes:
            raise DataError(path, f"mask has {channels} channels but num_classes="
                                  f"{self.num_classes}; set num_classes={channels}")
        if self.label_map is not None:
            raise DataError(path, "label_map applies to label-valued masks [H,W], not to "
                                  f"{channels}-channel masks")
        values = self._integer_values(raw, path)
        unexpected = [v for v in values.tolist() if v not in (0, 1, 255)]
        if unexpected:
            raise DataError(path, f"unexpected values {unexpected[:10]} in a {channels}-channel "
                                  "mask; each channel must be binary (0/1 or 0/255)")
        return (raw > 0).astype(np.uint8)

    @staticmethod
    def _integer_values(raw: Array, path: Any) -> Array:
        if raw.dtype == np.uint8:  # the common case; bincount beats a sort
            return np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        values = np.unique(raw)
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                bad = values[~np.isfinite(values) | (values != np.round(values))]
                raise DataError(path, f"unexpected label values {bad[:10].tolist()}: labels "
                                      "must be whole numbers")
            values = values.astype(np.int64)
        elif raw.dtype.kind == "b":
            values = values.astype(np.int64)
        elif raw.dtype.kind not in "iu":
            raise DataError(path, f"mask has dtype {raw.dtype}; expected integers")
        if values.size and values.min() < 0:
            raise DataError(path, f"unexpected label values {values[values < 0][:10].tolist()}: "
                                  "labels must not be negative")
        return values


def check_pair(image_shape: Sequence[int], mask_shape: Sequence[int], mask_path: Any,
               image_path: Any, allow_scaled: bool = False) -> None:
    """Raises DataError unless the mask covers the image.

    allow_scaled: the mask may be a whole-number downscale of the image with the same
    aspect (FedFMS stores 1024x1024 images with 256x256 labels).
    """
    ih, iw = int(image_shape[0]), int(image_shape[1])
    mh, mw = int(mask_shape[0]), int(mask_shape[1])
    if (ih, iw) == (mh, mw):
        return
    if (allow_scaled and mh and mw and ih % mh == 0 and iw % mw == 0
            and ih // mh == iw // mw):
        return
    raise DataError(mask_path, f"mask shape {tuple(mask_shape)} does not match image shape "
                               f"{tuple(image_shape)} of {image_path}")


def to_uint8_image(image: Array, path: Any,
                   percentiles: tuple[float, float] = (0.5, 99.5)) -> Array:
    """Any image array -> u8[H,W,3].

    8-bit data (in any integer dtype) is kept; floats in [0, 1] are scaled by 255 and floats
    in [0, 255] kept; wider ranges (16-bit, int16, raw float) are windowed at `percentiles`
    of the image, since their useful range is rarely the dtype's full range.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image_to_rgb(image, path)
    if image.dtype == np.bool_:
        return image_to_rgb(image.astype(np.uint8) * 255, path)
    if image.dtype.kind not in "iuf":
        raise DataError(path, f"image has dtype {image.dtype}; expected integers or floats")
    if image.size == 0:
        raise DataError(path, f"image is empty (shape {tuple(image.shape)})")
    low, high = float(np.min(image)), float(np.max(image))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DataError(path, "image contains NaN or infinite values")
    if image.dtype.kind == "f" and low >= 0 and high <= 1:
        image = image * 255.0
    elif not (low >= 0 and high <= 255):
        image = window_to_uint8(image, *percentile_window(image, percentiles))
    return image_to_rgb(np.clip(np.round(image), 0, 255).astype(np.uint8), path)


# The volume readers' default share of slices without foreground kept for training.
DEFAULT_KEEP_EMPTY = 0.1


def draw_empty_slices(empty: np.ndarray, keep_empty: float, seed, case: str) -> np.ndarray:
    """Which of a case's slices without foreground (indices `empty`) are kept: a share
    `keep_empty`, drawn from the seed and the case id (the same draw in every reader)."""
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), zlib.crc32(case.encode())])
    return rng.choice(empty, size=round(keep_empty * len(empty)), replace=False)


def keep_empty_slices(records: Sequence[Record], keep_empty: float, seed: Sequence[int],
                      ) -> list[Record]:
    """Training records with only a share `keep_empty` of each volume's slices without
    foreground, drawn per case from `seed` (as FedFMS keeps mostly slices that show the
    target); images (slice_index -1) and slices with foreground are all kept. Evaluation
    splits are never subsampled: their scores are per whole volume.
    """
    if not 0.0 <= keep_empty <= 1.0:
        raise ValueError(f"keep_empty must be in [0, 1], got {keep_empty}")
    if keep_empty == 1.0:
        return list(records)
    by_case: dict[str, list[Record]] = {}
    for record in records:
        if record.slice_index >= 0:
            by_case.setdefault(record.case_id, []).append(record)
    dropped: set[int] = set()
    for case, slices in by_case.items():
        slices = sorted(slices, key=lambda r: r.slice_index)
        empty = np.array([r.slice_index for r in slices if not np.any(r.mask)], np.int64)
        kept = set(draw_empty_slices(empty, keep_empty, seed, case).tolist())
        dropped |= {id(r) for r in slices if r.slice_index in set(empty.tolist()) - kept}
    return [r for r in records if id(r) not in dropped]
