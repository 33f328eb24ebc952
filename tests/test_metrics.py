"""Metrics against MONAI (the field's reference implementation) on random and hand-built
2-D and 3-D masks with anisotropic spacing, and the empty-case conventions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from fedfms_jax.metrics import (FEDFMS_THRESHOLDS, binary_metrics, case_metrics,
                                check_metric_names, field_of_view_diagonal, label_map,
                                site_summary, threshold_averaged)

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

TOLERANCE_MM = 1.5


def monai_reference(pred, truth, spacing, tolerance_mm, ignore_empty=True):
    """MONAI 1.6's figures for one binary mask pair (batch 1, one foreground channel)."""
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(truth[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask
        dice = monai_metrics.DiceMetric(include_background=True, ignore_empty=ignore_empty)(
            y_pred, y)
        iou = monai_metrics.compute_iou(y_pred, y, include_background=True,
                                        ignore_empty=ignore_empty)
        hd95 = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True,
                                                        percentile=95, spacing=list(spacing))
        nsd = monai_metrics.compute_surface_dice(y_pred, y, class_thresholds=[tolerance_mm],
                                                 include_background=True,
                                                 spacing=list(spacing))
    return {"dice": float(dice), "iou": float(iou), "hd95": float(hd95), "nsd": float(nsd)}


def random_blobs(rng, shape, fill):
    """Smoothed noise thresholded: irregular shapes with holes and several components."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2)
    return noise > np.quantile(noise, 1 - fill)


def ellipsoid(shape, centre, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def assert_matches_monai(pred, truth, spacing):
    ours = binary_metrics(pred, truth, spacing, tolerance_mm=TOLERANCE_MM)
    ref = monai_reference(pred, truth, spacing, TOLERANCE_MM)
    for name in ("dice", "iou"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name
    for name in ("hd95", "nsd"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-3), name
    return ours


CASES = [
    ((48, 64), (0.7, 1.3)),
    ((40, 56), (1.0, 1.0)),
    ((12, 40, 36), (3.0, 0.8, 1.1)),  # thick slices: anisotropy matters in 3-D
    ((20, 24, 28), (1.0, 0.5, 2.0)),
]


@pytest.mark.parametrize("shape, spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_match_monai(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    truth = random_blobs(rng, shape, 0.2)
    pred = random_blobs(rng, shape, 0.25) | (truth & (rng.random(shape) < 0.7))
    ours = assert_matches_monai(pred, truth, spacing)
    assert 0.05 < ours["dice"] < 0.95 and ours["hd95"] > 1  # a real disagreement to measure
    assert 0 < ours["nsd"] < 1


@pytest.mark.parametrize("shape, spacing", CASES)
def test_hand_built_shapes_match_monai(shape, spacing):
    centre = [n / 2 for n in shape]
    truth = ellipsoid(shape, centre, [n / 4 for n in shape])
    shifted = ellipsoid(shape, [c + 2 for c in centre], [n / 5 for n in shape])
    assert_matches_monai(shifted, truth, spacing)
    # Touching the array border: the border counts as outside, as in MONAI.
    border = np.zeros(shape, bool)
    border[(slice(0, shape[0] // 2),) + (slice(None),) * (len(shape) - 1)] = True
    assert_matches_monai(border, truth, spacing)
    same = assert_matches_monai(truth, truth, spacing)
    assert same["dice"] == 1 and same["hd95"] == 0 and same["nsd"] == 1


def test_hd95_of_two_points_is_their_distance_in_mm():
    shape, spacing = (5, 10, 10), (2.5, 1.0, 0.5)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[1, 2, 2], b[3, 2, 6] = True, True
    ours = binary_metrics(a, b, spacing, tolerance_mm=1.0)
    assert ours["hd95"] == pytest.approx(np.hypot(2 * 2.5, 4 * 0.5), abs=1e-6)
    assert ours["dice"] == 0 and ours["nsd"] == 0


@pytest.mark.parametrize("shape, spacing", [CASES[0], CASES[2]])
def test_empty_cases(shape, spacing):
    empty = np.zeros(shape, bool)
    mask = ellipsoid(shape, [n / 2 for n in shape], [n / 4 for n in shape])
    diagonal = field_of_view_diagonal(shape, spacing)
    assert diagonal == pytest.approx(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))

    # MONAI's ignore_empty: an empty truth has no Dice/IoU; both empty has nothing at all.
    both = binary_metrics(empty, empty, spacing, tolerance_mm=TOLERANCE_MM)
    ref = monai_reference(empty, empty, spacing, TOLERANCE_MM)
    assert both["outcome"] == "both_empty"
    for name in ("dice", "iou", "hd95", "nsd"):
        assert np.isnan(both[name]) and np.isnan(ref[name]), name

    missed = binary_metrics(empty, mask, spacing, tolerance_mm=TOLERANCE_MM)
    ref = monai_reference(empty, mask, spacing, TOLERANCE_MM)
    assert missed["outcome"] == "missed"
    assert missed["dice"] == ref["dice"] == 0 and missed["iou"] == ref["iou"] == 0
    assert missed["nsd"] == ref["nsd"] == 0
    # MONAI's HD95 is not finite here (the quantile of infinities); we count it as the
    # worst distance the volume allows.
    assert not np.isfinite(ref["hd95"]) and missed["hd95"] == pytest.approx(diagonal)

    spurious = binary_metrics(mask, empty, spacing, tolerance_mm=TOLERANCE_MM)
    ref = monai_reference(mask, empty, spacing, TOLERANCE_MM)
    assert spurious["outcome"] == "spurious"
    assert np.isnan(spurious["dice"]) and np.isnan(ref["dice"])
    assert np.isnan(spurious["iou"]) and np.isnan(ref["iou"])
    assert spurious["nsd"] == ref["nsd"] == 0
    assert not np.isfinite(ref["hd95"]) and spurious["hd95"] == pytest.approx(diagonal)

    # "score": MONAI's ignore_empty=False for Dice/IoU; HD95 0 and NSD 1 when both are empty.
    scored = binary_metrics(empty, empty, spacing, tolerance_mm=TOLERANCE_MM, empty="score")
    ref = monai_reference(empty, empty, spacing, TOLERANCE_MM, ignore_empty=False)
    assert scored["dice"] == ref["dice"] == 1 and scored["iou"] == ref["iou"] == 1
    assert scored["hd95"] == 0 and scored["nsd"] == 1
    scored = binary_metrics(mask, empty, spacing, tolerance_mm=TOLERANCE_MM, empty="score")
    ref = monai_reference(mask, empty, spacing, TOLERANCE_MM, ignore_empty=False)
    assert scored["dice"] == ref["dice"] == 0 and scored["iou"] == ref["iou"] == 0


def test_site_summary_counts_one_sided_cases_and_keeps_their_hd95():
    shape, spacing = (16, 16), (1.0, 2.0)
    mask = ellipsoid(shape, (8, 8), (4, 4))
    empty = np.zeros(shape, bool)
    truth = lambda m: m[..., None]
    cases = {
        "hit": case_metrics(mask.astype(np.uint8), truth(mask), spacing, tolerance_mm=1.0),
        "missed": case_metrics(empty.astype(np.uint8), truth(mask), spacing, tolerance_mm=1.0),
        "spurious": case_metrics(mask.astype(np.uint8), truth(empty), spacing, tolerance_mm=1.0),
        "empty": case_metrics(empty.astype(np.uint8), truth(empty), spacing, tolerance_mm=1.0),
    }
    summary = site_summary(cases)
    diagonal = field_of_view_diagonal(shape, spacing)
    assert summary["dice"] == pytest.approx(0.5)  # hit 1, missed 0; the others have no Dice
    assert summary["hd95"] == pytest.approx((0 + 2 * diagonal) / 3)  # never dropped
    assert summary["nsd"] == pytest.approx(1 / 3)
    assert (summary["cases"], summary["missed"], summary["spurious"],
            summary["both_empty"]) == (4, 1, 1, 1)


def test_label_map_and_multiclass_cases():
    logits = np.array([[[-1.0, -2.0], [3.0, 1.0], [0.5, 2.0]]])  # [1, 3, C=2]
    np.testing.assert_array_equal(label_map(logits), [[0, 1, 2]])
    np.testing.assert_array_equal(label_map(logits[..., :1]), [[0, 1, 1]])
    np.testing.assert_array_equal(label_map(logits, threshold=2.5), [[0, 1, 0]])
    truth = np.zeros((1, 3, 2), bool)
    truth[0, 1, 0] = truth[0, 2, 1] = True
    m = case_metrics(label_map(logits), truth, (1.0, 1.0), tolerance_mm=1.0)
    np.testing.assert_allclose(m["dice"], [1.0, 1.0])
    assert m["outcome"] == ["present", "present"]


def test_threshold_averaged_mode():
    truth = np.zeros((8, 8, 1), bool)
    truth[:4] = True
    logits = np.where(truth, 0.6, -1.0).astype(np.float32)  # above 0.1/0.3/0.5 only
    per_threshold = [case_metrics(label_map(logits, t), truth, (1.0, 1.0), tolerance_mm=1.0)
                     for t in FEDFMS_THRESHOLDS]
    averaged = threshold_averaged(per_threshold)
    np.testing.assert_allclose(averaged["dice"], [3 / 5])
    np.testing.assert_allclose(averaged["nsd"], [3 / 5])
    # Missed at 0.7 and 0.9: those thresholds count the field-of-view diagonal.
    np.testing.assert_allclose(averaged["hd95"], [2 / 5 * np.hypot(8, 8)])


def test_metric_names_are_checked():
    assert check_metric_names(["dice", " hd95"]) == ("dice", "hd95")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['hd59'\]"):
        check_metric_names(["dice", "hd59"])
