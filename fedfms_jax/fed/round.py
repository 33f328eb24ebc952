"""A federated round: every client's local steps at once (jit of vmap of scan), then FedAvg.

The model is split once into graphdef / trainable / frozen (`partition.split`). The frozen
weights live once, replicated, outside the state and are passed to every jitted function
unbatched (vmap in_axes None). Everything a run changes is one pytree, `FedState`: the
global trainable weights, each client's trainable weights and optimizer state stacked on a
leading client axis of K_pad (K real clients padded to the device layout, see sharding.py),
the server optimizer's state, the base PRNG key and the round counter.

A round is three jitted pure functions of that state, each donating the state it replaces:

    begin_round(state)                                   every client starts from the global
                                                         weights (not in the local-only
                                                         baseline); optional optimizer reset
    local_steps(frozen, state, batches, step_mask, mu)   S local steps of every client: a scan
                                                         over steps inside a vmap over clients;
                                                         masked steps leave weights AND
                                                         optimizer state exactly unchanged
    end_round(state, num_samples)                        FedAvg over the included clients and
                                                         the server optimizer (aggregate.py)

`local_steps` can be called several times per round on consecutive segments of steps, so a
long epoch streams through memory S steps at a time; the per-step keys depend on the step's
index in the round, not on the segmentation. `Federation` is the thin host-side driver:
it pads and places arrays, samples clients, logs left-out clients and counts bytes.

Baselines are settings of the same engine: 'centralised' (one client holding the pooled
source sites), 'local' (no averaging; each client keeps training its own weights) and, in
`plan_clients`, leave-one-site-out (the held-out site has FedAvg weight 0 and is only tested).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.fed import aggregate, sharding
from fedfms_jax.fed.comm import RoundComm, round_comm
from fedfms_jax.fed.partition import num_bytes, split
from fedfms_jax.losses import weighted_bce

log = logging.getLogger(__name__)

SETTINGS = ("federated", "centralised", "local")

# loss_fn(model, batch, key) -> f32[]: one client's loss on one batch (leaves [B, ...]).
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FedConfig:
    """How a federation trains. Defaults are FedFMS's: FedMSA, Adam 1e-4 with per-client state
    kept across rounds, one local epoch per client, FedAvg over all sites every round."""

    mode: str = "fedmsa"                 # partition.MODES: what is trained and communicated
    setting: str = "federated"           # 'federated' | 'centralised' | 'local' (baselines)
    # Local training (each client): Adam as FedFMS, loss BCE-with-logits with pos_weight.
    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    pos_weight: float = 2.0
    local_steps: int | None = None       # a fixed number of steps per round for every client,
    local_epochs: int | None = 1         # or epochs: ceil(n_k / batch) steps each, masked
    drop_remainder: bool = False         # with epochs: floor(n_k / batch) instead of ceil
    reset_optimizer: bool = False        # True: fresh optimizer state every round
    prox_mu: float = 0.0                 # FedProx: + mu/2 ||w - w_global||^2 in the local loss
    # Server.
    client_fraction: float = 1.0         # fraction of clients drawn each round (seeded)
    server_optimizer: str = "none"       # aggregate.SERVER_OPTIMIZERS
    server_lr: float = 1.0
    server_momentum: float = 0.9         # FedAvgM
    server_b1: float = 0.9               # FedAdam
    server_b2: float = 0.99
    server_eps: float = 1e-3
    # Scale: clients trained at once (None: all); rounded up to a multiple of the devices.
    clients_per_step: int | None = None
    seed: int = 0                        # base PRNG key and client sampling

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; known: {', '.join(SETTINGS)}")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs, got "
                             f"local_steps={self.local_steps}, local_epochs={self.local_epochs}")
        if (self.local_steps or self.local_epochs) < 1:
            raise ValueError("local_steps / local_epochs must be >= 1")
        if self.server_optimizer not in aggregate.SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.server_optimizer!r}; known: "
                             f"{', '.join(aggregate.SERVER_OPTIMIZERS)}")
        if self.setting != "federated" and (self.server_optimizer != "none"
                                            or self.client_fraction != 1.0):
            raise ValueError(f"setting {self.setting!r} has no server: server_optimizer must "
                             "be 'none' and client_fraction 1")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.prox_mu < 0:
            raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu}")

    def replace(self, **changes: Any) -> "FedConfig":
        return dataclasses.replace(self, **changes)

    def local_optimizer(self) -> optax.GradientTransformation:
        """Each client's optimizer: Adam (torch's defaults, as FedFMS)."""
        return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)

    def server_tx(self) -> optax.GradientTransformation:
        return aggregate.server_optimizer(self.server_optimizer, self.server_lr,
                                          self.server_momentum, self.server_b1,
                                          self.server_b2, self.server_eps)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class FedState:
    """Everything a federated run changes (a pytree; K_pad = padded client count).

    round: i32[] rounds completed. local_step: i32[] local steps taken in the current round.
    key: u32[2] the run's base key (per-round/client/step keys are folded in, never split
    off, so a resumed run draws the same ones). global_params: the trainable State.
    client_params, client_opt_state: per client, leaves [K_pad, ...]. server_opt_state:
    the server optimizer's state (empty for plain FedAvg).
    """

    round: jax.Array
    local_step: jax.Array
    key: jax.Array
    global_params: nnx.State
    client_params: nnx.State
    client_opt_state: Any
    server_opt_state: Any


def segmentation_loss(model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array, *,
                      pos_weight: float = 2.0) -> jax.Array:
    """FedFMS's loss on one batch: weighted BCE of `Sam.segment` against `mask_low_res`.

    batch: image f32[B, S, S, 3], mask_low_res f32[B, L, L, C], optional valid bool[B] and
    prompts (boxes f32[B, 4]; point_coords f32[B, N, 2] with point_labels i32[B, N]).
    """
    del key  # SAM has no dropout; kept so a loss with randomness has its key
    logits = model.segment(batch["image"], point_coords=batch.get("point_coords"),
                           point_labels=batch.get("point_labels"), boxes=batch.get("boxes"))
    return weighted_bce(logits, batch["mask_low_res"], pos_weight, valid=batch.get("valid"))


def client_local_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       loss_fn: LossFn, frozen: nnx.State, global_params: nnx.State,
                       params: nnx.State, opt_state, batches: Mapping[str, jax.Array],
                       step_mask: jax.Array, key: jax.Array, first_step: jax.Array,
                       prox_mu: jax.Array):
    """One client's local steps (pure; vmapped over clients by `local_steps`).

    params, opt_state: this client's; batches: leaves [S, B, ...]; step_mask: bool[S];
    key: this client's round key; first_step: i32[] index in the round of step 0.
    A masked step computes and discards: weights and optimizer state (Adam's count and
    moments too) come out bit-identical, so clients with fewer steps share the function.
    Returns (params, opt_state, losses f32[S]) with NaN losses on masked steps.
    """
    global_leaves = jax.tree.leaves(global_params)

    def objective(p, batch, step_key):
        loss = loss_fn(nnx.merge(graphdef, p, frozen), batch, step_key)
        drift = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), global_leaves))
        return loss + 0.5 * prox_mu * drift, loss

    def step(carry, xs):
        p, o = carry
        batch, active, index = xs
        (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(
            p, batch, jax.random.fold_in(key, index))
        updates, new_o = tx.update(grads, o, p)
        new_p = optax.apply_updates(p, updates)
        keep = lambda new, old: jnp.where(active, new, old)
        return ((jax.tree.map(keep, new_p, p), jax.tree.map(keep, new_o, o)),
                jnp.where(active, loss, jnp.nan))

    steps = first_step + jnp.arange(step_mask.shape[0], dtype=jnp.int32)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               (batches, step_mask, steps))
    return params, opt_state, losses


# The config fields each compiled function depends on. Anything else (prox_mu, passed as an
# array; sampling and step counts, decided on the host) changes without a recompile, and the
# costly local-steps function is shared by every setting and server optimizer.
_LOCAL_FIELDS = ("learning_rate", "b1", "b2", "eps", "pos_weight")
_SERVER_FIELDS = _LOCAL_FIELDS + ("setting", "reset_optimizer", "server_optimizer", "server_lr",
                                  "server_momentum", "server_b1", "server_b2", "server_eps")


def _config_from(fields: tuple) -> FedConfig:
    return FedConfig(**dict(fields))


@functools.lru_cache(maxsize=32)
def _local_steps_fn(graphdef: nnx.GraphDef, fields: tuple, loss_fn: LossFn | None,
                    mesh: jax.sharding.Mesh, num_padded: int, chunk: int) -> Callable:
    """jit(local_steps) for one model, optimizer and layout (cached: every Federation with
    the same pieces, e.g. one resumed from a checkpoint, reuses the compiled code).

    local_steps(frozen, state, batches [K_pad, S, B, ...], step_mask bool[K_pad, S],
    prox_mu f32[]) -> (state, losses f32[K_pad, S]); donates the state.
    """
    config = _config_from(fields)
    tx = config.local_optimizer()
    if loss_fn is None:
        loss_fn = functools.partial(segmentation_loss, pos_weight=config.pos_weight)
    train = jax.vmap(functools.partial(client_local_steps, graphdef, tx, loss_fn),
                     in_axes=(None, None, 0, 0, 0, 0, 0, None, None))

    def local_steps(frozen, state: FedState, batches, step_mask, prox_mu):
        round_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.round)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(round_key, jnp.arange(num_padded))
        per_client = (state.client_params, state.client_opt_state, batches, step_mask, keys)
        if chunk == num_padded:
            params, opt_state, losses = train(frozen, state.global_params, *per_client,
                                              state.local_step, prox_mu)
        else:
            # C clients at a time: a scan over chunks bounds the live activations to C clients.
            def one_chunk(_, xs):
                return None, train(frozen, state.global_params, *xs, state.local_step, prox_mu)
            _, out = jax.lax.scan(one_chunk, None, sharding.to_chunks(per_client, chunk, mesh))
            params, opt_state, losses = sharding.from_chunks(out)
        state = state.replace(client_params=sharding.constrain_clients(params, mesh),
                              client_opt_state=sharding.constrain_clients(opt_state, mesh),
                              local_step=state.local_step + step_mask.shape[1])
        return state, losses

    return jax.jit(local_steps, donate_argnums=1)


@functools.lru_cache(maxsize=32)
def _round_edges_fn(fields: tuple, mesh: jax.sharding.Mesh,
                    num_padded: int) -> tuple[Callable, Callable]:
    """(jit(begin_round), jit(end_round)) for one setting and server; both donate the state.

    begin_round(state) -> state: clients start from the global weights (the local-only
    baseline keeps its own), optimizer states reset if configured.
    end_round(state, num_samples f32[K_pad]) -> (state, {finite, included, weights}[K_pad]).
    """
    config = _config_from(fields)
    tx, server_tx = config.local_optimizer(), config.server_tx()
    local = config.setting == "local"

    def stack(tree):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_padded, *x.shape)), tree)
        return sharding.constrain_clients(stacked, mesh)

    def begin_round(state: FedState) -> FedState:
        params = state.client_params if local else stack(state.global_params)
        opt_state = state.client_opt_state
        if config.reset_optimizer:
            opt_state = sharding.constrain_clients(jax.vmap(tx.init)(params), mesh)
        return state.replace(client_params=params, client_opt_state=opt_state,
                             local_step=jnp.zeros((), jnp.int32))

    def end_round(state: FedState, num_samples: jax.Array):
        finite = aggregate.client_finite(state.client_params)
        included = (num_samples > 0) & finite
        weights = aggregate.fedavg_weights(num_samples, included)
        global_params, server_state = state.global_params, state.server_opt_state
        if not local:
            mean = aggregate.weighted_mean(state.client_params, weights)
            global_params, server_state = aggregate.server_step(
                global_params, mean, server_tx, server_state,
                plain=config.server_optimizer == "none", any_included=included.any())
        # A client whose weights went non-finite restarts its optimizer: its Adam moments
        # are likely NaN too and would spoil every later round.
        fresh = stack(tx.init(global_params))
        opt_state = jax.tree.map(
            lambda o, f: jnp.where(finite.reshape(-1, *([1] * (o.ndim - 1))), o, f),
            state.client_opt_state, fresh)
        state = state.replace(round=state.round + 1, global_params=global_params,
                              client_opt_state=opt_state, server_opt_state=server_state)
        return state, {"finite": finite, "included": included, "weights": weights}

    return jax.jit(begin_round, donate_argnums=0), jax.jit(end_round, donate_argnums=0)


def client_steps(num_samples: Sequence[int], batch_size: int, config: FedConfig) -> np.ndarray:
    """int32[K] local steps per round: local_steps for all, or local_epochs * steps per epoch
    of each client's data (ceil, or floor with drop_remainder), 0 for a client with no data."""
    n = np.asarray(num_samples, np.int64)
    if config.local_steps is not None:
        return np.where(n > 0, config.local_steps, 0).astype(np.int32)
    per_epoch = n // batch_size if config.drop_remainder else -(-n // batch_size)
    return (config.local_epochs * per_epoch).astype(np.int32)


def step_mask(steps: Sequence[int], total: int | None = None) -> np.ndarray:
    """bool[K, T]: step t of client k is real when t < steps[k]; T = max(steps) by default."""
    steps = np.asarray(steps)
    total = int(steps.max()) if total is None else total
    if steps.max(initial=0) > total:
        raise ValueError(f"a client has {steps.max()} steps but the round has only {total}")
    return np.arange(total)[None, :] < steps[:, None]


@dataclasses.dataclass(frozen=True)
class ClientPlan:
    """Who trains in a run: clients (each a group of pooled sites) and the unseen sites.

    names: one per client; sites: the sites pooled into each client; num_samples: each
    client's training-sample count (its FedAvg weight); unseen_sites: held out of training,
    only tested (weight 0; they get no client slot, which under vmap would cost a client's
    compute for nothing).
    """

    setting: str
    names: tuple[str, ...]
    sites: tuple[tuple[str, ...], ...]
    num_samples: tuple[int, ...]
    unseen_sites: tuple[str, ...] = ()


def plan_clients(site_samples: Mapping[str, int], setting: str = "federated",
                 held_out: Sequence[str] = ()) -> ClientPlan:
    """Sites -> clients for a setting: 'federated' and 'local' make one client per source
    site; 'centralised' pools all source sites into one client. `held_out` sites
    (leave-one-site-out) train in no setting and are only tested."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    unknown = [s for s in held_out if s not in site_samples]
    if unknown:
        raise ValueError(f"held-out sites {unknown} are not among the sites {list(site_samples)}")
    sources = [s for s in site_samples if s not in held_out]
    if not sources:
        raise ValueError("every site is held out: nothing to train on")
    if setting == "centralised":
        return ClientPlan(setting, ("+".join(sources),), (tuple(sources),),
                          (sum(site_samples[s] for s in sources),), tuple(held_out))
    return ClientPlan(setting, tuple(sources), tuple((s,) for s in sources),
                      tuple(site_samples[s] for s in sources), tuple(held_out))


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What a round did, per real client (arrays [K])."""

    round: int                  # rounds completed after this one
    participating: np.ndarray   # bool: drawn and with at least one step
    steps: np.ndarray           # int32: real local steps taken
    mean_loss: np.ndarray       # f32: mean loss over the real steps (NaN with none)
    finite: np.ndarray          # bool: every updated weight finite
    included: np.ndarray        # bool: in the average
    weights: np.ndarray         # f32: FedAvg weights used (sum 1 over included clients)
    comm: RoundComm


class Federation:
    """Host-side driver of the engine: static pieces and the jitted round functions.

    model: an NNX model (e.g. Sam) built for config.mode; num_clients: K real clients
    (named by client_names). mesh: a 'clients' mesh (default: every visible device).
    loss_fn(model, batch, key) -> f32[] replaces `segmentation_loss`.
    """

    def __init__(self, model: nnx.Module, config: FedConfig, num_clients: int, *,
                 mesh: jax.sharding.Mesh | None = None, loss_fn: LossFn | None = None,
                 client_names: Sequence[str] | None = None):
        if config.setting == "centralised" and num_clients != 1:
            raise ValueError(f"the centralised setting has one client (the pooled sites), "
                             f"got {num_clients}")
        self.config = config
        self.num_clients = num_clients
        self.client_names = tuple(client_names or (f"client{k}" for k in range(num_clients)))
        if len(self.client_names) != num_clients:
            raise ValueError(f"{len(self.client_names)} client names for {num_clients} clients")
        self.mesh = sharding.client_mesh() if mesh is None else mesh
        self.num_padded, self.chunk = sharding.layout(num_clients, self.mesh.size,
                                                      config.clients_per_step)
        self.graphdef, trainable, frozen = split(model, config.mode)
        # A host copy: the round functions donate the state's buffers, and device_put of
        # the model's own arrays would hand those very buffers (the model's) to the state.
        self.initial_params = jax.tree.map(np.array, trainable)
        # Never donated, so sharing the model's frozen buffers is safe (and costs nothing).
        self.frozen = sharding.place_replicated(frozen, self.mesh)
        self.model_config = getattr(model, "config", None)
        self.trainable_bytes = num_bytes(trainable)
        fields = lambda names: tuple((name, getattr(config, name)) for name in names)
        self._local_steps = _local_steps_fn(self.graphdef, fields(_LOCAL_FIELDS), loss_fn,
                                            self.mesh, self.num_padded, self.chunk)
        self._begin_round, self._end_round = _round_edges_fn(fields(_SERVER_FIELDS), self.mesh,
                                                             self.num_padded)

    # --- state -------------------------------------------------------------------------

    def init(self, params: nnx.State | None = None) -> FedState:
        """The state before round 1: every client and the global model at `params` (default:
        the model's trainable weights), fresh optimizer states, key from config.seed."""
        params = self.initial_params if params is None else jax.tree.map(np.array, params)
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x),
                                                         (self.num_padded, *x.shape)), params)
        tx = self.config.local_optimizer()
        opt_state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x),
                                                           (self.num_padded, *x.shape)),
                                 tx.init(params))
        key = jax.random.key_data(jax.random.key(self.config.seed))
        return self.place(FedState(
            round=np.zeros((), np.int32), local_step=np.zeros((), np.int32), key=np.asarray(key),
            global_params=params, client_params=stacked, client_opt_state=opt_state,
            server_opt_state=self.config.server_tx().init(params)))

    def place(self, state: FedState) -> FedState:
        """Put a state on the mesh: per-client fields sharded, the rest replicated."""
        clients = dict(client_params=state.client_params,
                       client_opt_state=state.client_opt_state)
        shared = dict(round=state.round, local_step=state.local_step, key=state.key,
                      global_params=state.global_params, server_opt_state=state.server_opt_state)
        return FedState(**sharding.place_clients(clients, self.mesh),
                        **sharding.place_replicated(shared, self.mesh))

    def global_model(self, state: FedState) -> nnx.Module:
        """The global model (global trainable weights + the shared frozen weights)."""
        return nnx.merge(self.graphdef, state.global_params, self.frozen)

    def client_model(self, state: FedState, client: int) -> nnx.Module:
        """Client k's own model (the local-only baseline evaluates these)."""
        params = jax.tree.map(lambda x: x[client], state.client_params)
        return nnx.merge(self.graphdef, params, self.frozen)

    # --- a round -----------------------------------------------------------------------

    def participants(self, round_index: int) -> np.ndarray:
        """bool[K]: clients drawn for round `round_index` (0-based) by config.client_fraction."""
        return aggregate.sample_clients(self.num_clients, self.config.client_fraction,
                                        self.config.seed, round_index)

    def client_steps(self, num_samples: Sequence[int], batch_size: int) -> np.ndarray:
        """int32[K] local steps each client takes per round (see `client_steps`)."""
        return client_steps(num_samples, batch_size, self.config)

    def begin_round(self, state: FedState) -> FedState:
        return self._begin_round(state)

    def local_steps(self, state: FedState, batches: Mapping[str, np.ndarray],
                    mask: np.ndarray) -> tuple[FedState, np.ndarray]:
        """S local steps of every client at once. batches: leaves [K, S, B, ...] (numpy, real
        clients only); mask: bool[K, S]. Returns (state, losses f32[K, S], NaN where masked)."""
        mask = np.asarray(mask, bool)
        if mask.shape[0] != self.num_clients:
            raise ValueError(f"step mask has {mask.shape[0]} clients, the federation "
                             f"{self.num_clients}")
        bad = {k: v.shape for k, v in batches.items() if v.shape[:2] != mask.shape}
        if bad:
            raise ValueError(f"batches must be [K, S, B, ...] with [K, S] = {mask.shape}; "
                             f"got {bad}")
        placed = sharding.place_clients(
            sharding.pad_clients((dict(batches), mask), self.num_padded), self.mesh)
        state, losses = self._local_steps(self.frozen, state, *placed,
                                              np.float32(self.config.prox_mu))
        return state, np.asarray(losses)[:self.num_clients]

    def end_round(self, state: FedState, num_samples: Sequence[float],
                  participating: np.ndarray | None = None,
                  losses: np.ndarray | None = None) -> tuple[FedState, RoundResult]:
        """Aggregate: FedAvg of the participating clients weighted by num_samples [K].

        participating: bool[K] (default all); losses: f32[K, T], the round's local_steps
        losses, for the result's mean loss. A participating client whose weights are not
        finite is left out with a warning and the weights are renormalised.
        """
        n = np.asarray(num_samples, np.float32)
        taking_part = np.ones(self.num_clients, bool) if participating is None else \
            np.asarray(participating, bool)
        weights = sharding.place_replicated(
            sharding.pad_clients(np.where(taking_part, n, 0.0).astype(np.float32),
                                 self.num_padded), self.mesh)
        state, metrics = self._end_round(state, weights)
        metrics = {k: np.asarray(v)[:self.num_clients] for k, v in metrics.items()}
        done = int(state.round)
        bad = np.flatnonzero(taking_part & (n > 0) & ~metrics["finite"])
        for k in bad:
            what = ("left out of the average; the weights are renormalised over "
                    f"{int(metrics['included'].sum())} client(s)"
                    if self.config.setting != "local" else "its weights are kept as they are")
            log.warning("round %d: client %s sent a non-finite update: %s", done,
                        self.client_names[k], what)
        if len(bad) and not metrics["included"].any() and self.config.setting != "local":
            log.warning("round %d: no client update to average; the global weights are "
                        "unchanged", done)
        if losses is None:
            steps = np.zeros(self.num_clients, np.int32)
            mean_loss = np.full(self.num_clients, np.nan, np.float32)
        else:
            losses = np.asarray(losses, np.float32)
            steps = np.isfinite(losses).sum(axis=1).astype(np.int32)
            with np.errstate(invalid="ignore"):
                mean_loss = np.where(steps > 0, np.nansum(losses, axis=1) / np.maximum(steps, 1),
                                     np.nan).astype(np.float32)
        comm = round_comm(taking_part, self.trainable_bytes,
                          communicates=self.config.setting == "federated")
        return state, RoundResult(round=done, participating=taking_part, steps=steps,
                                  mean_loss=mean_loss, finite=metrics["finite"],
                                  included=metrics["included"], weights=metrics["weights"],
                                  comm=comm)

    def run_round(self, state: FedState, batches: Mapping[str, np.ndarray], mask: np.ndarray,
                  num_samples: Sequence[float], *, sample: bool = True
                  ) -> tuple[FedState, RoundResult]:
        """One whole round from batches already in memory (leaves [K, T, B, ...], mask
        bool[K, T]). With sample=True, clients not drawn by `participants` take no step and
        have weight 0 (their batches are ignored)."""
        mask = np.asarray(mask, bool)
        taking_part = mask.any(axis=1)
        if sample:
            taking_part &= self.participants(int(state.round))
        state = self.begin_round(state)
        state, losses = self.local_steps(state, batches, mask & taking_part[:, None])
        return self.end_round(state, num_samples, taking_part, losses)

    # --- identity, for checkpoints -------------------------------------------------------

    def signature(self) -> dict:
        """What a checkpoint of this federation must match (JSON-able)."""
        model_config = self.model_config
        if hasattr(model_config, "to_json"):
            model_config = json.loads(model_config.to_json())
        return {"mode": self.config.mode, "setting": self.config.setting,
                "model_config": model_config, "num_clients": self.num_clients,
                "client_names": list(self.client_names)}

    @functools.cached_property
    def frozen_fingerprint(self) -> str:
        """sha256 of the frozen weights (paths, dtypes, shapes, bytes). Checkpoints hold
        only what training changes; this tells whether a resumed run froze the same
        (e.g. pretrained) weights. Computed once, on the host."""
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.frozen)[0]:
            value = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        return digest.hexdigest()


__all__ = ["FedConfig", "FedState", "Federation", "RoundResult", "ClientPlan", "SETTINGS",
           "client_local_steps", "client_steps", "plan_clients", "segmentation_loss",
           "step_mask"]
