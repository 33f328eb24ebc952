"""Readers of the on-disk layouts, and `load_sites`, the single entry point to all of them.

Layouts (one folder per site under `root`, sites in natural-sort order):
  fedfms:    <site>/{data_npy,label_npy,val_data_npy,val_label_npy}/<stem>.npy
  folders:   <site>/{train,val}/{images,masks}/<stem>.{png,jpg,tif,...}  (or <site>/{images,masks})
  volumes:   <site>/<case>/{image,label}.<nii.gz|nii|nrrd|nhdr|mha|mhd|dcm> (image/ may be a
             DICOM series folder, label.dcm a DICOM SEG), or <site>/{imagesTr,labelsTr} (see nifti.py); `nifti` is
             its old name
  synthetic: the embedded data set (synthetic.py); no root.

Every reader checks each pair when it loads (readable, mask present, shapes, label values),
so a bad file stops the run at the start with its name, not in round 37. Pixels stay on
disk: a record holds loaders, and the pipeline decodes one example at a time.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_jax.data import nifti
from fedfms_jax.data.records import (DEFAULT_CASE_PATTERN, Collector, DataError, LabelSpec,
                                     Record, Site, case_and_slice, check_pair, natural_key,
                                     split_cases, to_uint8_image)
from fedfms_jax.data.synthetic import make_synthetic_sites

log = logging.getLogger(__name__)

LAYOUTS = ("fedfms", "folders", "volumes", "nifti", "synthetic")
# The options (a config's data.options) each layout's reader takes, besides `seed` (a data
# seed of its own, every layout). The config validator (fedfms_jax.config) refuses any other
# key before data is read; tests/data/test_readers.py checks this table against the readers'
# signatures, so a new layout or option is added here and in its reader.
LAYOUT_OPTIONS = {
    "fedfms": ("case_pattern", "percentiles"),
    "folders": ("case_pattern", "percentiles"),
    "volumes": ("slab", "percentiles", "window", "keep_empty", "modality", "resample_label",
                "geometry_tolerance"),
    "synthetic": ("num_sites", "per_site", "image_size", "kind", "volumes", "depth",
                  "val_fraction"),
}
LAYOUT_OPTIONS["nifti"] = LAYOUT_OPTIONS["volumes"]  # the volumes layout's older name
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_sites(layout: str, root: str | Path | None = None, *,
               sites: Sequence[str] | None = None, skip_bad: bool = False,
               num_classes: int = 1, label_map: Mapping[int, int] | None = None,
               unmapped: str = "error", val_fraction: float = 0.2, seed: int = 0,
               **options: Any) -> dict[str, Site]:
    """Reads every site of a data set as {site name: Site}, in a deterministic order.

    layout: 'fedfms' | 'folders' | 'volumes' (alias 'nifti') | 'synthetic'.
    root: the folder holding one folder per site (None for 'synthetic').
    sites: only these sites, in this order (default: all, natural-sorted).
    skip_bad: leave bad inputs out (listed in `Site.skipped`) instead of raising DataError.
    num_classes, label_map, unmapped: how raw label values become classes (LabelSpec).
    val_fraction, seed: the seeded by-case validation split of sites that have none.
    options: layout options -- fedfms/folders: case_pattern, percentiles; volumes: see
      `nifti.read_site`; synthetic: see `make_synthetic_sites`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "synthetic":
        if root is not None:
            raise ValueError("the synthetic layout is generated, it takes no root")
        out = make_synthetic_sites(num_classes=num_classes, seed=seed, **options)
        return _select(out, sites, "synthetic")

    if root is None:
        raise ValueError(f"the {layout} layout needs a root folder")
    root = Path(root)
    if not root.exists():
        raise DataError(root, "data root does not exist")
    if not root.is_dir():
        raise DataError(root, "data root is not a folder")
    site_dirs = {p.name: p for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
                 if p.is_dir() and not p.name.startswith((".", "_"))}
    if not site_dirs:
        raise DataError(root, f"no site folders in the data root (expected <root>/<site>/ "
                              f"in the {layout} layout)")
    site_dirs = _select(site_dirs, sites, root)
    spec = LabelSpec.make(num_classes, label_map, unmapped)
    read_site = {"fedfms": read_fedfms_site, "folders": read_folders_site,
                 "volumes": nifti.read_site, "nifti": nifti.read_site}[layout]

    out = {}
    for name, site_dir in site_dirs.items():
        collector = Collector(skip_bad)
        # crc32, not hash(): str hashes change between Python runs.
        site_seed = [seed, zlib.crc32(name.encode())]
        train, val = read_site(site_dir, spec, collector, seed=site_seed, **options)
        if not train:
            note = f" ({len(collector.skipped)} bad inputs skipped)" if collector.skipped else ""
            raise DataError(site_dir, f"empty site: no training records found{note}")
        if val is None:
            train, val = split_cases(train, val_fraction, site_seed)
        if collector.skipped:
            log.warning("site %s: skipped %d bad inputs, e.g. %s", name, len(collector.skipped),
                        collector.skipped[0])
        out[name] = Site(name, train, val, collector.skipped, collector.volumes)
    return out


def _select(items: dict, names: Sequence[str] | None, where: Any) -> dict:
    if names is None:
        return items
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    missing = [n for n in names if n not in items]
    if missing:
        raise DataError(where if isinstance(where, Path) else Path(str(where)),
                        f"site(s) {missing} not found; available: {list(items)}")
    return {n: items[n] for n in names}


def _pair_files(images: dict[str, Path], masks: dict[str, Path], collector: Collector,
                mask_hint: Callable[[str], str]) -> list[tuple[str, Path, Path]]:
    """Matches images and masks by stem; a missing mask or a mask alone is a bad input."""
    pairs = []
    for stem, image_path in images.items():
        if stem in masks:
            pairs.append((stem, image_path, masks[stem]))
        else:
            collector.bad(DataError(image_path, f"no mask for this image (expected "
                                                f"{mask_hint(stem)})"))
    for stem, mask_path in masks.items():
        if stem not in images:
            collector.bad(DataError(mask_path, "mask without an image"))
    return pairs


def _files_by_stem(folder: Path, suffixes: Sequence[str], collector: Collector,
                   ) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            collector.bad(DataError(path, f"two files with stem {path.stem!r} "
                                          f"(also {found[path.stem].name})"))
            continue
        found[path.stem] = path
    return found


# ---------------------------------------------------------------------------------------
# FedFMS: <site>/{data_npy,label_npy,val_data_npy,val_label_npy}/<stem>.npy


def read_fedfms_site(site_dir: Path, spec: LabelSpec, collector: Collector, *,
                     seed: Any = 0, case_pattern: str = DEFAULT_CASE_PATTERN,
                     percentiles: tuple[float, float] = (0.5, 99.5),
                     ) -> tuple[list[Record], list[Record] | None]:
    """(train, val or None) records of one FedFMS site.

    Images are [H,W,3] (or grey [H,W]) arrays, usually u8 1024x1024; labels are [H,W] label
    values or [H,W,C] channels and may be a whole-number downscale of the image (FedFMS
    stores 256x256 labels).
    """
    del seed  # the FedFMS layout carries its own split, or load_sites draws one
    if not (site_dir / "data_npy").is_dir():
        raise DataError(site_dir, "not a FedFMS site: no data_npy/ folder (expected "
                                  "data_npy, label_npy, val_data_npy, val_label_npy)")
    read = functools.partial(_read_fedfms_split, spec=spec, collector=collector,
                             case_pattern=case_pattern, percentiles=percentiles)
    train = read(site_dir / "data_npy", site_dir / "label_npy")
    val = None
    if (site_dir / "val_data_npy").is_dir():
        val = read(site_dir / "val_data_npy", site_dir / "val_label_npy")
    return train, val


def _read_fedfms_split(image_dir: Path, label_dir: Path, *, spec: LabelSpec,
                       collector: Collector, case_pattern: str,
                       percentiles: tuple[float, float]) -> list[Record]:
    if not label_dir.is_dir():
        raise DataError(label_dir, f"label folder missing for {image_dir}")
    images = _files_by_stem(image_dir, (".npy",), collector)
    labels = _files_by_stem(label_dir, (".npy",), collector)
    records = []
    for stem, image_path, label_path in _pair_files(images, labels, collector,
                                                    lambda s: str(label_dir / f"{s}.npy")):
        try:
            image_shape = _npy_image_shape(image_path)
            mask = load_npy_mask(label_path, spec)
            check_pair(image_shape, mask.shape, label_path, image_path, allow_scaled=True)
        except DataError as error:
            collector.bad(error)
            continue
        case_id, slice_index = case_and_slice(stem, case_pattern)
        records.append(Record(functools.partial(load_npy_image, image_path, percentiles),
                              functools.partial(load_npy_mask, label_path, spec),
                              case_id, slice_index, None, str(image_path)))
    return records


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad file
        raise DataError(path, f"unreadable or corrupt .npy file ({type(exc).__name__}: {exc})")


def _npy_image_shape(path: Path) -> tuple[int, ...]:
    """Image shape from the header; memory-mapping also catches a truncated file."""
    image = _load_npy(path, mmap=True)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        raise DataError(path, f"image has shape {image.shape}: channels first? expected "
                              "[H,W,3] or [H,W]")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise DataError(path, f"image has shape {image.shape}; expected [H,W,3] or [H,W]")
    if image.dtype.kind not in "biuf":
        raise DataError(path, f"image has dtype {image.dtype}; expected integers or floats")
    return image.shape


def load_npy_image(path: Path, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """u8[H,W,3] image of a FedFMS .npy file."""
    return to_uint8_image(_load_npy(path), path, percentiles)


def load_npy_mask(path: Path, spec: LabelSpec) -> np.ndarray:
    """u8[H,W] classes or u8[H,W,C] channels of a FedFMS label .npy file."""
    return spec.apply(_load_npy(path), path)


# ---------------------------------------------------------------------------------------
# Image folders: <site>/{train,val}/{images,masks}/<stem>.<png|jpg|tif|...>


def read_folders_site(site_dir: Path, spec: LabelSpec, collector: Collector, *,
                      seed: Any = 0, case_pattern: str = DEFAULT_CASE_PATTERN,
                      percentiles: tuple[float, float] = (0.5, 99.5),
                      ) -> tuple[list[Record], list[Record] | None]:
    """(train, val or None) records of one image-folder site.

    Images: 8- or 16-bit, grey or RGB(A), any format Pillow reads; masks: single-channel
    label images matched by stem (the suffix may differ, e.g. case1.jpg with case1.png).
    """
    del seed
    read = functools.partial(_read_folder_split, spec=spec, collector=collector,
                             case_pattern=case_pattern, percentiles=percentiles)
    if (site_dir / "train").is_dir():
        val = read(site_dir / "val") if (site_dir / "val").is_dir() else None
        return read(site_dir / "train"), val
    if (site_dir / "images").is_dir():
        return read(site_dir), None
    raise DataError(site_dir, "not an image-folder site: expected train/images and "
                              "train/masks (or images/ and masks/) inside")


def _read_folder_split(split_dir: Path, *, spec: LabelSpec, collector: Collector,
                       case_pattern: str, percentiles: tuple[float, float]) -> list[Record]:
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    if not image_dir.is_dir():
        raise DataError(image_dir, "images folder missing")
    if not mask_dir.is_dir():
        raise DataError(mask_dir, f"masks folder missing for {image_dir}")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES, collector)
    masks = _files_by_stem(mask_dir, IMAGE_SUFFIXES, collector)
    records = []
    for stem, image_path, mask_path in _pair_files(images, masks, collector,
                                                   lambda s: f"{mask_dir / s}.png"):
        try:
            # A full decode now finds truncated files before training starts.
            image = load_image_file(image_path, percentiles)
            mask = load_mask_file(mask_path, spec)
            check_pair(image.shape, mask.shape, mask_path, image_path)
        except DataError as error:
            collector.bad(error)
            continue
        case_id, slice_index = case_and_slice(stem, case_pattern)
        records.append(Record(functools.partial(load_image_file, image_path, percentiles),
                              functools.partial(load_mask_file, mask_path, spec),
                              case_id, slice_index, None, str(image_path)))
    return records


def _read_pil(path: Path, role: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # the first frame of a multi-page TIFF
            if role == "image" and im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode in ("LA", "PA"):
                im = im.getchannel(0)
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable or corrupt {role} file ({type(exc).__name__}: {exc})")


def load_image_file(path: Path, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """u8[H,W,3] image of an 8/16-bit grey or colour image file."""
    return to_uint8_image(_read_pil(path, "image"), path, percentiles)


def load_mask_file(path: Path, spec: LabelSpec) -> np.ndarray:
    """u8[H,W] classes of a single-channel label image (palette indices count as labels)."""
    raw = _read_pil(path, "mask")
    if raw.ndim == 3:
        # Masks saved as RGB(A) with equal channels are grey; anything else is ambiguous.
        if raw.shape[-1] in (3, 4) and np.array_equal(raw[..., 0], raw[..., 1]) \
                and np.array_equal(raw[..., 0], raw[..., 2]):
            raw = raw[..., 0]
        else:
            raise DataError(path, f"colour mask of shape {raw.shape} with differing channels; "
                                  "save masks as single-channel label images")
    return spec.apply(raw, path)
