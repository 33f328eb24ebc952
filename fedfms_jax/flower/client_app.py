"""The ClientApp: what a SuperNode runs for each message the server sends its site.

    query     -> the site's identity and sizes (index, name, training and validation counts)
    train     -> the global trainable weights in, one round of local training (the engine's
                 own function, see site.py), the site's trainable weights out
    evaluate  -> the global trainable weights in, the site's scores out

Flower starts a new ClientApp process for every message, so the work is done by the site's
long-lived worker (worker.py), which keeps the model, the compiled round and the data stream
for the whole run: this adapter forwards the message to it over the local channel named by
the SuperNode's --node-config 'worker-dir="DIR"' (channel.py) and returns its answer. It
imports no JAX. Under Flower's simulation runtime (node config 'partition-id'), where the
ClientApp lives on in its Ray actor, the worker runs in the ClientApp's own process.

Only trainable weights travel, as an ArrayRecord of named arrays ('arrays'); the run settings
come in the run config (settings.py) and the site's identity in the SuperNode's
--node-config. A worker that is not there or dies mid-message makes the handler raise, so
the server reports the site by name and applies its on-site-failure policy.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedfms_jax.flower import channel
from fedfms_jax.flower.secagg import secagg_mod

app = ClientApp()

WORKER_DIR = "worker-dir"
# A worker restarted by its node needs a few seconds (JAX import) before it listens again.
CONNECT_PATIENCE = 60.0

_in_process: dict[int, object] = {}


class SiteWorkerError(RuntimeError):
    """The site's worker could not answer (the message says why and what to do)."""


def _forward(kind: str, msg: Message, context: Context, **fields) -> dict:
    request = {"kind": kind, "run_id": context.run_id, "run_config": dict(context.run_config),
               "node_config": dict(context.node_config), **fields}
    directory = context.node_config.get(WORKER_DIR)
    site = f"site-index {context.node_config.get('site-index', '?')}"
    if directory is None:
        if "partition-id" not in context.node_config:
            raise SiteWorkerError(
                f"{site}: this SuperNode has no site worker (no 'worker-dir' in its "
                "--node-config): start the site with `python -m fedfms_jax.flower.node` "
                "(README, 'Cross-site training on Flower')")
        from fedfms_jax.flower.worker import SiteWorker  # JAX: only here

        reply = _in_process.setdefault(context.node_id, SiteWorker()).handle(request)
    else:
        deadline = time.monotonic() + CONNECT_PATIENCE
        while True:
            try:
                reply = channel.call(directory, request)
                break
            except channel.WorkerUnavailable as error:
                if time.monotonic() > deadline:
                    raise SiteWorkerError(f"{site}: {error} (for {CONNECT_PATIENCE:.0f} s)") \
                        from None
                time.sleep(0.2)
            except channel.WorkerDied as error:
                raise SiteWorkerError(f"{site}: {error} while handling the {kind} message; "
                                      "its node restarts it, and it continues from its last "
                                      "saved round") from None
    if not reply["ok"]:
        raise SiteWorkerError(f"{site}: {reply['error']}")
    return reply


def _named(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _record(named: dict[str, np.ndarray]) -> ArrayRecord:
    # order="C", not np.ascontiguousarray, which turns 0-d arrays into 1-d (as arrays.py).
    return ArrayRecord({name: Array(np.asarray(v, order="C")) for name, v in named.items()})


@app.query()
def query(msg: Message, context: Context) -> Message:
    reply = _forward("query", msg, context)
    return Message(RecordDict({
        "metrics": MetricRecord({"site-index": reply["site-index"],
                                 "num-train": reply["num-train"], "num-val": reply["num-val"]}),
        "site": ConfigRecord({"site-name": reply["site-name"]}),
    }), reply_to=msg)


@app.train(mods=[secagg_mod])  # SecAgg+ rounds (--secagg) mask the update; others pass
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    incoming = msg.content["arrays"]
    log(INFO, "round %d: received %d bytes", int(config["server-round"]),
        incoming.count_bytes())
    reply = _forward("train", msg, context, arrays=_named(incoming),
                     config={"server-round": int(config["server-round"]),
                             "client-sites": list(config["client-sites"])})
    outgoing = _record(reply["arrays"])
    log(INFO, "round %d: sending %d bytes", int(config["server-round"]), outgoing.count_bytes())
    return Message(RecordDict({
        "arrays": outgoing,
        "metrics": MetricRecord({**reply["metrics"], "site-index": reply["site-index"]}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    split = str(msg.content["config"]["split"])
    reply = _forward("evaluate", msg, context, arrays=_named(msg.content["arrays"]),
                     config={"split": split})
    s = reply["scores"]
    return Message(RecordDict({
        "metrics": MetricRecord({
            **{k: float(s[k]) for k in ("dice", "iou", "hd95", "nsd")},
            **{k.replace("_", "-"): int(s[k]) for k in ("cases", "missed", "spurious",
                                                        "both_empty")},
            "num-examples": int(s["images"]), "site-index": int(reply["site-index"])}),
    }), reply_to=msg)
