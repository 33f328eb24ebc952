"""The ServerApp's rounds against sites answered in-process (a fake Grid): weighting,
strategies, failure policies, timeouts and the records it writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedfms_jax.build import build_model
from fedfms_jax.config import ConfigError
from fedfms_jax.fed import aggregate
from fedfms_jax.fed.accounting import Accountant
from fedfms_jax.flower import arrays, server_app, wire
from fedfms_jax.flower.server_app import FederationError, Server
from fedfms_jax.flower.settings import RunSettings, config_to_json
from fedfms_jax.run_log import read_records
from tests.flower.test_deployment import tiny_config
from tests.numerics import EPS32


@pytest.fixture(autouse=True)
def serverapp_identity():
    """Messages are stamped with the task's identity, which a ServerApp process has."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(tiny_config(mode="decoder"))


@pytest.fixture(autouse=True)
def reuse_model(monkeypatch, tiny_model):
    monkeypatch.setattr(server_app, "build_model", lambda config: tiny_model)


class FakeSite:
    """A site answering in-process: training adds `delta` to every weight."""

    def __init__(self, index, name, num_train, delta=0.0, fail_in_round=None, silent=False,
                 reply_arrays=None):
        self.index, self.name, self.num_train, self.delta = index, name, num_train, delta
        self.fail_in_round, self.silent, self.reply_arrays = fail_in_round, silent, reply_arrays
        self.received: list[Message] = []

    def __call__(self, msg: Message) -> Message | None:
        self.received.append(msg)
        kind = msg.metadata.message_type
        if kind == "query":
            return Message(RecordDict({
                "metrics": MetricRecord({"site-index": self.index, "num-train": self.num_train,
                                         "num-val": 2}),
                "site": ConfigRecord({"site-name": self.name})}), reply_to=msg)
        if kind == "train":
            if msg.content["config"]["server-round"] == self.fail_in_round:
                return Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
            if self.silent:
                return None
            new = self.reply_arrays or {k: v + np.float32(self.delta)
                                        for k, v in wire.unpack(msg.content).items()}
            return Message(RecordDict({
                **wire.pack(new),
                "metrics": MetricRecord({"num-examples": self.num_train, "loss": 0.5,
                                         "steps": 2, "finite": 1})}), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord({
            "num-examples": 2, "dice": 0.1 * self.index, "iou": 0.0, "hd95": 1.0,
            "nsd": 0.5, "cases": 1, "missed": 0, "spurious": 0, "both-empty": 0})}),
            reply_to=msg)


class FakeGrid:
    """The Grid methods the server uses; replies are computed when first pulled."""

    def __init__(self, sites):
        self.sites = {1000 + i: site for i, site in enumerate(sites)}
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.pending[message.object_id] = message
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in message_ids:
            message = self.pending.get(message_id)
            if message is None:
                continue
            reply = self.sites[message.metadata.dst_node_id](message)
            if reply is not None:
                del self.pending[message_id]
                replies.append(reply)
        return replies


def make_server(grid, tmp_path, num_sites, **changes):
    policy = {k: changes.pop(k) for k in ("on_site_failure", "min_sites", "round_timeout",
                                         "connect_timeout") if k in changes}
    config = tiny_config(mode="decoder", **{"data.unseen_site": "", **changes})
    settings = RunSettings(config_json=config_to_json(config), num_sites=num_sites,
                           workdir=str(tmp_path), **{"connect_timeout": 5.0,
                                                     "round_timeout": 5.0, **policy})
    return Server(grid, settings)


def trainable(server):
    return dict(server.global_named)


def test_fedavg_weighted_by_sample_counts_over_the_trainable_leaves(tmp_path):
    sites = [FakeSite(0, "a", 3, delta=1.0), FakeSite(1, "b", 1, delta=-1.0)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=1)
    before = trainable(server)
    server.run()
    after = trainable(server)
    sent = sites[0].received[1]
    assert sent.metadata.message_type == "train"
    assert set(wire.unpack(sent.content)) == set(before)
    assert all(name.startswith("mask_decoder.") for name in before)  # decoder mode
    assert list(sent.content["config"]["client-sites"]) == [0, 1]
    for name in before:  # (3 * (w + 1) + 1 * (w - 1)) / 4 = w + 0.5
        np.testing.assert_allclose(after[name], before[name] + 0.5, rtol=1e-6, atol=1e-6)
    record = read_records(tmp_path, "round")[0]
    assert record["sites"] == ["a", "b"] and record["loss"] == {"a": 0.5, "b": 0.5}
    down = wire.message_bytes(sent.content)
    assert record["message_bytes"] == {"a": {"down": down, "up": down},
                                       "b": {"down": down, "up": down}}
    assert read_records(tmp_path, "eval")[0]["sites"].keys() == {"a", "b"}
    assert read_records(tmp_path, "done")[0]["weights"].endswith("final.safetensors")


def test_unseen_site_is_only_tested(tmp_path):
    sites = [FakeSite(0, "a", 3), FakeSite(1, "b", 2), FakeSite(2, "c", 4)]
    server = make_server(FakeGrid(sites), tmp_path, 3, rounds=1, **{"data.unseen_site": "c"})
    server.run()
    assert [m.metadata.message_type for m in sites[2].received] == ["query", "evaluate"]
    assert sites[2].received[1].content["config"]["split"] == "test"
    evals = {r["split"]: r for r in read_records(tmp_path, "eval")}
    assert set(evals["val"]["sites"]) == {"a", "b"} and set(evals["test"]["sites"]) == {"c"}
    assert evals["test"]["dice_unseen"] == pytest.approx(0.2)


@pytest.mark.parametrize("server, hyper", [
    ("fedavgm", {"train.server_lr": 0.7}),
    ("fedadam", {"train.server_lr": 0.05, "train.server_b2": 0.9}),
    ("fedadam", {}),   # the defaults, the ones a user gets
])
def test_server_optimizers_are_the_engines(tmp_path, server, hyper):
    """Two rounds of FedAvgM / FedAdam on the server equal fed.aggregate's own server step
    (the simulator's) on the same replies; FedProx runs with any server optimizer."""
    sites = [FakeSite(0, "a", 3, delta=0.5), FakeSite(1, "b", 1, delta=-0.25)]
    server_ = make_server(FakeGrid(sites), tmp_path, 2, rounds=2, algorithm="fedprox",
                          **{"train.server_optimizer": server, **hyper})
    before = trainable(server_)
    server_.run()
    assert "proximal-mu" not in sites[0].received[1].content["config"]  # the config says it
    given = {k.removeprefix("train."): v for k, v in hyper.items()}
    tx = aggregate.server_optimizer(server, **given)
    w = {k: np.asarray(v) for k, v in before.items()}
    state = tx.init(w)
    for _ in range(2):  # both sites move every weight: mean = w + 0.3125
        mean = {k: v + (3 * 0.5 + 1 * -0.25) / 4 for k, v in w.items()}
        w, state = aggregate.server_step(w, mean, tx, state, plain=False, any_included=True)
    moved = max(float(np.max(np.abs(w[k] - before[k]))) for k in w)
    assert moved > 1e-4
    for name, value in trainable(server_).items():
        # float32 rounding of weights of size ~1 plus Adam's normalised steps
        np.testing.assert_allclose(value, w[name], rtol=1e-5, atol=1e-6 * (1 + moved))


def test_a_failed_site_fails_the_run_naming_it(tmp_path):
    sites = [FakeSite(0, "a", 3), FakeSite(1, "b", 1, fail_in_round=1)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=2)
    with pytest.raises(FederationError, match=r"round 1: training failed at site 1 \(b, node "
                                              r"1001\): Node Unavailable"):
        server.run()
    assert "on-site-failure=fail" in read_records(tmp_path, "error")[0]["error"]


def test_continue_goes_on_without_the_failed_site(tmp_path):
    sites = [FakeSite(0, "a", 3, delta=1.0), FakeSite(1, "b", 1, delta=-1.0, fail_in_round=1)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=2, on_site_failure="continue")
    before = trainable(server)
    server.run()
    rounds = read_records(tmp_path, "round")
    assert [r["sites"] for r in rounds] == [["a", "b"], ["a"]]
    assert "Node Unavailable" in rounds[0]["failed"]["b"] and rounds[1]["failed"] == {}
    assert [m.metadata.message_type for m in sites[1].received] == ["query", "train"]
    for name, value in trainable(server).items():  # only site a's +1, twice
        np.testing.assert_allclose(value, before[name] + 2.0, rtol=1e-6, atol=1e-6)


def test_continue_stops_below_min_sites(tmp_path):
    sites = [FakeSite(0, "a", 3), FakeSite(1, "b", 1, fail_in_round=1)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=2, on_site_failure="continue",
                         min_sites=2)
    with pytest.raises(FederationError, match="1 site\\(s\\) replied, fewer than min-sites=2"):
        server.run()


def test_a_silent_site_is_given_up_after_the_round_timeout(tmp_path):
    sites = [FakeSite(0, "a", 3), FakeSite(1, "b", 1, silent=True)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=1, on_site_failure="continue",
                         round_timeout=1.0)
    server.run()
    record = read_records(tmp_path, "round")[0]
    assert record["failed"] == {"b": "round 1 training: no reply before the round timeout"}
    assert 1.0 <= record["seconds"] < 5.0


def test_a_non_finite_update_is_left_out(tmp_path):
    sites = [FakeSite(0, "a", 3, delta=1.0), FakeSite(1, "b", 1, delta=float("nan"))]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=1)
    before = trainable(server)
    server.run()
    assert read_records(tmp_path, "round")[0]["excluded"] == ["b"]
    for name, value in trainable(server).items():
        np.testing.assert_allclose(value, before[name] + 1.0, rtol=1e-6, atol=1e-6)


def test_a_reply_that_does_not_fit_is_a_site_failure(tmp_path):
    grid = FakeGrid([FakeSite(0, "a", 3), FakeSite(1, "b", 1)])
    server = make_server(grid, tmp_path, 2, rounds=1)
    wrong = {**trainable(server), "image_encoder.neck.0.kernel": np.zeros(3, np.float32)}
    grid.sites[1001].reply_arrays = wrong
    with pytest.raises(FederationError, match="the reply of site 1 \\(b, node 1001\\) does "
                                              "not fit(.|\\n)*image_encoder.neck.0.kernel"):
        server.run()


class LayoutlessSite(FakeSite):
    """Replies with its packed arrays but without their layout."""

    def __call__(self, msg):
        reply = super().__call__(msg)
        if msg.metadata.message_type == "train":
            del reply.content[wire.LAYOUT]
        return reply


def test_a_reply_without_its_layout_is_a_site_failure(tmp_path):
    grid = FakeGrid([FakeSite(0, "a", 3), LayoutlessSite(1, "b", 1)])
    server = make_server(grid, tmp_path, 2, rounds=1)
    with pytest.raises(FederationError, match="at site 1 \\(b, node 1001\\): the reply of "
                                              "site 1 .* carries no packed arrays"):
        server.run()


def test_connect_is_bounded_and_checks_identities(tmp_path):
    server = make_server(FakeGrid([FakeSite(0, "a", 3)]), tmp_path / "one", 2,
                         connect_timeout=1.0)
    with pytest.raises(FederationError, match="only 1 of 2 sites connected within 1 s"):
        server.run()
    server = make_server(FakeGrid([FakeSite(0, "a", 3), FakeSite(0, "a2", 3)]),
                         tmp_path / "twice", 2)
    with pytest.raises(FederationError, match="site-index 0 at nodes \\[1000, 1001\\]"):
        server.run()


def test_an_unseen_site_that_did_not_connect_is_named(tmp_path):
    """The in-process form of the real launcher's wrong-site-count error (slow test)."""
    server = make_server(FakeGrid([FakeSite(0, "a", 3), FakeSite(1, "b", 1)]), tmp_path, 2,
                         **{"data.unseen_site": "c"})
    with pytest.raises(FederationError,
                       match=r"data.unseen_site='c' is none of the connected sites \(a, b\)"):
        server.run()


@pytest.mark.parametrize("changes, message", [
    ({"algorithm": "central"}, "baseline without a federation"),
    ({"train.server_optimizer": "adam"}, "train.server_optimizer='adam' is not one of: none, "
                                         "fedavgm, fedadam"),
    ({"train.server_lr": 0.1}, "train.server_lr is set, but train.server_optimizer='none'"),
])
def test_configs_flower_cannot_run_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        make_server(FakeGrid([]), tmp_path, 1, **changes)


def test_run_settings_round_trip():
    config = tiny_config()
    settings = RunSettings(config_json=config_to_json(config), num_sites=3, workdir="/w",
                           on_site_failure="continue", min_sites=2)
    back = RunSettings.from_run_config(settings.to_run_config())
    assert back == settings and back.config.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="on-site-failure"):
        RunSettings(config_json="{}", num_sites=1, on_site_failure="ignore")
    with pytest.raises(ValueError, match="config-json"):
        RunSettings.from_run_config({"num-sites": 2})


def test_the_server_clips_each_site_and_adds_the_simulators_noise(tmp_path):
    """DP-FedAvg on the server: each site's update clipped, the simulator's noise (the
    run's key and the round), the epsilon in every round record. (test_same_trajectory.py
    runs the real ClientApp against the simulator with DP end to end, marked slow.)"""
    sites = [FakeSite(0, "a", 3, delta=1.0), FakeSite(1, "b", 1, delta=-1.0)]
    server = make_server(FakeGrid(sites), tmp_path, 2, rounds=2, **{
        "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0})
    before = {k: np.asarray(v, np.float64) for k, v in trainable(server).items()}
    server.run()
    size = sum(v.size for v in before.values())
    key = jax.random.key_data(jax.random.key(server.config.seed))  # the simulator's FedState.key
    expected = dict(before)
    for round_index in range(2):
        # Each site moved every weight by +-1: clipped to norm 0.5 along the same direction,
        # so the weighted mean moves every weight by (3/4 - 1/4) * 0.5 / sqrt(size).
        std = jnp.float32(1.0 * 0.5 * 0.75)
        noise = aggregate.gaussian_noise(aggregate.noise_key(key, round_index),
                                         server.like, std)
        flat_noise = arrays.state_to_arrays(noise)
        expected = {k: v + 0.25 / np.sqrt(size) + flat_noise[k] for k, v in expected.items()}
    for name, value in trainable(server).items():
        scale = float(np.max(np.abs(expected[name])))
        # float32 rounding of a few terms of this size
        assert float(np.max(np.abs(value - expected[name]))) <= 64 * EPS32 * scale, name
    records = read_records(tmp_path, "round")
    accountant = Accountant(1.0, 1e-5, 2, 2)
    assert [r["epsilon"] for r in records] == pytest.approx(
        [accountant.epsilon(1), accountant.epsilon(2)], rel=1e-12)
    for r in records:
        assert r["noise_std"] == pytest.approx(0.375)
        assert r["update_norm"] == pytest.approx({"a": np.sqrt(size), "b": np.sqrt(size)},
                                                 rel=1e-5)
    assert read_records(tmp_path, "done")[0]["epsilon"] == pytest.approx(accountant.epsilon(2))
