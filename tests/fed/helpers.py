"""Shared pieces of the engine tests: a tiny SAM, synthetic client data and an independent
reference trainer (a plain optax loop, no vmap, no engine code).

Also run as a script by the multi-device test, in a subprocess whose XLA_FLAGS force 4 CPU
devices: `python -m tests.fed.helpers OUT.npz` trains the standard federation there and
writes its result.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.fed.clients import step_mask
from fedfms_jax.fed.round import FedConfig, Federation
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models import Sam, get_config

MODE = "decoder"
BATCH = 2
# Five clients of different sizes: one local epoch is [3, 1, 2, 2, 3] steps of batch 2, so
# four of them finish early and run masked steps.
NUM_SAMPLES = (6, 2, 4, 3, 5)
NUM_CLIENTS = len(NUM_SAMPLES)
STEPS = tuple(-(-n // BATCH) for n in NUM_SAMPLES)
ROUND_STEPS = max(STEPS)
ROUNDS = 3


def tiny_model(mode: str = MODE, seed: int = 0, **overrides) -> Sam:
    """The tiny SAM (image 128, low-res 32)."""
    return Sam(get_config("tiny", **overrides), rngs=nnx.Rngs(seed))


# Adam's eps: FedFMS's 1e-8 turns gradients that are pure rounding noise (of the attention
# key biases, see SHIFT_INVARIANT) into full-size steps whose sign differs between two
# correct implementations. Most tests use 1e-4, which keeps those steps ~1e-6 lr; the
# equivalence tests also run at PRODUCTION_EPS with the bounds of assert_training_matches.
EPS = 1e-4
PRODUCTION_EPS = 1e-8
LEARNING_RATE = 1e-3

# Tolerances of assert_training_matches, as fractions of how far training moved each leaf.
# Same computation in another order, eps 1e-4, no FedProx: measured <= 1.3e-4.
RTOL_ORDER = 2e-3
# Rounding noise fed back into the training (FedProx's pull mu (w - w_global) of the
# shift-invariant leaves' noise, or Adam at eps 1e-8 amplifying near-zero gradients):
# measured <= 4e-2; FedProx with mu off by a factor 2 gives > 1.
RTOL_NOISE_FED_BACK = 0.1
# |Adam update| / learning rate <= (1 - b1) / sqrt(1 - b2) = 3.16 at (0.9, 0.999)
# (Kingma & Ba 2015, section 2.1).
ADAM_MAX_STEP = 3.2


def shift_invariant(name: str) -> bool:
    """Leaves whose gradient is zero in exact arithmetic: a key bias adds q.b to all of a
    query's attention logits, and softmax ignores a shift. Their float32 gradients are
    rounding noise, so only Adam's step bound holds for them."""
    return ".k_proj.bias" in name


def config(**changes) -> FedConfig:
    """The tests' federation: decoder mode, a learning rate large enough that a few steps
    move the weights visibly, one local epoch."""
    return FedConfig(**{"mode": MODE, "learning_rate": LEARNING_RATE, "eps": EPS, **changes})


def round_batches(round_index: int, num_clients: int = NUM_CLIENTS,
                  steps: int = ROUND_STEPS) -> dict[str, np.ndarray]:
    """Deterministic data of one round: image f32[K, T, B, 128, 128, 3] and blob masks
    mask_low_res f32[K, T, B, 32, 32, 1], different for every client, round and step."""
    rng = np.random.default_rng([round_index, num_clients, steps])
    shape = (num_clients, steps, BATCH)
    yy, xx = np.mgrid[0:32, 0:32]
    centres = rng.uniform(8, 24, size=(*shape, 2))
    radius = rng.uniform(3, 8, size=shape)
    dist = np.hypot(yy - centres[..., 0, None, None], xx - centres[..., 1, None, None])
    masks = (dist < radius[..., None, None]).astype(np.float32)[..., None]
    coarse = np.repeat(np.repeat(masks, 4, axis=-3), 4, axis=-2)
    images = 0.6 * coarse + 0.4 * rng.uniform(size=(*shape, 128, 128, 3))
    return {"image": images.astype(np.float32), "mask_low_res": masks}


def round_mask(num_clients: int = NUM_CLIENTS) -> np.ndarray:
    return step_mask(STEPS[:num_clients], ROUND_STEPS)


def run_federation(fed: Federation, rounds: int = ROUNDS, state=None, first_round: int = 0):
    """Train `rounds` rounds of the standard data; returns (state, [RoundResult])."""
    state = fed.init() if state is None else state
    results = []
    for r in range(first_round, first_round + rounds):
        state, result = fed.run_round(state, round_batches(r), round_mask(fed.num_clients),
                                      NUM_SAMPLES[:fed.num_clients])
        results.append(result)
    return state, results


def snapshot(tree):
    """Host copies of every leaf (the engine donates its state; a view would follow it)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def host_state(fed: Federation, state):
    """A host copy of an engine state, its clients' fields as trees shaped as the global
    weights (`Federation.client_trees`): the form the tests compare."""
    return snapshot(fed.client_trees(state))


def engine_state(fed: Federation, state):
    """`host_state`'s inverse, placed: a state to run the engine from."""
    return fed.place(fed.from_client_trees(state))


def flat(tree) -> dict[str, np.ndarray]:
    """{path: host array} of any pytree; an nnx.State's paths as its nested dict's."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def assert_trees_equal(actual, expected):
    """Bit for bit, leaf by leaf."""
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), sorted(set(a) ^ set(e))[:5]
    for k in e:
        np.testing.assert_array_equal(a[k], e[k], err_msg=k)


def assert_trees_close(actual, expected, *, rtol: float = 16 * float(np.finfo(np.float32).eps)):
    """Leaf by leaf within `rtol` of the leaf's scale (default: float32 rounding of a short
    sum, as in averaging a few clients)."""
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), sorted(set(a) ^ set(e))[:5]
    for k in e:
        scale = float(np.max(np.abs(e[k]), initial=0.0)) or 1.0
        error = float(np.max(np.abs(a[k].astype(np.float64) - e[k]), initial=0.0))
        assert error <= rtol * scale, f"{k}: differs by {error:.3g} > {rtol:g} x scale {scale:.3g}"


def assert_training_matches(actual, expected, start, *, rtol: float,
                            noise_bound: float | None = None):
    """Two trainings from `start` that are equal in exact arithmetic (vmap vs a loop, one
    device vs four, the engine vs the plain reference) agree to float32 rounding grown
    through training: each leaf within `rtol` x how far training moved it (max |expected -
    start|), never below 16 float32 eps of the leaf's scale. Shift-invariant leaves (whose
    "movement" is noise) within `noise_bound`, by default `rtol` x the largest movement of
    any leaf. Integer leaves (Adam's count) must be equal."""
    a, e, s = flat(actual), flat(expected), flat(start)
    assert a.keys() == e.keys() == s.keys(), sorted(set(a) ^ set(e) ^ set(s))[:5]
    moved = {k: float(np.max(np.abs(e[k].astype(np.float64) - s[k]), initial=0.0)) for k in e}
    largest = max(moved.values())
    for k in e:
        if not np.issubdtype(e[k].dtype, np.floating):
            np.testing.assert_array_equal(a[k], e[k], err_msg=k)
            continue
        error = float(np.max(np.abs(a[k].astype(np.float64) - e[k]), initial=0.0))
        if shift_invariant(k):
            bound = rtol * largest if noise_bound is None else noise_bound
            what = "the noise bound"
        else:
            scale = float(np.max(np.abs(e[k]), initial=0.0))
            bound = max(rtol * moved[k], 16 * np.finfo(np.float32).eps * scale)
            what = f"{rtol:g} x its movement {moved[k]:.3g}"
        assert error <= bound, f"{k}: differs by {error:.3g} > {bound:.3g} ({what})"


def adam_noise_bound(steps: int, learning_rate: float = LEARNING_RATE) -> float:
    """How far two runs' shift-invariant leaves can be apart after `steps` Adam steps each,
    walking in opposite directions."""
    return 2 * ADAM_MAX_STEP * learning_rate * steps


# --- the reference: plain training, one client at a time -------------------------------

@functools.lru_cache(maxsize=4)
def _reference_step(graphdef, learning_rate: float, eps: float):
    tx = optax.adam(learning_rate, eps=eps)

    @jax.jit
    def step(params, opt_state, frozen, batch, anchor, mu):
        def data_loss(p):
            logits = nnx.merge(graphdef, p, frozen).segment(batch["image"])
            return weighted_bce(logits, batch["mask_low_res"], 2.0)
        grads = jax.grad(data_loss)(params)
        # FedProx's gradient written out: d/dw mu/2 |w - anchor|^2 = mu (w - anchor).
        grads = jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, params, anchor)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step, tx


def reference_train(graphdef, frozen, params, opt_state, batches, steps: int, *,
                    learning_rate: float = LEARNING_RATE, eps: float = EPS, mu: float = 0.0):
    """`steps` Adam steps of one client from params (its batches: leaves [T, B, ...]);
    opt_state None starts Adam afresh. Returns (params, opt_state)."""
    step, tx = _reference_step(graphdef, learning_rate, eps)
    opt_state = tx.init(params) if opt_state is None else opt_state
    anchor = params
    for t in range(steps):
        batch = {k: jnp.asarray(v[t]) for k, v in batches.items()}
        params, opt_state = step(params, opt_state, frozen, batch, anchor, jnp.float32(mu))
    return params, opt_state


def client_slice(tree, k: int):
    return jax.tree.map(lambda x: np.asarray(x)[k], tree)


def main(out_path: str) -> None:
    """The standard federation on every visible device, 4 clients per step."""
    fed = Federation(tiny_model(), config(clients_per_step=4), NUM_CLIENTS)
    state, results = run_federation(fed, rounds=2)
    leaf = state.client_params
    frozen_leaf = jax.tree.leaves(fed.frozen)[0]
    info = {"devices": len(jax.devices()), "num_padded": fed.num_padded, "chunk": fed.chunk,
            "client_spec": str(leaf.sharding.spec), "client_devices": len(leaf.sharding.device_set),
            "frozen_replicated": bool(frozen_leaf.sharding.is_fully_replicated),
            "weights": results[-1].weights.tolist()}
    state = fed.client_trees(state)
    arrays = {f"global.{k}": v for k, v in flat(state.global_params).items()}
    arrays |= {f"clients.{k}": v[:NUM_CLIENTS] for k, v in flat(state.client_params).items()}
    np.savez(out_path, info=json.dumps(info), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
