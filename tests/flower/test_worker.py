"""The site worker and its channel: authenticated requests, runs kept apart, a restarted
worker continuing exactly where its predecessor stopped, and the ClientApp's errors naming
what went wrong."""

from __future__ import annotations

import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedfms_jax.build import build_model
from fedfms_jax.fed.partition import split
from fedfms_jax.flower import arrays, channel, client_app
from fedfms_jax.flower.settings import RunSettings, config_to_json
from fedfms_jax.flower.worker import SiteWorker
from tests.flower.test_deployment import tiny_config
from tests.flower.test_server_app import serverapp_identity  # noqa: F401 (autouse)


def serve_once(directory, handle):
    """A worker stand-in answering one connection with `handle` (None: close unanswered)."""
    listener = channel.listen(directory)

    def run():
        with listener:
            while True:
                try:
                    connection = listener.accept()
                    break
                except AuthenticationError:  # as the worker does: refuse, serve the next
                    continue
            if handle is None:
                connection.recv()
                connection.close()
            else:
                channel.answer(connection, handle)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_channel_answers_and_refuses(tmp_path):
    with pytest.raises(channel.WorkerUnavailable, match="worker.key does not exist"):
        channel.call(tmp_path, {"kind": "ping"})
    thread = serve_once(tmp_path, lambda request: {"echo": request["kind"]})
    assert channel.call(tmp_path, {"kind": "ping"}) == {"echo": "ping"}
    thread.join(5)
    assert (tmp_path / channel.KEY_FILE).stat().st_mode & 0o077 == 0  # the key is private
    assert tmp_path.stat().st_mode & 0o077 == 0
    with pytest.raises(channel.WorkerUnavailable, match="no site worker listens"):
        channel.call(tmp_path, {"kind": "ping"})  # the key is there, the worker is not

    thread = serve_once(tmp_path, None)
    with pytest.raises(channel.WorkerDied, match="closed the connection before answering"):
        channel.call(tmp_path, {"kind": "train"})
    thread.join(5)


def test_channel_refuses_a_wrong_key(tmp_path):
    thread = serve_once(tmp_path, lambda request: {"ok": True})
    with pytest.raises(AuthenticationError):
        Client(channel.address(tmp_path), family="AF_UNIX", authkey=b"not the key")
    assert channel.call(tmp_path, {"kind": "ping"}) == {"ok": True}  # still serving
    thread.join(5)


def test_a_long_directory_gets_an_abstract_socket(tmp_path):
    deep = tmp_path / ("d" * 120)
    assert channel.address(deep).startswith("\0fedfms-worker-")
    assert channel.address(deep) == channel.address(deep)
    thread = serve_once(deep, lambda request: {"ok": 1})
    assert channel.call(deep, {"kind": "ping"}) == {"ok": 1}
    thread.join(5)


# --- the worker itself (in-process: what its socket forwards to is SiteWorker.handle) ------

@pytest.fixture(scope="module")
def run_config():
    config = tiny_config(**{"mode": "decoder", "data.options.num_sites": 2,
                            "data.unseen_site": ""})
    _, trainable, _ = split(build_model(config), config.mode)
    settings = RunSettings(config_json=config_to_json(config), num_sites=2)
    return settings.to_run_config(), arrays.state_to_arrays(trainable)


def request(run_config, kind, run_id=1, **fields):
    return {"kind": kind, "run_id": run_id, "run_config": run_config,
            "node_config": {"site-index": 0}, **fields}


def train(worker, run_config, start, round_number, run_id=1):
    reply = worker.handle(request(run_config, "train", run_id, arrays=start, config={
        "server-round": round_number, "client-sites": [0, 1]}))
    assert reply["ok"], reply
    return reply


def test_a_restarted_worker_continues_the_run_exactly(tmp_path, run_config):
    """Round 2 of a worker that trained round 1, and of a fresh worker started on the state
    another one saved after round 1, are the same: optimizer moments and data position are
    carried. Without the saved state round 2 differs. A new run id starts over."""
    config, start = run_config
    first = SiteWorker(tmp_path / "a")
    round_1 = train(first, config, start, 1)
    assert round_1["metrics"]["steps"] == 3 and round_1["site-index"] == 0
    round_2 = train(first, config, round_1["arrays"], 2)
    # Decoder mode: the site ran its frozen encoder once per training image, not per round.
    cache = first.site.client_state.streams.cache
    assert cache is not None and cache.computed == first.site.site.num_train

    crashed = SiteWorker(tmp_path / "b")
    crashed_1 = train(crashed, config, start, 1)
    assert list((tmp_path / "b").glob("*.npz")) == [tmp_path / "b/run-1.npz"]
    restarted_2 = train(SiteWorker(tmp_path / "b"), config, crashed_1["arrays"], 2)
    for name, value in round_2["arrays"].items():
        np.testing.assert_array_equal(restarted_2["arrays"][name], value, err_msg=name)
    assert restarted_2["metrics"]["loss"] == round_2["metrics"]["loss"]

    forgetful_2 = train(SiteWorker(None), config, crashed_1["arrays"], 2)
    assert forgetful_2["metrics"]["loss"] != round_2["metrics"]["loss"]

    new_run = train(first, config, start, 1, run_id=2)
    for name, value in round_1["arrays"].items():
        np.testing.assert_array_equal(new_run["arrays"][name], value, err_msg=name)
    assert [p.name for p in (tmp_path / "a").glob("*.npz")] == ["run-2.npz"]


def test_evaluate_uses_the_built_experiment_and_errors_are_answers(run_config, monkeypatch):
    config, start = run_config
    worker = SiteWorker()
    train(worker, config, start, 1)
    site = worker.site
    scores = worker.handle(request(config, "evaluate", arrays=start, config={"split": "val"}))
    assert scores["ok"] and scores["scores"]["images"] == site.site.num_val
    assert "per_case" not in scores["scores"]  # the per-case figures stay on the site
    assert worker.site is site  # nothing rebuilt
    bad = worker.handle(request(config, "train", arrays={"x": np.zeros(2)}, config={
        "server-round": 2, "client-sites": [0, 1]}))
    assert not bad["ok"] and "ArrayRecordMismatch" in bad["error"] and "missing" in bad["error"]
    moved = worker.handle(request(config, "train", arrays=start, config={
        "server-round": 2, "client-sites": [1, 0]}))
    assert not moved["ok"] and "was client 0 of this run and is now told it is client 1" in \
        moved["error"]


# --- the ClientApp adapter ---------------------------------------------------------------

def context(node_config):
    return Context(run_id=3, node_id=5, node_config=node_config, state=RecordDict(),
                   run_config={"config-json": "{}", "num-sites": 1})


def test_the_clientapp_says_what_is_missing(tmp_path, monkeypatch):
    message = Message(RecordDict(), dst_node_id=5, message_type="query")
    with pytest.raises(client_app.SiteWorkerError, match="no site worker .*fedfms_jax.flower.node"):
        client_app.query(message, context({"site-index": 1}))
    monkeypatch.setattr(client_app, "CONNECT_PATIENCE", 0.3)
    with pytest.raises(client_app.SiteWorkerError, match="site-index 1: no site worker at"):
        client_app.query(message, context({"site-index": 1, "worker-dir": str(tmp_path)}))
    thread = serve_once(tmp_path, None)
    with pytest.raises(client_app.SiteWorkerError,
                       match="site-index 1: .*closed the connection before answering.*while "
                             "handling the query message"):
        client_app.query(message, context({"site-index": 1, "worker-dir": str(tmp_path)}))
    thread.join(5)
    thread = serve_once(tmp_path, lambda request: {"ok": False, "error": "ConfigError: bad"})
    with pytest.raises(client_app.SiteWorkerError, match="site-index 1: ConfigError: bad"):
        client_app.query(message, context({"site-index": 1, "worker-dir": str(tmp_path)}))
    thread.join(5)
