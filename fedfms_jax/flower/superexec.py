"""The site's SuperExec: every message's ClientApp run in this one long-lived process.

flwr 1.42's SuperNode, in its default isolation ('subprocess'), starts `flower-superexec`,
which starts a fresh `flwr-clientapp` process for each message: a Python start, the flwr
import, the FAB installed (unzipped) again, the app imported again -- 2-3 s a message on a
2-core machine, every round, at every site. With `flower-supernode --isolation process`
the SuperNode leaves the ClientApps to a process of the site's choosing; this is it
(`fedfms_jax.flower.node` starts it beside the SuperNode). It takes each task from the
SuperNode's Runtime API (AcquireTask, polled every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s)
and runs it as `flwr.supernode.runtime.run_clientapp` does -- the task input pulled
(message, context, run, FAB), the ClientApp called, the reply and the context pushed back,
task heartbeats meanwhile -- using flwr's own functions for each step, but in-process: a
FAB is installed and its ClientApp loaded once (by FAB hash), and the process lives on.

A ClientApp that raises gives the server an error reply naming the exception (as in
flwr-clientapp), so the server reports the site and applies its on-site-failure policy;
the ClientApp itself is the thin adapter of client_app.py, which forwards to the site
worker. tests/flower/test_superexec.py checks the flwr internals this relies on.

    python -m fedfms_jax.flower.superexec --runtime-api-address HOST:PORT
        [--root-certificates CA.pem] [--parent PID]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from logging import DEBUG, ERROR, INFO
from pathlib import Path

from fedfms_jax.flower.polling import seconds_from_env

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL = 0.05


def poll_interval() -> float:
    """Seconds between AcquireTask polls (FLWR_SUPEREXEC_TASK_POLL_INTERVAL)."""
    return seconds_from_env(SUPEREXEC_POLL_ENV, DEFAULT_POLL, 0.01, 60.0)


class SuperExec:
    """Takes the SuperNode's ClientApp tasks one at a time and runs them in-process."""

    def __init__(self, runtime_api_address: str, root_certificates: str | None = None,
                 poll: float = DEFAULT_POLL):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        self.root_certificates = root_certificates
        self.poll = poll
        self.apps: dict[str, object] = {}  # FAB hash -> ClientApp
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=root_certificates is None,
            root_certificates=root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """The token of the next pending ClientApp task, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        response = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        if response.HasField("task") and response.token:
            return response.token
        return None

    def serve(self) -> None:
        """Runs tasks until the process is stopped."""
        while True:
            token = self.acquire()
            if token is None:
                time.sleep(self.poll)
            else:
                self.run_task(token)

    def client_app(self, run, fab):
        """The ClientApp of this run's FAB: installed and loaded on its first task."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        app = self.apps.get(fab.hash_str)
        if app is None:
            from flwr.supercore import log

            began = time.perf_counter()
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
            log(INFO, "[superexec] FAB %s installed and its ClientApp loaded in %.2f s",
                fab.hash_str[:12], time.perf_counter() - began)
        return app

    def run_task(self, token: str) -> None:
        """One task, as flwr-clientapp runs it (run_clientapp.run_clientapp), minus the
        process start and exit: whatever happens, the SuperNode gets a reply (or an error
        reply) and the task's end."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                                 RuntimeVersionHttpInterceptor)
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                          push_task_output)

        retry_invoker = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=[RuntimeTracingInterceptor(),
                          RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry_invoker)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        began = pulled = time.perf_counter()
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            pulled = time.perf_counter()
            reply = self.client_app(run, fab)(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # pylint: disable=broad-except  (as flwr-clientapp)
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(error)}:<'{error}'>"
            if isinstance(error, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log(ERROR, "ClientApp raised an exception", exc_info=error)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            handled = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as error:  # pylint: disable=broad-except
                log(ERROR, "Failed to push the reply message", exc_info=error)
            finally:
                retry_invoker.max_tries = 1  # as flwr-clientapp's exit: never block on it
                push_task_output(client=client, context=context, sub_status=sub_status,
                                 details=details)
                heartbeat.stop()
                client.close()
        if message is not None:
            # Where a message's seconds go, in the site's log (the server logs the round's).
            log(INFO, "[superexec] %s message: pulled in %.2f s, handled in %.2f s, reply "
                "pushed in %.2f s", message.metadata.message_type, pulled - began,
                handled - pulled, time.perf_counter() - handled)
        log(DEBUG, "[superexec] task done: %s", sub_status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.flower.superexec",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, HOST:PORT (its --host, --port)")
    parser.add_argument("--root-certificates", type=Path,
                        help="CA certificate of a Runtime API served over TLS (the "
                        "SuperNode's --ssl-ca-certfile)")
    parser.add_argument("--parent", type=int, help="exit when this process does")
    args = parser.parse_args(argv)
    poll = poll_interval()
    if args.parent is not None:
        from fedfms_jax.flower.processes import tie_to_parent

        tie_to_parent(args.parent)
    from flwr.supercore import log

    from fedfms_jax.flower.polling import fast_object_pulls

    fast_object_pulls()

    log(INFO, "[superexec] running ClientApps in-process (pid %d) for the SuperNode at %s",
        os.getpid(), args.runtime_api_address)
    executor = SuperExec(args.runtime_api_address,
                         str(args.root_certificates) if args.root_certificates else None, poll)
    try:
        executor.serve()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
