"""The ClientApp: what a SuperNode runs for each message the server sends its site.

    query     -> the site's identity and sizes (index, name, training and validation counts)
    train     -> the global trainable weights in, one round of local training (the engine's
                 own function, see site.py), the site's trainable weights out
    evaluate  -> the global trainable weights in, the site's scores out

The work is done by the site's long-lived worker (worker.py), which keeps the model, the
compiled round and the data stream for the whole run: this adapter forwards the message to
it over the local channel named by the SuperNode's --node-config 'worker-dir="DIR"'
(channel.py) and returns its answer. It imports no JAX: it runs in the site's SuperExec
(superexec.py), or in a fresh flwr-clientapp process per message under a plain SuperNode.
Under Flower's simulation runtime (node config 'partition-id'), where the ClientApp lives
on in its Ray actor, the worker runs in the ClientApp's own process.

Only trainable weights travel, packed into one array per dtype plus their layout (wire.py),
unpacked here into named arrays (the worker checks them against its model); the run settings
come in the run config (settings.py) and the site's identity in the SuperNode's
--node-config. A worker that is not there or dies mid-message makes the handler raise, so
the server reports the site by name and applies its on-site-failure policy.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedfms_jax.flower import channel, wire
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
    log(INFO, "round %d: received %d bytes", int(config["server-round"]),
        wire.message_bytes(msg.content))
    reply = _forward("train", msg, context,
                     arrays=wire.unpack(msg.content, "the server's train message"),
                     config={"server-round": int(config["server-round"]),
                             "client-sites": list(config["client-sites"])})
    outgoing = wire.pack(reply["arrays"])
    log(INFO, "round %d: sending %d bytes", int(config["server-round"]),
        wire.message_bytes(outgoing))
    return Message(RecordDict({
        **outgoing,
        "metrics": MetricRecord({**reply["metrics"], "site-index": reply["site-index"]}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    split = str(msg.content["config"]["split"])
    reply = _forward("evaluate", msg, context,
                     arrays=wire.unpack(msg.content, "the server's evaluate message"),
                     config={"split": split})
    s = reply["scores"]
    return Message(RecordDict({
        "metrics": MetricRecord({
            **{k: float(s[k]) for k in ("dice", "iou", "hd95", "nsd")},
            **{k.replace("_", "-"): int(s[k]) for k in ("cases", "missed", "spurious",
                                                        "both_empty")},
            "num-examples": int(s["images"]), "site-index": int(reply["site-index"])}),
    }), reply_to=msg)
