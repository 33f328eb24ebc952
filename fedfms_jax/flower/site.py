"""One hospital's side of the federation: its data, its model copy, its local training.

A site reads only its own data: the experiment config with `data.sites` narrowed to its site
and no unseen site. Everything else is the simulator's own code, so a Flower site trains
exactly as client k of `fedfms_jax.train`:
  * the model, data pipeline options and scoring come from `fedfms_jax.experiment.Experiment`;
  * local training is `fed.round.client_local_steps` (the per-client function the simulator
    vmaps over clients) under jit, with client k's key of the round and the same step
    segments (train.steps_per_segment);
  * the data stream is client k's pipeline (seed config.seed * 1000 + k), continued from
    where the site's previous round stopped;
  * Adam's state is carried across rounds (unless train.reset_optimizer), and reset when an
    update goes non-finite, as the engine's end_round does.
What the simulator keeps in its FedState per client (optimizer state, data iterator), a
Flower site keeps in Context.state, which stays on the site's machine between rounds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedfms_jax.data.records import natural_key
from fedfms_jax.experiment import (TRAIN_FIELDS, ConfigError, Experiment, SiteScores,
                                   load_data)
from fedfms_jax.fed.round import client_local_steps, segmentation_loss
from fedfms_jax.flower import arrays
from fedfms_jax.flower.settings import site_index

OPTIMIZER_STATE = "fedfms-optimizer"
SITE_STATE = "fedfms-site"


def site_names(config: ml_collections.ConfigDict) -> list[str]:
    """The data set's site names in the order `load_data` gives them, without reading any
    site's data (only the folder listing; the synthetic layout is generated)."""
    d = config.data
    if d.sites:
        return [n for n in d.sites.split(",") if n]
    if d.layout == "synthetic":
        return list(load_data(config))
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
    """This site's experiment: built once per message (Flower runs each message in a
    fresh ClientApp process)."""

    def __init__(self, config: ml_collections.ConfigDict, node_config: Mapping[str, Any]):
        self.config, self.index, self.name = site_config(config, node_config)
        self.experiment = Experiment(self.config)
        self.site = self.experiment.sites[self.name]
        federation = self.experiment.federation
        self.fed_config = federation.config
        self.tx = self.fed_config.local_optimizer()
        self.graphdef = federation.graphdef
        self.frozen = federation.frozen
        self.like = federation.initial_params
        loss_fn = functools.partial(segmentation_loss, pos_weight=self.fed_config.pos_weight)
        self._train_fn = jax.jit(functools.partial(client_local_steps, self.graphdef, self.tx,
                                                   loss_fn))

    @property
    def steps_per_round(self) -> int:
        return int(self.experiment.steps[0])

    def client_key(self, round_index: int, client: int) -> jax.Array:
        """Client k's key of a round, derived as the engine's local_steps derives it:
        fold_in(fold_in(key(seed), round), k)."""
        base = jax.random.wrap_key_data(jax.random.key_data(jax.random.key(self.fed_config.seed)))
        return jax.random.fold_in(jax.random.fold_in(base, round_index), client)

    def train(self, global_params, round_index: int, client: int, prox_mu: float,
              state: RecordDict) -> TrainResult:
        """The site's local work of one round, from the global weights; `state` (the
        site's Context.state) carries the optimizer and data position between rounds."""
        began = time.perf_counter()
        if OPTIMIZER_STATE in state.array_records and not self.fed_config.reset_optimizer:
            opt_state = arrays.tree_from_arrayrecord(state.array_records[OPTIMIZER_STATE],
                                                     self.tx.init(global_params))
        else:
            opt_state = self.tx.init(global_params)
        iterator = iter(self.experiment._train_pipeline(self.site.train, client))
        saved = state.config_records.get(SITE_STATE)
        if saved is not None:
            if int(saved["client"]) != client:
                raise ConfigError(f"site {self.name} was client {saved['client']} of this run "
                                  f"and is now told it is client {client}")
            iterator.set_state(json.loads(saved["iterator"]))
        params = global_params
        steps = self.steps_per_round
        segment = max(1, self.config.train.steps_per_segment)
        key = self.client_key(round_index, client)
        losses = []
        for start in range(0, steps, segment):
            todo = min(segment, steps - start)
            batches = [next(iterator) for _ in range(todo)]
            stacked = {f: np.stack([b[f] for b in batches]) for f in TRAIN_FIELDS
                       if f in batches[0]}
            params, opt_state, segment_losses = self._train_fn(
                self.frozen, global_params, params, opt_state, stacked,
                np.ones(todo, bool), key, jnp.int32(start), jnp.float32(prox_mu))
            losses.append(np.asarray(segment_losses))
        finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
        if not finite:
            # As the engine: the moments of a diverged client are likely NaN too.
            opt_state = self.tx.init(global_params)
        state.array_records[OPTIMIZER_STATE] = arrays.tree_to_arrayrecord(opt_state)
        state.config_records[SITE_STATE] = ConfigRecord(
            {"client": client, "iterator": json.dumps(iterator.get_state()),
             "round": round_index + 1})
        losses = np.concatenate(losses) if losses else np.zeros(0, np.float32)
        return TrainResult(params=params, num_examples=self.site.num_train, steps=steps,
                           mean_loss=float(np.mean(losses)) if losses.size else float("nan"),
                           finite=finite, seconds=time.perf_counter() - began)

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
        return self.experiment.score(params, records)
