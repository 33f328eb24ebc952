"""The site's in-process SuperExec (superexec.py) and the flwr internals it relies on: if a
flwr release changes any of them, these fail and superexec.py / node.py need a look."""

from __future__ import annotations

import inspect

import pytest
from flwr.app import Context, Message, RecordDict

from fedfms_jax.flower import node, superexec


def test_flwr_runs_a_clientapp_task_as_superexec_does():
    """flwr-clientapp's steps, in the order SuperExec.run_task repeats them in-process."""
    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.run_clientapp)
    steps = ["HeartbeatSender(make_task_heartbeat_fn_http(client))", "pull_task_input(client)",
             "install_from_fab(fab.content, skip_prompt=True)", "get_load_client_app_fn(",
             "client_app(message=message, context=context)", "push_message(client, ",
             "flwr_exit("]
    assert "push_task_output(" in source  # in its exit handler, run by flwr_exit
    at = 0
    for step in steps:
        at = source.find(step, at)
        assert at != -1, f"flwr-clientapp no longer does {step!r} (after the steps before it)"
    for function, parameters in [(run_clientapp.pull_task_input, ["client"]),
                                 (run_clientapp.push_message, ["client", "message", "context"]),
                                 (run_clientapp.push_task_output,
                                  ["client", "context", "sub_status", "details"])]:
        assert list(inspect.signature(function).parameters) == parameters, function


def test_flwr_supernode_defaults_and_process_isolation():
    from flwr.common.constant import ISOLATION_MODE_PROCESS
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import (SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST,
                                         TaskType)
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert (node.RUNTIME_HOST, node.RUNTIME_PORT) == (UVICORN_DEFAULT_HOST,
                                                      SUPERNODE_UVICORN_DEFAULT_PORT)
    assert ISOLATION_MODE_PROCESS == "process"
    args = _parse_args_run_supernode().parse_args(
        ["--insecure", "--superlink", "127.0.0.1:1", "--isolation", "process"])
    assert args.isolation == "process" and args.port == SUPERNODE_UVICORN_DEFAULT_PORT
    assert set(AcquireTaskRequest.DESCRIPTOR.fields_by_name) >= {"supported_task_types",
                                                                 "agentapp_fab_hashes"}
    assert TaskType.CLIENT_APP == "flwr-clientapp"


def test_the_superexec_serves_the_supernodes_runtime_api():
    args, superexec_args = node.with_own_superexec(["--insecure", "--port", "9123"])
    assert args == ["--insecure", "--port", "9123", "--isolation", "process"]
    assert superexec_args == ["--runtime-api-address", "127.0.0.1:9123"]
    _, superexec_args = node.with_own_superexec(["--host", "0.0.0.0", "--ssl-ca-certfile",
                                                 "/ca.pem"])
    assert superexec_args == ["--runtime-api-address", "127.0.0.1:9094",
                              "--root-certificates", "/ca.pem"]
    with pytest.raises(ValueError, match="leave --isolation out"):
        node.with_own_superexec(["--isolation", "subprocess"])


class FakeRuntime:
    """flwr's run_clientapp step functions, recording what the SuperExec pushes back."""

    def __init__(self, message: Message, fab_hash: str = "f" * 64):
        self.message, self.fab_hash = message, fab_hash
        self.run_config: dict = {}
        self.replies, self.outputs = [], []

    def install(self, monkeypatch):
        from flwr.supercore import heartbeat
        from flwr.supernode.runtime import run_clientapp

        class Run:
            fab_id, fab_version = "fedfms_jax/test", "1.0.0"

        class Fab:
            hash_str, content = self.fab_hash, b""

        def pull(client):
            context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                              run_config=dict(self.run_config))
            return self.message, context, Run(), Fab()

        monkeypatch.setattr(run_clientapp, "pull_task_input", pull)
        monkeypatch.setattr(run_clientapp, "push_message",
                            lambda client, reply, ctx: self.replies.append(reply))
        monkeypatch.setattr(run_clientapp, "push_task_output",
                            lambda client, context, sub_status, details:
                            self.outputs.append((sub_status, details)))

        class NoHeartbeat:
            def __init__(self, fn):
                pass

            def start(self):
                pass

            def stop(self):
                pass

        monkeypatch.setattr(heartbeat, "HeartbeatSender", NoHeartbeat)


def test_tasks_run_in_process_the_app_loaded_once_and_errors_become_error_replies(
        monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    runtime = FakeRuntime(message)
    runtime.install(monkeypatch)
    loads = []

    def app(message, context):
        if context.run_config.get("fail"):
            raise RuntimeError("site-index 0: the site worker died")
        return Message(RecordDict(), reply_to=message)

    executor = superexec.SuperExec("127.0.0.1:1")
    monkeypatch.setattr(executor, "client_app",
                        lambda run, fab: loads.append(fab.hash_str) or app)
    executor.run_task("token-1")
    assert [r.has_error() for r in runtime.replies] == [False]
    assert runtime.outputs == [("completed", "")]

    runtime.run_config = {"fail": True}
    executor.run_task("token-2")
    reply = runtime.replies[-1]
    assert reply.has_error() and "the site worker died" in reply.error.reason
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert runtime.outputs[-1][0] == "failed" and "the site worker died" in \
        runtime.outputs[-1][1]
    assert loads == ["f" * 64, "f" * 64]  # client_app() is the cache: see the next test


def test_a_fab_is_installed_and_loaded_once(monkeypatch):
    from flwr.cli import install
    from flwr.clientapp import utils

    installed, loaded = [], []
    monkeypatch.setattr(install, "install_from_fab",
                        lambda content, skip_prompt: installed.append(content))
    monkeypatch.setattr(utils, "get_load_client_app_fn",
                        lambda **kw: lambda *ids: loaded.append(ids) or object())

    class Run:
        fab_id, fab_version = "fedfms_jax/test", "1.0.0"

    class Fab:
        def __init__(self, hash_str):
            self.hash_str, self.content = hash_str, hash_str.encode()

    executor = superexec.SuperExec("127.0.0.1:1")
    first = executor.client_app(Run(), Fab("a" * 64))
    assert executor.client_app(Run(), Fab("a" * 64)) is first
    assert executor.client_app(Run(), Fab("b" * 64)) is not first
    assert installed == [b"a" * 64, b"b" * 64]
    assert loaded == [("fedfms_jax/test", "1.0.0", "a" * 64),
                      ("fedfms_jax/test", "1.0.0", "b" * 64)]


def test_the_poll_interval_is_checked(monkeypatch):
    monkeypatch.setenv(superexec.SUPEREXEC_POLL_ENV, "0.001")
    with pytest.raises(SystemExit, match="between 0.01 and 60"):
        superexec.poll_interval()
    monkeypatch.setenv(superexec.SUPEREXEC_POLL_ENV, "0.5")
    assert superexec.poll_interval() == 0.5
