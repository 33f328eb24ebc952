"""Segmentation metrics as the field reports them (MONAI / Medical Segmentation Decathlon
conventions), per case on the original voxel grid with its spacing in mm: Dice, IoU, HD95
and Normalised Surface Dice (NSD). Pure numpy/scipy functions.

A case is a volume (3-D surface distances, spacing (z, row, col)) or an image (2-D,
spacing (row, col); 1 when unknown, so distances are then in pixels).

Surfaces and distances follow MONAI 1.6 exactly: a surface voxel is a foreground voxel with
a face-neighbour outside the mask (the array border counts as outside); distances are exact
Euclidean distances between surface-voxel centres scaled by the spacing, in float32.
HD95 = max of the two directed 95th percentiles (`compute_hausdorff_distance(percentile=95)`);
NSD = share of both surfaces within `tolerance_mm` of the other (`compute_surface_dice`).

Empty cases, by `empty` (MONAI's `ignore_empty`):
                        both empty    truth empty, pred not   truth not, pred empty
  "ignore" (default)    all NaN       Dice/IoU NaN, NSD 0     Dice/IoU/NSD 0
  "score"               1, 1, 0, 1    Dice/IoU/NSD 0          Dice/IoU/NSD 0
HD95 of a one-sided-empty case is the diagonal of the case's field of view in mm (MONAI
gives inf), so a missed lesion or a spurious mask counts as the worst distance instead of
being dropped; such cases are also counted (`outcome`: "missed" / "spurious"). NaN means
"nothing to score" and is left out of means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

METRICS = ("dice", "iou", "hd95", "nsd")
EMPTY_CONVENTIONS = ("ignore", "score")
# FedFMS's compatibility mode: thresholds on the raw logits, every figure averaged over them.
FEDFMS_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
OUTCOMES = ("present", "missed", "spurious", "both_empty")


def check_metric_names(names: Sequence[str]) -> tuple[str, ...]:
    """The names, or ValueError naming the unknown ones (a typo is not silently skipped)."""
    names = tuple(n.strip() for n in names if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or names}; known: {', '.join(METRICS)}")
    return names


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of mask bool[*S]: foreground with a face-neighbour outside the mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel (zero-padded at the
    array border): surfaces and distances are unchanged, the work shrinks to the objects."""
    union = pred | truth
    slices = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        slices.append(slice(present[0], present[-1] + 1))
    crop = tuple(slices)
    return (np.pad(pred[crop], 1), np.pad(truth[crop], 1))


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(distances f32[Np] from each surface voxel of pred to truth's surface, f32[Nt] back),
    in the units of spacing. Both masks must be non-empty."""
    pred, truth = _crop_to_union(pred, truth)
    scale = np.asarray(spacing, np.float64)
    pred_points = np.argwhere(surface(pred)) * scale
    truth_points = np.argwhere(surface(truth)) * scale
    to_truth = cKDTree(truth_points).query(pred_points, k=1)[0]
    to_pred = cKDTree(pred_points).query(truth_points, k=1)[0]
    return to_truth.astype(np.float32), to_pred.astype(np.float32)


def field_of_view_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the diagonal of the grid's extent (shape * spacing), in mm."""
    return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * np.asarray(spacing)) ** 2)))


def binary_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *,
                   tolerance_mm: float, empty: str = "ignore",
                   metrics: Sequence[str] = METRICS) -> dict:
    """Metrics of one class of one case: pred, truth bool[*S] (S 2-D or 3-D), spacing of
    len(S) in mm -> {metric: float, "outcome": one of OUTCOMES}; see the module docstring."""
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not fit a {pred.ndim}-D mask")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    nan = float("nan")
    out: dict = {}
    if has_truth:
        outcome = "present" if has_pred else "missed"
    else:
        outcome = "spurious" if has_pred else "both_empty"
    out["outcome"] = outcome
    want = set(metrics)
    if {"dice", "iou"} & want:
        intersection = float(np.count_nonzero(pred & truth))
        total = float(np.count_nonzero(pred)) + float(np.count_nonzero(truth))
        if has_truth:
            dice, iou = 2 * intersection / total, intersection / (total - intersection)
        elif empty == "ignore":
            dice = iou = nan
        else:
            dice = iou = 0.0 if has_pred else 1.0
        if "dice" in want:
            out["dice"] = dice
        if "iou" in want:
            out["iou"] = iou
    if {"hd95", "nsd"} & want:
        if outcome == "present":
            to_truth, to_pred = surface_distances(pred, truth, spacing)
            hd95 = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
            tau = np.float32(tolerance_mm)  # compared in float32, as MONAI
            nsd = float((np.count_nonzero(to_truth <= tau) + np.count_nonzero(to_pred <= tau))
                        / (to_truth.size + to_pred.size))
        elif outcome == "both_empty":
            hd95, nsd = (nan, nan) if empty == "ignore" else (0.0, 1.0)
        else:
            hd95, nsd = field_of_view_diagonal(pred.shape, spacing), 0.0
        if "hd95" in want:
            out["hd95"] = hd95
        if "nsd" in want:
            out["nsd"] = nsd
    return out


def label_map(logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Class logits f32[..., C] -> u8[...] labels (0 background, c + 1 for channel c).

    A pixel takes the channel with the highest logit among those above `threshold`, so
    classes never overlap in the output (what predict writes is what evaluation scores).
    """
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:
        return (logits[..., 0] > threshold).astype(np.uint8)
    best = np.argmax(logits, axis=-1)
    above = np.take_along_axis(logits, best[..., None], axis=-1)[..., 0] > threshold
    return np.where(above, best + 1, 0).astype(np.uint8)


def case_metrics(pred_labels: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *,
                 tolerance_mm: float, empty: str = "ignore",
                 metrics: Sequence[str] = METRICS) -> dict:
    """All classes of one case: pred_labels u8[*S] (label_map), truth bool[*S, C] ->
    {metric: f64[C], "outcome": [C] outcome names}."""
    num_classes = truth.shape[-1]
    per_class = [binary_metrics(pred_labels == c + 1, truth[..., c], spacing,
                                tolerance_mm=tolerance_mm, empty=empty, metrics=metrics)
                 for c in range(num_classes)]
    out = {m: np.array([p[m] for p in per_class], np.float64) for m in metrics}
    out["outcome"] = [p["outcome"] for p in per_class]
    return out


def threshold_averaged(per_threshold: Sequence[dict]) -> dict:
    """FedFMS's mode: each metric averaged over the thresholds' case_metrics (NaN where a
    threshold has nothing to score is left out); outcomes are those at 0.5."""
    metrics = [k for k in per_threshold[0] if k != "outcome"]
    stacked = {m: np.stack([p[m] for p in per_threshold]) for m in metrics}
    out = {}
    for m, values in stacked.items():
        finite = ~np.isnan(values)
        out[m] = np.where(finite.any(0), np.where(finite, values, 0).sum(0)
                          / np.maximum(finite.sum(0), 1), np.nan)
    out["outcome"] = per_threshold[FEDFMS_THRESHOLDS.index(0.5)]["outcome"]
    return out


def site_summary(cases: dict[str, dict], metrics: Sequence[str] = METRICS) -> dict:
    """Means over a site's cases (each case's class mean; NaN left out) and outcome counts:
    {metric: float, "cases": n, "missed": n, "spurious": n, "both_empty": n}."""
    out: dict = {}
    for m in metrics:
        values = [float(np.nanmean(c[m])) if np.isfinite(c[m]).any() else np.nan
                  for c in cases.values()]
        finite = [v for v in values if np.isfinite(v)]
        out[m] = float(np.mean(finite)) if finite else float("nan")
    out["cases"] = len(cases)
    for outcome in OUTCOMES[1:]:
        out[outcome] = int(sum(c["outcome"].count(outcome) for c in cases.values()))
    return out
