"""Medical volumes of any common format, in one canonical slice layout, and labels written back.

Formats (by suffix, case-insensitive):
  NIfTI       .nii .nii.gz      nibabel (sform/qform chosen as the NIfTI standard says,
                                scl_slope/scl_inter applied, the header kept for write-back)
  NRRD        .nrrd .nhdr       SimpleITK
  MetaImage   .mha .mhd         SimpleITK
  DICOM       a folder holding one series (SimpleITK/GDCM, slices sorted by position), or
              one .dcm file: a DICOM SEG (highdicom; segment numbers as label values) or a
              multi-frame image (SimpleITK)

Every volume is brought to the closest RAS orientation of its affine and laid out as axial
slices `voxels[z, row, col]`: z runs inferior -> superior, rows anterior -> posterior (anterior
at the top), columns along +x of RAS, i.e. from the subject's left to the subject's right.
`Volume.slice_affine` maps (z, row, col) to RAS world millimetres, so two volumes can be
compared in world space whatever their formats and stored orientations.

`write_label_volume` undoes the layout and writes a label with the input's stored array
order, spacing, origin and direction; for NIfTI input the output keeps the input header's
geometry (qform, sform and their codes). DICOM input is written as NIfTI (.nii.gz) unless
the output name asks for NRRD or MetaImage: see `default_label_suffix`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_jax.data.records import DataError

# Longest first, so .nii.gz is not taken for .gz. A .dcm file is a DICOM SEG (read with
# highdicom) or a single-file (multi-frame) DICOM image.
FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
           ".mha": "metaimage", ".mhd": "metaimage", ".dcm": "dicom"}
SUFFIXES = tuple(FORMATS)
LABEL_SUFFIXES = SUFFIXES[:-1]  # what write_label_volume writes
FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM",
                "dicom-seg": "DICOM SEG"}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # the Segmentation Storage SOP class
# highdicom's volume index (slice, row, col) -> the stored (i, j, k) = (col, row, slice).
_SLICE_ROW_COL = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
# RAS <-> LPS: ITK's world is LPS, NIfTI's (and this module's) RAS.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], float)


def volume_suffix(path: str | Path) -> str | None:
    """The volume suffix `path`'s name ends with ('.nii.gz', '.nrrd', ...), or None."""
    name = Path(path).name.lower()
    return next((s for s in SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def strip_volume_suffix(name: str) -> str | None:
    """'case1.nii.gz' -> 'case1'; None if the name has no volume suffix."""
    suffix = volume_suffix(name)
    return None if suffix is None else name[: -len(suffix)]


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """One 3-D scan in the canonical slice layout, with what is needed to write a label back.

    voxels: f32[Z,H,W] axial slices (see the module docstring for the axes).
    spacing: (z, row, col) voxel size in mm.
    path: the file, or the DICOM series folder.
    format: 'nifti' | 'nrrd' | 'metaimage' | 'dicom' | 'dicom-seg'.
    affine: f64[4,4] from the *stored* array's voxel index (i, j, k) to RAS mm.
    stored_shape: the stored array's spatial shape (i, j, k).
    header: the nibabel NIfTI header of NIfTI input, else None.
    """

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    path: Path
    format: str
    affine: np.ndarray
    stored_shape: tuple[int, int, int]
    header: Any = None

    @property
    def orientation(self) -> str:
        """Axis codes of the stored array, e.g. 'RAS', 'LPS' (DICOM), 'LAS'."""
        from nibabel.orientations import aff2axcodes

        return "".join(aff2axcodes(self.affine))

    @property
    def slice_affine(self) -> np.ndarray:
        """f64[4,4] from (z, row, col) of `voxels` to RAS mm."""
        return self.affine @ _stored_to_slices_affine(self.affine, self.stored_shape)

    def to_stored(self, values: np.ndarray) -> np.ndarray:
        """[Z,H,W] array in `voxels`' layout -> the stored array order [i,j,k]."""
        from nibabel.orientations import apply_orientation, ornt_transform

        canonical = np.transpose(values[:, ::-1, :], (2, 1, 0))
        back = ornt_transform(_RAS_ORNT, _orientation(self.affine, self.path))
        return np.ascontiguousarray(apply_orientation(canonical, back))


def _orientation(affine: np.ndarray, path: Any) -> np.ndarray:
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)
    if np.isnan(ornt).any():
        raise DataError(path, f"degenerate affine (an axis has no direction):\n{affine}")
    return ornt


def _stored_to_slices_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """f64[4,4] from (z, row, col) of the slice layout to the stored voxel index (i, j, k)."""
    from nibabel.orientations import inv_ornt_aff

    ornt = _orientation(affine, "affine")
    canonical_to_stored = inv_ornt_aff(ornt, shape)
    height = shape[int(np.flatnonzero(ornt[:, 0] == 1)[0])]  # the stored axis that runs P-A
    # (z, row, col) -> canonical (x, y, z) = (col, H-1-row, z): anterior at the top.
    slices_to_canonical = np.array([[0, 0, 1, 0], [0, -1, 0, height - 1], [1, 0, 0, 0],
                                    [0, 0, 0, 1]], float)
    return canonical_to_stored @ slices_to_canonical


def _to_slices(stored: np.ndarray, affine: np.ndarray, path: Any) -> np.ndarray:
    """f32[i,j,k] stored array -> f32[Z,H,W] in the canonical slice layout."""
    from nibabel.orientations import apply_orientation

    canonical = apply_orientation(stored, _orientation(affine, path))  # [X,Y,Z] RAS
    return np.ascontiguousarray(np.transpose(canonical, (2, 1, 0))[:, ::-1, :])


def _pick_volume(data: np.ndarray, volumes_axis: int | None, modality: int | None,
                 path: Path) -> np.ndarray:
    """The one 3-D volume of `data`, whose axis `volumes_axis` (if any) holds volumes."""
    if volumes_axis is None:  # a 3-D file: modality chose it already (an nnU-Net channel)
        return data
    volumes = data.shape[volumes_axis]
    if volumes == 1 and modality in (None, 0):
        return np.take(data, 0, axis=volumes_axis)
    if modality is None:
        raise DataError(path, f"4-D file with {volumes} volumes; pick one with modality=N")
    if not 0 <= modality < volumes:
        raise DataError(path, f"modality={modality} but the file has {volumes} volumes")
    return np.take(data, modality, axis=volumes_axis)


def read_volume(path: str | Path, modality: int | None = None) -> Volume:
    """The volume in `path`: a .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd/.dcm file (.dcm: a DICOM
    SEG or a single-file DICOM image) or a folder holding one DICOM series.

    modality: which volume of a 4-D (or multi-component) file; required when it holds
      several, ignored for 3-D files (an nnU-Net channel file is one modality already).
    Raises DataError naming the file on any problem: unknown suffix, unreadable or truncated
    file, several volumes and no modality, several DICOM series in one folder, unevenly
    spaced DICOM slices, a degenerate affine.
    """
    path = Path(path)
    if path.is_dir():
        stored, affine, fmt, header = (*_read_dicom_series(path, modality), "dicom", None)
    elif not path.exists():
        raise DataError(path, "file not found")
    else:
        suffix = volume_suffix(path)
        if suffix is None:
            raise DataError(path, f"not a volume file: expected one of {', '.join(SUFFIXES)} "
                                  "or a folder holding a DICOM series")
        fmt, header = FORMATS[suffix], None
        if fmt == "nifti":
            stored, affine, header = _read_nifti(path, modality)
        elif fmt == "dicom":
            stored, affine, fmt = _read_dicom_file(path, modality)
        else:
            stored, affine = _read_itk_file(path, fmt, modality)
    if not np.all(np.isfinite(affine)):
        raise DataError(path, f"affine has non-finite values:\n{affine}")
    voxels = _to_slices(stored, affine, path)
    # Column norms of (z, row, col) -> world: the voxel size along each slice axis.
    norms = np.linalg.norm((affine @ _stored_to_slices_affine(affine, stored.shape))[:3, :3],
                           axis=0)
    spacing = tuple(round(float(s), 6) for s in norms)
    return Volume(voxels, spacing, path, fmt, affine, tuple(int(n) for n in stored.shape),
                  header)


def _read_nifti(path: Path, modality: int | None) -> tuple[np.ndarray, np.ndarray, Any]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        if len(image.shape) > 4 and all(n == 1 for n in image.shape[4:]):
            image = nib.funcs.squeeze_image(image)
        shape = image.shape
        if len(shape) > 4:
            raise DataError(path, f"NIfTI data has shape {shape}; expected a 3-D volume")
        data = image.get_fdata(dtype=np.float32)  # applies scl_slope and scl_inter
    except DataError:
        raise
    except Exception as exc:  # nibabel, gzip and numpy each raise their own types
        raise DataError(path, f"unreadable or corrupt NIfTI file ({type(exc).__name__}: {exc})")
    data = _pick_volume(data, 3 if data.ndim == 4 else None, modality, path)
    affine = np.asarray(image.affine, np.float64)
    if data.ndim == 2:  # a single slice
        data = data[..., None]
    return data, affine, image.header


def _itk_error(exc: Exception) -> str:
    """The informative line of an ITK exception (they span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    described = [line for line in lines if line.lower().startswith("description:")]
    text = described[-1].split(":", 1)[1].strip() if described else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def _read_itk_file(path: Path, fmt: str, modality: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(path, f"unreadable or corrupt {FORMAT_NAMES[fmt]} file "
                              f"({_itk_error(exc)})")
    return _from_itk(image, path, modality)


def _from_itk(image, path: Path, modality: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(f32[i,j,k] stored voxels, f64[4,4] RAS affine) of a SimpleITK image."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise DataError(path, f"{dim}-D image; expected a 3-D volume")
    if "complex" in image.GetPixelIDTypeAsString():
        raise DataError(path, f"complex pixels ({image.GetPixelIDTypeAsString()}); "
                              "expected real values")
    data = sitk.GetArrayViewFromImage(image)  # [t,]k,j,i[,c]: index order reversed
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1 and dim == 4:
        raise DataError(path, f"4-D image with {components} components per voxel; expected "
                              "one volume")
    if components > 1:
        data = _pick_volume(data, data.ndim - 1, modality, path)
    elif dim == 4:
        data = _pick_volume(data, 0, modality, path)
    else:
        data = _pick_volume(data, None, modality, path)
    data = np.asarray(data, np.float32).T  # [i,j(,k)]
    spatial = min(dim, 3)
    direction = np.eye(3)
    direction[:spatial, :spatial] = np.reshape(image.GetDirection(), (dim, dim))[:spatial,
                                                                                 :spatial]
    spacing = np.ones(3)
    spacing[:spatial] = image.GetSpacing()[:spatial]
    origin = np.zeros(3)
    origin[:spatial] = image.GetOrigin()[:spatial]
    if data.ndim == 2:
        data = data[..., None]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    return np.ascontiguousarray(data), _LPS @ lps


def _read_dicom_file(path: Path, modality: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(stored voxels, affine, 'dicom-seg' | 'dicom') of one .dcm file."""
    import pydicom

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ...
        raise DataError(path, f"unreadable or corrupt DICOM file ({type(exc).__name__}: {exc})")
    if header.get("SOPClassUID") != SEG_STORAGE:
        return (*_read_itk_file(path, "dicom", modality), "dicom")
    import highdicom

    try:
        seg = highdicom.seg.segread(str(path))
        # Segment numbers become label values (label_map picks them); frames the SEG left
        # out as empty are zeros, and a SEG of some slices is a crop of the image grid.
        volume = seg.get_volume(combine_segments=True)
    except Exception as exc:  # highdicom raises ValueError, RuntimeError, ...
        raise DataError(path, f"unreadable DICOM SEG ({type(exc).__name__}: {exc})")
    stored = np.ascontiguousarray(np.asarray(volume.array, np.float32).transpose(2, 1, 0))
    return stored, _LPS @ np.asarray(volume.affine, float) @ _SLICE_ROW_COL, "dicom-seg"


def has_dicom_series(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series among the files of `folder` (not below it)."""
    import SimpleITK as sitk

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def _read_dicom_series(folder: Path, modality: int | None) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise DataError(folder, f"cannot scan the folder for DICOM files ({_itk_error(exc)})")
    if not series:
        raise DataError(folder, "no DICOM series in this folder")
    if len(series) > 1:
        raise DataError(folder, f"{len(series)} DICOM series in one folder "
                                f"({', '.join(series)}); keep one series per image folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(folder, f"unreadable or corrupt DICOM series ({_itk_error(exc)})")
    stored, affine = _from_itk(image, folder, modality)
    _check_slice_positions(reader, len(files), affine, folder, files)
    return stored, affine


def _check_slice_positions(reader, count: int, affine: np.ndarray, folder: Path,
                           files) -> None:
    """Slices must be evenly spaced: GDCM stacks them regardless, so a missing slice would
    otherwise silently shift every slice after it."""
    if count < 3:
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(count)])
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient (e.g. secondary capture): nothing to check against
    normal = (_LPS @ affine)[:3, 2]
    normal = normal / np.linalg.norm(normal)
    steps = np.diff(positions @ normal)
    typical = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - typical)))
    if abs(steps[worst] - typical) > 0.1 * abs(typical) or abs(typical) == 0:
        # GDCM leaves out files it cannot parse, so a truncated slice shows up as a gap.
        read = {Path(f).resolve() for f in files}
        left_out = sorted(p.name for p in folder.iterdir()
                          if p.is_file() and not p.name.startswith(".") and p.resolve() not in read)
        hint = (f"; not read as part of the series: {', '.join(left_out[:5])}"
                + (" ..." if len(left_out) > 5 else "")) if left_out else ""
        raise DataError(folder, f"DICOM slices are not evenly spaced: {steps[worst]:.4g} mm "
                                f"between {Path(files[worst]).name} and "
                                f"{Path(files[worst + 1]).name}, {typical:.4g} mm elsewhere "
                                f"(a missing or duplicated slice?){hint}")


# ---------------------------------------------------------------------------------------
# Writing labels back


def default_label_suffix(like: Volume) -> str:
    """The suffix a label of `like` is written with by default: the input's own, and
    '.nii.gz' (NIfTI with the series' geometry) for DICOM."""
    if like.format.startswith("dicom"):
        return ".nii.gz"
    return volume_suffix(like.path) or ".nii.gz"


def write_label_volume(labels: np.ndarray, like: Volume, out_path: str | Path) -> Path:
    """Writes labels u8[Z,H,W] (in `like.voxels`' layout) as a label volume; returns its path.

    The file has `like`'s stored shape, array order, spacing, origin and direction and, for
    NIfTI input written as NIfTI, `like`'s header geometry (qform, sform, codes, units).
    The format follows `out_path`'s suffix (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd); a name
    without a suffix gets `default_label_suffix(like)`. DICOM (series or SEG) is not written.
    `read_volume` of the result gives back `labels` exactly.
    """
    labels = np.asarray(labels)
    if labels.shape != like.voxels.shape:
        raise ValueError(f"labels have shape {labels.shape}; the volume {like.path} has "
                         f"{like.voxels.shape} (Z,H,W)")
    if labels.dtype.kind not in "biu":
        raise ValueError(f"labels have dtype {labels.dtype}; expected integers (u8)")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values {labels.min()}..{labels.max()} do not fit u8")
    out_path = Path(out_path)
    suffix = volume_suffix(out_path)
    if suffix not in LABEL_SUFFIXES:
        if out_path.suffix:
            raise ValueError(f"cannot write a label volume as {out_path.name}: use one of "
                             f"{', '.join(LABEL_SUFFIXES)}")
        suffix = default_label_suffix(like)
        out_path = out_path.with_name(out_path.name + suffix)
    stored = like.to_stored(labels.astype(np.uint8))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = FORMATS[suffix]
    if fmt == "nifti":
        write = _write_nifti
    else:
        write = _write_itk
    if suffix in (".nhdr", ".mhd"):  # header + data file: the header names the data file
        write(stored, like, out_path)
    else:  # a whole file or none: a failed write leaves any earlier file in place
        partial = out_path.with_name(f".{out_path.name}.partial{suffix}")
        try:
            write(stored, like, partial)
            os.replace(partial, out_path)
        finally:
            partial.unlink(missing_ok=True)
    return out_path


def _write_nifti(stored: np.ndarray, like: Volume, path: Path) -> None:
    import nibabel as nib

    if like.header is not None:
        header = like.header.copy()
        header.extensions.clear()  # the image's extensions (often DICOM tags) are not the label's
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # The header's own affine equals like.affine, so qform/sform and codes stay as they are.
        image = image_class(stored, like.affine, header)
    else:
        image = nib.Nifti1Image(stored, like.affine)
        image.header.set_qform(like.affine, code=1)  # scanner anatomical, as the source was
        image.header.set_sform(like.affine, code=1)
        image.header.set_xyzt_units("mm")
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    image.header.set_intent("label")
    nib.save(image, str(path))


def _write_itk(stored: np.ndarray, like: Volume, path: Path) -> None:
    import SimpleITK as sitk

    lps = _LPS @ like.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(stored.T))  # ITK arrays are [k,j,i]
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise DataError(path, f"cannot write the label volume ({_itk_error(exc)})")


# ---------------------------------------------------------------------------------------
# Geometry in world space


def _corners(shape: tuple[int, int, int]) -> np.ndarray:
    """f64[4,8]: the homogeneous (z, row, col, 1) indices of a grid's corner voxels."""
    return np.array([[z, r, c, 1] for z in (0, shape[0] - 1) for r in (0, shape[1] - 1)
                     for c in (0, shape[2] - 1)], float).T


def _apart(image: Volume, label: Volume, offset) -> float:
    """Largest distance (mm) between a label voxel centre and the image voxel centre
    `offset` indices further. The difference of two affine maps is largest at a corner of
    the grid, so the 8 corners decide for every voxel."""
    corners = _corners(label.voxels.shape)
    shifted = corners + np.array([*offset, 0], float)[:, None]
    return float(np.linalg.norm((label.slice_affine @ corners
                                 - image.slice_affine @ shifted)[:3], axis=0).max())


def subgrid_offset(image: Volume, label: Volume, tolerance: float = 0.1,
                   ) -> tuple[int, int, int] | None:
    """(z, row, col) index in the image of the label's first voxel when every label voxel
    centre is an image voxel centre, within `tolerance` x the smallest image voxel size:
    the label grid is the image grid, or a crop of it (as DICOM SEG files without their
    empty frames, and 3D Slicer's cropped segmentations, are). Else None."""
    limit = tolerance * min(image.spacing)
    index = (np.linalg.inv(image.slice_affine) @ label.slice_affine[:, 3])[:3]
    offset = np.round(index).astype(int)
    if (offset < 0).any() or (offset + label.voxels.shape > np.array(image.voxels.shape)).any():
        return None
    if _apart(image, label, offset) > limit:
        return None
    return tuple(int(o) for o in offset)


def label_on_image_grid(image: Volume, label: Volume, tolerance: float = 0.1,
                        ) -> np.ndarray | None:
    """f32[Z,H,W] label values on the image grid when the label grid is that grid or a crop
    of it (`subgrid_offset`; 0 outside a crop), else None. No interpolation: exact."""
    offset = subgrid_offset(image, label, tolerance)
    if offset is None:
        return None
    if offset == (0, 0, 0) and label.voxels.shape == image.voxels.shape:
        return label.voxels
    out = np.zeros(image.voxels.shape, np.float32)
    out[tuple(slice(o, o + n) for o, n in zip(offset, label.voxels.shape))] = label.voxels
    return out


def grid_mismatch(image: Volume, label: Volume, tolerance: float = 0.1) -> str | None:
    """What differs between the label's and the image's voxel grids in world space, stated
    as 'label vs image', or None when every label voxel centre lies within `tolerance` x
    the smallest image voxel size of an image voxel centre (`subgrid_offset`)."""
    if subgrid_offset(image, label, tolerance) is not None:
        return None
    limit = tolerance * min(image.spacing)
    differences = []
    if image.voxels.shape != label.voxels.shape:
        differences.append(f"shape {label.voxels.shape} vs {image.voxels.shape} (Z,H,W)")
    else:
        differences.append(f"voxel centres up to {_apart(image, label, (0, 0, 0)):.3g} mm "
                           f"apart (tolerance {limit:.3g} mm)")
    if not np.allclose(label.spacing, image.spacing, rtol=0, atol=limit):
        differences.append(f"spacing {_mm(label.spacing)} vs {_mm(image.spacing)} mm "
                           "(z,row,col)")
    first = label.slice_affine[:3, 3], image.slice_affine[:3, 3]
    if np.linalg.norm(first[0] - first[1]) > limit:
        differences.append(f"first voxel centre at {_mm(first[0])} vs {_mm(first[1])} mm RAS "
                           f"(shifted by {_mm(first[0] - first[1])})")
    axes = lambda v: v.slice_affine[:3, :3] / np.array(v.spacing)
    if not np.allclose(axes(label), axes(image), rtol=0, atol=1e-3):
        differences.append("axis directions differ")
    if label.orientation != image.orientation:
        differences.append(f"stored orientation {label.orientation} vs {image.orientation}")
    return "; ".join(differences)


def _mm(vector) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in vector) + ")"


def resample_nearest(label: Volume, onto: Volume) -> np.ndarray:
    """f32[Z,H,W] label values of `label` at the voxel centres of `onto` (nearest
    neighbour, 0 outside the label's grid). A voxel covers +-half a voxel around its centre,
    as in ITK ('grid-constant'; scipy's 'constant' would drop the outer half voxels)."""
    from scipy import ndimage

    matrix = np.linalg.inv(label.slice_affine) @ onto.slice_affine
    return ndimage.affine_transform(label.voxels, matrix, output_shape=onto.voxels.shape,
                                    order=0, mode="grid-constant", cval=0.0)
