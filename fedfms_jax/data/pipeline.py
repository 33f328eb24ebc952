"""Grain pipelines: a site's records -> shuffled, resized, normalised, prompted batches.

Batches are dicts of numpy arrays (S = image_size, L = low_res_size, C = num_classes):
  image          f32[B,S,S,3]  SAM-normalised, or scaled to [0,1] as FedFMS does
  mask           f32[B,S,S,C]  full-size target, for evaluation
  mask_low_res   f32[B,L,L,C]  target at the mask decoder's output size, for the loss
The training streams take `image_output='pixels'`: instead of image and mask, pixels
u8[B,S,S,3] (resized and padded, not normalised: the loss normalises on the device) and
content i32[B,2] (the image's (h, w) inside S x S), mask_low_res as u8; or 'none' (decoder
mode with cached embeddings): no image at all, so the records' images are not even read.
  valid          bool[B]       False for padding rows of a short last batch
  record_index   i32[B]        index into the site's records (-1 for padding)
  boxes          f32[B,4]      prompt='box': (x0, y0, x1, y1) in model-input pixels
  point_coords   f32[B,K,2]    prompt='points': (x, y) in model-input pixels
  point_labels   i32[B,K]      1 positive, 0 negative, -1 padding
Every random choice (order, flips, rotations, prompts) derives from `seed` and the position
in the stream, so a pipeline replays exactly and its iterator resumes exactly from
`get_state()` / `set_state()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from fedfms_jax.data import prompts
from fedfms_jax.data.records import Record, steps_per_epoch
from fedfms_jax.models.sam import PIXEL_MEAN as SAM_PIXEL_MEAN  # noqa: F401 (re-exported)
from fedfms_jax.models.sam import PIXEL_STD as SAM_PIXEL_STD  # noqa: F401
from fedfms_jax.models.sam import content_shape, preprocess, resize_pad


IMAGE_OUTPUTS = ("image", "pixels", "none")


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    """How one record becomes one example; see `make_dataset` for the fields."""

    image_size: int
    low_res_size: int
    num_classes: int = 1
    normalise: str = "sam"
    resize: str = "stretch"
    augment: bool = False
    prompt: str = "none"
    box_jitter: float = 0.05
    num_positive: int = 1
    num_negative: int = 0
    per_component: bool = False
    min_component_size: int = 1
    image_output: str = "image"   # 'image' | 'pixels' | 'none': see the module docstring

    def __post_init__(self):
        checks = [
            (self.image_output in IMAGE_OUTPUTS, f"image_output must be one of "
                                                 f"{IMAGE_OUTPUTS}, got {self.image_output!r}"),
            (self.image_output != "none" or not self.augment,
             "image_output='none' (cached embeddings) cannot augment the images"),
            (self.normalise in ("sam", "unit"), f"normalise must be 'sam' or 'unit', got "
                                                f"{self.normalise!r}"),
            (self.resize in ("stretch", "longest_side"), "resize must be 'stretch' or "
                                                         f"'longest_side', got {self.resize!r}"),
            (self.prompt in ("none", "box", "points"), "prompt must be 'none', 'box' or "
                                                       f"'points', got {self.prompt!r}"),
            (self.image_size > 0 and self.low_res_size > 0, "sizes must be positive"),
            (self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (not self.per_component or self.num_classes == 1,
             "per_component prompts need binary masks (num_classes=1)"),
            (self.prompt != "points" or self.num_positive + self.num_negative > 0,
             "prompt='points' needs num_positive + num_negative > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def target_channels(mask: np.ndarray, num_classes: int, where: str = "") -> np.ndarray:
    """u8[H,W] class indices or u8[H,W,C] channels -> bool[H,W,C], channel c = class c+1."""
    if mask.ndim == 2:
        return mask[..., None] == np.arange(1, num_classes + 1, dtype=mask.dtype)
    if mask.ndim == 3 and mask.shape[-1] == num_classes:
        return mask > 0
    raise ValueError(f"{where}: mask of shape {mask.shape} does not fit num_classes="
                     f"{num_classes}")


def resize_nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[H,W,...] -> [h,w,...] by nearest neighbour at pixel centres (labels stay labels)."""
    h, w = hw
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64),
                      mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64),
                      mask.shape[1] - 1)
    return mask.take(rows, axis=0).take(cols, axis=1)  # two 1-D takes: 5x faster than 2-D


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads [h,w,...] at the bottom and right to [size,size,...], as SAM does."""
    h, w = array.shape[:2]
    if (h, w) == (size, size):
        return array
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad)


def make_example(record: Record, index: int, rng: np.random.Generator,
                 options: ExampleOptions) -> dict[str, np.ndarray]:
    """One record -> one example (the batch fields above, without the batch axis)."""
    o = options
    target = target_channels(np.asarray(record.mask), o.num_classes, record.path or
                             f"record {index}")
    image = None if o.image_output == "none" else np.asarray(record.image)
    if o.augment:
        # Exact flips and quarter turns, the same for image and mask, done at the source
        # resolution where they are cheap.
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        image, target = (np.rot90(a, turns, axes=(0, 1)) for a in (image, target))
        if flip:
            image, target = image[:, ::-1], target[:, ::-1]
        image = np.ascontiguousarray(image)
    source = target.shape[:2] if image is None else image.shape[:2]
    content = content_shape(*source, o.image_size, o.resize)
    content_low = content_shape(*target.shape[:2], o.low_res_size, o.resize)
    # The full-size mask: evaluation's target, and where prompts are drawn from.
    needs_mask = o.image_output == "image" or o.per_component or o.prompt != "none"
    mask = _pad(resize_nearest(target, content), o.image_size) if needs_mask else None
    mask_low = _pad(resize_nearest(target, content_low), o.low_res_size)

    example = {}
    if o.per_component:
        component = prompts.pick_component(mask[..., 0], rng, o.min_component_size)
        mask = component[..., None]
        mask_low = resize_nearest(mask, (o.low_res_size, o.low_res_size))
    foreground = None if mask is None else mask.any(axis=-1)
    if o.prompt == "box":
        example["boxes"] = prompts.box_from_mask(foreground, rng, o.box_jitter)
    elif o.prompt == "points":
        coords, labels = prompts.points_from_mask(foreground, rng, o.num_positive,
                                                  o.num_negative)
        example["point_coords"], example["point_labels"] = coords, labels
    if o.image_output == "image":
        model_input, _ = preprocess(image, o.image_size, resize=o.resize, normalise=o.normalise)
        example.update(image=np.ascontiguousarray(model_input, np.float32),
                       mask=np.ascontiguousarray(mask, np.float32),
                       mask_low_res=np.ascontiguousarray(mask_low, np.float32))
    else:
        if o.image_output == "pixels":
            pixels, _ = resize_pad(image, o.image_size, resize=o.resize)
            example.update(pixels=np.ascontiguousarray(pixels),
                           content=np.asarray(content, np.int32))
        example["mask_low_res"] = np.ascontiguousarray(mask_low, np.uint8)
    example.update(valid=np.bool_(True), record_index=np.int32(index))
    return example


class _RecordToExample:
    """grain random-map transform: record index -> example. A class, so it pickles."""

    def __init__(self, records: Sequence[Record], options: ExampleOptions):
        self.records = records
        self.options = options

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index = int(index)
        return make_example(self.records[index], index, rng, self.options)


class _StackAndPad:
    """grain batch_fn: stacks examples; a short batch is padded to `batch_size` rows marked
    valid=False, so every batch has one shape and a jitted step compiles once."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        missing = self.batch_size - len(examples)
        batch = {}
        for key in examples[0]:
            rows = [e[key] for e in examples]
            if missing:
                filler = np.zeros_like(rows[0])
                if key in ("record_index", "point_labels"):
                    filler = np.full_like(rows[0], -1)
                rows += [filler] * missing
            batch[key] = np.stack(rows)
        return batch


class _EpochShuffle(grain.MapDataset):
    """The parent's elements in a new random order each epoch (index // len): numpy's
    permutation of (seed, epoch), computed once per epoch. Grain's own shuffle computes each
    index alone (index_shuffle), ~0.8 ms per element holding the GIL, which at small image
    sizes is as long as the training step it feeds."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._epoch_order = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self._parent)
        epoch, position = divmod(int(index), length)
        cached, order = self._epoch_order  # one tuple: threads see a consistent pair
        if cached != epoch:
            order = np.random.default_rng([self._seed, epoch]).permutation(length)
            self._epoch_order = (epoch, order)
        return self._parent[int(order[position]) + epoch * length]


def make_dataset(records: Sequence[Record], *, image_size: int, batch_size: int,
                 low_res_size: int | None = None, seed: int = 0, shuffle: bool = True,
                 augment: bool = False, normalise: str = "sam", prompt: str = "none",
                 num_classes: int = 1, drop_remainder: bool = True,
                 num_epochs: int | None = 1, resize: str = "stretch",
                 box_jitter: float = 0.05, num_positive: int = 1, num_negative: int = 0,
                 per_component: bool = False, min_component_size: int = 1,
                 image_output: str = "image") -> grain.MapDataset:
    """Random-access dataset of batches of one site (fields in the module docstring).

    image_size: side S of the model input; low_res_size: side L of the decoder's masks
      (default S // 4, i.e. 256 for a 1024 SAM).
    seed: order (a new permutation each epoch), augmentation and prompts.
    shuffle: False keeps record order (evaluation).
    augment: random flips and quarter turns.
    normalise: 'sam' (ImageNet mean/std on 0..255) or 'unit' (x / 255, as FedFMS).
    prompt: 'none' (FedFMS's prompt-free mode), 'box' (jittered by up to
      box_jitter * S pixels per side) or 'points' (num_positive + num_negative points).
    per_component: each example targets one random connected component of its mask
      (instance data such as nuclei); components below min_component_size pixels are ignored.
    drop_remainder: drop the short last batch of an epoch (training) or pad it with rows
      marked valid=False (evaluation).
    num_epochs: passes over the records (None: endless); batches never straddle epochs.
    resize: 'stretch' to S x S, or 'longest_side' (keep the aspect, zero-pad, as SAM).
    image_output: 'image' (model input and the full-size mask, for evaluation), 'pixels'
      (training: u8 pixels and their content, normalised on the device) or 'none'.
    """
    if not records:
        raise ValueError("no records to build a pipeline from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps_per_epoch(len(records), batch_size, drop_remainder) == 0:
        raise ValueError(f"{len(records)} records make no full batch of {batch_size}; "
                         "lower batch_size or set drop_remainder=False")
    options = ExampleOptions(
        image_size=image_size, low_res_size=low_res_size or image_size // 4,
        num_classes=num_classes, normalise=normalise, resize=resize, augment=augment,
        prompt=prompt, box_jitter=box_jitter, num_positive=num_positive,
        num_negative=num_negative, per_component=per_component,
        min_component_size=min_component_size, image_output=image_output)
    seed = int(seed) % 2**32
    dataset = grain.MapDataset.range(len(records))
    if shuffle:
        dataset = _EpochShuffle(dataset, seed)
    dataset = dataset.random_map(_RecordToExample(records, options), seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder,
                            batch_fn=_StackAndPad(batch_size))
    if num_epochs != 1:
        # After batch: grain batches each epoch on its own, and shuffle and random_map see
        # the epoch in the index, so every epoch has a new order and new augmentations.
        dataset = dataset.repeat(num_epochs)
    return dataset


def make_pipeline(records: Sequence[Record], *, image_size: int, batch_size: int,
                  num_threads: int = 2, prefetch: int = 4, **options) -> grain.IterDataset:
    """The `make_dataset` batches as a prefetching grain IterDataset.

    `iter(pipeline)` gives an iterator with get_state()/set_state() for exact resume.
    num_threads: decoding threads (file reads, PIL and large numpy operations release the
      GIL, so threads scale with cores); prefetch: batches buffered ahead, kept small
      because 1024-px batches are large.
    """
    dataset = make_dataset(records, image_size=image_size, batch_size=batch_size, **options)
    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=prefetch if num_threads else 0)
    return dataset.to_iter_dataset(read_options)
