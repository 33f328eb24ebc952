"""Scoring a model on a site's records: every slice predicted, mapped back to its original
grid, and scored per case (a volume, or an image) with `fedfms_jax.metrics`.

    scores = score_records(records, predict_fn, preprocessing, EvalSettings())

`predict_fn(batch) -> logits f32[B, L, L, C]` takes a batch of `make_example` fields (image
f32[B,S,S,3] and, for prompted models, boxes / points), so the engine's jitted forward, a
Flower site's and `predict`'s are all the same call. A case is
  * a volume: the records of one case_id with 3-D spacing (z, row, col), i.e. slices of a
    volume read by the volume readers; all of its slices must be there (evaluation splits
    are never subsampled), and distances are 3-D in mm;
  * otherwise one image, keyed by its file stem, with 2-D distances in mm (pixels when the
    reader knows no spacing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fedfms_jax import metrics as metrics_lib
from fedfms_jax.data.pipeline import ExampleOptions, make_example, resize_nearest, target_channels
from fedfms_jax.data.preprocessing import Preprocessing
from fedfms_jax.data.records import Record
from fedfms_jax.models.sam import content_shape, postprocess_masks

EVAL_MODES = ("standard", "fedfms")
COUNTS = ("cases", "images", "missed", "spurious", "both_empty")

PredictFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """metrics: which of dice, iou, hd95, nsd to compute.
    mode: 'standard' (foreground where the logit > 0, i.e. sigmoid > 0.5) or 'fedfms'
      (FedFMS's compatibility mode: raw logits thresholded at 0.1, 0.3, 0.5, 0.7, 0.9 and
      every figure averaged over the thresholds).
    empty: 'ignore' (MONAI's ignore_empty, the default) or 'score'; see fedfms_jax.metrics.
    nsd_tolerance_mm: NSD's tolerance tau.
    batch_size: slices per forward pass.
    """

    metrics: tuple[str, ...] = metrics_lib.METRICS
    mode: str = "standard"
    empty: str = "ignore"
    nsd_tolerance_mm: float = 2.0
    batch_size: int = 8

    @classmethod
    def from_config(cls, eval_config) -> "EvalSettings":
        """From a config's `eval` block; ValueError naming the key at fault."""
        names = eval_config.metrics
        names = names.split(",") if isinstance(names, str) else list(names)
        if [n.strip() for n in names] in (["sigmoid"], ["fedfms"]):
            raise ValueError(f"eval.metrics={eval_config.metrics!r} is the old threshold "
                             "setting: it is eval.mode now (standard | fedfms); eval.metrics "
                             f"lists metrics ({', '.join(metrics_lib.METRICS)})")
        try:
            metrics = metrics_lib.check_metric_names(names)
        except ValueError as error:
            raise ValueError(f"eval.metrics: {error}") from None
        settings = cls(metrics=metrics, mode=eval_config.mode, empty=eval_config.empty,
                       nsd_tolerance_mm=float(eval_config.nsd_tolerance_mm),
                       batch_size=int(eval_config.batch_size))
        return settings

    def __post_init__(self):
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval.mode={self.mode!r}; known: {', '.join(EVAL_MODES)}")
        if self.empty not in metrics_lib.EMPTY_CONVENTIONS:
            raise ValueError(f"eval.empty={self.empty!r}; known: "
                             f"{', '.join(metrics_lib.EMPTY_CONVENTIONS)}")
        if not (self.nsd_tolerance_mm > 0 and math.isfinite(self.nsd_tolerance_mm)):
            raise ValueError(f"eval.nsd_tolerance_mm={self.nsd_tolerance_mm} must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size} must be >= 1")

    @property
    def thresholds(self) -> tuple[float, ...]:
        return metrics_lib.FEDFMS_THRESHOLDS if self.mode == "fedfms" else (0.0,)


@dataclasses.dataclass
class SiteScores:
    """One site's means over its cases, outcome counts, and every case's figures."""

    dice: float
    iou: float
    hd95: float
    nsd: float
    cases: int
    images: int
    missed: int = 0
    spurious: int = 0
    both_empty: int = 0
    per_case: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {m: getattr(self, m) for m in metrics_lib.METRICS}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_scores(scores: Sequence[SiteScores]) -> SiteScores:
    """The mean of several models' scores of one site (the local baseline's unseen site):
    every figure and count averaged, case by case; a case's outcome lists each model's."""
    def mean(values):
        finite = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    def combine(key, values):
        if key == "outcome":  # one per model
            return values
        if isinstance(values[0], list):  # per class
            return [mean(v) for v in zip(*values)]
        return mean(values)

    per_case = {case: {k: combine(k, [s.per_case[case][k] for s in scores])
                       for k in scores[0].per_case[case]} for case in scores[0].per_case}
    return SiteScores(**{m: mean([s.means()[m] for s in scores]) for m in metrics_lib.METRICS},
                      **{c: float(np.mean([getattr(s, c) for s in scores])) for c in COUNTS},
                      per_case=per_case)


# --- cases ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """Records scored together: a volume's slices (in slice order) or one image."""

    key: str
    indices: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def is_volume(self) -> bool:
        return len(self.spacing) == 3


def image_key(record: Record) -> str:
    """An image's case id: its file stem (the case id for records without a file)."""
    if record.path:
        return Path(record.path).name.split(".")[0]
    return record.case_id if record.slice_index < 0 else f"{record.case_id}_s{record.slice_index}"


def group_cases(records: Sequence[Record]) -> list[Case]:
    """Volume cases (records with 3-D spacing, grouped by case_id) and image cases, in the
    order they first appear; ValueError naming a volume case whose slices are not all
    there (0..Z-1), since its 3-D figures would be wrong."""
    volumes: dict[str, list[int]] = {}
    order: list[tuple[str, object]] = []
    for i, record in enumerate(records):
        if record.spacing is not None and len(record.spacing) == 3 and record.slice_index >= 0:
            if record.case_id not in volumes:
                volumes[record.case_id] = []
                order.append(("volume", record.case_id))
            volumes[record.case_id].append(i)
        else:
            order.append(("image", i))
    cases, used = [], set()
    for kind, item in order:
        if kind == "volume":
            indices = sorted(volumes[item], key=lambda i: records[i].slice_index)
            slices = [records[i].slice_index for i in indices]
            if slices != list(range(len(slices))):
                missing = sorted(set(range(max(slices) + 1)) - set(slices))
                raise ValueError(f"case {item!r} ({records[indices[0]].path}): evaluation "
                                 f"needs every slice of a volume, but slices {missing[:10]} "
                                 "are missing (were they subsampled?)")
            key, spacing = item, tuple(records[indices[0]].spacing)
        else:
            record = records[item]
            key, indices = image_key(record), [item]
            spacing = tuple(record.spacing) if record.spacing is not None else (1.0, 1.0)
        unique, n = key, 1
        while unique in used:  # two images with one stem in different folders
            n += 1
            unique = f"{key}#{n}"
        used.add(unique)
        cases.append(Case(unique, tuple(indices), spacing if kind == "volume" else spacing[-2:]))
    return cases


# --- prediction -----------------------------------------------------------------------


def forward(batch: dict[str, np.ndarray], predict_fn: PredictFn, batch_size: int) -> np.ndarray:
    """predict_fn over batch fields [N, ...] in chunks of batch_size rows (the last one
    zero-padded, so one program serves every call) -> logits f32[N, L, L, C]."""
    n = len(batch["image"])
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
        rows = len(chunk["image"])
        if rows < batch_size:
            chunk = {k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
        out.append(np.asarray(predict_fn(chunk))[:rows])
    return np.concatenate(out)


def to_original(logits: np.ndarray, original_size: tuple[int, int],
                prep: Preprocessing) -> np.ndarray:
    """Decoder logits f32[N, L, L, C] -> f32[N, H, W, C] on the original pixel grid: upsampled
    to the model input, its padding cropped, resized to H x W (SAM's postprocessing)."""
    content = content_shape(*original_size, prep.image_size, prep.resize)
    return np.asarray(postprocess_masks(logits, content, tuple(original_size), prep.image_size))


def example_options(prep: Preprocessing) -> ExampleOptions:
    return ExampleOptions(image_size=prep.image_size, low_res_size=prep.low_res_size,
                          num_classes=prep.num_classes, normalise=prep.normalise,
                          resize=prep.resize, augment=False,
                          prompt=prep.prompt if prep.prompt in ("box", "points") else "none")


MODEL_FIELDS = ("image", "boxes", "point_coords", "point_labels")


def predict_labels(n: int, batch_for: Callable[[range], dict[str, np.ndarray]],
                   predict_fn: PredictFn, prep: Preprocessing, original_size: tuple[int, int],
                   thresholds: Sequence[float], batch_size: int,
                   progress: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
    """Label maps u8[n, H, W] (one per threshold) of n slices of one original size; the
    model input of slices `indices` comes from batch_for(indices), batch_size at a time
    (so a 1024-px volume never sits in memory as model input)."""
    out: list[list[np.ndarray]] = [[] for _ in thresholds]
    for start in range(0, n, batch_size):
        indices = range(start, min(n, start + batch_size))
        logits = to_original(forward(batch_for(indices), predict_fn, batch_size),
                             original_size, prep)
        for maps, threshold in zip(out, thresholds):
            maps.append(metrics_lib.label_map(logits, threshold))
        progress(len(indices))
    return [np.concatenate(maps) for maps in out]


def predict_case(records: Sequence[Record], case: Case, predict_fn: PredictFn,
                 prep: Preprocessing, settings: EvalSettings, seed: int = 0
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """(per threshold u8[Z,H,W] (volume) or u8[H,W] (image) label maps, truth bool[...,C])."""
    options = example_options(prep)
    masks = [target_channels(np.asarray(records[i].mask), prep.num_classes,
                             records[i].path or case.key) for i in case.indices]
    original = masks[0].shape[:2]
    if any(m.shape[:2] != original for m in masks):
        raise ValueError(f"case {case.key!r}: slices of different sizes")

    def batch_for(positions):
        examples = [make_example(records[case.indices[p]], case.indices[p],
                                 np.random.default_rng([seed, case.indices[p]]), options)
                    for p in positions]
        return {f: np.stack([e[f] for e in examples]) for f in MODEL_FIELDS if f in examples[0]}

    maps = predict_labels(len(case.indices), batch_for, predict_fn, prep, original,
                          settings.thresholds, settings.batch_size)
    truth = np.stack(masks)
    if not case.is_volume:
        maps, truth = [m[0] for m in maps], truth[0]
    return maps, truth


def score_case(maps: Sequence[np.ndarray], truth: np.ndarray, case: Case,
               settings: EvalSettings) -> dict:
    """metrics.case_metrics of a case, threshold-averaged in FedFMS's mode."""
    per_threshold = [metrics_lib.case_metrics(m, truth, case.spacing,
                                              tolerance_mm=settings.nsd_tolerance_mm,
                                              empty=settings.empty, metrics=settings.metrics)
                     for m in maps]
    return per_threshold[0] if len(per_threshold) == 1 else metrics_lib.threshold_averaged(
        per_threshold)


def case_record(scored: dict, metrics: Sequence[str]) -> dict:
    """A case's JSON figures: each metric's class mean (and per class when C > 1), outcomes."""
    out = {}
    for m in metrics:
        values = scored[m]
        out[m] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        if len(values) > 1:
            out[f"{m}_per_class"] = [float(v) for v in values]
    out["outcome"] = scored["outcome"][0] if len(scored["outcome"]) == 1 else scored["outcome"]
    return out


def score_records(records: Sequence[Record], predict_fn: PredictFn, prep: Preprocessing,
                  settings: EvalSettings, *, seed: int = 0,
                  predictions: dict | None = None) -> SiteScores:
    """Scores of one site's records. With `predictions` (a dict), also fills it with each
    case's u8 label map at the first threshold (what `predict` writes), keyed by case."""
    if not records:
        raise ValueError("no records to score")
    scored = {}
    for case in group_cases(records):
        maps, truth = predict_case(records, case, predict_fn, prep, settings, seed)
        scored[case.key] = score_case(maps, truth, case, settings)
        if predictions is not None:
            predictions[case.key] = maps[0]
    summary = metrics_lib.site_summary(scored, settings.metrics)
    means = {m: summary.get(m, float("nan")) for m in metrics_lib.METRICS}
    return SiteScores(**means, cases=summary["cases"], images=len(records),
                      missed=summary["missed"], spurious=summary["spurious"],
                      both_empty=summary["both_empty"],
                      per_case={k: case_record(v, settings.metrics) for k, v in scored.items()})


def example_prediction(record: Record, predict_fn: PredictFn, prep: Preprocessing,
                       settings: EvalSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One record, as scored, shown at the decoder's resolution L for the plots:
    (image u8[L,L,3], truth bool[L,L], prediction bool[L,L]); the first class."""
    case = Case(image_key(record), (0,), (1.0, 1.0))
    maps, truth = predict_case([record], case, predict_fn, prep,
                               dataclasses.replace(settings, mode="standard"))
    size = (prep.low_res_size, prep.low_res_size)
    image = np.asarray(record.image)
    shown = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(
        size[::-1], Image.Resampling.BILINEAR))
    return (shown, resize_nearest(truth[..., 0], size),
            resize_nearest(maps[0] == 1, size))
