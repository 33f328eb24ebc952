"""read_volume / write_label_volume on real MRI volumes in every format, and their errors."""

import functools
import zlib

import nibabel as nib
import numpy as np
import pytest

from fedfms_jax.data import DataError, load_sites, volumes
from fedfms_jax.data.records import LabelSpec, percentile_window, window_to_uint8
from tests import real_volumes
from tests.data.conftest import save_itk, save_nifti, write_dicom_series

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _nibabel_slices(path, modality=None):
    """The NIfTI path as it was before read_volume (nibabel's closest canonical), kept here
    as the reference: f32[Z,H,W] slices and (z, row, col) spacing."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = image.get_fdata(dtype=np.float32)
    if data.ndim == 4:
        data = data[..., modality or 0]
    zooms = tuple(round(float(z), 6) for z in image.header.get_zooms()[:3])
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, :]), zooms[::-1]


def _nibabel_records(case, image_path, label_path, spec, seed, keep_empty):
    """(slice, spacing, image, mask) of each record the nibabel-based read_case produced."""
    image, zooms = _nibabel_slices(image_path)
    label, _ = _nibabel_slices(label_path)
    classes = spec.apply_values(label, label_path)
    volume = window_to_uint8(image, *percentile_window(image, (0.5, 99.5)))
    has_target = classes.reshape(len(classes), -1).any(axis=1)
    empty = np.flatnonzero(~has_target)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), zlib.crc32(case.encode())])
    kept = rng.choice(empty, size=round(keep_empty * len(empty)), replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(has_target), kept]))
    neighbours = lambda z: np.clip([z - 1, z, z + 1], 0, len(volume) - 1)
    return [(int(z), tuple(zooms), np.moveaxis(volume[neighbours(z)], 0, -1), classes[z])
            for z in keep]


def assert_same_grid(a, b, where=""):
    """Slice affines equal up to float32 rounding of the coordinates (NIfTI keeps its affine
    in float32, DICOM as decimal strings), i.e. relative to the coordinates' scale."""
    scale = max(1.0, float(np.abs(b.slice_affine).max()))
    np.testing.assert_allclose(a.slice_affine, b.slice_affine, rtol=0,
                               atol=4 * np.finfo(np.float32).eps * scale, err_msg=str(where))


@pytest.fixture(scope="module")
def colin():
    return volumes.read_volume(real_volumes.require(real_volumes.COLIN27_T1))


def _permuted_copy(path, out):
    """The volume at `path` stored as (y flipped, x, z): orientation PRS, same world."""
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    affine = image.affine
    stored = np.ascontiguousarray(np.transpose(data, (1, 0, 2))[::-1])
    new = np.eye(4)
    new[:3, 0] = -affine[:3, 1]
    new[:3, 1] = affine[:3, 0]
    new[:3, 2] = affine[:3, 2]
    new[:3, 3] = affine[:3, 3] + affine[:3, 1] * (data.shape[1] - 1)
    return save_nifti(out, stored, affine=new)


@pytest.mark.parametrize("name", ["COLIN27_T1", "AAL_ATLAS", "INIA19_T1", "INIA19_LABELS"])
def test_read_volume_equals_the_nibabel_path_on_real_volumes(name):
    path = real_volumes.require(getattr(real_volumes, name))
    volume = volumes.read_volume(path)
    expected, spacing = _nibabel_slices(path)
    np.testing.assert_array_equal(volume.voxels, expected)
    assert volume.voxels.dtype == np.float32 and volume.spacing == spacing
    assert volume.format == "nifti" and volume.orientation == "RAS"


def test_mni152_and_a_permuted_copy_give_the_same_slices(tmp_path):
    path = real_volumes.mni152_t1_path()
    volume = volumes.read_volume(path)
    expected, spacing = _nibabel_slices(path)
    np.testing.assert_array_equal(volume.voxels, expected)
    assert volume.spacing == spacing
    permuted = volumes.read_volume(_permuted_copy(path, tmp_path / "prs.nii.gz"))
    assert permuted.orientation == "PRS" and permuted.stored_shape != volume.stored_shape
    np.testing.assert_array_equal(permuted.voxels, volume.voxels)
    assert_same_grid(permuted, volume)
    np.testing.assert_array_equal(*(_nibabel_slices(p)[0] for p in (path, tmp_path / "prs.nii.gz")))


def test_read_case_records_equal_the_nibabel_path(tmp_path):
    """Colin27 with the AAL atlas (same grid): every slice record as before read_volume."""
    t1 = real_volumes.require(real_volumes.COLIN27_T1)
    aal = real_volumes.require(real_volumes.AAL_ATLAS)
    case = tmp_path / "site1" / "colin"
    case.mkdir(parents=True)
    (case / "image.nii.gz").symlink_to(t1)
    (case / "label.nii.gz").symlink_to(aal)
    # Two AAL regions (left/right precentral gyrus) as one class, the rest background.
    options = dict(label_map={1: 1, 2: 1}, unmapped="background", keep_empty=0.05,
                   val_fraction=0, seed=3)
    records = load_sites("nifti", tmp_path, **options)["site1"].train
    spec = LabelSpec.make(1, {1: 1, 2: 1}, "background")
    site_seed = [3, zlib.crc32(b"site1")]
    expected = _nibabel_records("colin", case / "image.nii.gz", case / "label.nii.gz", spec,
                                site_seed, 0.05)
    assert len(records) == len(expected) > 20
    for record, (z, spacing, image, mask) in zip(records, expected):
        assert (record.case_id, record.slice_index, record.spacing) == ("colin", z, spacing)
        np.testing.assert_array_equal(record.image, image)
        np.testing.assert_array_equal(record.mask, mask)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_label_volume_round_trips_in_the_stored_order(tmp_path, colin, suffix):
    like = volumes.read_volume(_permuted_copy(real_volumes.COLIN27_T1, tmp_path / "prs.nii.gz"))
    labels = (like.voxels > 80).astype(np.uint8) + (like.voxels > 120)
    out = volumes.write_label_volume(labels, like, tmp_path / "out" / f"label{suffix}")
    assert out == tmp_path / "out" / f"label{suffix}"
    back = volumes.read_volume(out)
    np.testing.assert_array_equal(back.voxels, labels)
    assert back.stored_shape == like.stored_shape and back.orientation == "PRS"
    assert_same_grid(back, like)
    assert_same_grid(back, colin)
    assert not list(out.parent.glob(".*partial*"))


def test_nifti_label_keeps_the_header_geometry(tmp_path):
    image = nib.load(str(real_volumes.require(real_volumes.INIA19_T1)))
    like = volumes.read_volume(real_volumes.INIA19_T1)
    labels = (like.voxels > np.percentile(like.voxels, 90)).astype(np.uint8)
    out = volumes.write_label_volume(labels, like, tmp_path / "label.nii.gz")
    written = nib.load(str(out))
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b",
                "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim",
                "xyzt_units"):
        np.testing.assert_array_equal(written.header[key], image.header[key], err_msg=key)
    assert written.get_data_dtype() == np.uint8 and written.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), like.to_stored(labels))


def test_the_same_volume_in_every_format_reads_identically(tmp_path, colin):
    """Colin27 cut to 24 slices, written by SimpleITK as NRRD, MHA and a DICOM series (its
    files named in reverse slice order), read as the NIfTI is."""
    import SimpleITK as sitk

    crop = sitk.ReadImage(str(real_volumes.COLIN27_T1))[:, :, 70:94]
    sitk.WriteImage(crop, str(tmp_path / "crop.nii.gz"))
    reference = volumes.read_volume(tmp_path / "crop.nii.gz")
    np.testing.assert_array_equal(reference.voxels, colin.voxels[70:94])
    for suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        sitk.WriteImage(crop, str(tmp_path / f"crop{suffix}"))
    write_dicom_series(crop, tmp_path / "dicom", reverse_names=True)
    for path in [tmp_path / f"crop{s}" for s in (".nrrd", ".nhdr", ".mha", ".mhd")] + [
            tmp_path / "dicom"]:
        volume = volumes.read_volume(path)
        np.testing.assert_array_equal(volume.voxels, reference.voxels, err_msg=str(path))
        assert volume.spacing == reference.spacing
        assert_same_grid(volume, reference, path)
        assert volumes.grid_mismatch(reference, volume) is None
    dicom = volumes.read_volume(tmp_path / "dicom")
    assert dicom.format == "dicom" and volumes.default_label_suffix(dicom) == ".nii.gz"
    out = volumes.write_label_volume((dicom.voxels > 90).astype(np.uint8), dicom,
                                     tmp_path / "dicom_label")
    assert out.name == "dicom_label.nii.gz"
    np.testing.assert_array_equal(volumes.read_volume(out).voxels, dicom.voxels > 90)
    assert_same_grid(volumes.read_volume(out), dicom)


def test_4d_images_need_a_modality(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    channels = [rng.integers(0, 500, (6, 7, 5)).astype(np.int16) for _ in range(2)]  # [k,j,i]
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(c) for c in channels]),
                    str(tmp_path / "four_d.nrrd"))
    sitk.WriteImage(sitk.Compose([sitk.GetImageFromArray(c) for c in channels]),
                    str(tmp_path / "vector.mha"))
    save_nifti(tmp_path / "four_d.nii.gz", np.stack([c.T for c in channels], -1))
    for m, c in enumerate(channels):
        sitk.WriteImage(sitk.GetImageFromArray(c), str(tmp_path / f"single{m}.nrrd"))
        save_nifti(tmp_path / f"single{m}.nii.gz", c.T)
    for name in ("four_d.nrrd", "vector.mha", "four_d.nii.gz"):
        with pytest.raises(DataError, match=rf"{name}: 4-D file with 2 volumes; pick one with "
                                            r"modality=N"):
            volumes.read_volume(tmp_path / name)
        with pytest.raises(DataError, match=rf"{name}: modality=2 but the file has 2 volumes"):
            volumes.read_volume(tmp_path / name, modality=2)
        single = "single{}.nii.gz" if name.endswith(".nii.gz") else "single{}.nrrd"
        for m in (0, 1):
            np.testing.assert_array_equal(
                volumes.read_volume(tmp_path / name, modality=m).voxels,
                volumes.read_volume(tmp_path / single.format(m)).voxels, err_msg=name)


def test_truncated_and_unreadable_files_name_the_file(tmp_path, colin):
    crop = colin.voxels[80:84].astype(np.uint8)
    like = volumes.Volume(crop, colin.spacing, tmp_path / "x.nii.gz", "nifti", colin.affine,
                          (181, 217, 4))
    for suffix, name in ((".nrrd", "NRRD"), (".mha", "MetaImage"), (".nii.gz", "NIfTI")):
        path = volumes.write_label_volume(crop, like, tmp_path / f"whole{suffix}")
        data = path.read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"cut{suffix.replace('.', r'.')}: unreadable or "
                                            rf"corrupt {name}"):
            volumes.read_volume(cut)
    (tmp_path / "text.mha").write_text("not an image")
    with pytest.raises(DataError, match=r"text\.mha: unreadable or corrupt MetaImage"):
        volumes.read_volume(tmp_path / "text.mha")
    with pytest.raises(DataError, match=r"scan\.png: not a volume file"):
        (tmp_path / "scan.png").write_bytes(b"x")
        volumes.read_volume(tmp_path / "scan.png")
    with pytest.raises(DataError, match=r"missing\.nrrd: file not found"):
        volumes.read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no DICOM series in this folder"):
        volumes.read_volume(tmp_path / "empty")


def test_dicom_folder_with_two_series_or_a_missing_slice(tmp_path):
    import SimpleITK as sitk

    crop = sitk.ReadImage(str(real_volumes.require(real_volumes.COLIN27_T1)))[60:100, 60:100,
                                                                             80:88]
    both = write_dicom_series(crop, tmp_path / "both", series_uid="1.2.3.4.1")
    other = write_dicom_series(crop[:, :, :4], tmp_path / "other", series_uid="1.2.3.4.2")
    for path in sorted(other.glob("*.dcm")):
        path.rename(both / f"other_{path.name}")
    with pytest.raises(DataError, match=r"both: 2 DICOM series in one folder \(1\.2\.3\.4\.1, "
                                        r"1\.2\.3\.4\.2\)"):
        volumes.read_volume(both)
    gap = write_dicom_series(crop, tmp_path / "gap")
    (gap / "slice004.dcm").unlink()
    with pytest.raises(DataError, match=r"gap: DICOM slices are not evenly spaced: 2 mm "
                                        r"between slice003\.dcm and slice005\.dcm, 1 mm "
                                        r"elsewhere \(a missing or duplicated slice\?\)$"):
        volumes.read_volume(gap)
    truncated = write_dicom_series(crop, tmp_path / "truncated")
    data = (truncated / "slice004.dcm").read_bytes()
    (truncated / "slice004.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated: DICOM slices are not evenly spaced: .*; "
                                        r"not read as part of the series: slice004\.dcm$"):
        volumes.read_volume(truncated)


def test_write_label_volume_refuses_what_it_cannot_write(tmp_path, colin):
    labels = np.zeros(colin.voxels.shape, np.uint8)
    with pytest.raises(ValueError, match=r"labels have shape \(3, 4\); the volume .*ch2"):
        volumes.write_label_volume(np.zeros((3, 4), np.uint8), colin, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"cannot write a label volume as a\.png"):
        volumes.write_label_volume(labels, colin, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"expected integers"):
        volumes.write_label_volume(labels.astype(np.float32), colin, tmp_path / "a.nrrd")
    assert volumes.write_label_volume(labels, colin, tmp_path / "plain").name == "plain.nii.gz"


def test_single_dicom_files(tmp_path, colin):
    import SimpleITK as sitk

    series = write_dicom_series(sitk.ReadImage(str(real_volumes.COLIN27_T1))[:, :, 80:83],
                                tmp_path / "series")
    one = volumes.read_volume(series / "slice001.dcm")
    assert one.format == "dicom" and one.voxels.shape == (1, 217, 181)
    np.testing.assert_array_equal(one.voxels[0], colin.voxels[81])
    np.testing.assert_allclose(one.slice_affine[:3, 3], colin.slice_affine[:3, 3] + [0, 0, 81],
                               rtol=0, atol=4 * np.finfo(np.float32).eps * 100)  # coords < 100 mm
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 200 + b"not DICOM")
    with pytest.raises(DataError, match=r"bad\.dcm: unreadable or corrupt DICOM file"):
        volumes.read_volume(tmp_path / "bad.dcm")


def test_a_failed_write_keeps_the_earlier_label_file(tmp_path, colin, monkeypatch):
    labels = (colin.voxels > 100).astype(np.uint8)
    out = volumes.write_label_volume(labels, colin, tmp_path / "label.nrrd")
    before = out.read_bytes()

    def broken(stored, like, path):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(volumes, "_write_itk", broken)
    with pytest.raises(OSError, match="disk full"):
        volumes.write_label_volume(1 - labels, colin, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["label.nrrd"]
