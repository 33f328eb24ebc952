"""What a loaded data set holds, per site: counts, shapes, dtypes, labels, foreground."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedfms_jax.data.records import Record, Site, VolumeInfo


def _sample(records: Sequence[Record], limit: int | None) -> Sequence[Record]:
    if not limit or len(records) <= limit:
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def summarise_split(records: Sequence[Record], limit: int | None = None) -> dict:
    """Counts (exact) and pixel statistics (over at most `limit` evenly spaced records)."""
    image_shapes, image_dtypes, mask_shapes, mask_dtypes = set(), set(), set(), set()
    labels: set[int] = set()
    foreground, empty = [], 0
    for record in _sample(records, limit):
        image, mask = record.image, record.mask
        image_shapes.add(tuple(image.shape))
        image_dtypes.add(str(image.dtype))
        mask_shapes.add(tuple(mask.shape))
        mask_dtypes.add(str(mask.dtype))
        labels.update(np.flatnonzero(np.bincount(mask.ravel(), minlength=1)).tolist())
        hit = mask > 0
        foreground.append(float(hit.mean()))
        empty += not hit.any()
    examined = max(len(foreground), 1)
    return {
        "count": len(records),
        "cases": len({r.case_id for r in records}),
        "examined": len(foreground),
        "image_shapes": sorted(list(s) for s in image_shapes),
        "image_dtypes": sorted(image_dtypes),
        "mask_shapes": sorted(list(s) for s in mask_shapes),
        "mask_dtypes": sorted(mask_dtypes),
        "label_values": sorted(labels),
        "foreground_fraction": round(float(np.mean(foreground)) if foreground else 0.0, 5),
        "empty_fraction": round(empty / examined, 4),
        "spacing": sorted({r.spacing for r in records if r.spacing is not None})[:5] or None,
    }


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items(), key=lambda item: (-item[1], item[0])))


def summarise_volumes(volumes: Sequence[VolumeInfo]) -> dict:
    """Formats, spacing ranges (mm) and stored orientations of a site's cases, and every
    case whose label does not lie on its image's grid."""
    spacing = np.array([v.spacing for v in volumes], float).reshape(-1, 3)
    return {
        "cases": len(volumes),
        "image_formats": _counts(v.image_format for v in volumes),
        "label_formats": _counts(v.label_format for v in volumes),
        "spacing_mm": {axis: [float(spacing[:, i].min()), float(spacing[:, i].max())]
                       for i, axis in enumerate(("z", "row", "col"))} if len(volumes) else {},
        "orientations": _counts(v.orientation for v in volumes),
        "label_orientations": _counts(v.label_orientation for v in volumes),
        "label_crops": sum(v.geometry is None and v.label_shape != v.shape for v in volumes),
        "geometry_off": [{"case": v.case, "image": v.image, "label": v.label,
                          "problem": v.geometry, "resampled": v.resampled}
                         for v in volumes if v.geometry is not None],
    }


def summarise_sites(sites: Mapping[str, Site], limit: int | None = None) -> dict:
    """{'sites': {name: {'train': n, 'val': n, ...}}, 'totals': ..., 'skipped': [...]}."""
    out: dict = {"sites": {}, "skipped": []}
    for name, site in sites.items():
        train, val = summarise_split(site.train, limit), summarise_split(site.val, limit)
        out["sites"][name] = {
            "train": train["count"], "val": val["count"], "skipped": len(site.skipped),
            "details": {"train": train, "val": val},
        }
        if site.volumes:
            out["sites"][name]["volumes"] = summarise_volumes(site.volumes)
        out["skipped"] += [{"site": name, "path": b.path, "problem": b.problem}
                           for b in site.skipped]
    out["totals"] = {key: sum(s[key] for s in out["sites"].values())
                     for key in ("train", "val", "skipped")}
    return out


def format_summary(summary: dict) -> str:
    """Human-readable table of `summarise_sites` output."""
    fmt_shapes = lambda shapes: ", ".join("x".join(map(str, s)) for s in shapes) or "-"
    lines = []
    for name, site in summary["sites"].items():
        train, val = site["details"]["train"], site["details"]["val"]
        lines.append(
            f"{name}: train {train['count']} ({train['cases']} cases), val {val['count']} "
            f"({val['cases']} cases), skipped {site['skipped']}")
        lines.append(
            f"    image {fmt_shapes(train['image_shapes'])} {'/'.join(train['image_dtypes'])}"
            f" | mask {fmt_shapes(train['mask_shapes'])} {'/'.join(train['mask_dtypes'])}"
            f" | labels {train['label_values']}"
            f" | foreground {100 * train['foreground_fraction']:.2f}% train, "
            f"{100 * val['foreground_fraction']:.2f}% val"
            f" | empty {100 * train['empty_fraction']:.0f}% train")
        if "volumes" in site:
            lines.extend(_format_volumes(site["volumes"]))
    totals = summary["totals"]
    lines.append(f"total: train {totals['train']}, val {totals['val']}, "
                 f"skipped {totals['skipped']}")
    for bad in summary["skipped"]:
        lines.append(f"  skipped [{bad['site']}] {bad['path']}: {bad['problem']}")
    return "\n".join(lines)


def _format_volumes(volumes: dict) -> list[str]:
    counts = lambda c: ", ".join(f"{k} {n}" for k, n in c.items()) or "-"
    ranges = ", ".join(f"{axis} {low:g}" + (f"-{high:g}" if high != low else "")
                       for axis, (low, high) in volumes["spacing_mm"].items())
    lines = [f"    volumes: {volumes['cases']} cases | image {counts(volumes['image_formats'])}"
             f" | label {counts(volumes['label_formats'])} | spacing {ranges or '-'} mm"
             f" | orientation {counts(volumes['orientations'])}"
             f" (labels {counts(volumes['label_orientations'])})"
             + (f" | {volumes['label_crops']} labels on a crop of the image grid"
                if volumes["label_crops"] else "")]
    for off in volumes["geometry_off"]:
        what = "resampled onto the image grid" if off["resampled"] else "not used"
        lines.append(f"    geometry off: {off['case']} ({what}), {Path(off['label']).name} vs "
                     f"{Path(off['image']).name}: {off['problem']}")
    return lines
