import numpy as np
import pytest
from scipy import ndimage

from fedfms_jax.data import load_sites
from fedfms_jax.data.synthetic import make_synthetic_sites, write_sites


@pytest.fixture(scope="module")
def sites():
    return make_synthetic_sites(num_sites=4, per_site=48, image_size=48, seed=0)


def _stack(records):
    return (np.stack([r.image for r in records]), np.stack([r.mask for r in records]))


def test_sites_have_very_different_sizes_and_the_record_format(sites):
    assert list(sites) == ["site1", "site2", "site3", "site4"]
    sizes = [s.num_train for s in sites.values()]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 4 * sizes[-1]
    for site in sites.values():
        assert site.num_val >= 2
        record = site.train[0]
        assert record.image.shape == (48, 48, 3) and record.image.dtype == np.uint8
        assert record.mask.shape == (48, 48) and record.mask.dtype == np.uint8
        assert record.slice_index == -1 and record.spacing is None
        # Grey slices are replicated to three channels.
        np.testing.assert_array_equal(record.image[..., 0], record.image[..., 2])
    assert not {r.case_id for r in sites["site1"].train} & {r.case_id for r in sites["site1"].val}


def test_deterministic_from_the_seed(sites):
    again = make_synthetic_sites(num_sites=4, per_site=48, image_size=48, seed=0)
    other = make_synthetic_sites(num_sites=4, per_site=48, image_size=48, seed=1)
    for name in sites:
        np.testing.assert_array_equal(_stack(sites[name].train)[0], _stack(again[name].train)[0])
        np.testing.assert_array_equal(_stack(sites[name].val)[1], _stack(again[name].val)[1])
    assert not np.array_equal(_stack(sites["site1"].train)[0], _stack(other["site1"].train)[0])


def test_targets_look_like_segmentation_data(sites):
    images, masks = _stack(sites["site1"].train)
    assert set(np.unique(masks)) == {0, 1}
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    assert 0.05 < empty.mean() < 0.5  # some empty slices, mostly not
    fraction = masks[~empty].mean()
    assert 0.005 < fraction < 0.3
    # Structures are smooth blobs: few, large connected components per slice.
    components = [ndimage.label(m)[1] for m in masks[~empty]]
    assert max(components) <= 6
    # The target is brighter than its surroundings on the reference site.
    assert images[..., 0][masks > 0].mean() > images[..., 0][masks == 0].mean() + 20


def test_domain_shift_hurts_a_model_fitted_on_one_site():
    """An intensity-window classifier fitted on site1 transfers badly to the other sites."""
    sites = make_synthetic_sites(num_sites=4, per_site=64, image_size=48, seed=0)

    def dice(site, lo, hi):
        images, masks = _stack(site.val if site is not sites["site1"] else site.train)
        pred, gt = (images[..., 0] >= lo) & (images[..., 0] <= hi), masks > 0
        return 2 * (pred & gt).sum() / max(pred.sum() + gt.sum(), 1)

    _, lo, hi = max((dice(sites["site1"], lo, hi), lo, hi)
                    for lo in range(0, 256, 16) for hi in range(lo + 16, 272, 16))
    own = dice(sites["site1"], lo, hi)
    assert own > 0.6
    for name in ("site2", "site3", "site4"):
        assert dice(sites[name], lo, hi) < own - 0.15, name


def test_sites_differ_in_intensity_statistics(sites):
    means = [_stack(s.train)[0].mean() for s in sites.values()]
    assert max(means) - min(means) > 40


def test_multi_class_labels():
    sites = make_synthetic_sites(num_sites=1, per_site=24, image_size=32, num_classes=2)
    assert set(np.unique(_stack(sites["site1"].train)[1])) == {0, 1, 2}


def test_volumes_give_25d_slices():
    sites = make_synthetic_sites(num_sites=2, per_site=16, image_size=32, volumes=True,
                                 depth=8)
    records = sites["site1"].train
    assert len(records) == 16 and {r.case_id for r in records} == {"case00000", "case00001"}
    first = [r for r in records if r.case_id == "case00000"]
    assert [r.slice_index for r in first] == list(range(8))
    # Channel 2 of slice z is channel 1 of slice z+1: the (i-1, i, i+1) stack.
    for a, b in zip(first, first[1:]):
        np.testing.assert_array_equal(a.image[..., 2], b.image[..., 1])
        np.testing.assert_array_equal(a.image[..., 1], b.image[..., 0])
    np.testing.assert_array_equal(first[0].image[..., 0], first[0].image[..., 1])  # edge


def test_natural_shapes_are_colour_scenes_with_several_objects():
    sites = make_synthetic_sites(num_sites=1, per_site=12, image_size=48, kind="natural")
    assert list(sites) == ["shapes1"]
    images, masks = _stack(sites["shapes1"].train)
    assert not np.array_equal(images[..., 0], images[..., 1])
    assert max(ndimage.label(m)[1] for m in masks) >= 2
    assert masks.reshape(len(masks), -1).any(axis=1).all()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_sites(kind="cats")
    with pytest.raises(ValueError, match="2-D and binary"):
        make_synthetic_sites(kind="natural", volumes=True)


@pytest.mark.parametrize("layout", ["folders", "fedfms"])
def test_written_data_reads_back_identically(tmp_path, layout):
    sites = make_synthetic_sites(num_sites=2, per_site=6, image_size=32, seed=3)
    write_sites(sites, tmp_path, layout=layout)
    loaded = load_sites(layout, tmp_path)
    assert list(loaded) == list(sites)
    for name in sites:
        assert loaded[name].num_train == sites[name].num_train
        assert loaded[name].num_val == sites[name].num_val
        for a, b in zip(sites[name].train, loaded[name].train):
            assert a.case_id == b.case_id
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)
