"""An experiment: the round driver over the parts built from a config, with evaluation.

    fedfms_jax.config    the config's keys, names and the one check (validate)
    fedfms_jax.build     config -> sites, model, preprocessing, client plan, federation
    fedfms_jax.streams   the clients' training data streams
    Experiment           those parts together: rounds (train_round), evaluation, describe

`train`, `evaluate` and the demo drive this; a Flower site uses the same parts for its one
client (flower/site.py); the engine (fedfms_jax.fed) knows nothing of configs or files.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from fedfms_jax import build, evaluation
from fedfms_jax.config import ALGORITHMS, ConfigError, load_config_file, validate  # noqa: F401
from fedfms_jax.data.records import Record
from fedfms_jax.embeddings import EmbeddingCache, cache_decision
# Re-exported: the scores every driver (train, evaluate, Flower) reports.
from fedfms_jax.evaluation import EvalSettings, SiteScores  # noqa: F401
from fedfms_jax.fed.partition import num_params
from fedfms_jax.fed.round import FedState, RoundResult
from fedfms_jax.models.sam import normalise_pixels, resize_pad
from fedfms_jax.streams import TRAIN_FIELDS, ClientStreams, pipeline_options  # noqa: F401

# A run folder's Orbax checkpoints (train writes, evaluate and resume read).
CHECKPOINTS = "checkpoints"


class Experiment:
    """Everything a run needs, built once from a config (data, model, federation, streams).

    The config is validated first (ConfigError before any data is read). With train=True
    the federation is fitted to the free memory at once (`fit`, which compiles); a caller
    with something to check first (a resume) builds with train=False and calls `fit` after."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None, train: bool = True):
        validate(config)
        self.config = config
        self.mesh = mesh
        self.sites = build.load_data(config)
        # Kept: a Flower site builds its one client's Federation from it (flower/site.py).
        self.model = model = build.build_model(config)
        self.model_config = model.config
        self.image_size = build.image_size(config, model)
        self.plan = build.plan(config, {name: site.num_train for name, site in self.sites.items()})
        self.client_records = [[r for s in group for r in self.sites[s].train]
                               for group in self.plan.sites]
        self.federation = build.federation(config, model, self.plan, mesh=mesh)
        self.embedding_cache, self.embedding_note = self.make_embedding_cache(
            self.client_records)
        self.streams = ClientStreams(config, self.client_records, self.federation.client_ids,
                                     self._pipeline_options(), cache=self.embedding_cache)
        self.total_params = num_params(nnx.state(model, nnx.Param))
        self.trainable_params = num_params(self.federation.initial_params)
        self.steps = self.federation.client_steps(self.plan.num_samples, config.data.batch_size)
        self._predict = _make_predict(self.federation.graphdef)
        self.preprocessing = build.preprocessing_for(config, model.config)
        self.eval_settings = EvalSettings.from_config(config.eval)
        if train:
            self.fit()

    def fit(self) -> None:
        """Fits the federation to the free memory: clients at once and remat chosen from a
        compile of the local steps on a batch like the streams' (the first round reuses
        it). Compiles: seconds at the tiny model, minutes for ViT-B at 1024."""
        self.federation = build.federation(self.config, self.model, self.plan, mesh=self.mesh,
                                           example_batch=self.streams.example_batch())
        self._predict = _make_predict(self.federation.graphdef)

    def _pipeline_options(self) -> dict:
        return pipeline_options(self.config, self.image_size, self.model_config.low_res_size)

    def make_embedding_cache(self, client_records: Sequence[Sequence[Record]]
                             ) -> tuple[EmbeddingCache | None, str]:
        """Decoder mode's cache of the frozen encoder's outputs for these clients' records
        (filled as they are first drawn), when valid (see `embeddings.cache_decision`), and
        the sentence saying what was decided. The simulator's streams use one over every
        client; a Flower site, one over its own records."""
        c = self.config
        use, why = cache_decision(c.mode, c.data.augment, c.train.embedding_cache)
        if not use:
            return None, why
        encode = _make_encode(self.federation.graphdef, c.data.normalise)
        params, frozen = self.federation.initial_params, self.federation.frozen
        size, batch = self.image_size, c.data.batch_size

        def embed(records):
            # Model input exactly as the training streams make it (resize_pad on the host,
            # normalise_pixels on the device); zeros for the rows past len(records), the
            # padding rows a short last batch gets.
            prepared = [resize_pad(np.asarray(r.image), size, resize=c.data.resize)
                        for r in records]
            dtype = prepared[0][0].dtype if prepared else np.uint8
            pixels = np.zeros((batch, size, size, 3), dtype)
            content = np.zeros((batch, 2), np.int32)
            for i, (x, hw) in enumerate(prepared):
                pixels[i], content[i] = x, hw
            return np.asarray(encode(params, frozen, pixels, content))

        like = jax.eval_shape(encode, params, frozen,
                              jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
                              jax.ShapeDtypeStruct((batch, 2), np.int32))
        cache = EmbeddingCache(client_records, embed, like.shape[1:], like.dtype,
                               storage=c.train.embedding_cache)
        return cache, cache.describe()

    # --- training ---------------------------------------------------------------------

    def init_state(self) -> FedState:
        return self.federation.init()

    def train_round(self, state: FedState) -> tuple[FedState, RoundResult]:
        """One round: every participating client's local epoch (or steps), streamed through
        memory train.steps_per_segment steps at a time, then aggregation."""
        federation = self.federation
        participating = federation.participants(int(state.round)) & (self.steps > 0)
        state = federation.begin_round(state)
        state, losses, _ = federation.local_round(
            state, np.where(participating, self.steps, 0), self.streams.next_batches,
            self.config.train.steps_per_segment)
        return federation.end_round(state, self.plan.num_samples, participating, losses)

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self, state: FedState, split: str = "val",
                 predictions: dict | None = None) -> dict[str, SiteScores]:
        """Scores per site. 'val': each source site's validation split; 'test': every
        record of the unseen site(s). The global model scores every site; in the local
        baseline, client k's model scores its own site and the unseen site gets the mean
        over the clients' models. `predictions`, when given, receives {site: {case: labels}}
        (what was scored: u8[Z,H,W] per volume, u8[H,W] per image)."""
        local = self.federation.config.setting == "local"
        if split == "val":
            names = [s for group in self.plan.sites for s in group]
            targets = {s: self.sites[s].val for s in names}
        elif split == "test":
            targets = {s: self.sites[s].train + self.sites[s].val for s in self.plan.unseen_sites}
        else:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        scores = {}
        for site, records in targets.items():
            if not records:
                continue
            if local and split == "test":
                scores[site] = evaluation.mean_scores(
                    [self.score(self.client_params(state, k), records)
                     for k in range(len(self.plan.names))])
            else:
                kept = None if predictions is None else predictions.setdefault(site, {})
                scores[site] = self.score(self.params_for(state, site), records, kept)
        return scores

    def client_params(self, state: FedState, client: int) -> dict:
        """Client k's own trainable weights (the local baseline evaluates these)."""
        row = np.array(np.asarray(state.client_params)[client])
        return self.federation.flat.unravel(row)

    def predict_fn(self, params: dict):
        """batch -> logits of the model with these trainable weights (evaluation's call)."""
        frozen = self.federation.frozen
        return lambda batch: self._predict(params, frozen, batch)

    def score(self, params: dict, records: Sequence[Record],
              predictions: dict | None = None) -> SiteScores:
        """Per-case metrics (fedfms_jax.evaluation) of every record, on the original grids."""
        return evaluation.score_records(records, self.predict_fn(params), self.preprocessing,
                                        self.eval_settings, seed=self.config.seed,
                                        predictions=predictions)

    def params_for(self, state: FedState, site: str) -> dict:
        """The weights that predict for a site: the global model's, or in the local
        baseline that site's own client's (client 0's for an unseen site)."""
        if self.federation.config.setting != "local":
            return state.global_params
        client = next((k for k, group in enumerate(self.plan.sites) if site in group), 0)
        return self.client_params(state, client)

    def example_prediction(self, state: FedState, record: Record, site: str
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One record as evaluation scores it, shown at the decoder's resolution L:
        (image u8[L, L, 3], ground truth bool[L, L], prediction bool[L, L]); the first class."""
        return evaluation.example_prediction(record, self.predict_fn(self.params_for(state, site)),
                                             self.preprocessing, self.eval_settings)

    def describe(self) -> str:
        plan = self.plan
        clients = ", ".join(f"{n} ({s} slices, {k} steps/round)"
                            for n, s, k in zip(plan.names, plan.num_samples, self.steps))
        unseen = f"; unseen: {', '.join(plan.unseen_sites)}" if plan.unseen_sites else ""
        note = f"\n{self.embedding_note}" if self.embedding_note else ""
        return (f"{self.config.algorithm} / {self.config.mode}: {self.model_config.variant} "
                f"{self.total_params:,} parameters, {self.trainable_params:,} trainable; "
                f"clients: {clients}{unseen}{note}"
                + (f"\n{self.federation.layout.describe()}" if self.federation.layout else ""))




@functools.lru_cache(maxsize=8)
def _make_predict(graphdef):
    """The jitted prediction of a model structure; cached so that runs of the same model
    in one process (the demo, tests, a resumed run) compile it once."""
    @jax.jit
    def predict(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        return model.segment(batch["image"], point_coords=batch.get("point_coords"),
                             point_labels=batch.get("point_labels"), boxes=batch.get("boxes"))
    return predict


@functools.lru_cache(maxsize=8)
def _make_encode(graphdef, normalise: str):
    """The jitted frozen encoder of decoder mode's embedding cache: (params, frozen, pixels
    u8[B, S, S, 3], content i32[B, 2]) -> image embeddings [B, h, w, C]."""
    @jax.jit
    def encode(params, frozen, pixels, content):
        model = nnx.merge(graphdef, params, frozen)
        return model.image_encoder(normalise_pixels(pixels, normalise, content))
    return encode


SUMMARY_HEADER = ["site", "dice", "iou", "hd95 mm", "nsd", "cases", "missed", "spurious"]


def summary_rows(scores: dict[str, SiteScores], unseen: tuple[str, ...]) -> list[list]:
    """Rows of the per-site table (SUMMARY_HEADER): means over cases and outcome counts."""
    return [[site + (" (unseen)" if site in unseen else ""), s.dice, s.iou, s.hd95, s.nsd,
             s.cases, s.missed, s.spurious] for site, s in scores.items()]


def eval_record(round_index: int, split: str, scores: dict[str, SiteScores],
                unseen: tuple[str, ...]) -> dict:
    """The metrics.jsonl record of one evaluation: per site the means over cases, outcome
    counts and every case's figures; the source sites' mean Dice and the unseen site's."""
    source = [s.dice for site, s in scores.items() if site not in unseen]
    held = [s.dice for site, s in scores.items() if site in unseen]
    return {"kind": "eval", "round": round_index, "split": split,
            "sites": {site: s.as_dict() for site, s in scores.items()},
            "mean_dice_source": float(np.nanmean(source)) if source else None,
            "dice_unseen": float(np.nanmean(held)) if held else None}
