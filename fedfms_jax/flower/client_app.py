"""The ClientApp: what a SuperNode runs for each message the server sends its site.

    query     -> the site's identity and sizes (index, name, training and validation counts)
    train     -> the global trainable weights in, one round of local training (the engine's
                 own function, see site.py), the site's trainable weights out
    evaluate  -> the global trainable weights in, the site's scores out

Only trainable weights travel, as an ArrayRecord of named arrays ('arrays'); the run settings
come in the run config (settings.py) and the site's identity in the SuperNode's
--node-config. Flower starts a new process for every message, so compiled code is reused
through JAX's persistent compilation cache (settings.enable_compilation_cache).
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedfms_jax.flower import arrays
from fedfms_jax.flower.settings import RunSettings, enable_compilation_cache

app = ClientApp()

def _open_site(context: Context):
    from fedfms_jax.flower.site import LocalSite  # imports JAX models and data: slow

    enable_compilation_cache()
    settings = RunSettings.from_run_config(context.run_config)
    return LocalSite(settings.config, context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's identity, read from its data without building a model."""
    from fedfms_jax.build import load_data
    from fedfms_jax.config import validate
    from fedfms_jax.flower.site import site_config

    settings = RunSettings.from_run_config(context.run_config)
    config, index, name = site_config(settings.config, context.node_config)
    validate(config)
    site = load_data(config)[name]
    log(INFO, "site %d (%s): %d training and %d validation records", index, name,
        site.num_train, site.num_val)
    return Message(RecordDict({
        "metrics": MetricRecord({"site-index": index, "num-train": site.num_train,
                                 "num-val": site.num_val}),
        "site": ConfigRecord({"site-name": name}),
    }), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _open_site(context)
    config = msg.content["config"]
    round_index = int(config["server-round"]) - 1
    client = list(config["client-sites"]).index(site.index)
    incoming = msg.content["arrays"]
    log(INFO, "site %d (%s), round %d: received %d bytes", site.index, site.name,
        round_index + 1, arrays.message_bytes(incoming))
    global_params = arrays.from_arrayrecord(incoming, site.like, "the server's weights")
    result = site.train(global_params, round_index, client, context.state)
    if not result.finite:
        log(WARNING, "site %d (%s), round %d: the update is not finite; the optimizer state "
            "is reset", site.index, site.name, round_index + 1)
    outgoing = arrays.to_arrayrecord(result.params)
    log(INFO, "site %d (%s), round %d: %d steps in %.1f s, loss %.4f; sending %d bytes",
        site.index, site.name, round_index + 1, result.steps, result.seconds,
        result.mean_loss, arrays.message_bytes(outgoing))
    return Message(RecordDict({
        "arrays": outgoing,
        "metrics": MetricRecord({
            "num-examples": result.num_examples, "loss": result.mean_loss,
            "steps": result.steps, "finite": int(result.finite),
            "train-seconds": result.seconds, "site-index": site.index}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _open_site(context)
    split = str(msg.content["config"]["split"])
    params = arrays.from_arrayrecord(msg.content["arrays"], site.like, "the server's weights")
    scores = site.evaluate(params, split)
    log(INFO, "site %d (%s): %s Dice %.4f on %d images", site.index, site.name, split,
        scores.dice, scores.images)
    return Message(RecordDict({
        # Site means and counts travel; the per-case figures stay on the site.
        "metrics": MetricRecord({"num-examples": scores.images, "dice": scores.dice,
                                 "iou": scores.iou, "hd95": scores.hd95, "nsd": scores.nsd,
                                 "cases": scores.cases, "missed": scores.missed,
                                 "spurious": scores.spurious, "both-empty": scores.both_empty,
                                 "site-index": site.index}),
    }), reply_to=msg)

