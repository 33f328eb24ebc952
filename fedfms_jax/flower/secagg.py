"""Secure aggregation on Flower: SecAgg+ (Bell et al. 2020) through flwr's own protocol.

With `--secagg` the server never sees a site's update, only the weighted sum of all of
them: each round runs flwr's `SecAggPlusWorkflow` (server) against `secaggplus_mod`
(each site's ClientApp train handler), which in flwr 1.42 live on the legacy path, so this
module is the glue both ways:

  server  `secure_round` builds the LegacyContext the workflow wants (a Strategy whose
          configure_fit hands it our train instructions and whose aggregate_fit receives
          the unmasked sum) and returns the weighted mean of the sites' updates;
  site    `secagg_mod` wraps the train handler: a SecAgg+ message goes through
          `secaggplus_mod`, whose fit step calls the handler unchanged (it trains as
          always) and sends the update theta_k - global (not the weights: an update spans a
          far smaller range, so the quantisation below costs far less).

What travels: every site's update multiplied by its weight n_k / max_j n_j, clipped to
[-R, R] (R = secagg-range, a Flower setting), stochastically quantised to integers in
[0, 2^22) and masked (pairwise masks that cancel in the sum, plus a private mask whose
seed is Shamir-shared among the sites); the weights travel quantised in the same vector.
The server unmasks only the sum. A site that drops after the key sharing is handled as
SecAgg+ handles it: while at least `threshold` of its neighbours answer, the others' shares
rebuild its pairwise masks and the round averages the sites that finished.

Quantisation error: each value is rounded to a grid of step 2R / 2^22 (stochastic
rounding, unbiased, less than one step), and each weight n_k / max n to one of 2^-22, so
the mean update differs from FedAvg's by at most 3 K R / 2^22 / sum_k (n_k / max_j n_j)
<= 3 K R / 2^22 per value (K sites; 2.1e-6 for K = 3 and R = 1). A value with
|update * n_k / max n| > R is clipped: each site counts and logs those ('secagg-clipped').

Not available under SecAgg: the server's per-site checks (a non-finite update is replaced
by a zero update of weight 0 on the site itself), per-site message sizes, and server-side
DP clipping (the server has no update to clip: DP under SecAgg would need each site to
clip and noise its own update; this project refuses privacy.clip_norm with --secagg).
"""

from __future__ import annotations

import dataclasses
import functools
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common import log
from flwr.common.secure_aggregation.secaggplus_constants import (RECORD_KEY_CONFIGS,
                                                                RECORD_KEY_STATE)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedfms_jax.flower import wire
from fedfms_jax.flower.exchange import exchange

# flwr's SecAggPlusWorkflow defaults: integers in [0, 2^22), masks modulo 2^32.
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


def quantisation_bound(num_sites: int, secagg_range: float) -> float:
    """The largest difference per value between the SecAgg+ mean update and FedAvg's
    (module docstring): K * 2R / 2^22 from the values' rounding plus K * R / 2^22 from the
    weights', for weights all at the maximum (smaller weights divide it by their sum)."""
    return 3 * num_sites * secagg_range / QUANTIZATION_RANGE


# --- the site ---------------------------------------------------------------------------

def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """The ClientApp train mod: SecAgg+ messages through flwr's secaggplus_mod (the site's
    update, masked), every other message straight to the handler."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, functools.partial(_train_update, call_next))


def _train_update(call_next, msg: Message, context: Context) -> Message:
    """secaggplus_mod's fit step: the legacy FitIns in, our train handler run on it, the
    update theta_k - global out as a legacy FitRes (what secaggplus_mod quantises)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    incoming = _unpack(fitins.parameters, fitins.config, "the server's SecAgg+ train message")
    msg.content = RecordDict({
        **wire.pack(incoming),
        "config": ConfigRecord({
            "server-round": int(fitins.config["server-round"]),
            "client-sites": [int(s) for s in str(fitins.config["client-sites"]).split(",")]})})
    reply = call_next(msg, context)
    content = reply.content
    weights = wire.unpack(content, "the site's reply")
    metrics = dict(content["metrics"])
    update = {n: np.asarray(weights[n], np.float64) - incoming[n] for n in incoming}
    num_examples = int(metrics["num-examples"])
    if not all(np.isfinite(u).all() for u in update.values()):
        # The server cannot see (and leave out) this update: it counts for nothing instead.
        log(WARNING, "SecAgg+: the update is not finite; it is sent as zero with weight 0")
        update = {n: np.zeros_like(u) for n, u in update.items()}
        num_examples = 0
    state = context.state.config_records[RECORD_KEY_STATE]
    limit = float(state["clipping_range"]) * float(state["max_weight"]) / max(num_examples, 1)
    clipped = int(sum(int(np.sum(np.abs(u) > limit)) for u in update.values()))
    if clipped:
        log(WARNING, "SecAgg+: %d update values exceed secagg-range %g (at this site's "
            "weight) and are clipped; raise secagg-range", clipped, float(state["clipping_range"]))
    metrics["secagg-clipped"] = clipped
    metrics["num-examples"] = num_examples
    # One float32 vector, in the layout's order: what secaggplus_mod quantises and masks.
    flat = wire.pack_flat({n: u.astype(np.float32) for n, u in update.items()})
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(
        list(flat.values())), num_examples=num_examples, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _unpack(parameters: Parameters, config, source: str) -> dict[str, np.ndarray]:
    """Legacy Parameters (one flat array per dtype, in 'arrays-dtypes' order) and the
    'arrays-layout' of the fit config -> {name: array}."""
    dtypes = str(config.get("arrays-dtypes", "")).split(",")
    flat = parameters_to_ndarrays(parameters)
    if len(flat) != len(dtypes):
        raise wire.WireError(f"{source}: {len(flat)} packed arrays, but 'arrays-dtypes' "
                             f"names {dtypes}")
    return wire.unpack_flat(dict(zip(dtypes, flat)), str(config.get("arrays-layout", "")),
                            source)


# --- the server -------------------------------------------------------------------------

@dataclasses.dataclass
class SecureOutcome:
    """One SecAgg+ round: the weighted mean of the updates ({name: array}, None when the
    protocol halted), each finishing site's metrics, the nodes that dropped out."""

    mean_update: dict[str, np.ndarray] | None
    metrics: dict[int, dict]
    dropped: dict[int, str]   # node -> why


class _ExchangeGrid:
    """The grid the workflow is given: its blocking send_and_receive is our `exchange`
    (replies polled every half second, not flwr's three, which SecAgg+'s four exchanges a
    round would pay four times; a message the SuperLink did not take, or an error reply,
    recorded per node instead of vanishing)."""

    def __init__(self, grid):
        self.grid = grid
        self.failed: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        outcome = exchange(self.grid, messages, timeout if timeout is not None else 3600.0)
        for node, why in outcome.failed.items():
            self.failed.setdefault(node, why)
        return list(outcome.replies.values())

    def __getattr__(self, name):
        return getattr(self.grid, name)


class _RoundStrategy(Strategy):
    """The two Strategy calls SecAggPlusWorkflow makes: configure_fit (our instructions,
    per node) and aggregate_fit (the unmasked weighted mean of the updates)."""

    def __init__(self, grid, instructions: dict[int, FitIns]):
        self.grid, self.instructions = grid, instructions
        self.results: list = []
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, run_id=0), fitins)
                for node, fitins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_round(grid, nodes: list[int], global_arrays: dict[str, np.ndarray],
                 config: dict, *, max_weight: float, secagg_range: float, threshold: float,
                 timeout: float) -> SecureOutcome:
    """One round of SecAgg+ with these nodes: they train from global_arrays and the server
    learns only the weighted mean of their updates (module docstring).

    config: the train instructions (server-round, client-sites); max_weight: the largest
    site weight (sample count); threshold: the share of a site's neighbours that must
    answer for its masks to be removed (flwr's reconstruction_threshold)."""
    flat = wire.pack_flat(global_arrays)
    parameters = ndarrays_to_parameters(list(flat.values()))
    fit_config = {"server-round": int(config["server-round"]),
                  "client-sites": ",".join(str(s) for s in config["client-sites"]),
                  "arrays-layout": wire.layout_of(global_arrays),
                  "arrays-dtypes": ",".join(flat)}
    strategy = _RoundStrategy(grid, {node: FitIns(parameters, dict(fit_config))
                                     for node in nodes})
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: int(config["server-round"])})
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        Parameters(tensors=[], tensor_type="numpy.ndarray"), keep_input=True)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state,
                                    run_config={}), strategy=strategy)
    grid = _ExchangeGrid(grid)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=float(threshold),
                                  max_weight=float(max_weight),
                                  clipping_range=float(secagg_range),
                                  quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MODULUS_RANGE, timeout=timeout)
    workflow(grid, context)
    metrics = {proxy.node_id: {**fitres.metrics, "num-examples": fitres.num_examples}
               for proxy, fitres in strategy.results}
    dropped = {node: grid.failed.get(node, "no reply") for node in nodes
               if node not in metrics}
    mean = None
    if strategy.mean is not None:
        if sum(m["num-examples"] for m in metrics.values()) == 0:
            mean = None   # every finishing site sent a zero-weight update
        else:
            # The sites' updates are one float32 vector in the layout's order.
            like = {n: np.broadcast_to(np.float32(0), np.shape(v))
                    for n, v in global_arrays.items()}
            mean = wire.unpack_flat({"float32": strategy.mean[0]} if len(strategy.mean) == 1
                                    else {}, wire.layout_of(like), "the SecAgg+ aggregate")
    return SecureOutcome(mean, metrics, dropped)
