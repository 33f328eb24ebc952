"""Sites of 3-D scans (NIfTI, NRRD, MetaImage, DICOM) cut into 2.5-D slices, the way FedFMS
prepares FeTS and prostate MRI: the `volumes` layout. The module and the layout's alias keep
the name `nifti` from when NIfTI was the only format read.

A site holds cases in one of two conventions:
  <site>/<case>/image.<ext> (or image/, a folder holding one DICOM series) with
    <site>/<case>/label.<ext> (or mask.<ext>, seg.<ext>); optionally under <site>/train and
    <site>/val
  <site>/imagesTr/<case>[_0000].<ext> with <site>/labelsTr/<case>.<ext>  (MSD, nnU-Net)
where ext is any of .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .dcm (a DICOM SEG label; see
`volumes.read_volume`).

Each volume is brought to the closest RAS orientation of its affine, and every label voxel
centre must be an image voxel centre in world space (`volumes.grid_mismatch`; a label on a
crop of the image grid is placed exactly): a label with a shifted origin or a flipped axis
stops the run naming both files, unless `resample_label` resamples it onto the image grid
(nearest neighbour). The image is clipped at intensity percentiles
(or a fixed window, for CT) to u8 and cut into axial slices; a slice's image is the stack of
slices (i-1, i, i+1) as RGB and its record carries the in-plane spacing. Slices without
foreground are subsampled (`keep_empty`), as FedFMS keeps mostly slices that show the target.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_jax.data.records import (Collector, DataError, LabelSpec, Record, VolumeInfo,
                                     draw_empty_slices, natural_key, window_volume)
from fedfms_jax.data.volumes import (SUFFIXES, grid_mismatch, label_on_image_grid, read_volume,
                                     resample_nearest, strip_volume_suffix)

LABEL_NAMES = ("label", "mask", "seg")
OTHER_SUFFIXES = f"or {', '.join(s for s in SUFFIXES if s != '.nii.gz')}"


def _volume_entries(folder: Path, collector: Collector, dicom_dirs: bool = False,
                    ) -> tuple[dict[str, Path], set[str]]:
    """({name without suffix: path}, names found twice) of the volume files in `folder`
    (and, with dicom_dirs, its sub-folders, each a DICOM series). Hidden files (e.g. macOS
    '._' copies in MSD) and the data files of .nhdr/.mhd headers are skipped; two volumes of
    one name are a bad input (reported here), and neither is used.
    """
    found: dict[str, Path] = {}
    twice: set[str] = set()
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        base = path.name if dicom_dirs and path.is_dir() else (
            strip_volume_suffix(path.name) if path.is_file() else None)
        if base is None:
            continue
        if base in found:
            collector.bad(DataError(path, f"two volumes named {base!r} in one folder (also "
                                          f"{found[base].name}); keep one"))
            twice.add(base)
            continue
        found[base] = path
    return {base: path for base, path in found.items() if base not in twice}, twice


def read_site(site_dir: Path, spec: LabelSpec, collector: Collector, *, seed: Any = 0,
              slab: int = 3, percentiles: tuple[float, float] = (0.5, 99.5),
              window: tuple[float, float] | None = None, keep_empty: float = 0.1,
              modality: int | None = None, resample_label: bool = False,
              geometry_tolerance: float = 0.1,
              ) -> tuple[list[Record], list[Record] | None]:
    """(train, val or None) slice records of one site of volumes.

    slab: 3 for 2.5-D (slices i-1, i, i+1 as RGB) or 1 (the slice replicated).
    percentiles: intensity clipping per volume; window: a fixed (low, high) instead, e.g.
      (-160, 240) for abdominal CT.
    keep_empty: share of slices without foreground kept (seeded per case); 1 keeps all.
    modality: which volume of a 4-D file, or which nnU-Net channel (_0000, _0001, ...).
    resample_label: a label on another voxel grid is resampled onto the image's (nearest
      neighbour, 0 outside the label) instead of being a bad input.
    geometry_tolerance: how far (in image voxels, of the smallest spacing) a label voxel
      centre may lie from the image's.
    """
    if slab not in (1, 3):
        raise ValueError(f"slab must be 1 or 3, got {slab}")
    if not 0.0 <= keep_empty <= 1.0:
        raise ValueError(f"keep_empty must be in [0, 1], got {keep_empty}")
    if not 0.0 <= geometry_tolerance < 1.0:
        raise ValueError(f"geometry_tolerance must be in [0, 1) voxels, got {geometry_tolerance}")
    read = functools.partial(_read_cases, spec=spec, collector=collector, seed=seed,
                             slab=slab, percentiles=percentiles, window=window,
                             keep_empty=keep_empty, modality=modality,
                             resample_label=bool(resample_label),
                             geometry_tolerance=geometry_tolerance)
    if (site_dir / "imagesTr").is_dir():
        return read(_msd_cases(site_dir, collector, modality)), None
    if (site_dir / "train").is_dir():
        val = read(_case_dirs(site_dir / "val", collector)) if (site_dir / "val").is_dir() else None
        return read(_case_dirs(site_dir / "train", collector)), val
    return read(_case_dirs(site_dir, collector)), None


def _case_dirs(folder: Path, collector: Collector) -> list[tuple[str, Path, Path]]:
    """(case, image, label) of <folder>/<case>/{image,label}.<ext>."""
    cases = []
    for case_dir in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if not case_dir.is_dir() or case_dir.name.startswith("."):
            continue
        files, twice = _volume_entries(case_dir, collector, dicom_dirs=True)
        if twice & {"image", *LABEL_NAMES}:
            continue  # two images or two labels: already reported
        if "image" not in files:
            collector.bad(DataError(case_dir, f"case folder without an image: expected "
                                              f"image.nii.gz ({OTHER_SUFFIXES}) or an image/ "
                                              "folder holding a DICOM series"))
            continue
        label = next((files[n] for n in LABEL_NAMES if n in files), None)
        if label is None:
            collector.bad(DataError(files["image"], "no label for this image (expected "
                                                    f"{case_dir / 'label.nii.gz'} "
                                                    f"({OTHER_SUFFIXES}))"))
            continue
        cases.append((case_dir.name, files["image"], label))
    return cases


def _msd_cases(site_dir: Path, collector: Collector,
               modality: int | None) -> list[tuple[str, Path, Path]]:
    """(case, image, label) of imagesTr/labelsTr; nnU-Net images end in _XXXX (channel)."""
    label_dir = site_dir / "labelsTr"
    if not label_dir.is_dir():
        raise DataError(label_dir, f"labelsTr folder missing beside {site_dir / 'imagesTr'}")
    images: dict[str, dict[int, Path]] = {}
    for base, path in _volume_entries(site_dir / "imagesTr", collector)[0].items():
        match = re.fullmatch(r"(.+)_(\d{4})", base)
        case, channel = (match[1], int(match[2])) if match else (base, -1)
        images.setdefault(case, {})[channel] = path
    labels, twice = _volume_entries(label_dir, collector)
    cases = []
    for case, channels in images.items():
        if -1 in channels:
            image = channels[-1]
        elif (modality or 0) in channels:
            image = channels[modality or 0]
        else:
            collector.bad(DataError(next(iter(channels.values())),
                                    f"no channel _{modality or 0:04d} for case {case!r}"))
            continue
        if case in twice:
            continue
        if case not in labels:
            collector.bad(DataError(image, "no label for this image (expected "
                                           f"{label_dir / case}.nii.gz {OTHER_SUFFIXES})"))
            continue
        cases.append((case, image, labels[case]))
    for case, path in labels.items():
        if case not in images:
            collector.bad(DataError(path, "label without an image in imagesTr"))
    return cases


def _read_cases(cases, *, collector: Collector, **options) -> list[Record]:
    records = []
    for case, image_path, label_path in cases:
        try:
            records.extend(read_case(case, image_path, label_path, collector=collector,
                                     **options))
        except DataError as error:
            collector.bad(error)
    return records


def read_case(case: str, image_path: Path, label_path: Path, *, spec: LabelSpec,
              seed: Any, slab: int, percentiles: tuple[float, float],
              window: tuple[float, float] | None, keep_empty: float,
              modality: int | None, resample_label: bool = False,
              geometry_tolerance: float = 0.1, collector: Collector | None = None,
              ) -> list[Record]:
    """Slice records of one case; raises DataError naming the file at fault.

    What was read (formats, grid, geometry) goes to `collector.volumes` when given, also
    for a case whose geometry is off.
    """
    image = read_volume(image_path, modality)
    label = read_volume(label_path, None)
    label_values = label_on_image_grid(image, label, geometry_tolerance)
    problem = None if label_values is not None else grid_mismatch(image, label,
                                                                   geometry_tolerance)
    if collector is not None:
        collector.volumes.append(VolumeInfo(
            case, str(image_path), str(label_path), image.format, label.format, image.spacing,
            image.voxels.shape, label.voxels.shape, image.orientation, label.orientation, problem,
            bool(problem and resample_label)))
    if problem is not None and not resample_label:
        raise DataError(label_path, f"label grid does not match its image {image_path}: "
                                    f"{problem} (label vs image). If both files' geometry is "
                                    "right, data.options.resample_label=True resamples the "
                                    "label onto the image grid")
    if label_values is None:
        label_values = resample_nearest(label, image)
    classes = spec.apply_values(label_values, label_path)
    volume = window_volume(image.voxels, window, percentiles)

    has_target = classes.reshape(len(classes), -1).any(axis=1)
    empty = np.flatnonzero(~has_target)
    kept_empty = draw_empty_slices(empty, keep_empty, seed, case)
    keep = np.sort(np.concatenate([np.flatnonzero(has_target), kept_empty]))
    spacing = image.spacing  # (z, row, col): evaluation scores the volume in 3-D
    return [Record(functools.partial(slab_image, volume, int(z), slab), classes[z], case,
                   int(z), spacing, str(image_path)) for z in keep]


def slab_image(volume: np.ndarray, z: int, slab: int = 3) -> np.ndarray:
    """u8[H,W,3] image of slice z of volume u8[Z,H,W]: slices (z-1, z, z+1), edges repeated."""
    if slab == 1:
        return np.repeat(volume[z][..., None], 3, axis=-1)
    neighbours = np.clip([z - 1, z, z + 1], 0, len(volume) - 1)
    return np.ascontiguousarray(np.moveaxis(volume[neighbours], 0, -1))
