"""Small on-disk data sets in each layout, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def square_mask(size: int, top: int, left: int, side: int, value: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top:top + side, left:left + side] = value
    return mask


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_folders_site(root: Path, site: str, *, train: int = 4, val: int | None = 2,
                      size: int = 16, seed: int = 0) -> Path:
    """<root>/<site>/{train,val}/{images,masks}/caseN.png: grey images, 0/255 square masks."""
    rng = np.random.default_rng(seed)
    splits = {"train": train} if val is None else {"train": train, "val": val}
    for split, count in splits.items():
        for i in range(count):
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            write_png(root / site / split / "images" / f"case{i}.png", image)
            write_png(root / site / split / "masks" / f"case{i}.png",
                      square_mask(size, 2 + i % 4, 3, 5, 255))
    return root / site


def make_fedfms_site(root: Path, site: str, *, train: int = 4, val: int | None = 2,
                     size: int = 32, label_size: int = 8, channels: int = 1,
                     seed: int = 0) -> Path:
    """<root>/<site>/{data_npy,label_npy,...}: u8[S,S,3] images and u8[L,L,C] labels."""
    rng = np.random.default_rng(seed)
    splits = {"": train} if val is None else {"": train, "val_": val}
    for prefix, count in splits.items():
        (root / site / f"{prefix}data_npy").mkdir(parents=True, exist_ok=True)
        (root / site / f"{prefix}label_npy").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / site / f"{prefix}data_npy" / f"case{i}_s{i % 2}.npy",
                    rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            label = np.stack([square_mask(label_size, c, 1, 3) for c in range(channels)], -1)
            np.save(root / site / f"{prefix}label_npy" / f"case{i}_s{i % 2}.npy", label)
    return root / site


def nifti_volume(shape=(12, 14, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int16 image [X,Y,Z] and u8 labels {0,1,2} with a target in slices 2..4."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 1200, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[3:7, 4:9, 2:5] = 1
    label[8:10, 4:6, 3] = 2
    return image, label


def save_nifti(path: Path, data: np.ndarray, affine=None, slope: float | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([0.8, 0.9, 3.0, 1.0]) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, path)
    return path


@pytest.fixture
def folders_root(tmp_path) -> Path:
    make_folders_site(tmp_path, "site1", train=4, val=2)
    make_folders_site(tmp_path, "site2", train=6, val=None, seed=1)
    return tmp_path


def write_dicom_series(image, folder: Path, *, reverse_names: bool = False,
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1") -> Path:
    """Writes a SimpleITK 3-D image as one int16 MR DICOM series, a file per slice, with the
    image's geometry in ImagePositionPatient/ImageOrientationPatient. reverse_names numbers
    the files from the last slice, so file order runs against slice position."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depth = image.GetDepth()
    for k in range(depth):
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
                "0020|000d": series_uid + ".0", "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": position, "0020|0037": orientation,
                "0018|0050": str(image.GetSpacing()[2])}
        slice_ = image[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{depth - 1 - k if reverse_names else k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def save_itk(path: Path, array_ijk: np.ndarray, affine_ras: np.ndarray) -> Path:
    """Writes a [i,j,k] array with a RAS affine in the format of path's suffix (SimpleITK)."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.T))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=True)
    return path
