"""Server side of a round: which clients take part, which updates count, and the new global.

FedAvg is the weighted mean sum_k w_k theta_k with w_k = n_k / sum_j n_j over the included
clients (training-sample counts, in float32, never rounded), taken leaf by leaf over the
trainable subtree only. A client is included when it has weight > 0 and every value of its
updated weights is finite; the weights of the others are renormalised away. A server
optimizer (FedAvgM, FedAdam) then treats global - mean as a pseudo-gradient.

Client-level differential privacy (DP-FedAvg, McMahan et al. 2018, "Learning differentially
private recurrent language models"), when `Privacy` is on: each included client's update
Delta_k = theta_k - global (over the whole trainable subtree) is clipped to L2 norm C
(`clip_norm`), and the new global before the server optimizer is

    mean = global + sum_k w_k clip(Delta_k) + N(0, sigma^2 I),  sigma = z * C * max_k w_k

with w_k the FedAvg weights above (sample counts are public to the server: every site
reports its own) and z = `noise_multiplier`. Sensitivity: replacing one client's update by
zero (the zero-out / add-or-remove relation of DP-FedAvg, dp_accounting's
ADD_OR_REMOVE_ONE) with the weights held fixed moves sum_k w_k clip(Delta_k) by at most
max_k w_k * C in L2, so sigma is z times the sensitivity: a Gaussian mechanism with noise
multiplier z per round (fed/accounting.py counts it). Uniform weights (all n_k equal) give
the smallest max_k w_k = 1/K and so the least noise; a dominant site makes the noise as
large as its share. The noise is drawn from the run's key and the round
(`noise_key`), so a resumed run and the Flower server add exactly the simulator's noise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam")

# Each server optimizer's hyper-parameters (FedConfig fields, config keys train.<name>) and
# defaults chosen to be safe when the global model starts from pretrained weights:
#   fedavgm  server_lr 0.1, server_momentum 0.9: Hsu et al. 2019 ("Measuring the effects of
#            non-identical data distribution", FedAvgM) read server momentum through the
#            effective rate server_lr / (1 - momentum); 0.1 / (1 - 0.9) = 1 is FedAvg's own
#            step once the momentum has built up, and the first rounds move less than FedAvg.
#   fedadam  server_b1 0.9, server_b2 0.99, server_eps (their tau) 1e-3: Reddi et al. 2021
#            ("Adaptive Federated Optimization", ICLR), also Flower's FedAdam defaults.
#            server_lr 1e-3 is ours: Adam's bias-corrected first step moves every weight by
#            up to server_lr whatever the update's size, and optax's 1.0 moves each weight of
#            a pretrained SAM by ~1, which destroys it; fine-tuning (local Adam at 1e-4 for
#            one epoch) moves weights by ~1e-3 a round. Reddi et al. tune server_lr per task;
#            so should a user, from here.
SERVER_DEFAULTS: dict[str, dict[str, float]] = {
    "none": {},
    "fedavgm": {"server_lr": 0.1, "server_momentum": 0.9},
    "fedadam": {"server_lr": 1e-3, "server_b1": 0.9, "server_b2": 0.99, "server_eps": 1e-3},
}
SERVER_HYPERPARAMETERS = ("server_lr", "server_momentum", "server_b1", "server_b2",
                          "server_eps")


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """A server optimizer and its hyper-parameters, every one resolved (hashable: it keys
    the compiled aggregation, which sees nothing else of a config)."""

    name: str = "none"
    server_lr: float | None = None
    server_momentum: float | None = None
    server_b1: float | None = None
    server_b2: float | None = None
    server_eps: float | None = None

    def __post_init__(self):
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; known: "
                             f"{', '.join(SERVER_OPTIMIZERS)}")
        # Fill the optimizer's defaults; a hyper-parameter it does not have stays None, so
        # two configs that differ only there are the same optimizer.
        for field in SERVER_HYPERPARAMETERS:
            default = SERVER_DEFAULTS[self.name].get(field)
            value = getattr(self, field)
            object.__setattr__(self, field, None if default is None else
                               float(default if value is None else value))

    def tx(self) -> optax.GradientTransformation:
        """The optimizer on the pseudo-gradient global - mean.

        none     the mean is the new global (plain FedAvg; optax.identity holds no state)
        fedavgm  SGD with server momentum (Hsu et al. 2019); lr 1, momentum 0 is FedAvg
        fedadam  Adam on the pseudo-gradient (Reddi et al. 2021), bias-corrected as optax's
        """
        if self.name == "fedavgm":
            return optax.sgd(self.server_lr, momentum=self.server_momentum or None)
        if self.name == "fedadam":
            return optax.adam(self.server_lr, b1=self.server_b1, b2=self.server_b2,
                              eps=self.server_eps)
        return optax.identity()


@dataclasses.dataclass(frozen=True)
class Privacy:
    """Client-level DP of the aggregation (hashable: it keys the compiled aggregation).

    clip_norm: C, the L2 bound of each client's update over the trainable subtree (0: no
    clipping); noise_multiplier: z, the noise std in units of the sensitivity
    max_k w_k * C (0: no noise). Both 0 is off: the aggregation is plain FedAvg, bit for
    bit. Noise needs clipping (without a bound there is no sensitivity to scale it to).
    """

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0

    def __post_init__(self):
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError("noise_multiplier > 0 needs clip_norm > 0: the noise is scaled "
                             "to the clipping bound")
        object.__setattr__(self, "clip_norm", float(self.clip_norm))
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))

    @property
    def on(self) -> bool:
        return self.clip_norm > 0


# The noise key of round r is fold_in(fold_in(key, NOISE_STREAM), r); the clients' keys are
# fold_in(fold_in(key, r), k) (round.client_key), so no round's noise reuses a client's key.
NOISE_STREAM = 0x7FFF_FFFF


def noise_key(base_key: jax.Array, round_index) -> jax.Array:
    """The DP noise key of round `round_index` (0-based) from the run's key data u32[2]."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(base_key),
                                                 NOISE_STREAM), round_index)


def update_norms(updates) -> jax.Array:
    """f32[K]: the L2 norm of each client's update over every leaf (leaves [K, ...])."""
    squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)
               for x in jax.tree.leaves(updates)]
    return jnp.sqrt(sum(squares))


def clip_updates(updates, clip_norm: float):
    """(updates scaled to L2 norm <= clip_norm per client, norms f32[K] before clipping).

    Scale min(1, C / norm): an update already within the bound is left exactly as it is.
    """
    norms = update_norms(updates)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))

    def clip(x):
        s = scale.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
        return jnp.where(s < 1, x * s, x)
    return jax.tree.map(clip, updates), norms


def gaussian_noise(key: jax.Array, like, std: jax.Array):
    """N(0, std^2) for every value of a tree shaped as `like`: one draw of all its values
    in tree order, cut into the leaves (the same on the simulator and the Flower server;
    one draw compiles to one generator however many leaves)."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    values = std.astype(jnp.float32) * jax.random.normal(key, (sum(sizes),), jnp.float32)
    starts = np.cumsum([0] + sizes)
    noise = [values[a:b].reshape(x.shape).astype(x.dtype)
             for a, b, x in zip(starts[:-1], starts[1:], leaves)]
    return jax.tree.unflatten(treedef, noise)


def private_mean(global_params, client_params, weights: jax.Array, privacy: Privacy,
                 key: jax.Array):
    """global + sum_k w_k clip(theta_k - global) + N(0, (z C max_k w)^2): the DP-FedAvg mean
    (module docstring). Returns (mean, {update_norm f32[K], noise_std f32[]})."""
    updates = jax.tree.map(lambda c, g: c - g[None], client_params, global_params)
    clipped, norms = clip_updates(updates, privacy.clip_norm)
    mean_update = weighted_mean(clipped, weights)
    std = jnp.float32(privacy.noise_multiplier * privacy.clip_norm) * jnp.max(weights)
    if privacy.noise_multiplier > 0:
        noise = gaussian_noise(key, mean_update, std)
        mean_update = jax.tree.map(jnp.add, mean_update, noise)
    mean = jax.tree.map(jnp.add, global_params, mean_update)
    return mean, {"update_norm": norms, "noise_std": std}


def server_optimizer(name: str, **hyper: float) -> optax.GradientTransformation:
    """`ServerOptimizer(name, **hyper).tx()`: hyper are server_lr, server_momentum, ..."""
    return ServerOptimizer(name, **hyper).tx()


def optimizer_state(tx: optax.GradientTransformation, params):
    """tx's initial state for params (host arrays), from one compiled program. optax's init
    run eagerly compiles a small XLA program per distinct leaf shape, each of which stays
    resident (ViT-B FedMSA's Adam: 23 programs, 0.8 s on a 2-core CPU against 0.4 s)."""
    return jax.tree.map(np.asarray, jax.jit(tx.init)(params))


def client_finite(client_params) -> jax.Array:
    """bool[K]: whether every value of client k's weights is finite (leaves [K, ...])."""
    leaves = jax.tree.leaves(client_params)
    ok = jnp.ones(leaves[0].shape[0], bool)
    for x in leaves:
        ok &= jnp.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    return ok


def fedavg_weights(num_samples: jax.Array, included: jax.Array) -> jax.Array:
    """f32[K] FedAvg weights: n_k / sum of n over the included clients, 0 for the others.

    All zeros when no client is included (the caller then keeps the old global weights).
    """
    n = jnp.where(included, num_samples.astype(jnp.float32), 0.0)
    return n / jnp.maximum(n.sum(), jnp.finfo(jnp.float32).tiny)


@jax.jit
def weighted_mean(client_params, weights: jax.Array):
    """sum_k weights[k] * theta_k for every leaf [K, ...] -> [...].

    Clients of weight 0 are zeroed before the product, so a NaN in a left-out client cannot
    reach the mean (0 * NaN is NaN). Multiply-and-sum rather than tensordot: a contraction
    over a sharded axis is refused under Explicit mesh axes, and this lowers to the same
    all-reduce.
    """
    def mean(x):
        w = weights.reshape(-1, *([1] * (x.ndim - 1)))
        kept = jnp.where(w > 0, x, jnp.zeros((), x.dtype))
        return jnp.sum(w.astype(x.dtype) * kept, axis=0)
    return jax.tree.map(mean, client_params)


def server_step(global_params, mean, tx: optax.GradientTransformation, tx_state,
                plain: bool, any_included: jax.Array):
    """(global, server state) after a round whose clients' weighted mean is `mean`.

    plain: FedAvg without a server optimizer, where the mean itself is the new global
    (computing global - (global - mean) would round it). When no client was included the
    global weights and the server state stay as they were.
    """
    if plain:
        new_params, new_state = mean, tx_state
    else:
        pseudo_grad = jax.tree.map(jnp.subtract, global_params, mean)
        updates, new_state = tx.update(pseudo_grad, tx_state, global_params)
        new_params = optax.apply_updates(global_params, updates)
    keep = lambda new, old: jnp.where(any_included, new, old)
    return (jax.tree.map(keep, new_params, global_params),
            jax.tree.map(keep, new_state, tx_state))


def aggregate(global_params, client_params, num_samples: jax.Array,
              server: ServerOptimizer, server_state, privacy: Privacy = Privacy(),
              key: jax.Array | None = None):
    """One round's aggregation, the same for the simulator and the Flower server (pure).

    client_params: leaves [K, ...]; num_samples f32[K], 0 for a client not taking part.
    A client is included when its weight is > 0 and its weights are finite; FedAvg over the
    included (with `privacy` on: the DP-FedAvg mean, clipped updates plus noise drawn from
    `key`, see `noise_key`), then the server optimizer. Returns (global, server_state,
    {finite bool[K], included bool[K], weights f32[K]}, plus update_norm f32[K] and
    noise_std f32[] under privacy); with no client included nothing changes.
    """
    mean, metrics = client_mean(global_params, client_params, num_samples, privacy, key)
    global_params, server_state = server_step(global_params, mean, server.tx(), server_state,
                                              plain=server.name == "none",
                                              any_included=metrics["included"].any())
    return global_params, server_state, metrics


def client_mean(global_params, client_params, num_samples: jax.Array,
                privacy: Privacy = Privacy(), key: jax.Array | None = None):
    """`aggregate` before the server step: (the included clients' FedAvg mean, or with
    `privacy` on the DP-FedAvg mean, of any pytree with leaves [K, ...], e.g. the engine's
    raveled weights [K, N]; aggregate's metrics)."""
    metrics = inclusion(client_params, num_samples)
    if privacy.on:
        if key is None:
            raise ValueError("aggregation with privacy on needs the round's noise key")
        mean, dp = private_mean(global_params, client_params, metrics["weights"], privacy,
                                key)
        metrics.update(dp)
    else:
        mean = weighted_mean(client_params, metrics["weights"])
    return mean, metrics


def inclusion(client_params, num_samples: jax.Array) -> dict[str, jax.Array]:
    """Which clients count: {finite, included bool[K], weights f32[K] (FedAvg's)}."""
    finite = client_finite(client_params)
    included = (num_samples > 0) & finite
    return {"finite": finite, "included": included,
            "weights": fedavg_weights(num_samples, included)}


@functools.lru_cache(maxsize=16)
def aggregate_fn(server: ServerOptimizer, privacy: Privacy = Privacy()):
    """jit(aggregate) for one server optimizer and privacy setting (the Flower server's; the
    simulator compiles `aggregate` into its end_round): (global, clients, num_samples,
    server_state, base_key u32[2], round_index i32[]) -> aggregate's result."""
    def run(global_params, client_params, num_samples, server_state, base_key, round_index):
        key = noise_key(base_key, round_index) if privacy.on else None
        return aggregate(global_params, client_params, num_samples, server, server_state,
                         privacy, key)
    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def mean_update_step_fn(server: ServerOptimizer):
    """jit: (global, mean_update, server_state) -> (global, server_state). The server step
    after a secure aggregation, which gives the server only the clients' weighted mean
    update sum_k w_k (theta_k - global), not their weights."""
    def run(global_params, mean_update, server_state):
        mean = jax.tree.map(jnp.add, global_params, mean_update)
        return server_step(global_params, mean, server.tx(), server_state,
                           plain=server.name == "none", any_included=jnp.array(True))
    return jax.jit(run)


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients `sample_clients` draws: max(1, round(fraction * K)), K at 1."""
    if fraction >= 1.0 or num_clients == 0:
        return num_clients
    return min(num_clients, max(1, int(round(fraction * num_clients))))


def sample_clients(num_clients: int, fraction: float, seed: int, round_index: int
                   ) -> np.ndarray:
    """bool[K]: the clients taking part in a round, drawn from (seed, round) alone.

    max(1, round(fraction * K)) of the K clients, without replacement; all of them when
    fraction >= 1. The draw depends on nothing but its arguments, so a resumed run (and the
    Flower server) draws what the uninterrupted simulator drew.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"client fraction must be in (0, 1], got {fraction}")
    chosen = np.zeros(num_clients, bool)
    count = clients_per_round(num_clients, fraction)
    if count == num_clients:
        chosen[:] = True
        return chosen
    rng = np.random.default_rng([seed, round_index])
    chosen[rng.choice(num_clients, size=count, replace=False)] = True
    return chosen
