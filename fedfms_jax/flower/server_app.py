"""The ServerApp: the federation's rounds, aggregated by the simulator's own code.

    connect    wait (bounded) until the expected sites are connected, ask each who it is
               (site index, name, sample count), check that no site is there twice
    round r    the clients drawn as the simulator draws them (fed.aggregate.sample_clients)
               get the global trainable weights; the replies are aggregated by the
               simulator's own code (fed.aggregate.aggregate: FedAvg weighted by
               'num-examples', then the config's server optimizer: none, fedavgm or
               fedadam; with privacy.* DP-FedAvg: each site's update clipped here and the
               simulator's noise added), so one config is one algorithm wherever it runs;
               with secagg, the round is SecAgg+ (flower/secagg.py) and the server learns
               only the weighted mean of the sites' updates
    evaluate   every eval.every rounds and after the last: each source site scores the
               global weights on its validation split, the unseen site on all its records
Only the trainable subtree travels, as named arrays packed into one array per dtype plus
their layout (wire.py), checked name by name on arrival; every message's size is logged. The
run's records go to <workdir>/metrics.jsonl in the format of `fedfms_jax.train` (plus a
'sites' record and the measured message sizes) and the final global model to
<workdir>/final.safetensors.

A site that errs or goes silent mid-round (its SuperNode died: the SuperLink answers for it
once its heartbeats stop, about a minute; or no reply before round_timeout) either fails
the run with a message naming it (on-site-failure=fail) or is dropped from this and later
rounds while the remaining sites go on (on-site-failure=continue, down to min-sites).
A reply whose weights are not finite is left out of that round's average with a warning,
as the simulator does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from logging import INFO, WARNING

import jax
import numpy as np
from flax import nnx
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedfms_jax.build import build_model, preprocessing_for
from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.config import fed_config, validate
from fedfms_jax.experiment import SiteScores, eval_record
from fedfms_jax.fed import aggregate
from fedfms_jax.fed.accounting import accountant_for, budget_message
from fedfms_jax.fed.clients import plan_clients
from fedfms_jax.fed.partition import split
from fedfms_jax.flower import arrays, secagg, wire
from fedfms_jax.flower.exchange import Outcome, exchange
from fedfms_jax.flower.polling import fast_object_pulls
from fedfms_jax.flower.settings import RunSettings, check_secagg
from fedfms_jax.run_log import RunLog, save_final

app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot go on; the message says which site and why."""


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    node: int
    index: int
    name: str
    num_train: int
    num_val: int

    def __str__(self) -> str:
        return f"site {self.index} ({self.name}, node {self.node})"


class Server:
    """One Flower run of an experiment config."""

    def __init__(self, grid: Grid, settings: RunSettings):
        self.grid = grid
        self.settings = settings
        self.config = settings.config
        # The sites hold the data (and check it); a weights file must be here too.
        validate(self.config, data_here=False, federated=True)
        check_secagg(self.config, settings)
        self.run_log = RunLog(settings.workdir) if settings.workdir else None
        model = build_model(self.config)
        self.graphdef, trainable, self.frozen = split(model, self.config.mode)
        self.like = trainable
        self.fed_config = fed_config(self.config)
        self.server = self.fed_config.server
        self.privacy = self.fed_config.privacy
        # The run's key, as the simulator's FedState holds it: the DP noise derives from it.
        self.base_key = np.asarray(jax.random.key_data(jax.random.key(self.fed_config.seed)))
        self.server_state = aggregate.optimizer_state(self.server.tx(),
                                                      jax.tree.map(np.asarray, trainable))
        self.set_global(trainable)
        self.lost: dict[str, str] = {}   # site name -> why it left the federation
        self.bytes_cumulative = 0

    # --- records and messages ---------------------------------------------------------

    def set_global(self, params) -> None:
        """The new global trainable weights, and the records every message sends of them."""
        self.global_params = jax.tree.map(np.asarray, params)
        self.global_named = arrays.state_to_arrays(self.global_params)
        self.global_records = wire.pack(self.global_named)

    def write(self, record: dict) -> None:
        if self.run_log is not None:
            self.run_log.write(record)

    def fail(self, round_index: int, message: str) -> None:
        self.write({"kind": "error", "round": round_index, "error": message})
        raise FederationError(message)

    def site_failures(self, round_index: int, what: str, outcome: Outcome,
                      sites: Mapping[int, SiteInfo]) -> None:
        """Applies the failure policy to the sites of `outcome` that gave no usable reply."""
        failed = outcome.failed
        if not failed:
            return
        described = "; ".join(f"{sites[node]}: {reason}" for node, reason in failed.items())
        if self.settings.on_site_failure == "fail":
            self.fail(round_index, f"round {round_index}: {what} failed at {described} "
                                   "(on-site-failure=fail; with 'continue' the other sites "
                                   "would go on)")
        for node, reason in failed.items():
            self.lost[sites[node].name] = f"round {round_index} {what}: {reason}"
        log(WARNING, "round %d: %s failed at %s; continuing without them", round_index, what,
            described)

    # --- the run ----------------------------------------------------------------------

    def connect(self) -> dict[int, SiteInfo]:
        """node id -> SiteInfo of every connected site, after all expected ones came."""
        wanted = self.settings.num_sites
        deadline = time.monotonic() + self.settings.connect_timeout
        while len(nodes := list(self.grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                self.fail(0, f"only {len(nodes)} of {wanted} sites connected within "
                             f"{self.settings.connect_timeout:.0f} s (connect-timeout)")
            time.sleep(0.5)
        queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                           message_type=MessageType.QUERY) for node in nodes]
        outcome = exchange(self.grid, queries, max(deadline - time.monotonic(), 60.0))
        if outcome.failed:
            self.fail(0, "sites could not say who they are: " + "; ".join(
                f"node {node}: {reason}" for node, reason in outcome.failed.items()))
        sites = {}
        for node, reply in outcome.replies.items():
            metrics = reply.content["metrics"]
            sites[node] = SiteInfo(node, int(metrics["site-index"]),
                                   str(reply.content["site"]["site-name"]),
                                   int(metrics["num-train"]), int(metrics["num-val"]))
        by_index: dict[int, list[SiteInfo]] = {}
        for info in sites.values():
            by_index.setdefault(info.index, []).append(info)
        twice = {i: s for i, s in by_index.items() if len(s) > 1}
        if twice:
            self.fail(0, "the same site connected more than once: " + "; ".join(
                f"site-index {i} at nodes {sorted(s.node for s in infos)}"
                for i, infos in sorted(twice.items())))
        names = [info.name for info in sites.values()]
        if len(set(names)) != len(names):
            self.fail(0, f"two sites have the same name: {sorted(names)}")
        unseen = self.config.data.unseen_site
        if unseen and unseen not in names:
            self.fail(0, f"data.unseen_site={unseen!r} is none of the connected sites "
                         f"({', '.join(sorted(names))})")
        return dict(sorted(sites.items(), key=lambda item: item[1].index))

    def run(self) -> dict:
        started = time.perf_counter()
        sites = self.connect()
        ordered = sorted(sites.values(), key=lambda s: s.index)
        self.write({"kind": "sites", "round": 0, "sites": [dataclasses.asdict(s)
                                                            for s in ordered]})
        log(INFO, "sites: %s", ", ".join(f"{s} n={s.num_train}" for s in ordered))
        held_out = [self.config.data.unseen_site] if self.config.data.unseen_site else []
        plan = plan_clients({s.name: s.num_train for s in ordered}, "federated", held_out)
        by_name = {s.name: s for s in ordered}
        clients = [by_name[name] for name in plan.names]
        client_sites = [s.index for s in clients]
        self.accountant = accountant_for(
            self.config.privacy.noise_multiplier, self.config.privacy.delta, len(clients),
            self.config.train.client_fraction)
        rounds = self.rounds_in_budget()
        for round_index in range(rounds):
            self.train_round(round_index, clients, client_sites)
            done = round_index + 1
            if done % self.config.eval.every == 0 or done == rounds:
                self.evaluate(done, clients, [by_name[n] for n in plan.unseen_sites])
        weights = self.save_final(rounds)
        summary = {"kind": "done", "round": rounds, "rounds": rounds,
                   "seconds": time.perf_counter() - started, "weights": weights,
                   "bytes_cumulative": self.bytes_cumulative, "lost": self.lost}
        if self.accountant is not None:
            summary["epsilon"] = self.accountant.epsilon(rounds)
            summary["delta"] = self.accountant.delta
            log(INFO, "privacy: epsilon %.4f at delta %g after %d rounds; %s",
                summary["epsilon"], self.accountant.delta, rounds, self.accountant.sampling)
        self.write(summary)
        return summary

    def rounds_in_budget(self) -> int:
        """config.rounds, or fewer where privacy.target_epsilon would be exceeded."""
        rounds, target = int(self.config.rounds), float(self.config.privacy.target_epsilon)
        if self.accountant is None or not target > 0:
            return rounds
        allowed = self.accountant.rounds_within(target, rounds)  # >= 1: validate checked
        if allowed < rounds:
            log(WARNING, "%s", budget_message(self.accountant, target, allowed))
        return allowed

    def train_round(self, round_index: int, clients: list[SiteInfo],
                    client_sites: list[int]) -> None:
        done = round_index + 1
        began = time.perf_counter()
        drawn = aggregate.sample_clients(len(clients), float(self.config.train.client_fraction),
                               int(self.config.seed), round_index)
        taking_part = [s for s, d in zip(clients, drawn) if d and s.name not in self.lost]
        if self.lost and len(taking_part) < self.settings.min_sites:
            self.fail(done, f"round {done}: only {len(taking_part)} site(s) left "
                            f"(min-sites={self.settings.min_sites}); lost: {self.lost}")
        if self.settings.secagg:
            return self.secure_round(done, began, clients, taking_part, client_sites)
        by_node = {s.node: s for s in taking_part}
        messages = [Message(RecordDict({**self.global_records, "config": ConfigRecord(
            {"server-round": done, "client-sites": client_sites})}), dst_node_id=node,
            message_type=MessageType.TRAIN) for node in by_node]
        down = wire.message_bytes(self.global_records)
        for message in messages:
            log(INFO, "round %d: to %s: %d bytes", done, by_node[message.metadata.dst_node_id],
                down)
        outcome = exchange(self.grid, messages, self.settings.round_timeout)
        up, named = {}, {}
        for node, reply in list(outcome.replies.items()):
            up[by_node[node].name] = wire.message_bytes(reply.content)
            log(INFO, "round %d: from %s: %d bytes", done, by_node[node], up[by_node[node].name])
            source = f"the reply of {by_node[node]}"
            try:
                named[node] = wire.unpack(reply.content, source)
                arrays.check_arrays(named[node], self.like, source)
            except wire.WireError as error:
                del outcome.replies[node]
                outcome.errors[node] = str(error)
        self.site_failures(done, "training", outcome, by_node)
        if outcome.failed and len(outcome.replies) < self.settings.min_sites:
            self.fail(done, f"round {done}: {len(outcome.replies)} site(s) replied, fewer than "
                            f"min-sites={self.settings.min_sites}; lost: {self.lost}")

        loss, steps, replies = {}, {}, []
        for node, reply in outcome.replies.items():
            site = by_node[node]
            metrics = reply.content["metrics"]
            loss[site.name] = float(metrics["loss"])
            steps[site.name] = int(metrics["steps"])
            replies.append((site, reply, named[node]))
        excluded, dp = self.aggregate(done, replies)
        total = down * len(messages) + sum(up.values())
        self.bytes_cumulative += total
        ordered = [s.name for s in taking_part]
        self.write({
            "kind": "round", "round": done, "loss": loss, "steps": steps, **dp,
            "bytes_up_per_client": max(up.values(), default=0),
            "bytes_down_per_client": down if messages else 0,
            "bytes_total": total, "bytes_cumulative": self.bytes_cumulative,
            "payload_bytes_per_client": wire.payload_bytes(self.global_named),
            "message_bytes": {name: {"down": down, "up": up.get(name)} for name in ordered},
            "excluded": excluded, "sites": ordered,
            "failed": {name: why for name, why in self.lost.items()
                       if why.startswith(f"round {done} ")},
            "seconds": time.perf_counter() - began})

    def secure_round(self, done: int, began: float, clients: list[SiteInfo],
                     taking_part: list[SiteInfo], client_sites: list[int]) -> None:
        """A round under SecAgg+ (flower/secagg.py): the server learns the weighted mean of
        the sites' updates and nothing of any one of them; a site dropping after the key
        sharing is handled by the protocol within its threshold, then by the failure policy."""
        by_node = {s.node: s for s in taking_part}
        if len(by_node) < 2:
            self.fail(done, f"round {done}: SecAgg+ needs at least 2 sites in a round, "
                            f"{len(by_node)} take part (train.client_fraction, lost: "
                            f"{self.lost or 'none'})")
        outcome = secagg.secure_round(
            self.grid, list(by_node), self.global_named,
            {"server-round": done, "client-sites": client_sites},
            max_weight=float(max(s.num_train for s in clients)),
            secagg_range=self.settings.secagg_range, threshold=self.settings.secagg_threshold,
            timeout=self.settings.round_timeout)
        failed = {node: f"dropped out of the SecAgg+ round ({why})"
                  for node, why in outcome.dropped.items()}
        if failed:
            if self.settings.on_site_failure == "fail":
                self.fail(done, f"round {done}: " + "; ".join(
                    f"{by_node[n]} {why}" for n, why in failed.items())
                    + " (on-site-failure=fail; with 'continue' SecAgg+ averages the others)")
            for node, why in failed.items():
                self.lost[by_node[node].name] = f"round {done} training: {why}"
            log(WARNING, "round %d: %s", done, "; ".join(f"{by_node[n]} {why}"
                                                         for n, why in failed.items()))
            if len(outcome.metrics) < self.settings.min_sites:
                self.fail(done, f"round {done}: {len(outcome.metrics)} site(s) finished the "
                                f"SecAgg+ round, fewer than min-sites="
                                f"{self.settings.min_sites}; lost: {self.lost}")
        if outcome.mean_update is None:
            if not outcome.metrics:
                self.fail(done, f"round {done}: SecAgg+ halted: fewer sites answered than its "
                                f"threshold ({self.settings.secagg_threshold:g} of each "
                                "site's neighbours) needs")
            log(WARNING, "round %d: no update with weight > 0; the global weights are "
                "unchanged", done)
        else:
            update = arrays.from_arrays(
                {k: v.astype(self.global_named[k].dtype)
                 for k, v in outcome.mean_update.items()}, self.like, "the SecAgg+ aggregate")
            new, self.server_state = aggregate.mean_update_step_fn(self.server)(
                self.global_params, update, self.server_state)
            self.set_global(new)
        down = wire.message_bytes(self.global_records)
        finished = {by_node[n].name: m for n, m in outcome.metrics.items()}
        self.bytes_cumulative += down * len(by_node)
        self.write({
            "kind": "round", "round": done, "secagg": True,
            "loss": {n: float(m["loss"]) for n, m in finished.items()},
            "steps": {n: int(m["steps"]) for n, m in finished.items()},
            "secagg_clipped": {n: int(m.get("secagg-clipped", 0)) for n, m in finished.items()},
            # Under SecAgg+ the upload is masked key material and vectors, not counted here.
            "bytes_up_per_client": 0, "bytes_down_per_client": down,
            "bytes_total": down * len(by_node), "bytes_cumulative": self.bytes_cumulative,
            "excluded": [n for n, m in finished.items() if int(m["num-examples"]) == 0],
            "sites": [s.name for s in taking_part],
            "failed": {by_node[n].name: why for n, why in failed.items()},
            "seconds": time.perf_counter() - began})

    def evaluate(self, done: int, clients: list[SiteInfo], unseen: list[SiteInfo]) -> None:
        targets = [(s, "val") for s in clients] + [(s, "test") for s in unseen]
        targets = [(s, split_) for s, split_ in targets if s.name not in self.lost]
        by_node = {s.node: s for s, _ in targets}
        messages = [Message(RecordDict({**self.global_records, "config": ConfigRecord(
            {"split": split_, "server-round": done})}), dst_node_id=s.node,
            message_type=MessageType.EVALUATE) for s, split_ in targets]
        outcome = exchange(self.grid, messages, self.settings.round_timeout)
        self.site_failures(done, "evaluation", outcome, by_node)
        for split_ in ("val", "test"):
            scores = {}
            for s, kind in targets:
                if kind == split_ and s.node in outcome.replies:
                    m = outcome.replies[s.node].content["metrics"]
                    scores[s.name] = SiteScores(
                        dice=float(m["dice"]), iou=float(m["iou"]), hd95=float(m["hd95"]),
                        nsd=float(m["nsd"]), cases=int(m["cases"]),
                        images=int(m["num-examples"]), missed=int(m["missed"]),
                        spurious=int(m["spurious"]), both_empty=int(m["both-empty"]))
            if scores:
                self.write(eval_record(done, split_, scores, tuple(s.name for s in unseen)))

    def privacy_fields(self, done: int, norms: dict[str, float], noise_std: float) -> dict:
        """The round record's privacy fields, as fedfms_jax.train writes them."""
        if not self.privacy.on:
            return {}
        return {"epsilon": None if self.accountant is None else self.accountant.epsilon(done),
                "delta": float(self.config.privacy.delta), "noise_std": noise_std,
                "update_norm": norms}

    def aggregate(self, done: int, replies: list) -> tuple[list[str], dict]:
        """The round's new global weights from the replies [(SiteInfo, Message, named
        arrays)], by the
        simulator's aggregation (non-finite replies left out, as there; with privacy on,
        each site's update clipped and the mean noised with the simulator's key for this
        round). Returns (the names of the sites left out, the round's privacy fields)."""
        if not replies:
            log(WARNING, "round %d: no update to average; the global weights are unchanged",
                done)
            return [], self.privacy_fields(done, {}, 0.0)
        trees = [arrays.from_arrays(named, self.like, f"the reply of {site}")
                 for site, _, named in replies]
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
        num_samples = np.array([float(reply.content["metrics"]["num-examples"])
                                for _, reply, _ in replies], np.float32)
        new, self.server_state, metrics = aggregate.aggregate_fn(self.server, self.privacy)(
            self.global_params, stacked, num_samples, self.server_state, self.base_key,
            np.int32(done - 1))
        self.set_global(new)
        excluded = [site.name for (site, _, _), ok in zip(replies, np.asarray(metrics["finite"]))
                    if not ok]
        for name in excluded:
            log(WARNING, "round %d: %s sent a non-finite update: left out of the average",
                done, name)
        if len(excluded) == len(replies):
            log(WARNING, "round %d: no update to average; the global weights are unchanged",
                done)
        norms = {site.name: float(v) for (site, _, _), v in
                 zip(replies, np.asarray(metrics.get("update_norm", [])))}
        return excluded, self.privacy_fields(done, norms, float(metrics.get("noise_std", 0.0)))

    def save_final(self, rounds: int) -> str | None:
        """The global model (frozen + global trainable weights) as a weights file."""
        if not self.settings.workdir:
            return None
        model = nnx.merge(self.graphdef, self.global_params, self.frozen)
        return str(save_final(self.settings.workdir, model, self.config, rounds,
                              "fedfms_jax.flower",
                              preprocessing=preprocessing_for(self.config, model.config)))


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    enable_compilation_cache()
    fast_object_pulls()
    try:
        summary = Server(grid, settings).run()
    except FederationError:
        raise  # already recorded
    except Exception as error:
        if settings.workdir:
            RunLog(settings.workdir).write({"kind": "error", "round": -1,
                                            "error": f"{type(error).__name__}: {error}"})
        raise
    log(INFO, "done: %d rounds in %.1f s, %d bytes in messages", summary["rounds"],
        summary["seconds"], summary["bytes_cumulative"])
