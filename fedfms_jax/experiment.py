"""An experiment: an ml_collections config -> sites, model, federation; then rounds with
evaluation, logs and checkpoints. `train`, `evaluate`, the demo and Flower drive this; the
engine (fedfms_jax.fed) knows nothing of configs or files.

The four algorithms are settings of one engine (FedFMS protocol in REFERENCE section 3):
    fedavg   every source site a client, FedAvg by training-slice counts
    fedprox  the same with FedProx's proximal term (train.prox_mu)
    central  all source sites pooled into one client (the upper baseline)
    local    every site trains alone, no averaging (the lower baseline)
"""

from __future__ import annotations

import functools
import importlib.util
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from fedfms_jax import evaluation
from fedfms_jax.data import load_sites, make_pipeline
from fedfms_jax.data.preprocessing import DEFAULT_PERCENTILES, Preprocessing
from fedfms_jax.data.records import DEFAULT_KEEP_EMPTY, Record, Site, keep_empty_slices
# Re-exported: the scores every driver (train, evaluate, Flower) reports.
from fedfms_jax.evaluation import EvalSettings, SiteScores  # noqa: F401
from fedfms_jax.fed.partition import config_for_mode, num_params
from fedfms_jax.fed.round import FedConfig, Federation, FedState, RoundResult, plan_clients
from fedfms_jax.models import Sam, get_config
from fedfms_jax.models.sam import RESIZE_MODES
from fedfms_jax.models.sam import extend
from fedfms_jax.weights_file import load_sam

ALGORITHMS = {"fedavg": "federated", "fedprox": "federated", "central": "centralised",
              "local": "local"}
# Batch fields the loss reads; the full-size mask and record indices stay on the host.
TRAIN_FIELDS = ("image", "mask_low_res", "valid", "boxes", "point_coords", "point_labels")


# A run folder's Orbax checkpoints (train writes, evaluate and resume read).
CHECKPOINTS = "checkpoints"


class ConfigError(ValueError):
    """A config that cannot run; raised before any data is read or code compiled."""


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as --config loads it (for callers without flags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on anything that would fail later."""
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={config.algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if config.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {config.rounds}")
    weights = config.model.weights
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model.weights: {weights} does not exist (convert an official "
                          "checkpoint with weights/convert.py)")
    if config.data.layout != "synthetic":
        if not config.data.root:
            raise ConfigError(f"data.root is empty: the {config.data.layout} layout reads a "
                              "folder; pass --config.data.root=DIR")
        if not Path(config.data.root).is_dir():
            raise ConfigError(f"data.root: {config.data.root} does not exist or is not a folder")
    if config.algorithm == "local" and config.train.server_optimizer != "none":
        raise ConfigError("algorithm=local has no server: train.server_optimizer must be 'none'")
    try:
        EvalSettings.from_config(config.eval)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.data.resize not in RESIZE_MODES:
        raise ConfigError(f"data.resize={config.data.resize!r}; known: {', '.join(RESIZE_MODES)}")


def fed_config(config: ml_collections.ConfigDict) -> FedConfig:
    t = config.train
    epochs = None if t.local_steps > 0 else t.local_epochs
    return FedConfig(
        mode=config.mode, setting=ALGORITHMS[config.algorithm], learning_rate=t.learning_rate,
        eps=t.adam_eps,
        pos_weight=t.pos_weight, local_steps=t.local_steps or None, local_epochs=epochs,
        reset_optimizer=t.reset_optimizer,
        prox_mu=t.prox_mu if config.algorithm == "fedprox" else 0.0,
        client_fraction=t.client_fraction, server_optimizer=t.server_optimizer,
        server_lr=t.server_lr, clients_per_step=t.clients_per_step or None, seed=config.seed)


def build_model(config: ml_collections.ConfigDict) -> Sam:
    """The starting model: the weights file (plus whatever the mode adds: adapters, LoRA, a
    class head, initialised from the seed) or, without one, a randomly initialised variant."""
    m = config.model
    settings = dict(dtype=m.dtype, num_classes=m.num_classes, adapter_ratio=m.adapter_ratio,
                    adapter_scale=m.adapter_scale, adapter_init=m.adapter_init,
                    lora_alpha=m.lora_alpha)
    rngs = nnx.Rngs(params=config.seed)
    if not m.weights:
        base_config = get_config(m.variant, **settings, lora_rank=m.lora_rank
                                 if config.mode == "fedlora" else 0)
        return Sam(config_for_mode(base_config, config.mode), rngs=rngs)
    base = load_sam(m.weights, dtype=m.dtype)
    target = base.config.replace(**{k: v for k, v in settings.items() if k != "dtype"})
    if config.mode == "fedlora" and base.config.lora_rank == 0:
        target = target.replace(lora_rank=m.lora_rank)
    target = config_for_mode(target, config.mode)
    return base if target == base.config else extend(base, target, rngs=rngs)


def parse_label_map(text: str) -> dict[int, int] | None:
    """data.label_map "1:1,2:1" -> {1: 1, 2: 1}; empty -> None."""
    if not text:
        return None
    try:
        return {int(a): int(b) for a, b in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise ConfigError(f"data.label_map={text!r}: expected raw:class pairs such as "
                          "'1:1,2:1'") from None


# Layouts read by nifti.read_site, whose keep_empty the engine applies to training only.
VOLUME_LAYOUTS = ("volumes", "nifti")


def load_data(config: ml_collections.ConfigDict) -> dict[str, Site]:
    """The sites. Volume layouts are read with every slice; `keep_empty` then thins the
    empty slices of the training sites' training records only, so validation and test
    volumes are scored whole."""
    d = config.data
    options = d.options.to_dict()
    seed = options.pop("seed", config.seed)  # a data seed of its own, e.g. for pretraining
    keep_empty = None
    if d.layout in VOLUME_LAYOUTS:
        keep_empty = options.pop("keep_empty", DEFAULT_KEEP_EMPTY)
        options["keep_empty"] = 1.0
    sites = load_sites(d.layout, d.root or None, sites=d.sites or None, skip_bad=d.skip_bad,
                       num_classes=config.model.num_classes,
                       label_map=parse_label_map(d.label_map),
                       val_fraction=d.val_fraction, seed=seed, **options)
    if d.unseen_site and d.unseen_site not in sites:
        raise ConfigError(f"data.unseen_site={d.unseen_site!r} is not a site; sites: "
                          f"{', '.join(sites)}")
    if keep_empty is not None:
        for name, site in sites.items():
            if name != d.unseen_site:  # the unseen site is only tested, on whole volumes
                # crc32, not hash(): the readers' per-site seed, so the draw is theirs.
                site.train = keep_empty_slices(site.train, keep_empty,
                                               [seed, zlib.crc32(name.encode())])
    return sites


def preprocessing_for(config: ml_collections.ConfigDict, model_config) -> Preprocessing:
    """What the network of this run sees (written into final.safetensors)."""
    d, o = config.data, config.data.options
    label_map = parse_label_map(d.label_map)
    window = o.get("window", None)
    return Preprocessing(
        image_size=model_config.image_size, low_res_size=model_config.low_res_size,
        normalise=d.normalise, resize=d.resize, prompt=d.prompt,
        num_classes=model_config.num_classes, class_head=model_config.num_classes > 1,
        label_map=None if label_map is None else tuple(sorted(label_map.items())),
        percentiles=tuple(float(v) for v in o.get("percentiles", DEFAULT_PERCENTILES)),
        window=None if window is None else tuple(float(v) for v in window),
        slab=int(o.get("slab", 3)), modality=o.get("modality", None))


class Experiment:
    """Everything a run needs, built once from a config (data, model, federation)."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        check_config(config)
        self.config = config
        self.sites = load_data(config)
        model = build_model(config)
        self.model_config = model.config
        self.image_size = config.data.image_size or model.config.image_size
        if self.image_size != model.config.image_size:
            raise ConfigError(f"data.image_size={self.image_size} but the model takes "
                              f"{model.config.image_size}")
        held_out = [config.data.unseen_site] if config.data.unseen_site else []
        self.plan = plan_clients({name: site.num_train for name, site in self.sites.items()},
                                 ALGORITHMS[config.algorithm], held_out)
        self.federation = Federation(model, fed_config(config), len(self.plan.names),
                                     mesh=mesh, client_names=self.plan.names)
        self.total_params = num_params(nnx.state(model, nnx.Param))
        self.trainable_params = num_params(self.federation.initial_params)
        self.client_records = [[r for s in group for r in self.sites[s].train]
                               for group in self.plan.sites]
        self.steps = self.federation.client_steps(self.plan.num_samples, config.data.batch_size)
        self.iterators = [iter(self._train_pipeline(records, k))
                          for k, records in enumerate(self.client_records)]
        self._template = None
        self._predict = _make_predict(self.federation.graphdef)
        self.preprocessing = preprocessing_for(config, model.config)
        self.eval_settings = EvalSettings.from_config(config.eval)

    # --- data -------------------------------------------------------------------------

    def _pipeline_options(self) -> dict:
        d = self.config.data
        return dict(image_size=self.image_size, batch_size=d.batch_size,
                    low_res_size=self.model_config.low_res_size, normalise=d.normalise,
                    resize=d.resize, prompt=d.prompt, num_classes=self.config.model.num_classes)

    def _train_pipeline(self, records: Sequence[Record], client: int):
        return make_pipeline(records, **self._pipeline_options(), seed=self.config.seed * 1000 + client,
                             shuffle=True, augment=self.config.data.augment, drop_remainder=False,
                             num_epochs=None, num_threads=self.config.data.num_threads)

    def iterator_states(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_iterator_states(self, states: Sequence) -> None:
        if len(states) != len(self.iterators):
            raise ValueError(f"{len(states)} data iterator states for {len(self.iterators)} clients")
        for it, state in zip(self.iterators, states):
            it.set_state(state)

    def _next_batches(self, client_steps: np.ndarray) -> dict[str, np.ndarray]:
        """[K, S, B, ...] batches: client k draws client_steps[k] batches, the rest of its
        S rows are zeros (masked steps), so no client's data order depends on another's."""
        per_client = []
        for k, n in enumerate(client_steps):
            batches = [{f: b[f] for f in TRAIN_FIELDS if f in b}
                       for b in (next(self.iterators[k]) for _ in range(int(n)))]
            if self._template is None and batches:
                self._template = jax.tree.map(np.zeros_like, batches[0])
            per_client.append(batches)
        total = int(max(client_steps))
        return {field: np.stack([np.stack([b[field] for b in batches]
                                          + [self._template[field]] * (total - len(batches)))
                                 for batches in per_client])
                for field in self._template}

    # --- training ---------------------------------------------------------------------

    def init_state(self) -> FedState:
        return self.federation.init()

    def train_round(self, state: FedState) -> tuple[FedState, RoundResult]:
        """One round: every participating client's local epoch (or steps), streamed through
        memory train.steps_per_segment steps at a time, then aggregation."""
        federation = self.federation
        participating = federation.participants(int(state.round)) & (self.steps > 0)
        steps = np.where(participating, self.steps, 0)
        state = federation.begin_round(state)
        segment = max(1, self.config.train.steps_per_segment)
        losses = []
        for start in range(0, int(steps.max()), segment):
            todo = np.clip(steps - start, 0, segment)
            mask = np.arange(int(todo.max()))[None, :] < todo[:, None]
            state, segment_losses = federation.local_steps(state, self._next_batches(todo), mask)
            losses.append(segment_losses)
        losses = np.concatenate(losses, axis=1) if losses else None
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
                    [self.score(client_params(state, k), records)
                     for k in range(len(self.plan.names))])
            else:
                kept = None if predictions is None else predictions.setdefault(site, {})
                scores[site] = self.score(self.params_for(state, site), records, kept)
        return scores

    def predict_fn(self, params: nnx.State):
        """batch -> logits of the model with these trainable weights (evaluation's call)."""
        frozen = self.federation.frozen
        return lambda batch: self._predict(params, frozen, batch)

    def score(self, params: nnx.State, records: Sequence[Record],
              predictions: dict | None = None) -> SiteScores:
        """Per-case metrics (fedfms_jax.evaluation) of every record, on the original grids."""
        return evaluation.score_records(records, self.predict_fn(params), self.preprocessing,
                                        self.eval_settings, seed=self.config.seed,
                                        predictions=predictions)

    def params_for(self, state: FedState, site: str) -> nnx.State:
        """The weights that predict for a site: the global model's, or in the local
        baseline that site's own client's (client 0's for an unseen site)."""
        if self.federation.config.setting != "local":
            return state.global_params
        client = next((k for k, group in enumerate(self.plan.sites) if site in group), 0)
        return client_params(state, client)

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
        return (f"{self.config.algorithm} / {self.config.mode}: {self.model_config.variant} "
                f"{self.total_params:,} parameters, {self.trainable_params:,} trainable; "
                f"clients: {clients}{unseen}")


def client_params(state: FedState, client: int) -> nnx.State:
    """Client k's own trainable weights (the local baseline evaluates these)."""
    return jax.tree.map(lambda x: x[client], state.client_params)


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
