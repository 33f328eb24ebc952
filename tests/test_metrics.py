"""Metrics against scipy/numpy references and the stated conventions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fedfms_jax.metrics import (boundary, distance_transform, fedfms_metrics, hd95, per_case,
                                segmentation_metrics)


def blob(shape, centre, radius, rng=None):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = radius if rng is None else radius * (1 + 0.3 * np.sin(np.arctan2(yy - centre[0], xx - centre[1]) * 3))
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < r ** 2


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.5, 0.7)])
def test_distance_transform_matches_scipy(spacing):
    rng = np.random.default_rng(0)
    features = rng.random((37, 51)) < 0.02
    expected = ndimage.distance_transform_edt(~features, sampling=spacing)
    np.testing.assert_allclose(distance_transform(jnp.asarray(features), spacing), expected,
                               rtol=1e-5, atol=1e-5)
    assert np.isinf(np.asarray(distance_transform(jnp.zeros((4, 5), bool)))).all()


def reference_hd95(pred, target, spacing):
    """MONAI-style HD95 with scipy: max of the two directed 95th percentiles."""
    def edge(m):
        return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1),
                                            border_value=0)
    pe, te = edge(pred), edge(target)
    d_to_t = ndimage.distance_transform_edt(~te, sampling=spacing)[pe]
    d_to_p = ndimage.distance_transform_edt(~pe, sampling=spacing)[te]
    return max(np.percentile(d_to_t, 95), np.percentile(d_to_p, 95))


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.5, 0.5)])
def test_hd95_matches_reference(spacing):
    rng = np.random.default_rng(1)
    pred = blob((64, 64), (30, 28), 14, rng)
    target = blob((64, 64), (34, 36), 11)
    np.testing.assert_array_equal(boundary(jnp.asarray(target)),
                                  target & ~ndimage.binary_erosion(target, border_value=0))
    expected = reference_hd95(pred, target, spacing)
    assert expected > 3  # the shapes differ: a wrong distance would show
    np.testing.assert_allclose(float(hd95(jnp.asarray(pred), jnp.asarray(target), spacing)),
                               expected, rtol=1e-5)


def test_segmentation_metrics_conventions():
    h = w = 32
    target = np.zeros((4, h, w, 1), np.float32)
    target[0, 8:24, 8:24] = 1  # perfect prediction
    target[1, 8:24, 8:24] = 1  # half overlap
    # image 2: empty ground truth and empty prediction; image 3: empty GT, one false pixel
    logits = np.full((4, h, w, 1), -5.0, np.float32)
    logits[0, 8:24, 8:24] = 5
    logits[1, 8:24, 16:32] = 5
    logits[3, 0, 0] = 5
    spacing = np.array([[1, 1], [1, 1], [1, 1], [2, 2]], np.float32)
    m = {k: np.asarray(v) for k, v in segmentation_metrics(logits, target, spacing).items()}
    np.testing.assert_allclose(m["dice"][:, 0], [1.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(m["iou"][:, 0], [1.0, 1 / 3, 1.0, 0.0])
    assert m["hd95"][0, 0] == 0 and m["hd95"][2, 0] == 0 and np.isnan(m["hd95"][3, 0])
    np.testing.assert_allclose(m["hd95"][1, 0], reference_hd95(logits[1, ..., 0] > 0,
                                                               target[1, ..., 0] > 0.5, (1, 1)))


def test_fedfms_mode_averages_thresholds():
    target = np.zeros((1, 8, 8, 1), np.float32)
    target[0, :4] = 1
    logits = np.zeros((1, 8, 8, 1), np.float32)
    logits[0, :4] = 0.6  # above 0.1, 0.3, 0.5; below 0.7, 0.9
    m = fedfms_metrics(logits, target)
    np.testing.assert_allclose(m["dice"], [[3 / 5]])
    np.testing.assert_allclose(m["iou"], [[3 / 5]])


def test_per_case_sums_slices():
    target = np.zeros((3, 16, 16, 1), np.float32)
    logits = np.full((3, 16, 16, 1), -1.0, np.float32)
    target[0, :8] = 1
    logits[0, :8] = 1  # case a, slice 0: perfect (128 px)
    target[1, :2, :2] = 1  # case a, slice 1: 4 px missed
    target[2, 4:8, 4:8] = 1
    logits[2, 4:8, 4:8] = 1  # case b: perfect
    m = {k: np.asarray(v) for k, v in segmentation_metrics(logits, target).items()}
    cases = per_case(m, ["a", "a", "b"])
    np.testing.assert_allclose(cases["a"]["dice"], [2 * 128 / (128 + 132)])
    np.testing.assert_allclose(cases["b"]["dice"], [1.0])
    assert cases["a"]["hd95"][0] == 0  # slice 1's HD95 is undefined (empty prediction)
