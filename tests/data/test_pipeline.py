import numpy as np
import pytest

from fedfms_jax.data import Record, make_dataset, make_pipeline, steps_per_epoch
from fedfms_jax.data.pipeline import SAM_PIXEL_MEAN, SAM_PIXEL_STD, resize_nearest


def _records(n=10, size=16, num_classes=1):
    """Records whose image encodes the mask, so tests can check they stay aligned."""
    records = []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[1 + i % 5:6 + i % 5, 2:8] = 1
        if num_classes > 1:
            mask[10:14, 9 + i % 3:13 + i % 3] = 2
        image = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
        image[0, 0] = i  # marks the record
        records.append(Record(image, mask, f"case{i}"))
    return records


def _batches(pipeline):
    return [dict(b) for b in pipeline]


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_shapes_and_dtypes():
    batch = next(iter(make_pipeline(_records(), image_size=32, batch_size=4, prompt="points",
                                    num_positive=2, num_negative=1)))
    expected = {"image": ((4, 32, 32, 3), np.float32), "mask": ((4, 32, 32, 1), np.float32),
                "mask_low_res": ((4, 8, 8, 1), np.float32), "valid": ((4,), np.bool_),
                "record_index": ((4,), np.int32), "point_coords": ((4, 3, 2), np.float32),
                "point_labels": ((4, 3), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    boxed = next(iter(make_pipeline(_records(), image_size=32, low_res_size=16, batch_size=2,
                                    prompt="box", num_classes=2)))
    assert boxed["boxes"].shape == (2, 4) and boxed["mask_low_res"].shape == (2, 16, 16, 2)


def test_normalisation_sam_and_unit():
    records = [Record(np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.uint8), "c")]
    opts = dict(image_size=8, batch_size=1, shuffle=False)
    sam = next(iter(make_pipeline(records, **opts)))["image"][0, 0, 0]
    np.testing.assert_allclose(sam, (200 - SAM_PIXEL_MEAN) / SAM_PIXEL_STD, rtol=1e-6)
    unit = next(iter(make_pipeline(records, normalise="unit", **opts)))["image"][0, 0, 0]
    np.testing.assert_allclose(unit, 200 / 255, rtol=1e-6)


def test_training_pixels_normalised_on_the_device_are_the_model_input_bit_for_bit():
    """The training streams' u8 pixels (resized and padded on the host) normalised inside a
    jitted function equal the evaluation pipeline's float32 model input, for both
    normalisations and both resize modes, padding rows included; their targets too."""
    import jax

    from fedfms_jax.models.sam import normalise_pixels

    rng = np.random.default_rng(0)
    records = [Record(rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      (rng.random((h, w)) < 0.3).astype(np.uint8), f"c{i}")
               for i, (h, w) in enumerate([(40, 70), (64, 64), (90, 30)])]
    for normalise in ("sam", "unit"):
        for resize in ("stretch", "longest_side"):
            opts = dict(image_size=32, batch_size=2, shuffle=False, normalise=normalise,
                        resize=resize, drop_remainder=False, prompt="box")
            images = _batches(make_dataset(records, **opts))
            pixels = _batches(make_dataset(records, image_output="pixels", **opts))
            device = jax.jit(lambda p, c: normalise_pixels(p, normalise, c))
            for a, b in zip(images, pixels):
                assert b["pixels"].dtype == np.uint8 and "mask" not in b and "image" not in b
                np.testing.assert_array_equal(np.asarray(device(b["pixels"], b["content"])),
                                              a["image"])
                np.testing.assert_array_equal(b["mask_low_res"], a["mask_low_res"])
                np.testing.assert_array_equal(b["boxes"], a["boxes"])
            assert not pixels[-1]["valid"][1] and (pixels[-1]["content"][1] == 0).all()
    with pytest.raises(ValueError, match="cannot augment"):
        make_dataset(records, image_size=32, batch_size=1, augment=True, image_output="none")


def test_masks_are_resized_nearest_to_both_sizes():
    records = _records(1)
    batch = next(iter(make_pipeline(records, image_size=64, batch_size=1, shuffle=False)))
    expected = np.kron(records[0].mask, np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(batch["mask"][0, ..., 0], expected)
    np.testing.assert_array_equal(batch["mask_low_res"][0, ..., 0], records[0].mask)
    assert set(np.unique(batch["mask"])) == {0.0, 1.0}
    # Downscaling samples the pixel nearest each output pixel's centre.
    np.testing.assert_array_equal(resize_nearest(records[0].mask, (8, 8)),
                                  records[0].mask[1::2, 1::2])


def test_multi_class_masks_become_channels():
    batch = next(iter(make_pipeline(_records(4, num_classes=2), image_size=16, batch_size=4,
                                    num_classes=2, shuffle=False)))
    assert batch["mask"].shape == (4, 16, 16, 2)
    np.testing.assert_array_equal(batch["mask"][0, ..., 0], _records(1)[0].mask == 1)
    assert batch["mask"][0, 10:14, 9:13, 1].all() and batch["mask"][..., 1].sum() == 4 * 16
    with pytest.raises(ValueError, match="does not fit num_classes=1"):
        bad = [Record(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8), "c", path="p")]
        next(iter(make_pipeline(bad, image_size=4, batch_size=1)))


def test_augmentation_moves_image_and_masks_together():
    batches = _batches(make_pipeline(_records(), image_size=32, batch_size=5, augment=True,
                                     normalise="unit", prompt="box", box_jitter=0.0,
                                     num_epochs=3, seed=1))
    changed = 0
    for batch in batches:
        for i in range(5):
            mask = batch["mask"][i, ..., 0]
            np.testing.assert_array_equal(batch["image"][i, ..., 1] > 0.5, mask > 0)
            np.testing.assert_array_equal(resize_nearest(mask, (8, 8)),
                                          batch["mask_low_res"][i, ..., 0])
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(batch["boxes"][i],
                                          [xs.min(), ys.min(), xs.max(), ys.max()])
            original = _records()[batch["record_index"][i]].mask
            changed += not np.array_equal(mask, np.kron(original, np.ones((2, 2))))
    assert changed > 10


def test_same_seed_same_stream_other_seed_other_order():
    opts = dict(image_size=16, batch_size=3, augment=True, prompt="points", num_negative=1)
    first = _batches(make_pipeline(_records(), seed=7, **opts))
    _equal(first, _batches(make_pipeline(_records(), seed=7, num_threads=0, **opts)))
    other = _batches(make_pipeline(_records(), seed=8, **opts))
    assert [list(b["record_index"]) for b in first] != [list(b["record_index"]) for b in other]


def test_each_epoch_is_a_new_permutation_of_all_records():
    batches = _batches(make_pipeline(_records(12), image_size=16, batch_size=4, num_epochs=3))
    assert len(batches) == 3 * steps_per_epoch(12, 4)
    epochs = [np.concatenate([b["record_index"] for b in batches[e * 3:(e + 1) * 3]])
              for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert len({tuple(o) for o in epochs}) == 3


def test_unshuffled_order_and_padded_last_batch():
    batches = _batches(make_pipeline(_records(10), image_size=16, batch_size=4, shuffle=False,
                                     drop_remainder=False, prompt="points"))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[0]["record_index"], [0, 1, 2, 3])
    last = batches[-1]
    assert last["image"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(last["valid"], [True, True, False, False])
    np.testing.assert_array_equal(last["record_index"], [8, 9, -1, -1])
    assert (last["point_labels"][2:] == -1).all() and not last["mask"][2:].any()
    dropped = _batches(make_pipeline(_records(10), image_size=16, batch_size=4))
    assert len(dropped) == 2 and all(b["valid"].all() for b in dropped)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_resumes_exactly(num_threads):
    opts = dict(image_size=16, batch_size=3, augment=True, prompt="box", seed=3, num_epochs=2,
                drop_remainder=False, num_threads=num_threads)
    pipeline = make_pipeline(_records(10), **opts)
    full = _batches(pipeline)
    iterator = iter(pipeline)
    for _ in range(5):  # stop inside the second epoch
        next(iterator)
    state = iterator.get_state()
    resumed = iter(make_pipeline(_records(10), **opts))
    resumed.set_state(state)
    _equal(list(resumed), full[5:])


def test_per_component_targets_one_instance():
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[1:4, 1:4] = 1
    mask[8:14, 8:14] = 1
    records = [Record(image, mask, "nuclei")] * 8
    batches = _batches(make_pipeline(records, image_size=16, batch_size=8, per_component=True,
                                     prompt="box", box_jitter=0))
    sizes = set(batches[0]["mask"].sum(axis=(1, 2, 3)).astype(int).tolist())
    assert sizes == {9, 36}
    for box, target in zip(batches[0]["boxes"], batches[0]["mask"][..., 0]):
        ys, xs = np.nonzero(target)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])


def test_longest_side_keeps_aspect_and_pads():
    record = Record(np.full((8, 16, 3), 255, np.uint8), np.ones((8, 16), np.uint8), "wide")
    batch = next(iter(make_pipeline([record], image_size=32, batch_size=1,
                                    resize="longest_side", normalise="unit")))
    assert batch["image"][0, :16].min() == 1.0 and batch["image"][0, 16:].max() == 0.0
    assert batch["mask"][0, :16].all() and not batch["mask"][0, 16:].any()
    assert batch["mask_low_res"][0, :4].all() and not batch["mask_low_res"][0, 4:].any()


def test_bad_pipeline_options():
    with pytest.raises(ValueError, match="no full batch"):
        make_dataset(_records(3), image_size=16, batch_size=4)
    with pytest.raises(ValueError, match="no records"):
        make_dataset([], image_size=16, batch_size=1)
    with pytest.raises(ValueError, match="normalise"):
        make_dataset(_records(), image_size=16, batch_size=1, normalise="imagenet")
    with pytest.raises(ValueError, match="binary"):
        make_dataset(_records(), image_size=16, batch_size=1, per_component=True, num_classes=2)


def test_random_access_dataset_matches_the_iterator():
    dataset = make_dataset(_records(), image_size=16, batch_size=2, seed=4, augment=True)
    assert len(dataset) == 5
    _equal([dataset[3]], [_batches(make_pipeline(_records(), image_size=16, batch_size=2,
                                                 seed=4, augment=True))[3]])


def test_a_file_broken_after_loading_fails_the_pipeline_with_its_name(tmp_path):
    from fedfms_jax.data import DataError, load_sites
    from tests.data.conftest import make_folders_site

    make_folders_site(tmp_path, "s", train=4, val=None)
    records = load_sites("folders", tmp_path, val_fraction=0)["s"].train
    (tmp_path / "s" / "train" / "images" / "case2.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"s/train/images/case2\.png: unreadable or corrupt image"):
        list(make_pipeline(records, image_size=16, batch_size=2, num_threads=2))
