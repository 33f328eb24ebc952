"""SAM prompts drawn from ground-truth masks: boxes, points, one per connected component.

Coordinates are (x, y) pixel indices of the array they come from (the model input in the
pipeline); SAM's prompt encoder adds the half-pixel shift itself. Every draw takes an
explicit `np.random.Generator`, so prompts are a pure function of the seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Point labels as SAM's prompt encoder reads them.
POSITIVE, NEGATIVE, PADDING = 1, 0, -1
# 8-connectivity: touching nuclei that meet at a corner are one object in most annotations.
_EIGHT = np.ones((3, 3), bool)


def box_from_mask(mask: np.ndarray, rng: np.random.Generator | None = None,
                  jitter: float = 0.0) -> np.ndarray:
    """Bounding box f32[4] = (x0, y0, x1, y1) of the foreground of bool[H,W].

    jitter: each side moves outwards by a random 0..jitter*max(H, W) pixels (MedSAM trains
    with such loose boxes), clipped to the image. An empty mask gives (0, 0, 0, 0).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, np.float32)
    h, w = mask.shape
    box = np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)
    shift = int(jitter * max(h, w))
    if shift > 0 and rng is not None:
        box += rng.integers(0, shift + 1, size=4) * np.array([-1, -1, 1, 1])
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    return box.astype(np.float32)


def points_from_mask(mask: np.ndarray, rng: np.random.Generator, num_positive: int = 1,
                     num_negative: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random points of bool[H,W]: coords f32[K,2] (x, y) and labels i32[K], K = pos + neg.

    Positive points come from the foreground, negative ones from the background; when a
    region has too few pixels its slots are padding (label -1, coords 0).
    """
    k = num_positive + num_negative
    coords = np.zeros((k, 2), np.float32)
    labels = np.full(k, PADDING, np.int32)
    flat = mask.ravel()
    w = mask.shape[1]
    start = 0
    for want, region, label in ((num_positive, flat, POSITIVE), (num_negative, ~flat, NEGATIVE)):
        if want == 0:
            continue
        pixels = np.flatnonzero(region)
        take = min(want, pixels.size)
        if take:
            chosen = rng.choice(pixels, size=take, replace=False)
            coords[start:start + take] = np.stack([chosen % w, chosen // w], axis=-1)
            labels[start:start + take] = label
        start += want
    return coords, labels


def connected_components(mask: np.ndarray, min_size: int = 1) -> tuple[np.ndarray, int]:
    """Instance labels i32[H,W] (0 = background, 1..n) of the foreground of bool[H,W].

    Components smaller than `min_size` pixels are dropped (annotation specks).
    """
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if min_size > 1 and count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_size
        keep[0] = False
        relabel = np.zeros(count + 1, np.int32)
        relabel[keep] = np.arange(1, keep.sum() + 1)
        labels, count = relabel[labels], int(keep.sum())
    return labels.astype(np.int32), int(count)


def component_prompts(mask: np.ndarray, rng: np.random.Generator | None = None, *,
                      max_components: int | None = None, min_size: int = 1,
                      jitter: float = 0.0, num_positive: int = 1, num_negative: int = 0,
                      ) -> dict[str, np.ndarray]:
    """One prompt per connected component of bool[H,W] (instance data such as nuclei).

    Returns, for M components (the largest `max_components` when given):
      masks bool[M,H,W], boxes f32[M,4], point_coords f32[M,K,2], point_labels i32[M,K].
    Negative points of a component come from outside that component.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    labels, count = connected_components(mask, min_size)
    ids = np.arange(1, count + 1)
    if max_components is not None and count > max_components:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        ids = np.sort(ids[np.argsort(-sizes, kind="stable")[:max_components]])
    masks = labels[None] == ids[:, None, None]
    k = num_positive + num_negative
    boxes = np.zeros((len(ids), 4), np.float32)
    coords = np.zeros((len(ids), k, 2), np.float32)
    point_labels = np.full((len(ids), k), PADDING, np.int32)
    for i, component in enumerate(masks):
        boxes[i] = box_from_mask(component, rng, jitter)
        if k:
            coords[i], point_labels[i] = points_from_mask(component, rng, num_positive,
                                                          num_negative)
    return {"masks": masks, "boxes": boxes, "point_coords": coords, "point_labels": point_labels}


def pick_component(mask: np.ndarray, rng: np.random.Generator,
                   min_size: int = 1) -> np.ndarray:
    """bool[H,W]: one connected component of the foreground, chosen at random (or empty)."""
    labels, count = connected_components(mask, min_size)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == rng.integers(1, count + 1)
