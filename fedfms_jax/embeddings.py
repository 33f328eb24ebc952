"""Image embeddings of a frozen encoder, computed once per training image and reused.

In `decoder` mode the image encoder (and the prompt encoder) are frozen: an image's
embedding is the same in every round, so computing it every step is wasted work (the
encoder is nearly all of SAM's compute). `EmbeddingCache` holds each training record's
embedding, computed the first time a batch needs it, in memory or, when the set does not fit
comfortably, in a memory-mapped file on disk. The training streams then draw batches without
the image (`pipeline.ExampleOptions(image_output="none")`) and put the cached embeddings in
their place (`image_embeddings`), which `losses.segmentation_loss` decodes directly.

Only valid when the encoder sees the same input every time: without `data.augment` (flips and
turns are applied to the image before the encoder). `cache_decision` says when it applies.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from fedfms_jax.data.records import Record

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "disk", "off")
# 'auto' keeps the embeddings in memory up to this share of the machine's physical memory.
MEMORY_SHARE = 0.25


def cache_decision(model_mode: str, augment: bool, requested: str) -> tuple[bool, str]:
    """(cache?, the sentence that says why not; '' when there is nothing to say) for a run's
    mode, data.augment and train.embedding_cache."""
    if requested not in CACHE_MODES:
        raise ValueError(f"embedding cache must be one of {', '.join(CACHE_MODES)}, got "
                         f"{requested!r}")
    if model_mode != "decoder":
        return False, ""
    if requested == "off":
        return False, ("decoder mode: train.embedding_cache=off, the frozen image encoder "
                       "runs at every step")
    if augment:
        return False, ("decoder mode with data.augment: the flips and turns change the "
                       "encoder's input every epoch, so embeddings are not cached and the "
                       "frozen image encoder runs at every step")
    return True, ""


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class EmbeddingCache:
    """Embeddings f32[h, w, C] of every training record of K clients.

    client_records[k]: client k's records (a stream's record_index indexes them);
    embed(records) -> f32[n, h, w, C]: the frozen encoder on those records' model inputs
    (n <= batch, called with at most `batch` records at a time); shape: (h, w, C);
    storage: 'memory', 'disk' or 'auto' (memory up to MEMORY_SHARE of physical memory);
    directory: where a disk cache lives (default: a temporary folder, removed with the cache).
    """

    def __init__(self, client_records: Sequence[Sequence[Record]],
                 embed: Callable[[Sequence[Record]], np.ndarray], shape: tuple[int, ...],
                 dtype, *, storage: str = "auto", directory: str | None = None):
        self.client_records = [list(r) for r in client_records]
        self.offsets = np.cumsum([0] + [len(r) for r in self.client_records])
        total = int(self.offsets[-1])
        self.embed = embed
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = total * int(np.prod(self.shape)) * self.dtype.itemsize
        if storage == "auto":
            storage = "memory" if self.nbytes <= MEMORY_SHARE * physical_memory_bytes() else "disk"
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'auto', 'memory' or 'disk', got {storage!r}")
        self.storage = storage
        self.path = None
        if storage == "memory":
            self.values = np.empty((total, *self.shape), self.dtype)
        else:
            folder = directory or tempfile.mkdtemp(prefix="fedfms-embeddings-")
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, "embeddings.npy")
            self.values = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                                    shape=(total, *self.shape))
            if directory is None:
                weakref.finalize(self, shutil.rmtree, folder, True)
        self.done = np.zeros(total, bool)
        self.filler = None  # the embedding of a padding row (an all-zero model input)
        self.computed = 0

    def describe(self) -> str:
        where = "in memory" if self.storage == "memory" else f"on disk at {self.path}"
        return (f"decoder mode: the frozen image encoder runs once per training image; the "
                f"{len(self.done)} embeddings ({self.nbytes / 2**20:.0f} MB) are kept {where}")

    def lookup(self, client: int, indices: np.ndarray, batch: int) -> np.ndarray:
        """f32[len(indices), h, w, C]: client k's records `indices` (a batch's record_index;
        -1, a padding row, gets the embedding of an all-zero input), computing the missing."""
        indices = np.asarray(indices)
        rows = self.offsets[client] + indices
        missing = sorted({int(r) for r, i in zip(rows, indices) if i >= 0 and not self.done[r]})
        for start in range(0, len(missing), batch):
            chunk = missing[start:start + batch]
            records = [self.client_records[client][r - self.offsets[client]] for r in chunk]
            self.values[chunk] = self.embed(records)[:len(chunk)]
            self.done[chunk] = True
            self.computed += len(chunk)
        out = np.empty((len(indices), *self.shape), self.dtype)
        real = indices >= 0
        out[real] = self.values[rows[real]]
        if not real.all():
            if self.filler is None:
                self.filler = self.embed([])[0]
            out[~real] = self.filler
        return out
