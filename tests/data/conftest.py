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


VOLUME_FORMATS = ("nii.gz", "nii", "nrrd", "nhdr", "mha", "mhd", "dicom")


def colin_crop(path, z0: int, depth: int = 6):
    """64 x 64 x depth voxels of a 1 mm MNI-space volume around the thalamus."""
    import SimpleITK as sitk

    from tests import real_volumes

    return sitk.ReadImage(str(real_volumes.require(path)))[58:122, 60:124, z0:z0 + depth]


def write_case(case_dir, image, label, fmt: str, label_fmt: str | None = None):
    """image.<fmt> and label.<label_fmt or fmt>; 'dicom' stores the image as a DICOM series
    running head to feet (the opposite slice order of the NIfTI), its files named from the
    last slice, with a NIfTI label stored feet to head."""
    import SimpleITK as sitk

    case_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        # Flip keeps every voxel where it is in world space and reverses the stored order.
        write_dicom_series(sitk.Flip(image, [False, True, True]), case_dir / "image",
                           reverse_names=True)
        label_fmt = label_fmt or "nii.gz"
    else:
        sitk.WriteImage(image, str(case_dir / f"image.{fmt}"))
    sitk.WriteImage(label, str(case_dir / f"label.{label_fmt or fmt}"))


def make_format_sites(root, crops, formats=VOLUME_FORMATS):
    """One site per format (named after it), each with train/case0 = crops[0] and
    val/case1 = crops[1], crops being (image, label) SimpleITK pairs."""
    for fmt in formats:
        site = fmt.replace(".", "_")
        for split, case, (image, label) in (("train", "case0", crops[0]),
                                             ("val", "case1", crops[1])):
            write_case(root / site / split / case, image, label, fmt)
    return root


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
                "0020|0052": series_uid + ".9", "0010|0020": "colin27", "0010|0010": "Colin^27",
                "0008|0020": "20260101", "0008|0030": "120000", "0008|0050": "1",
                "0020|0011": "1", "0010|0030": "", "0010|0040": "O", "0008|0090": "",
                "0020|0010": "1",
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


def write_dicom_seg(series: Path, labels, out: Path) -> Path:
    """A DICOM SEG of the series in `series` (BINARY, one segment per label value, frames
    without any segment left out as highdicom does by default). labels: a SimpleITK label
    image on the series' grid."""
    import highdicom
    import pydicom
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in sorted(series.glob("*.dcm"))]
    values = sitk.GetArrayFromImage(labels)  # [k, row, col]
    order = [labels.TransformPhysicalPointToIndex([float(v) for v in s.ImagePositionPatient])[2]
             for s in sources]
    segments = [int(v) for v in np.unique(values) if v]
    description = [highdicom.seg.SegmentDescription(
        segment_number=n, segment_label=f"label {v}", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, v in enumerate(segments, 1)]
    numbered = np.zeros(values.shape, np.uint8)
    for n, v in enumerate(segments, 1):
        numbered[values == v] = n
    seg = highdicom.seg.Segmentation(
        source_images=sources, pixel_array=numbered[order],
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=description, series_instance_uid=highdicom.UID(), series_number=2,
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="fedfms_jax tests",
        manufacturer_model_name="conftest", software_versions="1", device_serial_number="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out
