"""One hospital's node: its Flower SuperNode and the site worker beside it, as one command.

    python -m fedfms_jax.flower.node --worker_dir DIR -- <flower-supernode arguments>

starts
  * the site worker (`python -m fedfms_jax.flower.worker --dir DIR`), which holds the model,
    the compiled round and the data stream for the whole run (worker.py), and
  * the SuperNode (`fedfms_jax.flower.supernode`: flower-supernode with a short idle poll,
    and FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05 for its SuperExec), with worker-dir="DIR"
    added to its --node-config so that its ClientApp forwards every message to the worker.
Neither outlives the other or this command:
  * the SuperNode exits -> the worker is stopped and this command exits with its code;
  * the worker dies -> the message in flight fails (the server names the site and applies
    its on-site-failure policy) and the worker is restarted; it continues the run from its
    saved state with the server's next message (up to --max_restarts times);
  * Ctrl-C / SIGTERM -> both are stopped; SIGKILL -> the kernel signals both
    (PR_SET_PDEATHSIG) and the worker also polls this process's pid.
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
from fedfms_jax.flower.supernode import DEFAULT_POLL, POLL_ENV

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


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
        supernode_args = with_worker_dir(argv[split + 1:], directory)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    env = {POLL_ENV: os.environ.get(POLL_ENV) or str(DEFAULT_POLL),
           SUPEREXEC_POLL_ENV: os.environ.get(SUPEREXEC_POLL_ENV) or "0.05"}
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
            print(f"node: site worker pid {worker.pid} in {directory}, SuperNode pid "
                  f"{supernode.pid}", flush=True)
            restarts = 0
            while True:
                procs.reap()
                code = supernode.popen.poll()
                if code is not None:
                    print(f"node: the SuperNode exited with code {code}; stopping the site "
                          "worker", flush=True)
                    return code
                code = worker.popen.poll()
                if code is not None:
                    if restarts >= args.max_restarts:
                        print(f"error: the site worker exited with code {code} after "
                              f"{restarts} restarts; stopping the node", flush=True)
                        return 1
                    restarts += 1
                    print(f"warning: the site worker exited with code {code}; restarting "
                          f"it ({restarts} of {args.max_restarts})", flush=True)
                    time.sleep(1.0)
                    worker = start_worker()
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
