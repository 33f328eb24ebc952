"""SecAgg+ on the Flower server against sites answered in-process through the real glue
(flower/secagg.py: flwr's SecAggPlusWorkflow and secaggplus_mod, all four stages, real
keys and masks): the aggregate is FedAvg's within the documented quantisation error, a
site dropping after the key sharing is handled within the threshold, and server-side DP is
refused. The sites' training is FakeSite's (every weight moved by a constant), so nothing
is compiled but the server step; `flower.local --secagg` runs the real ClientApp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedfms_jax.config import ConfigError
from fedfms_jax.flower import secagg
from fedfms_jax.flower.server_app import Server
from fedfms_jax.flower.settings import RunSettings, config_to_json
from fedfms_jax.run_log import read_records
from tests.flower.test_deployment import tiny_config
from fedfms_jax.fed.partition import config_for_mode
from fedfms_jax.models import get_config
from tests.fast_build import random_sam
from tests.flower.test_server_app import (FakeGrid, FakeSite, reuse_model,  # noqa: F401
                                          serverapp_identity, trainable)

RANGE = 0.5
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model():
    """The server's model (test_server_app's reuse_model hands it out): random weights
    set without eager initialisation, since no test here trains or predicts."""
    return random_sam(config_for_mode(get_config("tiny"), "decoder"))


class SecureGrid(FakeGrid):
    """FakeGrid plus the blocking send_and_receive that SecAggPlusWorkflow calls."""

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def own_copy(content: RecordDict) -> RecordDict:
    """The content with its own config and metric records (arrays are only read)."""
    out = RecordDict()
    for name, record in content.array_records.items():
        out.array_records[name] = record
    for name, record in content.config_records.items():
        out.config_records[name] = ConfigRecord(dict(record))
    for name, record in content.metric_records.items():
        out.metric_records[name] = MetricRecord(dict(record))
    return out


class SecureSite:
    """A FakeSite behind the ClientApp's train mod (secagg.secagg_mod), with the Context
    state a SuperNode keeps; drop_in_round: answers the masked-vector stage of that round
    with an error, after it has shared its keys."""

    def __init__(self, site: FakeSite, drop_in_round: int | None = None):
        self.site, self.drop_in_round = site, drop_in_round
        self.context = Context(run_id=7, node_id=1000 + site.index, node_config={},
                               state=RecordDict(), run_config={})
        self.rounds_trained = 0

    @property
    def index(self):
        return self.site.index

    def __call__(self, msg):
        if msg.metadata.message_type != "train":
            return self.site(msg)
        # A SuperNode receives its own deserialised copy; the workflow sends every node one
        # content object (and secaggplus_mod pops from it).
        msg.content = own_copy(msg.content)
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.rounds_trained += 1
            if self.rounds_trained == self.drop_in_round:
                return Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
        return secagg.secagg_mod(msg, self.context, lambda m, _: self.site(m))


def secure_server(grid, tmp_path, num_sites, secure=True, **changes):
    policy = {k: changes.pop(k) for k in ("on_site_failure",) if k in changes}
    config = tiny_config(mode="decoder", **{"data.unseen_site": "", **changes})
    settings = RunSettings(config_json=config_to_json(config), num_sites=num_sites,
                           workdir=str(tmp_path), connect_timeout=5.0, round_timeout=30.0,
                           secagg=int(secure), secagg_range=RANGE, **policy)
    return Server(grid, settings)


def sites(deltas, counts=(3, 1, 2)):
    return [FakeSite(k, "abc"[k], n, delta=d) for k, (n, d) in enumerate(zip(counts, deltas))]


def test_secagg_is_fedavg_within_the_quantisation_error(tmp_path):
    deltas = (0.3, -0.1, 0.2)
    plain = secure_server(FakeGrid(sites(deltas)), tmp_path / "plain", 3, secure=False,
                          rounds=2)
    plain.run()
    secure_sites = [SecureSite(s) for s in sites(deltas)]
    server = secure_server(SecureGrid(secure_sites), tmp_path / "secure", 3, rounds=2)
    before = trainable(server)
    server.run()
    # Per value and round: 3 K R / 2^22 (1.1e-6 at R = 0.5), twice, plus float32 rounding.
    bound = 2 * secagg.quantisation_bound(3, RANGE)
    expected, got = trainable(plain), trainable(server)
    moved = max(float(np.max(np.abs(expected[k] - before[k]))) for k in expected)
    assert moved == pytest.approx(2 * (3 * 0.3 - 0.1 + 2 * 0.2) / 6, rel=1e-4)  # it trained
    worst = max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected)
    assert 0 < worst <= bound + 8 * np.finfo(np.float32).eps * max(
        float(np.max(np.abs(v))) for v in expected.values()), (worst, bound)
    records = read_records(tmp_path / "secure", "round")
    assert [r["secagg"] for r in records] == [True, True]
    assert records[0]["loss"] == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert records[0]["secagg_clipped"] == {"a": 0, "b": 0, "c": 0}
    # The server received masked vectors only: no site's arrays reached it in the clear.
    for site in secure_sites:
        assert site.rounds_trained == 2


def test_a_site_dropping_after_key_sharing_is_handled_within_the_threshold(tmp_path):
    secure_sites = [SecureSite(s, drop_in_round=1 if s.name == "c" else None)
                    for s in sites((0.3, -0.1, 0.2))]
    server = secure_server(SecureGrid(secure_sites), tmp_path, 3, rounds=2,
                           on_site_failure="continue")
    before = trainable(server)
    server.run()
    records = read_records(tmp_path, "round")
    assert "dropped out of the SecAgg+ round" in records[0]["failed"]["c"]
    assert set(records[0]["loss"]) == {"a", "b"} and records[1]["sites"] == ["a", "b"]
    # Both rounds average a and b only: (3 * 0.3 + 1 * -0.1) / 4 = 0.2 a round.
    bound = 2 * secagg.quantisation_bound(3, RANGE) + 1e-6
    for name, value in trainable(server).items():
        assert float(np.max(np.abs(value - (before[name] + 0.4)))) <= bound, name
    # With on-site-failure=fail the drop fails the run, naming the site.
    failing = [SecureSite(s, drop_in_round=1 if s.name == "c" else None)
               for s in sites((0.3, -0.1, 0.2))]
    with pytest.raises(Exception, match=r"site 2 \(c, node 1002\) dropped out"):
        secure_server(SecureGrid(failing), tmp_path / "fail", 3, rounds=1).run()


def test_server_side_dp_is_refused_under_secagg(tmp_path):
    with pytest.raises(ConfigError, match="SecAgg"):
        secure_server(SecureGrid([]), tmp_path, 2, **{"privacy.clip_norm": 0.1})


def test_the_launcher_refuses_secagg_with_server_side_dp_before_starting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedfms_jax.flower.local", "--config", "configs/demo.py",
         "--sites", "4", "--secagg", "--workdir", str(tmp_path / "run"),
         "--config.privacy.clip_norm=0.1"], capture_output=True, text=True, timeout=120,
        cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "which SecAgg+ (--secagg) makes impossible" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()
