"""The clients' training data streams: one endless, shuffled grain pipeline per client,
drawn a segment of steps at a time, with states for exact resume.

Client k's stream is seeded `stream_seed(config.seed, k)` from its id k in the run, so the
simulator's client k and the Flower site that is client k draw the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from fedfms_jax.data import make_pipeline
from fedfms_jax.data.records import Record
from fedfms_jax.fed.sharding import host_zeros

# Batch fields the loss reads (the model input as u8 pixels and their content, or decoder
# mode's cached image embeddings); record indices stay on the host.
TRAIN_FIELDS = ("pixels", "content", "image_embeddings", "mask_low_res", "valid", "boxes",
                "point_coords", "point_labels")


def stream_seed(seed: int, client: int) -> int:
    return seed * 1000 + client


def pipeline_options(config: ml_collections.ConfigDict, image_size: int,
                     low_res_size: int) -> dict:
    """make_dataset's options of the config's data (training and scoring alike)."""
    d = config.data
    return dict(image_size=image_size, batch_size=d.batch_size, low_res_size=low_res_size,
                normalise=d.normalise, prompt=d.prompt, num_classes=config.model.num_classes,
                resize=d.resize, box_jitter=d.box_jitter, num_positive=d.num_positive,
                num_negative=d.num_negative, per_component=d.per_component,
                min_component_size=d.min_component_size)


class ClientStreams:
    """Training batches of K clients. client_records[k]: client k's records; client_ids[k]:
    its id in the run (its seed); options: `pipeline_options`; cache: decoder mode's
    `embeddings.EmbeddingCache` of these clients' records (None: batches carry the images as
    u8 pixels). Either way a client draws the same records, prompts and targets in the same
    order: the image's preparation consumes no randomness."""

    def __init__(self, config: ml_collections.ConfigDict,
                 client_records: Sequence[Sequence[Record]], client_ids: Sequence[int],
                 options: dict, cache=None):
        self.cache = cache
        self.batch_size = options["batch_size"]
        image_output = "pixels" if cache is None else "none"
        self._pipeline = lambda records, seed: make_pipeline(
            records, **options, seed=seed, shuffle=True, augment=config.data.augment,
            drop_remainder=False, num_epochs=None, num_threads=config.data.num_threads,
            image_output=image_output)
        self.iterators = [iter(self._pipeline(records, stream_seed(config.seed, int(k))))
                          for k, records in zip(client_ids, client_records)]
        self._records = [list(records) for records in client_records]

    def _batch(self, k: int) -> dict[str, np.ndarray]:
        return self._fields(k, next(self.iterators[k]))

    def _fields(self, k: int, batch: dict) -> dict[str, np.ndarray]:
        """The fields the loss reads of client k's pipeline batch (decoder mode: with the
        cached image embeddings)."""
        if self.cache is not None:
            batch = dict(batch, image_embeddings=self.cache.lookup(k, batch["record_index"],
                                                                   self.batch_size))
        return {f: batch[f] for f in TRAIN_FIELDS if f in batch}

    def example_batch(self) -> dict[str, np.ndarray] | None:
        """One training batch ([B, ...] fields, as `next_batches` stacks them) from a fresh
        pipeline over a client's records, so the streams' positions are untouched: the
        shapes the engine compiles for. None when no client has a record."""
        k = next((k for k, records in enumerate(self._records) if records), None)
        if k is None:
            return None
        return self._fields(k, next(iter(self._pipeline(self._records[k], 0))))

    def states(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_states(self, states: Sequence) -> None:
        if len(states) != len(self.iterators):
            raise ValueError(f"{len(states)} data iterator states for {len(self.iterators)} "
                             "clients")
        for it, state in zip(self.iterators, states):
            it.set_state(state)

    def next_batches(self, todo: Sequence[int], length: int | None = None
                     ) -> dict[str, np.ndarray]:
        """[A, L, B, ...] batches of the A clients with todo[k] > 0, in client order, L =
        length (default max(todo)): client k draws todo[k] batches, the rest of its L rows
        are zeros, so no client's data order depends on another's. Written once, into
        `host_zeros` buffers (a CPU device trains them where they lie)."""
        drawn = [[self._batch(k) for _ in range(int(n))] for k, n in enumerate(todo) if n > 0]
        if not drawn:
            raise ValueError("next_batches: no client has a step to draw")
        total = int(max(todo)) if length is None else int(length)
        out = {field: host_zeros((len(drawn), total, *np.shape(value)), np.asarray(value).dtype)
               for field, value in drawn[0][0].items()}
        for a, batches in enumerate(drawn):
            for s, batch in enumerate(batches):
                for field, value in batch.items():
                    out[field][a, s] = value
        return out
