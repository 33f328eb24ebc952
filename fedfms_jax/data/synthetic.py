"""An embedded multi-site segmentation data set, so the project runs with no download.

`make_synthetic_sites(kind='medical')` renders anatomy-like grey slices: a textured body
outline, darker and brighter distractor organs, and one to three smooth irregular target
structures (with a share of empty slices). Each site has its own acquisition style
(intensity curve, contrast, bias field, noise, blur, structure size) and its own size, so the
sites are non-IID the way hospitals are and a model trained on one site does worse on
another. `volumes=True` renders 3-D cases and cuts them into 2.5-D slices (i-1, i, i+1).
`kind='natural'` renders colour scenes of generic shapes instead, for pretraining.

Everything is a pure function of the seed, vectorised over all records of a split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import fft as sp_fft
from scipy import special

from fedfms_jax.data.records import Record, Site

f32 = np.float32


@dataclasses.dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner turns anatomy into pixels, and how much data it has."""

    gamma: float             # intensity curve x -> x**gamma
    contrast: float          # gain around mid-grey
    offset: float            # brightness shift
    bias: float              # amplitude of the smooth multiplicative bias field
    noise: float             # std of additive noise, on the 0..1 scale
    blur: float              # Gaussian blur sigma, pixels at 128 px
    structure_scale: float   # target structure size relative to the reference site
    empty_fraction: float    # share of 2-D slices (or volumes) with no target
    size_fraction: float     # share of `per_site` training records


# The first four sites span the shifts seen across hospitals: a clean large site, a bright
# blurry one, a dark noisy one and a small low-contrast one with small structures.
BASE_STYLES = (
    SiteStyle(1.00, 1.00, 0.00, 0.10, 0.02, 0.5, 1.00, 0.20, 1.00),
    SiteStyle(0.60, 0.85, 0.04, 0.30, 0.04, 1.3, 1.25, 0.15, 0.55),
    SiteStyle(1.70, 1.35, -0.06, 0.15, 0.09, 0.3, 0.85, 0.25, 0.30),
    SiteStyle(1.25, 0.55, 0.12, 0.40, 0.06, 1.8, 0.65, 0.30, 0.15),
)


def site_style(index: int, seed: int) -> SiteStyle:
    """Style of site `index`: the base table, then seeded variations of it for more sites."""
    if index < len(BASE_STYLES):
        return BASE_STYLES[index]
    rng = np.random.default_rng([seed, index, 7])
    base = BASE_STYLES[index % len(BASE_STYLES)]
    jitter = lambda value, spread: float(value * np.exp(rng.uniform(-spread, spread)))
    return SiteStyle(
        gamma=jitter(base.gamma, 0.3), contrast=jitter(base.contrast, 0.2),
        offset=float(base.offset + rng.uniform(-0.05, 0.05)), bias=jitter(base.bias, 0.3),
        noise=jitter(base.noise, 0.4), blur=jitter(base.blur, 0.4),
        structure_scale=jitter(base.structure_scale, 0.2),
        empty_fraction=float(np.clip(base.empty_fraction + rng.uniform(-0.1, 0.1), 0, 0.6)),
        size_fraction=float(rng.uniform(0.15, 1.0)))


def make_synthetic_sites(num_sites: int = 4, per_site: int = 96, image_size: int = 128,
                         seed: int = 0, kind: str = "medical", num_classes: int = 1,
                         volumes: bool = False, depth: int = 16, val_fraction: float = 0.25,
                         ) -> dict[str, Site]:
    """The embedded data set as {site name: Site}, deterministic from `seed`.

    per_site: training records of the largest site; the others get their style's share.
    image_size: side S of the square u8[S,S,3] images.
    kind: 'medical' (non-IID sites with domain shift) or 'natural' (IID colour shapes).
    num_classes: target structure classes C (masks hold class indices 0..C).
    volumes: render 3-D cases of `depth` slices and cut them into 2.5-D slices.
    val_fraction: val records per train record (at least 2, or one case).
    """
    if kind not in ("medical", "natural"):
        raise ValueError(f"kind must be 'medical' or 'natural', got {kind!r}")
    if num_sites < 1 or per_site < 1 or image_size < 16:
        raise ValueError(f"need num_sites >= 1, per_site >= 1, image_size >= 16; got "
                         f"{num_sites}, {per_site}, {image_size}")
    if kind == "natural" and (volumes or num_classes != 1):
        raise ValueError("the natural-shapes variant is 2-D and binary")
    sites = {}
    for index in range(num_sites):
        style = site_style(index, seed)
        name = f"shapes{index + 1}" if kind == "natural" else f"site{index + 1}"
        num_train = per_site if kind == "natural" else max(2, round(per_site * style.size_fraction))
        num_val = max(2, round(num_train * val_fraction))
        splits = []
        for split, count in enumerate((num_train, num_val)):
            rng = np.random.default_rng([seed, index, split])
            first_case = 0 if split == 0 else 10_000  # val case ids never repeat train's
            if kind == "natural":
                images, labels = render_shapes(rng, count, image_size)
                splits.append(_records_2d(images, labels, first_case))
            elif volumes:
                num_cases = max(1, round(count / depth))
                images, labels = render_anatomy(rng, num_cases, depth, image_size, style,
                                                num_classes)
                splits.append(_records_25d(images, labels, first_case))
            else:
                images, labels = render_anatomy(rng, count, 1, image_size, style, num_classes)
                splits.append(_records_2d(images[:, 0], labels[:, 0], first_case))
        sites[name] = Site(name, splits[0], splits[1])
    return sites


def _records_2d(images, labels, first_case: int) -> list[Record]:
    """images u8[N,S,S] or [N,S,S,3], labels u8[N,S,S] -> one record per image."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return [Record(images[i], labels[i], f"case{first_case + i:05d}")
            for i in range(len(images))]


def _records_25d(volumes, labels, first_case: int) -> list[Record]:
    """volumes u8[N,D,S,S], labels u8[N,D,S,S] -> 2.5-D slice records (i-1, i, i+1)."""
    depth = volumes.shape[1]
    records = []
    for n in range(len(volumes)):
        for z in range(depth):
            neighbours = np.clip([z - 1, z, z + 1], 0, depth - 1)
            image = np.ascontiguousarray(np.moveaxis(volumes[n, neighbours], 0, -1))
            records.append(Record(image, labels[n, z], f"case{first_case + n:05d}", z))
    return records


# ---------------------------------------------------------------------------------------
# Rendering. Coordinates are in units of the image side, so styles hold at any size.


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...],
                 ) -> np.ndarray:
    """Gaussian-filtered white noise over the trailing len(sigma) axes, unit std per item.

    sigma: filter width in pixels per filtered axis. The noise is drawn directly as a
    spectrum (the Fourier transform of white noise is white) and shaped by the filter's
    gain, so the whole batch costs one inverse FFT; borders wrap, which texture does not mind.
    """
    axes = tuple(range(len(shape) - len(sigma), len(shape)))
    half = list(shape)
    half[-1] = shape[-1] // 2 + 1
    gain = np.ones((), f32)
    for i, (axis, s) in enumerate(zip(axes, sigma)):
        n = shape[axis]
        freq = sp_fft.rfftfreq(n) if i == len(axes) - 1 else sp_fft.fftfreq(n)
        gain = gain[..., None] * np.exp(-2 * (np.pi * s * freq) ** 2).astype(f32)
    spectrum = rng.standard_normal(half, dtype=f32) + 1j * rng.standard_normal(half, dtype=f32)
    out = sp_fft.irfftn(spectrum.astype(np.complex64) * gain, s=[shape[a] for a in axes],
                        axes=axes, workers=-1).astype(f32)
    out -= out.mean(axis=axes, keepdims=True)
    out /= out.std(axis=axes, keepdims=True) + 1e-6
    return out


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes, sigma in pixels."""
    if sigma <= 0.05:
        return images
    h, w = images.shape[-2:]
    gain = (np.exp(-2 * (np.pi * sigma * sp_fft.fftfreq(h)) ** 2)[:, None]
            * np.exp(-2 * (np.pi * sigma * sp_fft.rfftfreq(w)) ** 2)[None, :]).astype(f32)
    spectrum = sp_fft.rfft2(images, axes=(-2, -1), workers=-1)
    return sp_fft.irfft2(spectrum * gain, s=(h, w), axes=(-2, -1), workers=-1).astype(f32)


def _sigmoid(x):
    return special.expit(x)


def _blob(x, y, cx, cy, radius, harmonics, phases):
    """Normalised distance of pixels to a smooth irregular blob (< 1 inside).

    x, y: f32[...,S,S] pixel coordinates; cx, cy, radius broadcast against them;
    harmonics, phases: [K, ...] amplitudes and phases of the boundary's angular modes k=2..
    """
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy)
    # cos(k theta), sin(k theta) by the angle-addition recurrence: no trig on the pixel grid.
    c1, s1 = dx / np.maximum(r, 1e-6), dy / np.maximum(r, 1e-6)
    ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1
    boundary = 1.0
    for k in range(harmonics.shape[0]):
        boundary = boundary + harmonics[k] * (ck * np.cos(phases[k]) - sk * np.sin(phases[k]))
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
    return r / (np.maximum(radius, 1e-4) * boundary)


def render_anatomy(rng: np.random.Generator, num_cases: int, depth: int, size: int,
                   style: SiteStyle, num_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy-like cases as images u8[N,D,S,S] and labels u8[N,D,S,S] (0..num_classes)."""
    n, d, s = num_cases, depth, size
    shape4 = (n, d, s, s)
    u = lambda lo, hi, *extra: rng.uniform(lo, hi, (n, *extra)).astype(f32)
    y = (np.arange(s, dtype=f32)[:, None] + 0.5) / s
    x = (np.arange(s, dtype=f32)[None, :] + 0.5) / s
    # Slice position in [-1, 1] along the case; a 2-D case sits at its centre.
    z = np.zeros((1, 1), f32) if d == 1 else np.linspace(-1, 1, d, dtype=f32)[None, :]
    # Per-case values [N] -> [N,1,1,1]; per-slice values [N,D] -> [N,D,1,1].
    col = lambda v: v.reshape(n, 1, 1, 1) if v.ndim == 1 else v.reshape(n, d, 1, 1)
    # Boundary harmonics [N,K] -> [K,N,1,1,1], the layout `_blob` loops over.
    modes = lambda v: v.T.reshape(v.shape[1], n, 1, 1, 1)

    # Body: an ellipse-like outline that narrows towards the ends of a volume.
    taper = 1.0 - 0.2 * z ** 2
    body_d = _blob(x, y, col(u(0.46, 0.54)), col(u(0.46, 0.54)),
                   col(u(0.34, 0.42)[:, None] * taper),
                   modes(u(0.0, 0.06, 3)), modes(u(0, 2 * np.pi, 3)))
    body = _sigmoid((1.0 - body_d) / 0.015)

    sz = max(1.0, d / 5)
    texture = (0.07 * smooth_noise(rng, shape4, (sz, s / 24, s / 24))
               + 0.035 * smooth_noise(rng, shape4, (sz, s / 80, s / 80)))
    intensity = 0.45 + texture

    # Distractor organs (one darker, one brighter than tissue), so the target is found by
    # shape and texture, not by intensity alone.
    for delta in (-0.2, 0.12):
        organ_d = _blob(x, y, col(u(0.3, 0.7)), col(u(0.3, 0.7)),
                        col(u(0.06, 0.12)[:, None] * np.sqrt(np.clip(1 - z ** 2, 0.2, 1))),
                        modes(u(0.0, 0.15, 3)), modes(u(0, 2 * np.pi, 3)))
        intensity = intensity + delta * _sigmoid((1.0 - organ_d) / 0.05)

    # Target structures: up to three per case, each a 3-D blob whose section shrinks to
    # nothing at its ends (empty slices) and drifts across slices.
    labels = np.zeros(shape4, np.uint8)
    count = rng.choice([1, 1, 2, 3], size=n)
    count[rng.random(n) < style.empty_fraction] = 0
    lesion_texture = 0.06 * smooth_noise(rng, shape4, (sz, s / 50, s / 50))
    # Class 1 brighter than tissue, class 2 brighter still (unlike the darker organ).
    class_delta = np.array([0.3, 0.5, -0.3, 0.2], f32)
    for m in range(3):
        active = (m < count).astype(f32)
        cls = rng.integers(1, num_classes + 1, size=n)
        z0 = u(-0.35, 0.35) if d > 1 else np.zeros(n, f32)
        half = u(0.45, 0.9) if d > 1 else np.full(n, np.inf, f32)
        extent = np.sqrt(np.clip(1 - ((z - z0[:, None]) / half[:, None]) ** 2, 0, 1))
        radius = (style.structure_scale * u(0.06, 0.12))[:, None] * extent * active[:, None]
        cx = u(0.33, 0.67)[:, None] + u(-0.06, 0.06)[:, None] * z
        cy = u(0.33, 0.67)[:, None] + u(-0.06, 0.06)[:, None] * z
        blob_d = _blob(x, y, col(cx), col(cy), col(radius),
                       modes(u(0.0, 0.2, 4) / np.arange(1, 5, dtype=f32)),
                       modes(u(0, 2 * np.pi, 4)))
        inside = blob_d < 1.0
        soft = _sigmoid((1.0 - blob_d) / 0.06)
        intensity = intensity + soft * (class_delta[(cls - 1) % 4].reshape(n, 1, 1, 1)
                                        + lesion_texture)
        labels = np.where(inside, cls.reshape(n, 1, 1, 1).astype(np.uint8), labels)

    image = 0.04 + body * (intensity - 0.04)
    image = image * (1.0 + style.bias * smooth_noise(rng, shape4, (s, s / 3, s / 3)) * 0.5)
    image = np.clip(image, 0, 1) ** style.gamma
    image = 0.5 + style.contrast * (image - 0.5) + style.offset
    image = _blur(image.astype(f32), style.blur * s / 128)
    image = image + style.noise * rng.standard_normal(shape4, dtype=f32)
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return image, labels


def render_shapes(rng: np.random.Generator, count: int, size: int,
                  max_objects: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Colour scenes of generic shapes: images u8[N,S,S,3], labels u8[N,S,S] (1 = any shape)."""
    n, s = count, size
    y = (np.arange(s, dtype=f32)[:, None] + 0.5) / s
    x = (np.arange(s, dtype=f32)[None, :] + 0.5) / s
    col = lambda v: v.reshape(n, 1, 1)

    base = rng.uniform(0.15, 0.85, (n, 1, 1, 3)).astype(f32)
    image = base + 0.12 * np.moveaxis(smooth_noise(rng, (n, 3, s, s), (s / 10, s / 10)), 1, -1)
    image += 0.05 * smooth_noise(rng, (n, s, s), (s / 60, s / 60))[..., None]
    labels = np.zeros((n, s, s), np.uint8)

    count_objects = rng.integers(1, max_objects + 1, size=n)
    for m in range(max_objects):
        cx, cy = col(rng.uniform(0.12, 0.88, n)), col(rng.uniform(0.12, 0.88, n))
        a = col(rng.uniform(0.05, 0.18, n))
        b = a * col(rng.uniform(0.5, 1.0, n))
        angle = col(rng.uniform(0, np.pi, n))
        sides = col(rng.integers(3, 7, n).astype(f32))
        kind = rng.integers(0, 4, n)
        colour = rng.uniform(0, 1, (n, 1, 1, 3)).astype(f32)
        shading = 0.06 * smooth_noise(rng, (n, s, s), (s / 40, s / 40))[..., None]
        dist = np.full((n, s, s), np.inf, f32)
        for k in range(4):
            pick = (kind == k) & (m < count_objects)
            if pick.any():
                dist[pick] = _shape_distance(k, x - cx[pick], y - cy[pick], a[pick], b[pick],
                                             angle[pick], sides[pick])
        inside = dist < 1.0
        image = np.where(inside[..., None], colour + shading, image)
        labels[inside] = 1

    image = _blur(np.moveaxis(image, -1, 1), 0.6 * s / 128)
    image = np.moveaxis(image, 1, -1) + 0.02 * rng.standard_normal((n, s, s, 3), dtype=f32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), labels


def _shape_distance(kind: int, dx, dy, a, b, angle, sides):
    """Normalised distance (< 1 inside) to an ellipse, rectangle, regular polygon or star.

    dx, dy: f32[N,S,S] offsets from the shape centres; a, b: half-axes; angle: rotation;
    sides: polygon sides or star points; all per shape as [N,1,1].
    """
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == 0:
        return np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if kind == 1:
        return np.maximum(np.abs(u) / a, np.abs(v) / b)
    theta, radius = np.arctan2(v, u), np.hypot(u, v)
    if kind == 2:
        # Distance to the centre over the polygon boundary's distance in that direction.
        sector = np.pi / sides
        return radius * np.cos(theta % (2 * sector) - sector) / (a * np.cos(sector))
    return radius / (a * (1 + 0.4 * np.cos(sides * theta)))


# ---------------------------------------------------------------------------------------
# Writing to disk, so users can look at the data and readers can be exercised end to end.


def write_sites(sites: dict[str, Site], out: str | Path, layout: str = "folders",
                num_classes: int = 1) -> Path:
    """Writes sites to `out` in the 'folders' (PNG) or 'fedfms' (npy) layout.

    Binary masks are written as 0/255 PNGs so they are visible; multi-class masks keep their
    class indices. File stems are '<case>' or '<case>_s<slice>'.
    """
    from PIL import Image  # only needed here

    out = Path(out)
    if layout not in ("folders", "fedfms"):
        raise ValueError(f"layout must be 'folders' or 'fedfms', got {layout!r}")
    for name, site in sites.items():
        for split, records in (("train", site.train), ("val", site.val)):
            if layout == "folders":
                image_dir = out / name / split / "images"
                mask_dir = out / name / split / "masks"
            else:
                prefix = "" if split == "train" else "val_"
                image_dir = out / name / f"{prefix}data_npy"
                mask_dir = out / name / f"{prefix}label_npy"
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for record in records:
                stem = record.case_id + (f"_s{record.slice_index:03d}"
                                         if record.slice_index >= 0 else "")
                image, mask = np.asarray(record.image, np.uint8), record.mask
                if layout == "fedfms":
                    np.save(image_dir / f"{stem}.npy", image)
                    labels = mask[..., None] if mask.ndim == 2 else mask
                    if num_classes > 1 and mask.ndim == 2:
                        labels = np.stack([mask == c for c in range(1, num_classes + 1)], -1)
                    np.save(mask_dir / f"{stem}.npy", (labels > 0).astype(np.uint8))
                    continue
                grey = bool(np.all(image[..., :1] == image))
                Image.fromarray(image[..., 0] if grey else image).save(image_dir / f"{stem}.png")
                if mask.ndim == 3:
                    raise ValueError("the folders layout stores label-valued masks [H,W]")
                Image.fromarray((mask * 255 if num_classes == 1 else mask).astype(np.uint8)
                                ).save(mask_dir / f"{stem}.png")
    return out
