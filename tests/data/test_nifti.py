import numpy as np
import pytest

from fedfms_jax.data import DataError, load_sites
from tests.data.conftest import nifti_volume, save_nifti

AFFINE = np.diag([0.8, 0.9, 3.0, 1.0])
# The same voxels stored with the first axis running right-to-left.
FLIPPED = np.array([[-0.8, 0, 0, 0.8 * 11], [0, 0.9, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])


def _case_dirs(root, site="site1", cases=3, **save):
    image, label = nifti_volume()
    for i in range(cases):
        save_nifti(root / site / f"case{i}" / "image.nii.gz", image, **save)
        save_nifti(root / site / f"case{i}" / "label.nii.gz", label)
    return image, label


def _all(sites, name):
    return sites[name].train + sites[name].val


def test_case_folders_give_25d_slices_with_spacing(tmp_path):
    image, label = _case_dirs(tmp_path)
    sites = load_sites("nifti", tmp_path, label_map={1: 1, 2: 1}, keep_empty=1.0)
    records = _all(sites, "site1")
    assert len(records) == 3 * 8 and sites["site1"].num_val == 8  # one whole case in val
    record = next(r for r in records if r.slice_index == 3)
    assert record.image.shape == (14, 12, 3) and record.image.dtype == np.uint8
    assert record.mask.shape == (14, 12) and set(np.unique(record.mask)) == {0, 1}
    assert record.spacing == (3.0, 0.9, 0.8)  # (z, row, col) mm
    same_case = {r.slice_index: r for r in records if r.case_id == record.case_id}
    np.testing.assert_array_equal(record.image[..., 0], same_case[2].image[..., 1])
    np.testing.assert_array_equal(record.image[..., 2], same_case[4].image[..., 1])
    # Rows run anterior (high y) to posterior; columns left to right in x.
    np.testing.assert_array_equal(record.mask, (label[:, ::-1, 3].T > 0).astype(np.uint8))


def test_empty_slices_are_subsampled_with_a_seed(tmp_path):
    _case_dirs(tmp_path, cases=2)
    options = dict(label_map={1: 1, 2: 1}, val_fraction=0)
    kept = lambda **o: sorted((r.case_id, r.slice_index)
                              for r in load_sites("nifti", tmp_path, **options, **o)["site1"].train)
    none = kept(keep_empty=0.0)
    assert none == [(c, z) for c in ("case0", "case1") for z in (2, 3, 4)]
    half = kept(keep_empty=0.5)
    assert len(half) == 2 * (3 + 2)  # 5 empty slices per case -> round(2.5) = 2 kept
    assert half == kept(keep_empty=0.5)
    assert half != kept(keep_empty=0.5, seed=1)


def test_msd_layout_with_4d_image_flipped_orientation_and_scl_slope(tmp_path):
    image, label = nifti_volume()
    # Reference: plain int16 per-case layout.
    save_nifti(tmp_path / "ref" / "c" / "image.nii.gz", image)
    save_nifti(tmp_path / "ref" / "c" / "label.nii.gz", label)
    # MSD: float 4-D file with one volume, stored flipped, labels flipped the same way.
    msd = tmp_path / "msd"
    save_nifti(msd / "imagesTr" / "c.nii.gz", image[::-1, :, :, None].astype(np.float32),
               affine=FLIPPED)
    save_nifti(msd / "labelsTr" / "c.nii.gz", label[::-1], affine=FLIPPED)
    (msd / "imagesTr" / "._c.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    # Scaled int16: the stored values are half the real ones.
    save_nifti(tmp_path / "slope" / "c" / "image.nii.gz", (image // 2).astype(np.int16),
               slope=2.0)
    save_nifti(tmp_path / "slope" / "c" / "label.nii.gz", label)
    sites = load_sites("nifti", tmp_path, num_classes=2, keep_empty=1.0, val_fraction=0)
    ref, flipped, slope = (sites[n].train for n in ("ref", "msd", "slope"))
    assert len(ref) == len(flipped) == len(slope) == 8
    for a, b, c in zip(ref, flipped, slope):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.image, b.image)
        assert np.abs(a.image.astype(int) - c.image.astype(int)).max() <= 2
    assert set(np.unique(np.stack([r.mask for r in ref]))) == {0, 1, 2}


def test_nnunet_channels_and_4d_modalities(tmp_path):
    image, label = nifti_volume()
    nnunet = tmp_path / "nnunet"
    save_nifti(nnunet / "imagesTr" / "p1_0000.nii.gz", image)
    save_nifti(nnunet / "imagesTr" / "p1_0001.nii.gz", 1200 - image)
    save_nifti(nnunet / "labelsTr" / "p1.nii.gz", label)
    four_d = tmp_path / "four_d"
    save_nifti(four_d / "imagesTr" / "p1.nii.gz", np.stack([image, 1200 - image], -1))
    save_nifti(four_d / "labelsTr" / "p1.nii.gz", label)
    options = dict(num_classes=2, keep_empty=1.0, val_fraction=0)
    with pytest.raises(DataError, match=r"four_d/imagesTr/p1\.nii\.gz: 4-D file with 2 "
                                        r"volumes; pick one with modality=N"):
        load_sites("nifti", tmp_path, **options)
    first = load_sites("nifti", tmp_path, modality=0, **options)
    second = load_sites("nifti", tmp_path, modality=1, **options)
    for sites in (first, second):
        for a, b in zip(sites["nnunet"].train, sites["four_d"].train):
            np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(first["nnunet"].train[3].image, second["nnunet"].train[3].image)


def test_fixed_window_for_ct(tmp_path):
    image, label = nifti_volume()
    save_nifti(tmp_path / "ct" / "c" / "image.nii.gz", (image - 700).astype(np.int16))
    save_nifti(tmp_path / "ct" / "c" / "label.nii.gz", label)
    records = load_sites("nifti", tmp_path, num_classes=2, window=(-160, 240), keep_empty=1,
                         val_fraction=0)["ct"].train
    stack = np.stack([r.image for r in records]).astype(np.float32)
    expected = np.clip(((image - 700).astype(np.float32) + 160) * 255 / 400 + 0.5, 0, 255)
    assert stack.max() == 255 and stack.min() == 0
    np.testing.assert_array_equal(stack[3, ..., 1], np.floor(expected[:, ::-1, 3].T))


def test_label_shape_mismatch_names_the_label(tmp_path):
    _case_dirs(tmp_path, cases=2)
    save_nifti(tmp_path / "site1" / "case1" / "label.nii.gz", np.zeros((12, 14, 9), np.uint8))
    with pytest.raises(DataError, match=r"case1/label\.nii\.gz: label grid does not match its "
                                        r"image .*case1/image\.nii\.gz: shape \(9, 14, 12\) vs "
                                        r"\(8, 14, 12\) \(Z,H,W\)"):
        load_sites("nifti", tmp_path, num_classes=2)
    sites = load_sites("nifti", tmp_path, num_classes=2, skip_bad=True)
    assert {r.case_id for r in _all(sites, "site1")} == {"case0"}
    assert len(sites["site1"].skipped) == 1


def test_unexpected_label_values_name_the_label_file(tmp_path):
    _case_dirs(tmp_path, cases=2)
    with pytest.raises(DataError, match=r"case0/label\.nii\.gz: unexpected label values \[2\]"):
        load_sites("nifti", tmp_path, num_classes=1)


def test_corrupt_nifti_and_missing_label(tmp_path):
    _case_dirs(tmp_path, cases=4)
    (tmp_path / "site1" / "case0" / "image.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"case0/image\.nii\.gz: unreadable or corrupt NIfTI"):
        load_sites("nifti", tmp_path, num_classes=2)
    (tmp_path / "site1" / "case1" / "label.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case1/image\.nii\.gz: no label for this image"):
        load_sites("nifti", tmp_path, num_classes=2)
    sites = load_sites("nifti", tmp_path, num_classes=2, skip_bad=True)
    problems = sorted(b.problem.split(" (")[0] for b in sites["site1"].skipped)
    assert problems == ["no label for this image", "unreadable or corrupt NIfTI file"]
    assert {r.case_id for r in _all(sites, "site1")} == {"case2", "case3"}


def test_msd_label_without_image_and_missing_labels_folder(tmp_path):
    image, label = nifti_volume()
    save_nifti(tmp_path / "s" / "imagesTr" / "a.nii.gz", image)
    save_nifti(tmp_path / "s" / "labelsTr" / "a.nii.gz", label)
    save_nifti(tmp_path / "s" / "labelsTr" / "b.nii.gz", label)
    with pytest.raises(DataError, match=r"labelsTr/b\.nii\.gz: label without an image"):
        load_sites("nifti", tmp_path, num_classes=2)
    assert load_sites("nifti", tmp_path, num_classes=2, skip_bad=True)["s"].num_train > 0
    other = tmp_path / "other"
    save_nifti(other / "t" / "imagesTr" / "a.nii.gz", image)
    with pytest.raises(DataError, match=r"t/labelsTr: labelsTr folder missing"):
        load_sites("nifti", other)


def test_case_folder_without_image(tmp_path):
    _case_dirs(tmp_path, cases=2)
    (tmp_path / "site1" / "case0" / "image.nii.gz").unlink()
    with pytest.raises(DataError, match=r"site1/case0: case folder without an image: expected "
                                        r"image\.nii\.gz"):
        load_sites("nifti", tmp_path, num_classes=2)


def test_label_on_a_crop_of_the_image_grid_is_placed_exactly(tmp_path):
    """Every voxel centre of a cropped label is an image voxel centre: it is used as is,
    zeros around it (DICOM SEG without empty frames, 3D Slicer's cropped segmentations)."""
    image, label = nifti_volume()
    save_nifti(tmp_path / "full" / "c" / "image.nii.gz", image)
    save_nifti(tmp_path / "full" / "c" / "label.nii.gz", label)
    save_nifti(tmp_path / "crop" / "c" / "image.nii.gz", image)
    offset = np.diag([0.8, 0.9, 3.0, 1.0])
    offset[:3, 3] = np.array([2, 3, 1]) * [0.8, 0.9, 3.0]  # starts at voxel (2, 3, 1)
    save_nifti(tmp_path / "crop" / "c" / "label.nii.gz", label[2:11, 3:10, 1:6], affine=offset)
    sites = load_sites("nifti", tmp_path, num_classes=2, keep_empty=1.0, val_fraction=0)
    for a, b in zip(sites["full"].train, sites["crop"].train):
        np.testing.assert_array_equal(a.mask, b.mask)
    assert [v.label_shape for v in sites["crop"].volumes] == [(5, 7, 9)]
    assert sites["crop"].volumes[0].geometry is None
