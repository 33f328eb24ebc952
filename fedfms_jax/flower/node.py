"""One hospital's node: its Flower SuperNode, its SuperExec and the site worker, as one command.

    python -m fedfms_jax.flower.node --worker_dir DIR -- <flower-supernode arguments>

starts
  * the site worker (`python -m fedfms_jax.flower.worker --dir DIR`), which holds the model,
    the compiled round and the data stream for the whole run (worker.py),
  * the SuperNode (`fedfms_jax.flower.supernode`: flower-supernode with a short idle poll)
    with `--isolation process` and worker-dir="DIR" added to its --node-config, and
  * its SuperExec (`fedfms_jax.flower.superexec`, polling every
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05 s), which runs the ClientApp of every message
    in one long-lived process instead of flwr's process per message; the ClientApp
    forwards each message to the worker.
None outlives the others or this command:
  * the SuperNode exits -> the others are stopped and this command exits with its code;
  * the worker dies -> the message in flight fails (the server names the site and applies
    its on-site-failure policy) and the worker is restarted; it continues the run from its
    saved state with the server's next message (up to --max_restarts times); a SuperExec
    that dies is restarted the same way (its task, if any, expires at the SuperNode, which
    answers the server with an error for it);
  * Ctrl-C / SIGTERM -> all are stopped; SIGKILL -> the kernel signals them
    (PR_SET_PDEATHSIG) and worker and SuperExec also poll this process's pid.
flower.local runs exactly this per site.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from fedfms_jax.flower import channel
from fedfms_jax.flower.client_app import WORKER_DIR
from fedfms_jax.flower.processes import RUN_TAG_ENV, Processes, exit_on_signals
from fedfms_jax.flower.superexec import DEFAULT_POLL as SUPEREXEC_POLL
from fedfms_jax.flower.superexec import SUPEREXEC_POLL_ENV
from fedfms_jax.flower.polling import DEFAULT_POLL, POLL_ENV

# flower-supernode's defaults (flwr.supercore.constant UVICORN_DEFAULT_HOST and
# SUPERNODE_UVICORN_DEFAULT_PORT; tests/flower/test_superexec.py checks them).
RUNTIME_HOST, RUNTIME_PORT = "127.0.0.1", 9094


def with_worker_dir(supernode_args: list[str], directory: Path) -> list[str]:
    """The SuperNode's arguments with worker-dir="DIR" added to its --node-config (which
    must name the site)."""
    from flwr.common.config import parse_config_args

    args = list(supernode_args)
    position, inline = None, False
    for i, arg in enumerate(args):
        if arg == "--node-config" and i + 1 < len(args):
            position, inline, value = i + 1, False, args[i + 1]
        elif arg.startswith("--node-config="):
            position, inline, value = i, True, arg.split("=", 1)[1]
    if position is None:
        raise ValueError("the SuperNode arguments have no --node-config: give it "
                         "--node-config 'site-index=K' (K = 0, 1, ... in the data's site order)")
    try:
        node_config = parse_config_args([value])
    except Exception as error:  # flwr raises ValueError and tomli errors alike
        raise ValueError(f"--node-config {value!r} does not parse: {error}") from None
    if "site-index" not in node_config and "site-name" not in node_config:
        raise ValueError(f"--node-config {value!r} does not say which site this is: add "
                         "site-index=K (K = 0, 1, ... in the data's site order)")
    if WORKER_DIR in node_config:
        raise ValueError(f"--node-config {value!r} sets {WORKER_DIR}: --worker_dir does")
    value = f"{value} {WORKER_DIR}={json.dumps(str(directory))}"
    args[position] = f"--node-config={value}" if inline else value
    return args


def with_own_superexec(supernode_args: list[str]) -> tuple[list[str], list[str]]:
    """The SuperNode's arguments with `--isolation process` added, and the arguments of
    the SuperExec that then serves its Runtime API (its --host/--port, and with
    --ssl-ca-certfile, TLS)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation")
    parser.add_argument("--host", default=RUNTIME_HOST)
    parser.add_argument("--port", default=str(RUNTIME_PORT))
    parser.add_argument("--ssl-ca-certfile", "--appio-ssl-ca-certfile", dest="ca")
    known, _ = parser.parse_known_args(supernode_args)
    if known.isolation is not None:
        raise ValueError(f"the SuperNode arguments set --isolation {known.isolation}: the "
                         "node runs its SuperNode with --isolation process and its own "
                         "SuperExec (leave --isolation out)")
    # A Runtime API bound to every interface is reached on loopback.
    host = "127.0.0.1" if known.host in ("0.0.0.0", "") else (
        "::1" if known.host == "::" else known.host)
    host = f"[{host}]" if ":" in host else host
    superexec = ["--runtime-api-address", f"{host}:{known.port}"]
    if known.ca:
        superexec += ["--root-certificates", known.ca]
    return [*supernode_args, "--isolation", "process"], superexec


def _answers(directory: Path) -> bool:
    try:
        return channel.call(directory, {"kind": "ping"}, timeout=30)["ok"]
    except (channel.WorkerUnavailable, channel.WorkerDied, TimeoutError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: give the SuperNode's arguments after --, e.g. `python -m "
              "fedfms_jax.flower.node --worker_dir DIR -- --superlink HOST:9092 "
              "--node-config 'site-index=0'`", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.flower.node",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker_dir", required=True, type=Path,
                        help="the worker's directory: its socket, key, saved state")
    parser.add_argument("--max_restarts", type=int, default=5,
                        help="restarts of a dying worker before the node gives up")
    args = parser.parse_args(argv[:split])
    directory = args.worker_dir.resolve()
    try:
        supernode_args, superexec_args = with_own_superexec(
            with_worker_dir(argv[split + 1:], directory))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    env = {POLL_ENV: os.environ.get(POLL_ENV) or str(DEFAULT_POLL),
           SUPEREXEC_POLL_ENV: os.environ.get(SUPEREXEC_POLL_ENV) or str(SUPEREXEC_POLL)}
    exit_on_signals()
    tag = os.environ.get(RUN_TAG_ENV) or uuid.uuid4().hex
    try:
        with Processes(tag, env) as procs:
            def start_worker():
                # A stale key or socket would be tried (and refused) by the ClientApp.
                (directory / channel.KEY_FILE).unlink(missing_ok=True)
                return procs.start("worker", [sys.executable, "-m", "fedfms_jax.flower.worker",
                                              "--dir", str(directory),
                                              "--parent", str(os.getpid())], None)

            worker = start_worker()
            # The SuperNode joins once the site can answer (JAX imported, socket bound), so
            # the server's first message never waits for a worker that is still starting.
            while not _answers(directory):
                if worker.popen.poll() is not None:
                    print(f"error: the site worker exited with code {worker.popen.returncode} "
                          "before it listened (its output is above)", flush=True)
                    return 1
                time.sleep(0.2)
            supernode = procs.start("supernode", [sys.executable, "-m",
                                                  "fedfms_jax.flower.supernode",
                                                  *supernode_args], None)

            def start_superexec():
                return procs.start("superexec", [sys.executable, "-m",
                                                 "fedfms_jax.flower.superexec", *superexec_args,
                                                 "--parent", str(os.getpid())], None)

            helpers = {"site worker": [worker, start_worker, 0],
                       "SuperExec": [start_superexec(), start_superexec, 0]}
            print(f"node: site worker pid {worker.pid} in {directory}, SuperNode pid "
                  f"{supernode.pid}, SuperExec pid {helpers['SuperExec'][0].pid}", flush=True)
            while True:
                procs.reap()
                code = supernode.popen.poll()
                if code is not None:
                    print(f"node: the SuperNode exited with code {code}; stopping the site "
                          "worker and the SuperExec", flush=True)
                    return code
                for name, helper in helpers.items():
                    child, start, restarts = helper
                    code = child.popen.poll()
                    if code is None:
                        continue
                    if restarts >= args.max_restarts:
                        print(f"error: the {name} exited with code {code} after "
                              f"{restarts} restarts; stopping the node", flush=True)
                        return 1
                    helper[2] = restarts + 1
                    print(f"warning: the {name} exited with code {code}; restarting "
                          f"it ({restarts + 1} of {args.max_restarts})", flush=True)
                    time.sleep(1.0)
                    helper[0] = start()
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
