"""The experiment config: every key with its default, the table of the names it takes, and
the one check every command runs before any data is read.

`base_config()` documents every key (configs/base.py is it; experiment files start from it
and change a few keys; the command line overrides any key: --config.rounds=20).
`validate(config)` is the one place a config is checked: `train`, `evaluate`, the demo and
Flower (server, sites and the local launcher) call it first, and it raises ConfigError
with one sentence naming the key, the value and the valid ones. `fed_config` turns a valid
config into the engine's FedConfig; `trajectory` and `resume_conflicts` say which keys a
resumed run may change.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from fedfms_jax.data.readers import LAYOUT_OPTIONS, LAYOUTS
from fedfms_jax.evaluation import EVAL_MODES, EvalSettings
from fedfms_jax.metrics import EMPTY_CONVENTIONS
from fedfms_jax.fed.aggregate import SERVER_DEFAULTS, SERVER_HYPERPARAMETERS, SERVER_OPTIMIZERS
from fedfms_jax.fed.partition import MODES
from fedfms_jax.fed.round import FedConfig
from fedfms_jax.embeddings import CACHE_MODES
from fedfms_jax.models.image_encoder import REMAT_MODES
from fedfms_jax.models.sam import RESIZE_MODES
from fedfms_jax.models.variants import VARIANTS


class ConfigError(ValueError):
    """A config that cannot run; raised before any data is read or code compiled."""


# --- the names a config takes (one table: configs, docs and errors use these) -------------

# algorithm -> the engine's setting (fed.clients.SETTINGS); FedFMS protocol in REFERENCE 3:
#   fedavg   every source site a client, FedAvg by training-slice counts
#   fedprox  the same with FedProx's proximal term (train.prox_mu)
#   central  all source sites pooled into one client (the upper baseline)
#   local    every site trains alone, no averaging (the lower baseline)
ALGORITHMS = {"fedavg": "federated", "fedprox": "federated", "central": "centralised",
              "local": "local"}
NAMES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "algorithm": tuple(ALGORITHMS),
    "model.variant": tuple(VARIANTS),
    "model.dtype": ("float32", "bfloat16"),
    "model.adapter_init": ("torch_default", "zero"),
    "model.remat": ("auto", *REMAT_MODES),
    "train.embedding_cache": CACHE_MODES,
    "data.layout": LAYOUTS,
    "data.normalise": ("unit", "sam"),
    "data.prompt": ("none", "box", "points"),
    "train.server_optimizer": SERVER_OPTIMIZERS,
    "data.resize": RESIZE_MODES,
    "eval.mode": EVAL_MODES,
    "eval.empty": EMPTY_CONVENTIONS,
}
# Keys every layout's data.options may hold besides its own (LAYOUT_OPTIONS).
COMMON_LAYOUT_OPTIONS = ("seed",)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment: FedFMS's protocol (Adam 1e-4, BCE pos_weight 2,
    one local epoch, FedAvg by sample counts, 100 rounds, leave-one-site-out, evaluation
    every 5 rounds)."""
    c = ml_collections.ConfigDict()
    c.mode = "fedmsa"          # fedsam | fedmsa | fedlora | decoder: what is trained and sent
    c.algorithm = "fedavg"     # fedavg | fedprox | central | local
    c.rounds = 100
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = "vit_b"  # used when model.weights is empty (random init)
    c.model.weights = ""       # a fedfms_jax .safetensors (weights/convert.py makes one)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.num_classes = 1
    c.model.adapter_ratio = 0.25
    c.model.adapter_scale = 0.5
    c.model.adapter_init = "torch_default"  # torch_default (upstream) | zero
    c.model.lora_rank = 4
    c.model.lora_alpha = 4.0
    # Rematerialise the image encoder's blocks in the backward: off | blocks | full, or auto
    # (the least recomputation that fits, see fed.fit). ViT-B at 1024, one FedMSA image,
    # compiled XLA temp on CPU: 14.0 GB off, 5.7 GB blocks, 4.2 GB full.
    c.model.remat = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.layout = "fedfms"   # fedfms | folders | volumes (alias nifti) | synthetic
    c.data.root = ""           # <root>/<site>/...; not used by the synthetic layout
    c.data.sites = ""          # comma-separated subset, in order; empty: all
    c.data.unseen_site = ""    # held out of training, tested only (leave-one-site-out)
    c.data.image_size = 0      # model input side; 0: the model's (1024 for SAM)
    c.data.batch_size = 4
    c.data.normalise = "unit"  # unit (FedFMS: x / 255) | sam (ImageNet mean/std)
    c.data.resize = "stretch"  # stretch (to S x S, FedFMS) | longest_side (SAM's, zero-padded)
    c.data.prompt = "none"     # none (FedFMS's prompt-free mode) | box | points
    c.data.box_jitter = 0.05   # prompt=box: each side moved by up to this share of the side
    c.data.num_positive = 1    # prompt=points: foreground points per example ...
    c.data.num_negative = 0    # ... and background points
    c.data.per_component = False  # each example targets one connected component (nuclei)
    c.data.min_component_size = 1  # with per_component: smaller components are ignored
    c.data.augment = False
    c.data.skip_bad = False    # skip (and count) bad files instead of stopping
    c.data.label_map = ""      # e.g. "1:1,2:1" to merge labels 1 and 2 into class 1
    c.data.val_fraction = 0.2  # seeded by-case validation split for sites that have none
    c.data.num_threads = 2
    # Layout options, empty here: each layout takes its own (data.readers.LAYOUT_OPTIONS,
    # e.g. synthetic sizes; volumes: keep_empty, window, modality, resample_label,
    # geometry_tolerance), plus `seed` (a data seed of its own): set them in a config file.
    c.data.options = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.learning_rate = 1e-4
    c.train.adam_eps = 1e-8    # torch's (and FedFMS's) Adam epsilon
    c.train.pos_weight = 2.0
    c.train.local_epochs = 1   # FedFMS: one epoch per client per round ...
    c.train.local_steps = 0    # ... or, when > 0, this many steps for every client
    c.train.reset_optimizer = False  # FedFMS keeps each client's Adam state across rounds
    c.train.prox_mu = 0.01     # FedProx's mu (algorithm=fedprox only)
    c.train.client_fraction = 1.0
    c.train.server_optimizer = "none"  # none (FedAvg) | fedavgm | fedadam
    # The server optimizer's hyper-parameters; unset: its defaults, safe for a pretrained
    # model (fed.aggregate.SERVER_DEFAULTS, with their sources): fedavgm server_lr 0.1,
    # server_momentum 0.9; fedadam server_lr 1e-3, server_b1 0.9, server_b2 0.99,
    # server_eps 1e-3.
    for name in SERVER_HYPERPARAMETERS:
        c.train[name] = placeholder(float)
    c.train.clients_per_step = 0  # 0: as many as fit (fed.fit); else chunks of this many
    c.train.steps_per_segment = 16  # local steps streamed through memory at a time
    # decoder mode: each training image's embedding by the frozen encoder, computed once:
    # auto (in memory up to a quarter of RAM, else on disk) | memory | disk | off. Never
    # with data.augment, whose flips and turns change the encoder's input.
    c.train.embedding_cache = "auto"

    # Client-level differential privacy of the aggregation (DP-FedAvg; fed/aggregate.py and
    # fed/accounting.py; README "Privacy"). Each client's update (its trainable weights minus
    # the round's global ones) is clipped to L2 norm clip_norm, and Gaussian noise of std
    # noise_multiplier * clip_norm * (largest FedAvg weight) is added to the average.
    # Both 0: off (plain FedAvg, bit for bit); clip_norm > 0 alone: clipping only.
    c.privacy = ml_collections.ConfigDict()
    c.privacy.clip_norm = 0.0
    c.privacy.noise_multiplier = 0.0
    c.privacy.delta = 1e-5     # the delta of the reported (epsilon, delta)
    c.privacy.target_epsilon = 0.0  # > 0: stop (checkpointed) before epsilon would exceed it

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 5           # rounds between evaluations (and the last round)
    # Per case on the original grid (volumes in 3-D, mm): any of dice, iou, hd95, nsd.
    c.eval.metrics = "dice,iou,hd95,nsd"
    c.eval.mode = "standard"   # standard (sigmoid > 0.5) | fedfms (thresholds 0.1..0.9 averaged)
    c.eval.empty = "ignore"    # ignore (MONAI's ignore_empty) | score (both empty scores 1)
    c.eval.nsd_tolerance_mm = 2.0  # Normalised Surface Dice tolerance
    c.eval.batch_size = 8

    c.checkpoint_every = 1     # rounds between checkpoints
    c.tensorboard = False
    return c


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as --config loads it (for callers without flags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --- the check ----------------------------------------------------------------------------

def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name != "data.options":
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _as_dict(config) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _unknown_keys(config: dict) -> None:
    schema = _flat(_as_dict(base_config()))
    given = _flat(config)
    for key in given:
        if key not in schema:
            section = key.rpartition(".")[0]
            siblings = sorted(k.rpartition(".")[2] for k in schema
                              if k.rpartition(".")[0] == section)
            where = f"section {section!r}" if section else "the top level"
            raise ConfigError(f"unknown key {key}; {where} has: {', '.join(siblings)}")
    missing = [k for k in schema if k not in given]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(missing)}: start it from "
                          "configs/base.py (fedfms_jax.config.base_config)")


def _number(config: dict, key: str, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, integer: bool = False) -> None:
    value = _flat(config)[key]
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not float(value).is_integer()):
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if low_open else '>='} {low}"
                          + (f" and <= {high}" if high is not None else ""))
    if high is not None and value > high:
        raise ConfigError(f"{key}={value!r} must be <= {high}")


def validate(config, *, data_here: bool = True, weights_here: bool = True,
             federated: bool = False) -> None:
    """Checks a whole experiment config before anything is read or built; raises ConfigError
    naming the key, its value and what it may be.

    data_here: the data root must exist on this machine (False on the Flower server, whose
    sites hold the data); weights_here: likewise model.weights (False where only the app is
    written). federated: the run needs a server (Flower).
    """
    c = _as_dict(config)
    _unknown_keys(c)
    flat = _flat(c)
    for key, names in NAMES.items():
        if flat[key] not in names:
            raise ConfigError(f"{key}={flat[key]!r} is not one of: {', '.join(names)}")
    for key in ("rounds", "data.batch_size", "eval.every", "eval.batch_size",
                "checkpoint_every", "model.num_classes"):
        _number(c, key, 1, integer=True)
    for key in ("seed", "data.image_size", "data.num_threads", "train.local_epochs",
                "data.num_positive", "data.num_negative", "data.min_component_size",
                "train.local_steps", "train.clients_per_step", "train.steps_per_segment",
                "model.lora_rank"):
        _number(c, key, 0, integer=True)
    _number(c, "train.learning_rate", 0, low_open=True)
    _number(c, "train.adam_eps", 0, low_open=True)
    _number(c, "train.pos_weight", 0, low_open=True)
    _number(c, "train.prox_mu", 0)
    _number(c, "train.client_fraction", 0, 1, low_open=True)
    _number(c, "data.val_fraction", 0, 1)
    _number(c, "data.box_jitter", 0, 1)
    d = c["data"]
    if d["prompt"] == "points" and d["num_positive"] + d["num_negative"] == 0:
        raise ConfigError("data.prompt='points' needs data.num_positive + data.num_negative > 0")
    if d["per_component"] and c["model"]["num_classes"] != 1:
        raise ConfigError("data.per_component=True needs binary masks (model.num_classes=1), "
                          f"got model.num_classes={c['model']['num_classes']}")
    t = c["train"]
    if t["local_steps"] == 0 and t["local_epochs"] == 0:
        raise ConfigError("train.local_epochs=0 and train.local_steps=0: give one of them > 0 "
                          "(epochs per round, or steps per round for every client)")
    server = t["server_optimizer"]
    for name in SERVER_HYPERPARAMETERS:
        value = t[name]
        if value is None:
            continue
        if name not in SERVER_DEFAULTS[server]:
            takes = ", ".join(f"train.{k}" for k in SERVER_DEFAULTS[server])
            raise ConfigError(f"train.{name} is set, but train.server_optimizer={server!r} "
                              + (f"takes only {takes}" if takes else
                                 "(plain FedAvg) has no hyper-parameters"))
        _number(c, f"train.{name}", 0, low_open=name in ("server_lr", "server_eps"))
    setting = ALGORITHMS[c["algorithm"]]
    if federated and setting != "federated":
        raise ConfigError(f"algorithm={c['algorithm']} is a baseline without a federation "
                          "(pooled or site-local data): run it with fedfms_jax.train")
    if setting != "federated" and (server != "none" or t["client_fraction"] != 1.0):
        raise ConfigError(f"algorithm={c['algorithm']} has no server: train.server_optimizer "
                          "must be 'none' and train.client_fraction 1")
    _check_privacy(c, setting)
    _check_data(c["data"], data_here)
    try:  # eval.metrics is a list of names: evaluation checks it (and the rest of eval)
        EvalSettings.from_config(ml_collections.ConfigDict(c["eval"]))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    weights = c["model"]["weights"]
    if weights_here and weights and not Path(weights).is_file():
        raise ConfigError(f"model.weights: {weights} does not exist (convert an official "
                          "checkpoint with weights/convert.py)")


def _check_privacy(c: dict, setting: str) -> None:
    p = c["privacy"]
    for key in ("clip_norm", "noise_multiplier", "target_epsilon"):
        _number(c, f"privacy.{key}", 0)
    _number(c, "privacy.delta", 0, 1, low_open=True)
    if p["delta"] >= 1:
        raise ConfigError(f"privacy.delta={p['delta']!r} must be < 1")
    if p["noise_multiplier"] > 0 and p["clip_norm"] == 0:
        raise ConfigError(f"privacy.noise_multiplier={p['noise_multiplier']!r} needs "
                          "privacy.clip_norm > 0: the noise is scaled to the clipping bound "
                          "(without one, an update's influence is unbounded)")
    if p["target_epsilon"] > 0 and p["noise_multiplier"] == 0:
        raise ConfigError(f"privacy.target_epsilon={p['target_epsilon']!r} needs "
                          "privacy.noise_multiplier > 0: without noise epsilon is infinite")
    if p["target_epsilon"] > 0:
        from fedfms_jax.fed.accounting import Accountant  # dp-accounting: only when needed

        first = Accountant(p["noise_multiplier"], p["delta"], 1, 1).epsilon(1)
        if first > p["target_epsilon"]:
            raise ConfigError(f"privacy.target_epsilon={p['target_epsilon']!r} is below the "
                              f"epsilon of a single round ({first:.4g} at privacy.delta="
                              f"{p['delta']!r}, privacy.noise_multiplier="
                              f"{p['noise_multiplier']!r}): raise it, or the noise")
    if setting != "federated" and (p["clip_norm"] > 0 or p["noise_multiplier"] > 0):
        raise ConfigError(f"privacy.clip_norm and privacy.noise_multiplier apply to a "
                          f"federation's aggregation; algorithm={c['algorithm']} has none")


def _check_data(d: dict, data_here: bool) -> None:
    layout = d["layout"]
    allowed = LAYOUT_OPTIONS[layout] + COMMON_LAYOUT_OPTIONS
    foreign = [k for k in d["options"] if k not in allowed]
    if foreign:
        raise ConfigError(f"data.options {', '.join(foreign)} do not belong to the {layout} "
                          f"layout, whose options are: {', '.join(allowed)}")
    if layout == "synthetic":
        if d["root"]:
            raise ConfigError(f"data.root={d['root']!r} is set, but the synthetic layout is "
                              "generated and reads no folder (data written by `python -m "
                              "fedfms_jax.data synth` is data.layout=folders)")
    elif data_here:
        if not d["root"]:
            raise ConfigError(f"data.root is empty: the {layout} layout reads a folder; pass "
                              "--config.data.root=DIR")
        if not Path(d["root"]).is_dir():
            raise ConfigError(f"data.root: {d['root']} does not exist or is not a folder")
    sites = [s for s in d["sites"].split(",") if s]
    if d["unseen_site"] and sites and d["unseen_site"] not in sites:
        raise ConfigError(f"data.unseen_site={d['unseen_site']!r} is not in data.sites "
                          f"({', '.join(sites)})")
    label_map(d["label_map"])


def label_map(text: str) -> dict[int, int] | None:
    """data.label_map 'a:b,c:d' -> {a: b, c: d} (None when empty)."""
    if not text:
        return None
    try:
        return {int(a): int(b) for a, b in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise ConfigError(f"data.label_map={text!r} must be 'raw:class' pairs separated by "
                          "commas, e.g. '1:1,2:1'") from None


def fed_config(config) -> FedConfig:
    """The engine's FedConfig of a valid experiment config."""
    t = config.train
    epochs = None if t.local_steps > 0 else t.local_epochs
    return FedConfig(
        mode=config.mode, setting=ALGORITHMS[config.algorithm], learning_rate=t.learning_rate,
        eps=t.adam_eps, pos_weight=t.pos_weight, normalise=config.data.normalise,
        local_steps=t.local_steps or None,
        local_epochs=epochs, reset_optimizer=t.reset_optimizer,
        prox_mu=t.prox_mu if config.algorithm == "fedprox" else 0.0,
        client_fraction=t.client_fraction, server_optimizer=t.server_optimizer,
        **{name: t[name] for name in SERVER_HYPERPARAMETERS},
        clip_norm=float(config.privacy.clip_norm),
        noise_multiplier=float(config.privacy.noise_multiplier),
        clients_per_step=t.clients_per_step or None, seed=config.seed)


# --- resuming -----------------------------------------------------------------------------

# Keys a resumed run may change: they decide how long, how often or how fast it runs, or
# where its files are, never which steps it takes. model.weights and data.root are
# locations: the checkpoint checks the frozen weights' sha256 and the clients and their
# sample counts, so moved files resume and other files are refused.
RESUMABLE = ("rounds", "eval.every", "eval.metrics", "eval.batch_size", "checkpoint_every",
             "tensorboard", "data.num_threads", "data.root", "model.weights",
             "train.clients_per_step", "train.steps_per_segment", "model.remat",
             "train.embedding_cache",
             # what is reported and when the run stops, never which steps it takes
             "privacy.delta", "privacy.target_epsilon")


def trajectory(config) -> dict[str, Any]:
    """{key: value} of every key that decides a run's trajectory (JSON-normalised)."""
    flat = _flat(_as_dict(config))
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in RESUMABLE},
                                 sort_keys=True, default=str))


def resume_conflicts(saved: Mapping[str, Any], config) -> list[str]:
    """'key: checkpoint X, this run Y' for every trajectory key that differs. A key the
    checkpoint does not know (added to the schema after it was written, e.g. privacy.*)
    is no conflict while this run leaves it at its default: the checkpoint's run had it."""
    ours = trajectory(config)
    defaults = trajectory(base_config())
    keys = sorted(set(saved) | set(ours))
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {ours.get(k)!r}" for k in keys
            if saved.get(k) != ours.get(k)
            and not (k not in saved and k in defaults and ours.get(k) == defaults[k])]
