"""A federated round: every client's local steps at once (jit of vmap of scan), then FedAvg.

The model is split once into graphdef / trainable / frozen (`partition.split`). The frozen
weights live once, replicated, outside the state and are passed to every jitted function
unbatched (vmap in_axes None). Everything a run changes is one pytree, `FedState`: the
global trainable weights, each client's trainable weights and optimizer state stacked on a
leading client axis of K_pad (K real clients padded to the device layout, see sharding.py),
the server optimizer's state, the base PRNG key and the round counter. The clients' weights
and optimizer moments are kept raveled (`partition.FlatLayout`: [K_pad, N]), so the work
done to every weight of a client is a few operations, not a few per leaf;
`Federation.client_trees` gives them as trees.

A round is four jitted pure functions of that state, each donating the state it replaces:

    begin_round(state)                                   every client starts from the global
                                                         weights (not in the local-only
                                                         baseline); optional optimizer reset
    local_steps(frozen, state, batches, step_mask,       S local steps of a group of clients:
                client_ids, rows, first_step, prox_mu)   a scan over steps inside a vmap over
                                                         clients of `client_local_steps`, on
                                                         the whole state or on rows gathered
                                                         and scattered back; masked steps
                                                         leave weights AND optimizer state
                                                         exactly unchanged
    finish_local(state)                                  a client whose weights went non-finite
                                                         restarts its optimizer
    end_round(state, num_samples)                        aggregation (aggregate.aggregate:
                                                         FedAvg, or DP-FedAvg with the noise
                                                         of the state's key and round, and
                                                         the server optimizer)

`local_round` is the host side of one round's local work, shared by the simulator (K
clients) and a Flower site (a Federation of its one client, `client_ids=(k,)`, so it draws
client k's keys). Clients of unequal sizes cost the sum of their steps, not K x the longest:
`Federation.plan` (clients.segment_plan) cuts the round where a client finishes and trains
only the clients still going, grouped into a few vmap widths (sharding.group_widths), so no
step is masked (`clients.masked_work` measures a plan); one client at a time, each client's
steps are one call. The step count is an argument of the compiled steps (a loop of that many
iterations over batches of `clients.call_length` steps), so a round compiles one program per
vmap width. The next call's batches are drawn and placed in a background thread while the
current one trains. The per-step keys depend on the client's id, the round and the step's
index in the round, not on the plan or on which other clients train alongside; the vmap
width can change float32 rounding (XLA's CPU matmuls block their sums by the operands'
sizes), never the steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.fed import aggregate, fit, sharding
from fedfms_jax.fed.clients import (SETTINGS, Segment, call_length, client_steps,
                                    segment_plan, step_mask)
from fedfms_jax.fed.comm import RoundComm, round_comm
from fedfms_jax.fed.partition import FlatLayout, num_bytes, split
from fedfms_jax.losses import segmentation_loss
from fedfms_jax.models.sam import NORMALISATIONS

log = logging.getLogger(__name__)

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
    # How the loss turns a batch's u8 `pixels` into model input (models.sam.normalise_pixels):
    # the data's normalisation, done on the device.
    normalise: str = "unit"
    local_steps: int | None = None       # a fixed number of steps per round for every client,
    local_epochs: int | None = 1         # or epochs: ceil(n_k / batch) steps each, masked
    reset_optimizer: bool = False        # True: fresh optimizer state every round
    prox_mu: float = 0.0                 # FedProx: + mu/2 ||w - w_global||^2 in the local loss
    # Server.
    client_fraction: float = 1.0         # fraction of clients drawn each round (seeded)
    server_optimizer: str = "none"       # aggregate.SERVER_OPTIMIZERS
    # Its hyper-parameters; None: the optimizer's default (aggregate.SERVER_DEFAULTS).
    server_lr: float | None = None
    server_momentum: float | None = None  # FedAvgM
    server_b1: float | None = None        # FedAdam
    server_b2: float | None = None
    server_eps: float | None = None
    # Client-level DP of the aggregation (aggregate.Privacy): each update clipped to L2 norm
    # clip_norm, Gaussian noise of std noise_multiplier * clip_norm * max_k w_k; 0, 0: off.
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
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
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got "
                             f"{self.normalise!r}")
        if self.prox_mu < 0:
            raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu}")
        privacy = self.privacy  # checks clip_norm and noise_multiplier
        if self.setting != "federated" and privacy.on:
            raise ValueError(f"setting {self.setting!r} has no aggregation to make private: "
                             "clip_norm and noise_multiplier must be 0")

    def replace(self, **changes: Any) -> "FedConfig":
        return dataclasses.replace(self, **changes)

    @property
    def local(self) -> "LocalTraining":
        """What the compiled local steps depend on (and all they can see)."""
        return LocalTraining(self.learning_rate, self.b1, self.b2, self.eps, self.pos_weight,
                             self.normalise)

    @property
    def server(self) -> aggregate.ServerOptimizer:
        """The server optimizer, its defaults filled in."""
        return aggregate.ServerOptimizer(
            self.server_optimizer, **{name: getattr(self, name)
                                      for name in aggregate.SERVER_HYPERPARAMETERS})

    @property
    def privacy(self) -> aggregate.Privacy:
        """The aggregation's client-level DP (off when clip_norm and noise_multiplier are 0)."""
        return aggregate.Privacy(self.clip_norm, self.noise_multiplier)

    def local_optimizer(self) -> optax.GradientTransformation:
        return self.local.optimizer()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class FedState:
    """Everything a federated run changes (a pytree; K_pad = padded client count).

    round: i32[] rounds completed. local_step: i32[] local steps taken in the current round.
    key: u32[2] the run's base key (per-round/client/step keys are folded in, never split
    off, so a resumed run draws the same ones). global_params: the trainable weights, a
    nested dict of arrays (`partition.split`). client_params: f32[K_pad, N], each client's
    trainable weights raveled (`Federation.flat`); client_opt_state: the local optimizer's
    state of those vectors, leaves [K_pad, ...] (Adam: count [K_pad], mu and nu [K_pad, N]).
    server_opt_state: the server optimizer's state of the global tree (empty for plain
    FedAvg).
    """

    round: jax.Array
    local_step: jax.Array
    key: jax.Array
    global_params: dict
    client_params: dict
    client_opt_state: Any
    server_opt_state: Any


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """A client's optimizer and loss: the key of the compiled local steps, which see nothing
    else of a FedConfig (so no field can change without a recompile)."""

    learning_rate: float
    b1: float
    b2: float
    eps: float
    pos_weight: float
    normalise: str = "unit"

    def optimizer(self) -> optax.GradientTransformation:
        """Each client's optimizer: Adam (torch's defaults, as FedFMS)."""
        return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)

    def loss_fn(self) -> LossFn:
        return functools.partial(segmentation_loss, pos_weight=self.pos_weight,
                                 normalise=self.normalise)


def client_key(base_key: jax.Array, round_index: jax.Array, client_id: jax.Array) -> jax.Array:
    """Client k's key of a round: fold_in(fold_in(key(seed), round), k); step t's key folds
    in t. base_key: u32[2] key data. Folded, never split, so a resumed run, a Flower site and
    the simulator draw the same keys."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(base_key),
                                                 round_index), client_id)


def client_local_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       loss_fn: LossFn, flat: FlatLayout, frozen: dict, global_vector: jax.Array,
                       params: jax.Array, opt_state, batches: Mapping[str, jax.Array],
                       step_mask: jax.Array, key: jax.Array, first_step: jax.Array,
                       num_steps: jax.Array, prox_mu: jax.Array):
    """One client's local steps (pure; vmapped over clients by `local_steps`).

    params f32[N], opt_state: this client's, raveled as `flat` (global_vector f32[N]: the
    round's global weights, FedProx's anchor); batches: leaves [S, B, ...]; step_mask: bool[S];
    key: this client's round key; first_step: i32[] index in the round of step 0;
    num_steps: i32[] the steps taken, the first num_steps <= S of the batches (a loop of
    that many iterations: the rest are padding, never computed, so calls of any length
    share one program). A masked step computes and discards: weights and optimizer state
    (Adam's count and moments too) come out bit-identical. Returns (params, opt_state,
    losses f32[S]) with NaN losses on masked steps and past num_steps.
    """
    def data_loss(weights, batch, step_key):
        return loss_fn(nnx.merge(graphdef, weights, frozen), batch, step_key)

    def step(i, carry):
        p, o, losses = carry
        batch = jax.tree.map(lambda x: x[i], batches)
        active, index = step_mask[i], first_step + i
        # The gradient of the weight tree, raveled once: differentiating through the
        # vector's slices instead would sum one zero-padded N-vector per leaf.
        loss, grads = jax.value_and_grad(data_loss)(flat.unravel(p), batch,
                                                    jax.random.fold_in(key, index))
        # FedProx: + mu/2 |p - global|^2, whose gradient is mu (p - global).
        grads = flat.ravel(grads) + prox_mu * (p - global_vector)
        updates, new_o = tx.update(grads, o, p)
        new_p = optax.apply_updates(p, updates)
        keep = lambda new, old: jnp.where(active, new, old)
        losses = losses.at[i].set(jnp.where(active, loss, jnp.nan).astype(losses.dtype))
        return jax.tree.map(keep, new_p, p), jax.tree.map(keep, new_o, o), losses

    losses = jnp.full(step_mask.shape, jnp.nan, jnp.float32)
    return jax.lax.fori_loop(0, num_steps, step, (params, opt_state, losses))


@functools.lru_cache(maxsize=32)
def _local_steps_fn(graphdef: nnx.GraphDef, local: LocalTraining, loss_fn: LossFn | None,
                    flat: FlatLayout, mesh: jax.sharding.Mesh, num_padded: int,
                    chunk: int) -> Callable:
    """jit(local_steps) for one model, optimizer and layout (cached on exactly what it is
    built from: every Federation with the same pieces, e.g. one resumed from a checkpoint,
    reuses the compiled code).

    local_steps(frozen, state, batches [G, S, B, ...], step_mask bool[G, S], client_ids
    i32[G], rows, first_step i32[], num_steps i32[] (<= S), prox_mu f32[]) -> (state,
    losses f32[G, S]); donates the
    state. rows None: the group is every client slot (G = K_pad), trained C at a time;
    rows i32[G]: the group is those rows of the state (G <= C; a row >= K_pad is a padding
    member: it trains on a copy of the last row and its result is dropped), gathered,
    trained and scattered back in place.
    """
    tx = local.optimizer()
    train = jax.vmap(functools.partial(client_local_steps, graphdef, tx,
                                       loss_fn or local.loss_fn(), flat),
                     in_axes=(None, None, 0, 0, 0, 0, 0, None, None, None))

    def local_steps(frozen, state: FedState, batches, step_mask, client_ids, rows, first_step,
                    num_steps, prox_mu):
        keys = jax.vmap(client_key, (None, None, 0))(state.key, state.round, client_ids)
        params, opt_state = state.client_params, state.client_opt_state
        if rows is not None:
            take = lambda x: sharding.constrain_clients(x.at[rows].get(mode="clip"), mesh)
            params, opt_state = jax.tree.map(take, (params, opt_state))
        per_client = (params, opt_state, batches, step_mask, keys)
        global_vector = flat.ravel(state.global_params)
        if step_mask.shape[0] <= chunk:
            params, opt_state, losses = train(frozen, global_vector, *per_client, first_step,
                                              num_steps, prox_mu)
        else:
            # C clients at a time: a scan over chunks bounds the live activations to C clients.
            def one_chunk(_, xs):
                return None, train(frozen, global_vector, *xs, first_step, num_steps, prox_mu)
            _, out = jax.lax.scan(one_chunk, None, sharding.to_chunks(per_client, chunk, mesh))
            params, opt_state, losses = sharding.from_chunks(out)
        if rows is not None:
            put = lambda full, part: full.at[rows].set(part, mode="drop")
            params = jax.tree.map(put, state.client_params, params)
            opt_state = jax.tree.map(put, state.client_opt_state, opt_state)
        state = state.replace(client_params=sharding.constrain_clients(params, mesh),
                              client_opt_state=sharding.constrain_clients(opt_state, mesh),
                              local_step=first_step + num_steps)
        return state, losses

    return jax.jit(local_steps, donate_argnums=1)


@functools.lru_cache(maxsize=32)
def _round_edges_fn(local_training: LocalTraining, server: aggregate.ServerOptimizer,
                    privacy: aggregate.Privacy, setting: str, reset_optimizer: bool,
                    flat: FlatLayout, mesh: jax.sharding.Mesh, num_padded: int
                    ) -> tuple[Callable, Callable, Callable]:
    """(jit(begin_round), jit(finish_local), jit(end_round)) for one setting and server,
    cached on exactly what they are built from; all donate the state.

    begin_round(state) -> state: clients start from the global weights (the local-only
    baseline keeps its own), optimizer states reset if configured.
    finish_local(state) -> (state, finite bool[K_pad]): a client whose weights are not
    finite restarts its optimizer (its Adam moments are likely NaN too and would spoil every
    later round).
    end_round(state, num_samples f32[K_pad]) -> (state, {finite, included, weights}[K_pad],
    with privacy on also update_norm [K_pad] and noise_std []); the DP noise key is the
    state's key and round (aggregate.noise_key).
    """
    tx = local_training.optimizer()
    local = setting == "local"

    def stack(tree):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_padded, *x.shape)), tree)
        return sharding.constrain_clients(stacked, mesh)

    def begin_round(state: FedState) -> FedState:
        params = state.client_params if local else stack(flat.ravel(state.global_params))
        opt_state = state.client_opt_state
        if reset_optimizer:
            opt_state = sharding.constrain_clients(jax.vmap(tx.init)(params), mesh)
        return state.replace(client_params=params, client_opt_state=opt_state,
                             local_step=jnp.zeros((), jnp.int32))

    def finish_local(state: FedState):
        finite = aggregate.client_finite(state.client_params)
        fresh = stack(tx.init(flat.ravel(state.global_params)))
        opt_state = jax.tree.map(
            lambda o, f: jnp.where(finite.reshape(-1, *([1] * (o.ndim - 1))), o, f),
            state.client_opt_state, fresh)
        return state.replace(client_opt_state=opt_state), finite

    def end_round(state: FedState, num_samples: jax.Array):
        if local:
            metrics = aggregate.inclusion(state.client_params, num_samples)
            global_params, server_state = state.global_params, state.server_opt_state
        else:
            # The clients' mean over the vectors, the server step on the tree.
            key = aggregate.noise_key(state.key, state.round) if privacy.on else None
            mean, metrics = aggregate.client_mean(flat.ravel(state.global_params),
                                                  state.client_params, num_samples, privacy,
                                                  key)
            global_params, server_state = aggregate.server_step(
                state.global_params, flat.unravel(mean), server.tx(), state.server_opt_state,
                plain=server.name == "none", any_included=metrics["included"].any())
        state = state.replace(round=state.round + 1, global_params=global_params,
                              server_opt_state=server_state)
        return state, metrics

    return (jax.jit(begin_round, donate_argnums=0), jax.jit(finish_local, donate_argnums=0),
            jax.jit(end_round, donate_argnums=0))


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
    update_norm: np.ndarray | None = None  # f32: L2 norm of each update before clipping (DP)
    noise_std: float = 0.0      # std of the DP noise added to the mean (0: none)


class Federation:
    """Host-side driver of the engine: static pieces and the jitted round functions.

    model: an NNX model (e.g. Sam) built for config.mode; num_clients: K real clients
    (named by client_names). client_ids: each client's id in the run, i32[K] (default
    0..K-1): what its keys derive from, so a Flower site, a Federation of its one client,
    passes its index k and trains as client k of the simulator. mesh: a 'clients' mesh
    (default: every visible device). loss_fn(model, batch, key) -> f32[] replaces
    `losses.segmentation_loss`.
    """

    def __init__(self, model: nnx.Module, config: FedConfig, num_clients: int, *,
                 mesh: jax.sharding.Mesh | None = None, loss_fn: LossFn | None = None,
                 client_names: Sequence[str] | None = None,
                 client_ids: Sequence[int] | None = None):
        if config.setting == "centralised" and num_clients != 1:
            raise ValueError(f"the centralised setting has one client (the pooled sites), "
                             f"got {num_clients}")
        self.config = config
        self.num_clients = num_clients
        self.client_names = tuple(client_names or (f"client{k}" for k in range(num_clients)))
        if len(self.client_names) != num_clients:
            raise ValueError(f"{len(self.client_names)} client names for {num_clients} clients")
        ids = np.arange(num_clients) if client_ids is None else np.asarray(client_ids)
        if ids.shape != (num_clients,):
            raise ValueError(f"{ids.size} client ids for {num_clients} clients")
        self.client_ids = ids.astype(np.int32)
        self.mesh = sharding.client_mesh() if mesh is None else mesh
        self.layout: fit.Layout | None = None  # set by build.federation when it chose one
        self.num_padded, self.chunk = sharding.layout(num_clients, self.mesh.size,
                                                      config.clients_per_step)
        self.group_widths = sharding.group_widths(self.chunk, self.mesh.size)
        self.graphdef, trainable, frozen = split(model, config.mode)
        self.flat = FlatLayout.of(trainable)  # how a client's weights are one vector
        # A host copy: the round functions donate the state's buffers, and device_put of
        # the model's own arrays would hand those very buffers (the model's) to the state.
        self.initial_params = jax.tree.map(np.array, trainable)
        # Never donated, so sharing the model's frozen buffers is safe (and costs nothing).
        self.frozen = sharding.place_replicated(frozen, self.mesh)
        self.model_config = getattr(model, "config", None)
        self.trainable_bytes = num_bytes(trainable)
        self._local_steps = _local_steps_fn(self.graphdef, config.local, loss_fn, self.flat,
                                            self.mesh, self.num_padded, self.chunk)
        self._begin_round, self._finish_local, self._end_round = _round_edges_fn(
            config.local, config.server, config.privacy, config.setting,
            config.reset_optimizer, self.flat, self.mesh, self.num_padded)

    @classmethod
    def fitted(cls, model: nnx.Module, config: FedConfig, num_clients: int, *,
               example_batch: Mapping[str, np.ndarray], steps: Sequence[int], segment: int,
               remat: str = "auto", mesh: jax.sharding.Mesh | None = None,
               **kwargs) -> "Federation":
        """A Federation whose clients at once (config.clients_per_step None: chosen) and
        encoder rematerialisation (remat "auto": chosen; else as given, set on the model)
        fit a round of steps[k] local steps per client, in segments of `segment`, on batches
        like `example_batch` (one client's, [B, ...] fields) into the memory free now
        (fed.fit; `compiled_memory`). The choice is `.layout`."""
        mesh = sharding.client_mesh() if mesh is None else mesh
        candidates = []  # every candidate's jitted local steps

        def make(mode: str, width: int) -> Federation:
            model.set_remat(mode)
            return cls(model, config.replace(clients_per_step=width), num_clients, mesh=mesh,
                       **kwargs)

        def measure(mode: str, width: int) -> fit.MemoryNeed:
            candidate = make(mode, width)
            candidates.append(candidate._local_steps)
            return candidate.compiled_memory(example_batch, steps, segment)

        def step_flops(width: int) -> float:  # the step's own work: no recomputation
            candidate = make("off", width)
            candidates.append(candidate._local_steps)
            return candidate.step_flops(example_batch, steps, segment)

        layout = fit.choose_layout(measure, num_clients, mesh.size, remat=remat,
                                   clients_per_step=config.clients_per_step or 0,
                                   step_flops=step_flops,
                                   **fit.policy(mesh.devices.flat[0].platform))
        federation = make(layout.remat, layout.clients_per_step)
        federation.layout = layout
        for local_steps in candidates:
            if local_steps is not federation._local_steps:
                local_steps.clear_cache()  # a program never to run (~120-190 MB, small)
        federation.compile_round_edges()  # so that their compiles' leftovers go too
        fit.release_free_heap()  # what the candidates' compiles left on the heap
        return federation

    # --- state -------------------------------------------------------------------------

    def init(self, params: dict | None = None, *, round_index: int = 0,
             client_opt_state=None) -> FedState:
        """The state before round `round_index` + 1: every client and the global model at
        `params` (default: the model's trainable weights), the key from config.seed, fresh
        optimizer states or `client_opt_state` (the optimizer's state of the weight tree,
        leaves [K, ...], as `client_trees` gives it: e.g. a Flower site's own, carried
        between rounds)."""
        params = self.initial_params if params is None else jax.tree.map(np.array, params)
        vector = self.flat.ravel(jax.tree.map(np.asarray, params))
        stack = lambda tree: jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (self.num_padded, *np.shape(x))), tree)
        if client_opt_state is None:
            opt_state = stack(aggregate.optimizer_state(self.config.local_optimizer(), vector))
        else:
            opt_state = sharding.pad_clients(self.flat.ravel_state(
                jax.tree.map(np.asarray, client_opt_state), batch_dims=1), self.num_padded)
        key = jax.random.key_data(jax.random.key(self.config.seed))
        return self.place(FedState(
            round=np.asarray(round_index, np.int32), local_step=np.zeros((), np.int32),
            key=np.asarray(key), global_params=params, client_params=stack(vector),
            client_opt_state=opt_state,
            server_opt_state=aggregate.optimizer_state(self.config.server.tx(), params)))

    def place(self, state: FedState) -> FedState:
        """Put a state on the mesh: per-client fields sharded, the rest replicated."""
        clients = dict(client_params=state.client_params,
                       client_opt_state=state.client_opt_state)
        shared = dict(round=state.round, local_step=state.local_step, key=state.key,
                      global_params=state.global_params, server_opt_state=state.server_opt_state)
        return FedState(**sharding.place_clients(clients, self.mesh),
                        **sharding.place_replicated(shared, self.mesh))

    def client_trees(self, state: FedState, copy: bool = True) -> FedState:
        """The state with its clients' weights and optimizer state as trees shaped as the
        global weights (leaves [K_pad, ...]), on the host: what checkpoints, Flower sites and
        tests read. Views of one host copy per field; copy=False: of the state's own buffers
        where the backend allows, valid only until the engine donates them (next call)."""
        host = lambda x: np.array(x, copy=True) if copy else np.asarray(x)
        params = host(state.client_params)
        opt_state = jax.tree.map(host, state.client_opt_state)
        return state.replace(client_params=self.flat.unravel(params),
                             client_opt_state=self.flat.unravel_state(opt_state))

    def from_client_trees(self, state: FedState) -> FedState:
        """`client_trees`' inverse: the clients' fields raveled again (host arrays, not
        placed)."""
        as_host = lambda tree: jax.tree.map(np.asarray, tree)
        return state.replace(
            client_params=self.flat.ravel(as_host(state.client_params), batch_dims=1),
            client_opt_state=self.flat.ravel_state(as_host(state.client_opt_state),
                                                   batch_dims=1))

    def abstract_state(self) -> FedState:
        """The shapes, dtypes and shardings of `init()`'s state, with nothing allocated."""
        clients = sharding.client_sharding(self.mesh)
        shared = sharding.replicated(self.mesh)
        spec = lambda x, where, lead=(): jax.ShapeDtypeStruct(
            (*lead, *np.shape(x)), x.dtype, sharding=where)
        params = self.initial_params
        vector = jax.ShapeDtypeStruct((self.flat.size,), self.flat.dtype)
        opt_state = jax.eval_shape(self.config.local_optimizer().init, vector)
        server = jax.eval_shape(self.config.server.tx().init, params)
        key = jax.random.key_data(jax.random.key(self.config.seed))
        return FedState(
            round=spec(np.int32(0), shared), local_step=spec(np.int32(0), shared),
            key=spec(key, shared), global_params=jax.tree.map(lambda x: spec(x, shared), params),
            client_params=spec(vector, clients, (self.num_padded,)),
            client_opt_state=jax.tree.map(lambda x: spec(x, clients, (self.num_padded,)),
                                          opt_state),
            server_opt_state=jax.tree.map(lambda x: spec(x, shared), server))

    def compile_round_edges(self) -> None:
        """Compile begin_round, finish_local and end_round for this federation's state
        (nothing runs; JAX's caches keep them for the first round)."""
        state = self.abstract_state()
        weights = jax.ShapeDtypeStruct((self.num_padded,), np.float32,
                                       sharding=sharding.replicated(self.mesh))
        for edge, args in ((self._begin_round, ()), (self._finish_local, ()),
                           (self._end_round, (weights,))):
            edge.lower(state, *args).compile()

    def compiled_memory(self, example_batch: Mapping[str, np.ndarray], steps: Sequence[int],
                        segment: int) -> fit.MemoryNeed:
        """Compile the round's first planned call of the local steps (its widest group:
        every client is still training) for batches like `example_batch` (one client's,
        [B, ...] fields), clients taking steps[k] steps in segments of `segment`, and read
        XLA's memory analysis. Nothing is allocated; the compiled code is cached, so the
        first round does not compile it again."""
        group, length = self.plan(steps, segment)[0], call_length(steps, segment)
        stats = self._lower_call(example_batch, group, length).compile().memory_analysis()
        # On the host: the call's batches being trained and the next call's, drawn ahead.
        call = sum(np.asarray(v).nbytes for v in example_batch.values()) * length * len(
            group.clients)
        return fit.MemoryNeed(
            arguments=stats.argument_size_in_bytes, temporaries=stats.temp_size_in_bytes,
            outputs=max(0, stats.output_size_in_bytes - stats.alias_size_in_bytes),
            resident=num_bytes(self.frozen), host_batches=2 * call)

    def step_flops(self, example_batch: Mapping[str, np.ndarray], steps: Sequence[int],
                   segment: int) -> float:
        """FLOPs of one local step of the same call as `compiled_memory` (all its clients),
        from XLA's cost analysis of the lowered program: nothing is compiled (on the CPU a
        fraction of a second against the compile's ~10 s, small variant; within a few
        percent of the compiled program's count). 0 where the backend gives no analysis."""
        lowered = self._lower_call(example_batch, self.plan(steps, segment)[0],
                                   call_length(steps, segment))
        cost = lowered.cost_analysis() or {}
        return float(cost.get("flops", 0.0))  # a loop's body counts once: one step

    def _lower_call(self, example_batch: Mapping[str, np.ndarray], group: Segment,
                    length: int) -> jax.stages.Lowered:
        """The local steps of one planned call (a `plan` group, batches of `length` steps,
        `call_length`), lowered for abstract inputs like `example_batch`."""
        width = group.width
        clients = sharding.client_sharding(self.mesh)
        spec = lambda shape, dtype, where=clients: jax.ShapeDtypeStruct(shape, dtype,
                                                                       sharding=where)
        batches = {k: spec((width, length, *np.shape(v)), np.asarray(v).dtype)
                   for k, v in example_batch.items()}
        whole = width == self.num_padded and group.clients == tuple(range(len(group.clients)))
        rows = None if whole else spec((width,), np.int32, sharding.replicated(self.mesh))
        return self._local_steps.lower(
            self.frozen, self.abstract_state(), batches, spec((width, length), np.bool_),
            spec((width,), np.int32), rows, jax.ShapeDtypeStruct((), np.int32),
            jax.ShapeDtypeStruct((), np.int32), np.float32(self.config.prox_mu))

    def global_model(self, state: FedState) -> nnx.Module:
        """The global model (global trainable weights + the shared frozen weights)."""
        return nnx.merge(self.graphdef, state.global_params, self.frozen)

    # --- a round -----------------------------------------------------------------------

    def participants(self, round_index: int) -> np.ndarray:
        """bool[K]: clients drawn for round `round_index` (0-based) by config.client_fraction."""
        return aggregate.sample_clients(self.num_clients, self.config.client_fraction,
                                        self.config.seed, round_index)

    def client_steps(self, num_samples: Sequence[int], batch_size: int) -> np.ndarray:
        """int32[K] local steps each client takes per round (see `clients.client_steps`)."""
        return client_steps(num_samples, batch_size, local_steps=self.config.local_steps,
                            local_epochs=self.config.local_epochs)

    def begin_round(self, state: FedState) -> FedState:
        return self._begin_round(state)

    def local_steps(self, state: FedState, batches: Mapping[str, np.ndarray],
                    mask: np.ndarray) -> tuple[FedState, np.ndarray]:
        """S local steps of every client at once, masked steps computed and discarded (for
        arbitrary masks; `local_round` plans a round without masked steps). batches: leaves
        [K, S, B, ...] (numpy, real clients only); mask: bool[K, S]. Returns (state, losses
        f32[K, S], NaN where masked)."""
        mask = np.asarray(mask, bool)
        if mask.shape[0] != self.num_clients:
            raise ValueError(f"step mask has {mask.shape[0]} clients, the federation "
                             f"{self.num_clients}")
        bad = {k: v.shape for k, v in batches.items() if v.shape[:2] != mask.shape}
        if bad:
            raise ValueError(f"batches must be [K, S, B, ...] with [K, S] = {mask.shape}; "
                             f"got {bad}")
        ids = np.concatenate([self.client_ids, np.arange(self.num_padded - self.num_clients,
                                                         dtype=np.int32) + _PADDING_ID])
        placed = sharding.place_clients(
            sharding.pad_clients((dict(batches), mask), self.num_padded) + (ids,), self.mesh)
        state, losses = self._local_steps(self.frozen, state, *placed, None, state.local_step,
                                          np.int32(mask.shape[1]),
                                          np.float32(self.config.prox_mu))
        return state, np.asarray(losses)[:self.num_clients]

    def finish_local(self, state: FedState) -> tuple[FedState, np.ndarray]:
        """After a round's local steps: clients whose weights are not finite restart their
        optimizer. Returns (state, finite bool[K])."""
        state, finite = self._finish_local(state)
        return state, np.asarray(finite)[:self.num_clients]

    def plan(self, steps: Sequence[int], segment: int) -> list[Segment]:
        """The calls of the compiled steps that train client k steps[k] steps (see
        `clients.segment_plan`: no masked steps; `clients.masked_work` measures a plan)."""
        return segment_plan(steps, segment, self.group_widths)

    def _place_group(self, group: Segment, batches: Mapping[str, np.ndarray],
                     length: int) -> tuple:
        """The device arguments of one planned call: batches [n, length, B, ...] of its n
        clients (`length` = `call_length`; the rows past group.length are never computed),
        padded to its width, with their mask, ids, rows, first step and step count. Batches
        drawn into `sharding.host_zeros` buffers at the call's width are placed on a CPU
        device without a copy."""
        n, width = len(group.clients), group.width
        clients = np.asarray(group.clients, np.int32)
        bad = {k: v.shape for k, v in batches.items() if v.shape[:2] != (n, length)}
        if bad:
            raise ValueError(f"a call of {n} clients padded to {length} steps needs batches "
                             f"[{n}, {length}, B, ...]; got {bad}")
        if n < width:
            batches = sharding.pad_clients(dict(batches), width)
        padding = np.arange(width - n, dtype=np.int32)
        mask = np.arange(width)[:, None] < np.full((1, length), n)
        if width == self.num_padded and group.clients == tuple(range(n)):
            # The whole state in slot order: trained where it lies, no gathered copy; the
            # slots past n (padding clients, or real clients that are done) run masked.
            ids = np.concatenate([self.client_ids, np.arange(self.num_padded - self.num_clients,
                                                             dtype=np.int32) + _PADDING_ID])
            rows = None
        else:
            ids = np.concatenate([self.client_ids[clients], padding + _PADDING_ID])
            rows = sharding.place_replicated(
                np.concatenate([clients, padding * 0 + self.num_padded]), self.mesh)
        return (*sharding.place_clients((dict(batches), mask, ids), self.mesh), rows,
                np.int32(group.first_step), np.int32(group.length))

    def local_round(self, state: FedState, steps: Sequence[int],
                    draw: Callable[[np.ndarray, int], Mapping[str, np.ndarray]],
                    segment: int) -> tuple[FedState, np.ndarray | None, np.ndarray]:
        """A round's local work after `begin_round`: client k takes steps[k] steps, in the
        calls of `plan(steps, segment)` (at most `segment` steps each, only the clients
        still training, no masked steps; every call holds batches of `call_length` steps,
        so a round runs one compiled program per vmap width). draw(todo int32[K], length)
        gives the next call's steps: every nonzero todo[k] is the call's step count, and the
        result is the batches of those clients in client order, leaves [A, length, B, ...]
        (zeros past todo[k]; in `sharding.host_zeros` buffers, so that they are written
        once). The next call's batches are drawn and placed in a background thread while
        the current one trains.
        The simulator's and a Flower site's one path. Returns (state, losses f32[K, T] or
        None, finite bool[K]); T = max(steps)."""
        steps = np.asarray(steps, np.int32)
        plan, length = self.plan(steps, segment), call_length(steps, segment)

        def prepare(group: Segment) -> tuple:
            todo = np.zeros(self.num_clients, np.int32)
            todo[list(group.clients)] = group.length
            return self._place_group(group, draw(todo, length), length)

        losses = []
        prox_mu = np.float32(self.config.prox_mu)
        with concurrent.futures.ThreadPoolExecutor(1, "fedfms-draw") as pool:
            ahead = pool.submit(prepare, plan[0]) if plan else None
            for i, group in enumerate(plan):
                args = ahead.result()
                if i + 1 < len(plan):
                    ahead = pool.submit(prepare, plan[i + 1])
                state, group_losses = self._local_steps(self.frozen, state, *args, prox_mu)
                losses.append((group, group_losses))
        state, finite = self.finish_local(state)
        if not losses:
            return state, None, finite
        out = np.full((self.num_clients, int(steps.max())), np.nan, np.float32)
        for group, group_losses in losses:
            out[list(group.clients), group.first_step:group.first_step + group.length] = \
                np.asarray(group_losses)[:len(group.clients), :group.length]
        return state, out, finite

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
        noise_std = float(metrics.pop("noise_std", 0.0))
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
        steps, mean_loss = loss_summary(losses, self.num_clients)
        comm = round_comm(taking_part, self.trainable_bytes,
                          communicates=self.config.setting == "federated")
        return state, RoundResult(round=done, participating=taking_part, steps=steps,
                                  mean_loss=mean_loss, finite=metrics["finite"],
                                  included=metrics["included"], weights=metrics["weights"],
                                  comm=comm, update_norm=metrics.get("update_norm"),
                                  noise_std=noise_std)

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
        mask &= taking_part[:, None]
        state = self.begin_round(state)
        steps = mask.sum(axis=1)
        if np.array_equal(mask, step_mask(steps, mask.shape[1])):
            state, losses, _ = self.local_round(state, steps, _array_draw(batches),
                                                mask.shape[1])
            if losses is not None and losses.shape[1] < mask.shape[1]:
                losses = np.pad(losses, ((0, 0), (0, mask.shape[1] - losses.shape[1])),
                                constant_values=np.nan)
        else:  # steps skipped in the middle: the masked path
            state, losses = self.local_steps(state, batches, mask)
            state, _ = self.finish_local(state)
        return self.end_round(state, num_samples, taking_part, losses)


def _array_draw(batches: Mapping[str, np.ndarray]) -> Callable[[np.ndarray, int], dict]:
    """`local_round`'s draw over a round's batches in memory (leaves [K, T, B, ...]): each
    client's next todo[k] rows."""
    position = np.zeros(next(iter(batches.values())).shape[0], np.int64)

    def draw(todo: np.ndarray, length: int) -> dict[str, np.ndarray]:
        active = np.flatnonzero(todo > 0)
        out = {k: sharding.host_zeros((len(active), length, *v.shape[2:]), v.dtype)
               for k, v in batches.items()}
        for a, c in enumerate(active):
            n = int(todo[c])
            for k, v in batches.items():
                out[k][a, :n] = v[c, position[c]:position[c] + n]
        position[active] += todo[active]
        return out

    return draw


# Padding clients (zero weight, all steps masked) get ids no real client has.
_PADDING_ID = 1 << 30


def loss_summary(losses: np.ndarray | None, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps int32[K], mean loss f32[K]) of a round's losses f32[K, T] (NaN = masked step);
    NaN mean for a client without steps."""
    if losses is None:
        return np.zeros(num_clients, np.int32), np.full(num_clients, np.nan, np.float32)
    losses = np.asarray(losses, np.float32)
    steps = np.isfinite(losses).sum(axis=1).astype(np.int32)
    with np.errstate(invalid="ignore"):
        mean = np.where(steps > 0, np.nansum(losses, axis=1) / np.maximum(steps, 1), np.nan)
    return steps, mean.astype(np.float32)


__all__ = ["FedConfig", "FedState", "Federation", "LocalTraining", "RoundResult",
           "client_key", "client_local_steps", "loss_summary"]
