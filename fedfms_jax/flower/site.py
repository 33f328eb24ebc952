"""One hospital's side of the federation: its data, its model copy, its local training.

A site reads only its own data: the experiment config with `data.sites` narrowed to its site
and no unseen site. Everything else is the simulator's own code, so a Flower site trains
exactly as client k of `fedfms_jax.train`:
  * the config is checked and turned into data, model and client plan by the simulator's
    Experiment (fedfms_jax.experiment), which also scores the site's evaluation records;
  * local training is the engine's: a Federation of this one client with client id k
    (`Federation.local_round`: the same jitted local steps, keys of client k, segments of
    train.steps_per_segment, and the optimizer reset after a non-finite update);
  * the data stream is client k's (`streams.ClientStreams`, seeded from k), continued from
    where the site's previous round stopped.
What the simulator keeps in its FedState per client (optimizer state, data iterator), a
LocalSite keeps in memory between rounds; the site's worker (worker.py) holds the LocalSite
for the whole run and saves that state after every round, so that a restarted worker
continues where it stopped.
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

from fedfms_jax import build
from fedfms_jax.config import ConfigError
from fedfms_jax.data.records import natural_key
from fedfms_jax.experiment import Experiment, SiteScores
from fedfms_jax.fed.round import Federation, loss_summary
from fedfms_jax.flower import arrays
from fedfms_jax.flower.settings import site_index
from fedfms_jax.streams import ClientStreams, pipeline_options

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


@dataclasses.dataclass
class ClientState:
    """What a site carries from one round to the next as client `client` of the run."""

    client: int
    federation: Federation          # of this one client, with client id `client`
    streams: ClientStreams          # client `client`'s training stream, where it stopped
    opt_state: Any = None           # the local optimizer's state, leaves [1, ...] (numpy)
    rounds: int = 0                 # rounds this site has trained in the run


class LocalSite:
    """This site's data, model, compiled client round and data stream, built once and kept
    by the site's worker for a whole run (and across runs of the same config)."""

    def __init__(self, config: ml_collections.ConfigDict, node_config: Mapping[str, Any]):
        self.config, self.index, self.name = site_config(config, node_config)
        # Validates, reads this site, builds the model; train=False: the site's own one-client
        # Federation (below) is what trains, fitted to this machine's memory.
        self.experiment = Experiment(self.config, train=False)
        self.site = self.experiment.sites[self.name]
        self.like = self.experiment.federation.initial_params
        self.client_state: ClientState | None = None

    def reset(self) -> None:
        """Forget the run's optimizer state and data position (a new run starts fresh)."""
        self.client_state = None

    def _client(self, client: int) -> ClientState:
        if self.client_state is None:
            options = pipeline_options(self.config, self.experiment.image_size,
                                       self.experiment.model_config.low_res_size)
            # Decoder mode: the frozen encoder runs once per image of the run, as in the
            # simulator, not every round.
            cache, _ = self.experiment.make_embedding_cache([self.site.train])
            streams = ClientStreams(self.config, [self.site.train], [client], options,
                                    cache=cache)
            federation = build.federation(self.config, self.experiment.model,
                                          self.experiment.plan, client_ids=[client],
                                          example_batch=streams.example_batch())
            self.client_state = ClientState(client, federation, streams)
        elif self.client_state.client != client:
            raise ConfigError(f"site {self.name} was client {self.client_state.client} of "
                              f"this run and is now told it is client {client}")
        return self.client_state

    def train(self, global_params, round_index: int, client: int) -> TrainResult:
        """The site's local work of one round as client `client`, from the global weights,
        continuing the optimizer state and data stream of its previous round."""
        began = time.perf_counter()
        state = self._client(client)
        federation = state.federation
        steps = federation.client_steps(self.experiment.plan.num_samples,
                                        self.config.data.batch_size)
        fed_state = federation.begin_round(federation.init(
            global_params, round_index=round_index, client_opt_state=state.opt_state))
        fed_state, losses, finite = federation.local_round(
            fed_state, steps, state.streams.next_batches, self.config.train.steps_per_segment)
        trees = federation.client_trees(fed_state)
        state.opt_state = jax.tree.map(lambda x: x[:1], trees.client_opt_state)
        state.rounds += 1
        _, mean_loss = loss_summary(losses, 1)
        return TrainResult(params=jax.tree.map(lambda x: x[0], trees.client_params),
                           num_examples=self.site.num_train, steps=int(steps[0]),
                           mean_loss=float(mean_loss[0]),
                           finite=bool(finite[0]), seconds=time.perf_counter() - began)

    # --- the state a restarted worker continues from -----------------------------------

    def saved_state(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(meta, optimizer arrays) of the run so far; None before the first round."""
        state = self.client_state
        if state is None or state.opt_state is None:
            return None
        meta = {"client": state.client, "rounds": state.rounds,
                "iterator": json.dumps(state.streams.states()[0])}
        return meta, arrays.tree_to_arrays(jax.tree.map(lambda x: x[0], state.opt_state))

    def restore(self, meta: Mapping[str, Any], opt_arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from `saved_state`: the same client, optimizer state and data position."""
        state = self._client(int(meta["client"]))
        like = jax.eval_shape(state.federation.config.local_optimizer().init, self.like)
        state.opt_state = jax.tree.map(lambda x: np.asarray(x)[None],
                                       arrays.tree_from_arrays(opt_arrays, like))
        state.streams.set_states([json.loads(meta["iterator"])])
        state.rounds = int(meta["rounds"])

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
