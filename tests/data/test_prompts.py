import numpy as np

from fedfms_jax.data.prompts import (box_from_mask, component_prompts, connected_components,
                                     pick_component, points_from_mask)


def _mask():
    mask = np.zeros((32, 40), bool)
    mask[4:10, 6:12] = True     # 36 px
    mask[20:30, 25:38] = True   # 130 px
    mask[15, 2] = True          # a speck
    return mask


def test_box_is_tight_without_jitter_and_zero_when_empty():
    np.testing.assert_array_equal(box_from_mask(_mask()), [2, 4, 37, 29])
    np.testing.assert_array_equal(box_from_mask(np.zeros((8, 8), bool)), [0, 0, 0, 0])
    assert box_from_mask(_mask()).dtype == np.float32


def test_jittered_box_grows_within_bounds_and_is_seeded():
    tight = box_from_mask(_mask())
    boxes = np.stack([box_from_mask(_mask(), np.random.default_rng(s), jitter=0.1)
                      for s in range(50)])
    assert np.all(boxes[:, :2] <= tight[:2]) and np.all(boxes[:, 2:] >= tight[2:])
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 39) and np.all(boxes[:, [1, 3]] <= 31)
    assert np.all(tight[:2] - boxes[:, :2] <= 4)  # 0.1 * 40 px
    assert len({tuple(b) for b in boxes}) > 10
    np.testing.assert_array_equal(box_from_mask(_mask(), np.random.default_rng(3), 0.1),
                                  boxes[3])


def test_points_fall_in_their_regions():
    mask = _mask()
    coords, labels = points_from_mask(mask, np.random.default_rng(0), 3, 2)
    assert coords.shape == (5, 2) and coords.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0])
    x, y = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert mask[y[:3], x[:3]].all() and not mask[y[3:], x[3:]].any()
    again, _ = points_from_mask(mask, np.random.default_rng(0), 3, 2)
    np.testing.assert_array_equal(coords, again)


def test_points_pad_when_the_region_is_too_small():
    mask = np.zeros((6, 6), bool)
    mask[2, 3] = True
    coords, labels = points_from_mask(mask, np.random.default_rng(0), 3, 1)
    np.testing.assert_array_equal(labels, [1, -1, -1, 0])
    np.testing.assert_array_equal(coords[0], [3, 2])
    _, labels = points_from_mask(np.zeros((6, 6), bool), np.random.default_rng(0), 2, 0)
    np.testing.assert_array_equal(labels, [-1, -1])


def test_connected_components_and_min_size():
    assert connected_components(_mask())[1] == 3
    labels, count = connected_components(_mask(), min_size=5)
    assert count == 2 and labels[15, 2] == 0
    diagonal = np.eye(4, dtype=bool)
    assert connected_components(diagonal)[1] == 1  # 8-connected


def test_one_prompt_per_component():
    out = component_prompts(_mask(), np.random.default_rng(0), num_positive=2)
    assert out["masks"].shape == (3, 32, 40) and out["boxes"].shape == (3, 4)
    assert out["point_coords"].shape == (3, 2, 2)
    np.testing.assert_array_equal(out["masks"].sum(axis=0), _mask())
    for mask, box in zip(out["masks"], out["boxes"]):
        np.testing.assert_array_equal(box, box_from_mask(mask))
    largest = component_prompts(_mask(), max_components=2)
    np.testing.assert_array_equal(largest["boxes"], [[6, 4, 11, 9], [25, 20, 37, 29]])


def test_pick_component_is_one_whole_component():
    picks = {int(pick_component(_mask(), np.random.default_rng(s)).sum()) for s in range(30)}
    assert picks == {1, 36, 130}
    assert not pick_component(np.zeros((4, 4), bool), np.random.default_rng(0)).any()
