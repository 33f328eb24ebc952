"""Server side of a round: which clients take part, which updates count, and the new global.

FedAvg is the weighted mean sum_k w_k theta_k with w_k = n_k / sum_j n_j over the included
clients (training-sample counts, in float32, never rounded), taken leaf by leaf over the
trainable subtree only. A client is included when it has weight > 0 and every value of its
updated weights is finite; the weights of the others are renormalised away. A server
optimizer (FedAvgM, FedAdam) then treats global - mean as a pseudo-gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam")


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


def server_optimizer(name: str, learning_rate: float = 1.0, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3
                     ) -> optax.GradientTransformation:
    """The server's optimizer on the pseudo-gradient global - mean.

    none     the mean is the new global (plain FedAvg; optax.identity holds no state)
    fedavgm  SGD with server momentum (Hsu et al. 2019); lr 1, momentum 0 is FedAvg
    fedadam  Adam on the pseudo-gradient (Reddi et al. 2021; eps = their tau, 1e-3)
    """
    if name == "none":
        return optax.identity()
    if name == "fedavgm":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "fedadam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(SERVER_OPTIMIZERS)}")


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


def sample_clients(num_clients: int, fraction: float, seed: int, round_index: int,
                   eligible: np.ndarray | None = None) -> np.ndarray:
    """bool[K]: the clients taking part in a round, drawn from (seed, round) alone.

    max(1, round(fraction * E)) of the E eligible clients, without replacement; all of them
    when fraction >= 1. The draw depends on nothing but its arguments, so a resumed run
    draws what the uninterrupted run drew.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"client fraction must be in (0, 1], got {fraction}")
    eligible = np.ones(num_clients, bool) if eligible is None else np.asarray(eligible, bool)
    pool = np.flatnonzero(eligible)
    chosen = np.zeros(num_clients, bool)
    if fraction >= 1.0 or pool.size == 0:
        chosen[pool] = True
        return chosen
    count = max(1, int(round(fraction * pool.size)))
    rng = np.random.default_rng([seed, round_index])
    chosen[rng.choice(pool, size=count, replace=False)] = True
    return chosen
