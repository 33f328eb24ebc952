import functools
import pickle

import numpy as np
import pytest

from fedfms_jax.data.records import (DataError, LabelSpec, Record, case_and_slice,
                                     check_pair, split_cases,
                                     steps_per_epoch, to_uint8_image)


def test_binary_masks_accept_0_1_and_0_255():
    spec = LabelSpec.make()
    mask = np.array([[0, 255], [1, 0]], np.uint8)
    np.testing.assert_array_equal(spec.apply(mask, "m.png"), [[0, 1], [1, 0]])


def test_unexpected_label_values_name_the_file_and_the_values():
    with pytest.raises(DataError, match=r"isbi_07\.png: unexpected label values \[2\]"):
        LabelSpec.make().apply(np.array([[0, 1], [2, 1]], np.uint8), "isbi_07.png")


def test_label_map_merges_labels_and_checks_values():
    spec = LabelSpec.make(label_map={1: 1, 2: 1})
    np.testing.assert_array_equal(spec.apply(np.array([[0, 1, 2]], np.uint8), "m"), [[0, 1, 1]])
    with pytest.raises(DataError, match="unexpected label values \\[3\\]"):
        spec.apply(np.array([[3]], np.uint8), "m")


def test_unmapped_background_picks_structures_from_an_atlas():
    spec = LabelSpec.make(num_classes=2, label_map={17: 1, 53: 2}, unmapped="background")
    atlas = np.array([[0, 17, 53, 1000, 4]], np.uint16)
    np.testing.assert_array_equal(spec.apply(atlas, "atlas.nii"), [[0, 1, 2, 0, 0]])


def test_label_map_to_a_class_beyond_num_classes_is_refused():
    with pytest.raises(ValueError, match="outside 0..1"):
        LabelSpec.make(num_classes=1, label_map={1: 2})


def test_multi_class_values_and_channel_masks():
    two = LabelSpec.make(num_classes=2)
    np.testing.assert_array_equal(two.apply(np.array([[0, 1, 2]], np.uint8), "m"), [[0, 1, 2]])
    channels = np.zeros((2, 2, 2), np.uint8)
    channels[0, 0, 1] = 255
    out = two.apply(channels, "fundus.npy")
    assert out.shape == (2, 2, 2) and out.max() == 1
    with pytest.raises(DataError, match=r"fundus\.npy: mask has 2 channels but num_classes=1"):
        LabelSpec.make().apply(channels, "fundus.npy")


def test_non_integer_and_negative_labels_are_rejected():
    with pytest.raises(DataError, match=r"lab\.nii: unexpected label values \[0\.5\]"):
        LabelSpec.make().apply(np.array([[0.0, 0.5]], np.float32), "lab.nii")
    with pytest.raises(DataError, match="negative"):
        LabelSpec.make().apply(np.array([[0, -1]], np.int16), "lab.nii")


def test_case_and_slice_from_stems():
    assert case_and_slice("patient3_s012") == ("patient3", 12)
    assert case_and_slice("patient3_slice7") == ("patient3", 7)
    # Numbers that are not marked as slices stay part of the case id.
    assert case_and_slice("BraTS2021_00001") == ("BraTS2021_00001", -1)


def _records(cases):
    return [Record(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8), c, i)
            for i, c in enumerate(cases)]


def test_split_by_case_keeps_slices_together_and_is_seeded():
    records = _records([f"case{i // 3}" for i in range(30)])  # 10 cases of 3 slices
    train, val = split_cases(records, 0.2, seed=5)
    assert len(val) == 6 and len(train) == 24
    assert not {r.case_id for r in train} & {r.case_id for r in val}
    again = split_cases(records, 0.2, seed=5)[1]
    assert [r.case_id for r in again] == [r.case_id for r in val]
    other = split_cases(records, 0.2, seed=6)[1]
    assert {r.case_id for r in other} != {r.case_id for r in val}


def test_split_leaves_a_single_case_in_train():
    train, val = split_cases(_records(["only"] * 4), 0.5, seed=0)
    assert len(train) == 4 and val == []


def test_to_uint8_image_conversions():
    grey16 = np.linspace(1000, 5000, 64, dtype=np.uint16).reshape(8, 8)
    out = to_uint8_image(grey16, "x.png")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # windowed, not divided by 65535
    unit = to_uint8_image(np.full((2, 2, 3), 0.5, np.float32), "x.npy")
    assert np.all(unit == 128)
    with pytest.raises(DataError, match=r"x\.npy: image has shape \(3, 2, 2, 2\)"):
        to_uint8_image(np.zeros((3, 2, 2, 2), np.uint8), "x.npy")
    with pytest.raises(DataError, match="NaN"):
        to_uint8_image(np.array([[np.nan, 1.0]]), "x.npy")


def test_check_pair_allows_the_fedfms_label_downscale_only_when_asked():
    check_pair((1024, 1024, 3), (256, 256, 1), "l.npy", "i.npy", allow_scaled=True)
    with pytest.raises(DataError, match=r"l\.npy: mask shape \(256, 256, 1\) does not match "
                                        r"image shape \(1024, 1024, 3\) of i\.npy"):
        check_pair((1024, 1024, 3), (256, 256, 1), "l.npy", "i.npy")
    with pytest.raises(DataError):
        check_pair((1024, 1024, 3), (256, 128), "l.npy", "i.npy", allow_scaled=True)


def test_records_load_lazily_and_pickle():
    image = np.ones((4, 4, 3), np.uint8)
    record = Record(functools.partial(np.array, image), np.zeros((4, 4), np.uint8), "c", 3,
                    (0.5, 0.5), "/data/c.npy")
    assert not record.in_memory
    clone = pickle.loads(pickle.dumps(record))
    np.testing.assert_array_equal(clone.image, image)
    assert (clone.case_id, clone.slice_index, clone.spacing, clone.path) == (
        "c", 3, (0.5, 0.5), "/data/c.npy")


def test_data_errors_pickle():
    error = pickle.loads(pickle.dumps(DataError("/d/a.png", "mask without an image")))
    assert (error.path, error.problem, str(error)) == (
        "/d/a.png", "mask without an image", "/d/a.png: mask without an image")


def test_steps_per_epoch():
    # FedAvg weights are the engine's (fed.aggregate.fedavg_weights, tests/fed).
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(10, 4, drop_remainder=False) == 3
