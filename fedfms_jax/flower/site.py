"""One hospital's side of the federation: its data, its model copy, its local training.

A site reads only its own data: the experiment config with `data.sites` narrowed to its site
and no unseen site. Everything else is the simulator's own code, so a Flower site trains
exactly as client k of `fedfms_jax.train`:
  * the config is checked (config.validate) and turned into the model, data and client
    plan by fedfms_jax.build, as the simulator's Experiment does;
  * local training is the engine's: a Federation of this one client with client id k
    (`Federation.local_round`: the same jitted local steps, keys of client k, segments of
    train.steps_per_segment, and the optimizer reset after a non-finite update);
  * the data stream is client k's (`streams.ClientStreams`, seeded from k), continued from
    where the site's previous round stopped.
What the simulator keeps in its FedState per client (optimizer state, data iterator), a
Flower site keeps in Context.state, which stays on the site's machine between rounds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedfms_jax import build
from fedfms_jax.config import ConfigError, validate
from fedfms_jax.data.records import natural_key
from fedfms_jax.experiment import Experiment, SiteScores
from fedfms_jax.fed.partition import split
from fedfms_jax.fed.round import loss_summary
from fedfms_jax.flower import arrays
from fedfms_jax.flower.settings import site_index
from fedfms_jax.streams import ClientStreams, pipeline_options

OPTIMIZER_STATE = "fedfms-optimizer"
SITE_STATE = "fedfms-site"


def site_names(config: ml_collections.ConfigDict) -> list[str]:
    """The data set's site names in the order `load_data` gives them, without reading any
    site's data (only the folder listing; the synthetic layout is generated)."""
    d = config.data
    if d.sites:
        return [n for n in d.sites.split(",") if n]
    if d.layout == "synthetic":
        return list(build.load_data(config))
    root = Path(d.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} does not exist or is not a folder (set it with "
                          "the SuperNode's --node-config 'data-root=\"DIR\"')")
    return [p.name for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
            if p.is_dir() and not p.name.startswith((".", "_"))]


def site_config(config: ml_collections.ConfigDict, node_config: Mapping[str, Any]
                ) -> tuple[ml_collections.ConfigDict, int, str]:
    """(config narrowed to this node's site, site index, site name).

    node_config: the SuperNode's --node-config: site-index (or Flower simulation's
    partition-id), optionally site-name and data-root (this site's copy of the data).
    """
    config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    if "data-root" in node_config:
        config.data.root = str(node_config["data-root"])
    index = site_index(node_config)
    if "site-name" in node_config:
        name = str(node_config["site-name"])
    else:
        names = site_names(config)
        if not 0 <= index < len(names):
            raise ConfigError(f"site-index={index}, but the data has {len(names)} sites "
                              f"({', '.join(names)})")
        name = names[index]
    config.data.sites = name
    config.data.unseen_site = ""
    return config, index, name


@dataclasses.dataclass
class TrainResult:
    params: Any
    num_examples: int
    steps: int
    mean_loss: float
    finite: bool
    seconds: float


class LocalSite:
    """This site's model and data, built once per message (Flower runs each message in a
    fresh ClientApp process)."""

    def __init__(self, config: ml_collections.ConfigDict, node_config: Mapping[str, Any]):
        self.config, self.index, self.name = site_config(config, node_config)
        validate(self.config)
        self.site = build.load_data(self.config)[self.name]
        self.model = build.build_model(self.config)
        self.plan = build.plan(self.config, {self.name: self.site.num_train})
        _, self.like, _ = split(self.model, self.config.mode)

    def train(self, global_params, round_index: int, client: int,
              state: RecordDict) -> TrainResult:
        """The site's local work of one round as client `client`, from the global weights;
        `state` (the site's Context.state) carries the optimizer and data position between
        rounds."""
        began = time.perf_counter()
        federation = build.federation(self.config, self.model, self.plan, client_ids=[client])
        saved_opt = None
        if OPTIMIZER_STATE in state.array_records:
            like = federation.config.local_optimizer().init(global_params)
            saved_opt = jax.tree.map(lambda x: np.asarray(x)[None], arrays.tree_from_arrayrecord(
                state.array_records[OPTIMIZER_STATE], like))
        options = pipeline_options(self.config, build.image_size(self.config, self.model),
                                   self.model.config.low_res_size)
        streams = ClientStreams(self.config, [self.site.train], [client], options)
        saved = state.config_records.get(SITE_STATE)
        if saved is not None:
            if int(saved["client"]) != client:
                raise ConfigError(f"site {self.name} was client {saved['client']} of this run "
                                  f"and is now told it is client {client}")
            streams.set_states([json.loads(saved["iterator"])])
        steps = federation.client_steps(self.plan.num_samples, self.config.data.batch_size)
        fed_state = federation.begin_round(federation.init(
            global_params, round_index=round_index, client_opt_state=saved_opt))
        fed_state, losses, finite = federation.local_round(
            fed_state, steps, streams.next_batches, self.config.train.steps_per_segment)
        first = lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], tree)
        state.array_records[OPTIMIZER_STATE] = arrays.tree_to_arrayrecord(
            first(fed_state.client_opt_state))
        state.config_records[SITE_STATE] = ConfigRecord(
            {"client": client, "iterator": json.dumps(streams.states()[0]),
             "round": round_index + 1})
        _, mean_loss = loss_summary(losses, 1)
        return TrainResult(params=first(fed_state.client_params),
                           num_examples=self.site.num_train, steps=int(steps[0]),
                           mean_loss=float(mean_loss[0]),
                           finite=bool(finite[0]), seconds=time.perf_counter() - began)

    def evaluate(self, params, split: str) -> SiteScores:
        """Scores of the given weights on the site's validation split ('val'), or on all of
        its records when it is the unseen site ('test'), as Experiment.evaluate scores."""
        if split == "val":
            records = self.site.val
        elif split == "test":
            records = self.site.train + self.site.val
        else:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if not records:
            raise ConfigError(f"site {self.name} has no records for split {split!r}")
        return Experiment(self.config).score(params, records)
