"""The volumes layout on real MRI (Colin27 T1 with its AAL atlas) stored in every format,
and the geometry checks between a label and its image."""

import numpy as np
import pytest

from fedfms_jax.data import DataError, load_sites, volumes
from tests import real_volumes
from tests.data.conftest import (colin_crop, make_format_sites, write_case, write_dicom_seg,
                                 write_dicom_series)

sitk = pytest.importorskip("SimpleITK")

# The thalami (AAL 77, 78) as one class: present in every slice of the crops.
LABELS = dict(label_map={77: 1, 78: 1}, unmapped="background")


@pytest.fixture(scope="module")
def colin_crops():
    return [(colin_crop(real_volumes.COLIN27_T1, z), colin_crop(real_volumes.AAL_ATLAS, z))
            for z in (80, 86)]


def records_of(site):
    return [(split, r.case_id, r.slice_index, r.spacing, r.image, r.mask)
            for split, records in (("train", site.train), ("val", site.val)) for r in records]


def assert_same_records(a, b, where):
    assert len(a) == len(b) > 0, where
    for x, y in zip(a, b):
        assert x[:4] == y[:4], where
        np.testing.assert_array_equal(x[4], y[4], err_msg=where)
        np.testing.assert_array_equal(x[5], y[5], err_msg=where)


def test_every_format_gives_identical_slice_records(tmp_path, colin_crops):
    make_format_sites(tmp_path, colin_crops)
    sites = load_sites("volumes", tmp_path, keep_empty=1.0, **LABELS)
    assert list(sites) == ["dicom", "mha", "mhd", "nhdr", "nii", "nii_gz", "nrrd"]
    reference = records_of(sites["nii_gz"])
    assert len(reference) == 12 and reference[0][3] == (1.0, 1.0, 1.0)
    assert all(r[5].any() for r in reference)  # the thalamus in every slice
    for name, site in sites.items():
        assert_same_records(records_of(site), reference, name)
        assert [v.geometry for v in site.volumes] == [None, None]
    dicom = sites["dicom"].volumes[0]
    assert (dicom.image_format, dicom.label_format) == ("dicom", "nifti")
    assert dicom.orientation != dicom.label_orientation  # stored in opposite slice orders
    assert sites["mhd"].volumes[0].image_format == "metaimage"
    # The old layout name reads the same.
    assert_same_records(records_of(load_sites("nifti", tmp_path, sites=["dicom"], keep_empty=1.0,
                                              **LABELS)["dicom"]), reference, "nifti alias")


def test_nnunet_folders_in_any_format(tmp_path, colin_crops):
    (image, label), _ = colin_crops
    for fmt in ("nii.gz", "nrrd"):
        (tmp_path / fmt / "imagesTr").mkdir(parents=True)
        (tmp_path / fmt / "labelsTr").mkdir(parents=True)
        sitk.WriteImage(image, str(tmp_path / fmt / "imagesTr" / f"colin_0000.{fmt}"))
        label_fmt = "mha" if fmt == "nrrd" else fmt
        sitk.WriteImage(label, str(tmp_path / fmt / "labelsTr" / f"colin.{label_fmt}"))
    (tmp_path / "nrrd" / "imagesTr" / "colin_0000.raw").write_bytes(b"stray data file")
    sites = load_sites("volumes", tmp_path, keep_empty=1.0, val_fraction=0, **LABELS)
    assert_same_records(records_of(sites["nrrd"]), records_of(sites["nii.gz"]), "nnU-Net")
    assert sites["nrrd"].volumes[0].label_format == "metaimage"


def _with_geometry(label, origin=None, direction=None):
    moved = sitk.Image(label)
    if origin is not None:
        moved.SetOrigin(origin)
    if direction is not None:
        moved.SetDirection(direction)
    return moved


def test_flipped_or_shifted_label_stops_naming_both_files(tmp_path, colin_crops):
    (image, label), _ = colin_crops
    x, y, z = label.GetOrigin()
    d = np.array(label.GetDirection())
    flipped = _with_geometry(label, direction=(d * [-1, 1, 1, 1, 1, 1, 1, 1, 1]).tolist())
    write_case(tmp_path / "s" / "flipped", image, flipped, "nrrd")
    write_case(tmp_path / "s" / "shifted", image, _with_geometry(label, (x, y + 2.0, z)), "mha")
    write_case(tmp_path / "s" / "good", image, label, "nii.gz")
    with pytest.raises(DataError, match=r"flipped/label\.nrrd: label grid does not match its "
                                        r"image .*flipped/image\.nrrd: voxel centres up to 63 mm "
                                        r"apart \(tolerance 0\.1 mm\); first voxel centre at "
                                        r"\(-95, .*shifted by \(-63, 0, 0\)\).*stored orientation "
                                        r"LAS vs RAS \(label vs image\)\. .*resample_label=True"):
        load_sites("volumes", tmp_path, **LABELS)
    sites = load_sites("volumes", tmp_path, skip_bad=True, val_fraction=0, **LABELS)
    assert {r.case_id for r in sites["s"].train} == {"good"}
    problems = {v.case: v.geometry for v in sites["s"].volumes}
    assert problems["good"] is None
    assert "shifted by (0, -2, 0)" in problems["shifted"]  # LPS +2 mm = 2 mm posterior
    assert [b.path.split("/")[-2:] for b in sites["s"].skipped] == [["flipped", "label.nrrd"],
                                                                   ["shifted", "label.mha"]]


def test_resample_label_puts_a_shifted_label_on_the_image_grid(tmp_path, colin_crops):
    (image, label), _ = colin_crops
    x, y, z = label.GetOrigin()
    write_case(tmp_path / "s" / "shifted", image, _with_geometry(label, (x, y + 2.0, z)), "mha")
    write_case(tmp_path / "ref" / "shifted", image, label, "mha")
    sites = load_sites("volumes", tmp_path, resample_label=True, keep_empty=1.0,
                       val_fraction=0, **LABELS)
    shifted, reference = sites["s"].train, sites["ref"].train
    assert sites["s"].volumes[0].resampled and not sites["ref"].volumes[0].resampled
    for a, b in zip(shifted, reference):
        np.testing.assert_array_equal(a.image, b.image)
        # Rows run anterior to posterior: the label moved 2 rows down, zeros come in on top.
        np.testing.assert_array_equal(a.mask[2:], b.mask[:-2])
        assert not a.mask[:2].any()


def test_resample_label_from_a_coarser_grid_agrees_with_simpleitk(tmp_path, colin_crops):
    (image, label), _ = colin_crops
    # 2 mm voxels, offset by 0.3 mm so no image voxel centre falls halfway between two.
    coarse = sitk.Resample(label, [32, 32, 4], sitk.Transform(), sitk.sitkNearestNeighbor,
                           np.add(label.GetOrigin(), 0.3).tolist(), [2.0, 2.0, 2.0],
                           label.GetDirection(), 0, label.GetPixelID())
    write_case(tmp_path / "s" / "coarse", image, coarse, "nrrd")
    with pytest.raises(DataError, match=r"coarse/label\.nrrd: label grid does not match its "
                                        r"image .*: shape \(4, 32, 32\) vs \(6, 64, 64\) "
                                        r"\(Z,H,W\); spacing \(2, 2, 2\) vs \(1, 1, 1\) mm"):
        load_sites("volumes", tmp_path, **LABELS)
    records = load_sites("volumes", tmp_path, resample_label=True, keep_empty=1.0,
                         val_fraction=0, **LABELS)["s"].train
    expected_image = sitk.Resample(coarse, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(expected_image, str(tmp_path / "expected.nrrd"))
    expected = volumes.read_volume(tmp_path / "expected.nrrd").voxels
    expected = np.isin(expected, (77, 78))
    masks = np.zeros_like(expected)
    for record in records:
        masks[record.slice_index] = record.mask
    np.testing.assert_array_equal(masks, expected)
    assert masks.any()


def test_bad_files_in_the_layout_name_the_file(tmp_path, colin_crops):
    root, tmp_path = tmp_path / "root", tmp_path
    (image, label), (image2, _) = colin_crops
    write_case(root / "s" / "good", image, label, "nrrd")
    # A truncated label.
    write_case(root / "s" / "truncated", image, label, "mha")
    data = (root / "s" / "truncated" / "label.mha").read_bytes()
    (root / "s" / "truncated" / "label.mha").write_bytes(data[: len(data) // 2])
    # Two series in the image folder.
    write_case(root / "s" / "two_series", image, label, "dicom")
    other = write_dicom_series(image2, tmp_path / "other", series_uid="1.2.826.0.1.9")
    for path in other.glob("*.dcm"):
        path.rename(root / "s" / "two_series" / "image" / f"x_{path.name}")
    # A 4-D image (two volumes) and no modality.
    (root / "s" / "four_d").mkdir()
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(root / "s" / "four_d" / "image.nrrd"))
    sitk.WriteImage(label, str(root / "s" / "four_d" / "label.nrrd"))
    # Two images in one case.
    write_case(root / "s" / "twice", image, label, "nrrd")
    sitk.WriteImage(image, str(root / "s" / "twice" / "image.mha"))
    # A .mhd header whose data file is gone.
    write_case(root / "s" / "no_raw", image, label, "mhd")
    for raw in (root / "s" / "no_raw").glob("image.*raw"):
        raw.unlink()

    with pytest.raises(DataError, match=r"twice/image\.nrrd: two volumes named 'image'"):
        load_sites("volumes", root, **LABELS)
    sites = load_sites("volumes", root, skip_bad=True, val_fraction=0, **LABELS)
    assert {r.case_id for r in sites["s"].train} == {"good"}
    problems = {b.path.split("/s/")[1]: b.problem for b in sites["s"].skipped}
    assert problems["four_d/image.nrrd"].startswith("4-D file with 2 volumes")
    assert problems["no_raw/image.mhd"].startswith("unreadable or corrupt MetaImage file")
    assert problems["truncated/label.mha"].startswith("unreadable or corrupt MetaImage file")
    assert problems["two_series/image"].startswith("2 DICOM series in one folder")
    assert problems["twice/image.nrrd"].startswith("two volumes named 'image' in one folder "
                                                   "(also image.mha)")
    assert len(problems) == 5


def test_inspect_shows_formats_spacing_orientations_and_every_case_off_grid(
        tmp_path, colin_crops, capsys):
    import json

    from fedfms_jax.data.__main__ import main

    (image, label), (image2, label2) = colin_crops
    write_case(tmp_path / "a" / "dicom_case", image, label, "dicom")
    write_case(tmp_path / "a" / "nrrd_case", image2, label2, "nrrd")
    x, y, z = label.GetOrigin()
    write_case(tmp_path / "b" / "shifted", image, _with_geometry(label, (x, y + 2.0, z)), "mha")
    x2, y2, z2 = label2.GetOrigin()
    write_case(tmp_path / "b" / "moved", image2, _with_geometry(label2, (x2 + 3.0, y2, z2)),
               "mha")
    write_case(tmp_path / "b" / "fine", image, label, "nii.gz")
    argv = ["inspect", "--layout", "volumes", "--root", str(tmp_path), "--label-map", "77:1,78:1",
            "--unmapped", "background", "--json"]

    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "b/moved/label.mha: label grid does not match its image" in err
    assert "2 bad inputs, listed above; training stops at the first" in err
    assert ("    volumes: 2 cases | image dicom 1, nrrd 1 | label nifti 1, nrrd 1 | spacing z 1, "
            "row 1, col 1 mm | orientation RAS 1, RPI 1 (labels RAS 2)") in out
    assert ("geometry off: moved (not used), label.mha vs image.mha: voxel centres up to 3 mm "
            "apart (tolerance 0.1 mm); first voxel centre at (-35, -2, 15) vs (-32, -2, 15) mm "
            "RAS (shifted by (-3, 0, 0))\n") in out
    assert "geometry off: shifted (not used), label.mha vs image.mha" in out
    assert "shifted by (0, -2, 0)" in out
    bad = json.loads(out.strip().splitlines()[-1])["bad"]
    assert sorted(b["path"].split("/")[-2] for b in bad) == ["moved", "shifted"]

    assert main(argv + ["--option", "resample_label=True"]) == 0
    out, _ = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    off = summary["sites"]["b"]["volumes"]["geometry_off"]
    assert [(o["case"], o["resampled"]) for o in off] == [("moved", True), ("shifted", True)]
    assert summary["sites"]["a"]["volumes"]["spacing_mm"] == {"z": [1.0, 1.0], "row": [1.0, 1.0],
                                                              "col": [1.0, 1.0]}
    assert "geometry off: shifted (resampled onto the image grid), label.mha vs image.mha" in out


def test_dicom_seg_label_of_a_dicom_series(tmp_path, colin_crops):
    """A SEG with two segments, its first and last frames empty (so left out): segment
    numbers are the label values and the SEG's frames a crop of the series' grid."""
    (image, label), _ = colin_crops
    values = sitk.GetArrayFromImage(label)
    regions = np.zeros(values.shape, np.uint8)
    regions[np.isin(values, (77, 78))] = 1  # thalamus
    regions[np.isin(values, (71, 72, 73, 74))] = 2  # caudate and putamen
    regions[[0, -1]] = 0
    regions_image = sitk.GetImageFromArray(regions)
    regions_image.CopyInformation(label)
    write_case(tmp_path / "seg" / "c", image, regions_image, "dicom")
    (tmp_path / "seg" / "c" / "label.nii.gz").unlink()
    series = tmp_path / "seg" / "c" / "image"
    write_dicom_seg(series, sitk.Flip(regions_image, [False, True, True]),
                    tmp_path / "seg" / "c" / "label.dcm")
    write_case(tmp_path / "ref" / "c", image, regions_image, "nii.gz")
    sites = load_sites("volumes", tmp_path, num_classes=2, keep_empty=1.0, val_fraction=0)
    seg = volumes.read_volume(tmp_path / "seg" / "c" / "label.dcm")
    assert seg.format == "dicom-seg" and seg.voxels.shape == (4, 64, 64)
    assert sites["seg"].volumes[0].label_format == "dicom-seg"
    assert sites["seg"].volumes[0].label_shape == (4, 64, 64)
    assert_same_records(records_of(sites["seg"]), records_of(sites["ref"]), "DICOM SEG")
    assert {int(v) for r in sites["seg"].train for v in np.unique(r.mask)} == {0, 1, 2}
    with pytest.raises(ValueError, match=r"cannot write a label volume as x\.dcm"):
        volumes.write_label_volume(seg.voxels.astype(np.uint8), seg, tmp_path / "x.dcm")
    assert volumes.default_label_suffix(seg) == ".nii.gz"
