"""Client-level DP-FedAvg (fed/aggregate.py) and its accounting (fed/accounting.py): the
clipping bound, the noise's scale, the aggregation against a float64 reference, privacy off
as plain FedAvg bit for bit, and epsilon against dp-accounting computed independently.
Nothing here trains a model: end_round is fed hand-made client weights."""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedfms_jax.fed import aggregate
from fedfms_jax.fed.accounting import Accountant, accountant_for
from fedfms_jax.fed.round import FedConfig, Federation
from flax import nnx

from tests.fed.helpers import (assert_trees_equal, config, engine_state, flat, host_state,
                               snapshot)
from tests.numerics import EPS32

CLIP = 0.5


def _updates(rng, norms):
    """Client updates (a two-leaf tree, leaves [K, ...]) of exactly these L2 norms."""
    k = len(norms)
    tree = {"w": rng.normal(size=(k, 6, 5)), "b": rng.normal(size=(k, 11))}
    total = np.sqrt(sum(np.sum(x.reshape(k, -1) ** 2, axis=1) for x in tree.values()))
    scale = np.asarray(norms) / total
    return {n: (x * scale.reshape(-1, *([1] * (x.ndim - 1)))).astype(np.float32)
            for n, x in tree.items()}


def test_clipping_bounds_every_client_and_keeps_small_updates_exactly():
    rng = np.random.default_rng(0)
    norms = np.array([0.01, 0.49, 0.5, 0.51, 3.0, 1e4, 0.0], np.float32)
    updates = _updates(rng, norms)
    clipped, measured = aggregate.clip_updates(updates, CLIP)
    np.testing.assert_allclose(np.asarray(measured), norms, rtol=1e-5, atol=1e-7)
    after = np.asarray(aggregate.update_norms(clipped))
    # float32 rounding of the scaled sum of squares: a few eps of the bound
    assert (after <= CLIP * (1 + 8 * EPS32)).all(), after
    for k, n in enumerate(norms):
        if n <= CLIP:   # within the bound: untouched, bit for bit
            for name in updates:
                np.testing.assert_array_equal(np.asarray(clipped[name][k]), updates[name][k])
        else:           # scaled onto the bound, direction kept
            assert abs(after[k] - CLIP) <= 8 * EPS32 * CLIP
            for name in updates:
                np.testing.assert_allclose(np.asarray(clipped[name][k]),
                                           updates[name][k] * (CLIP / n), rtol=1e-5,
                                           atol=1e-7 * CLIP)


def test_noise_has_the_configured_std_over_many_draws():
    std = jnp.float32(0.037)
    like = {"a": jnp.zeros((400, 250)), "b": jnp.zeros((50_000,))}   # 150k values
    noise = aggregate.gaussian_noise(jax.random.key(3), like, std)
    values = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(noise)])
    n = values.size
    # The sample std of n normals has relative std 1/sqrt(2n) (0.18% here): 5 of those.
    assert abs(values.std() / float(std) - 1) < 5 / np.sqrt(2 * n)
    assert abs(values.mean()) < 5 * float(std) / np.sqrt(n)
    # One draw cut into the leaves: no two leaves share values.
    assert not np.allclose(np.asarray(noise["a"]).ravel()[:1000],
                           np.asarray(noise["b"])[:1000])
    np.testing.assert_array_equal(  # the same key, the same noise
        np.asarray(aggregate.gaussian_noise(jax.random.key(3), like, std)["b"]),
        np.asarray(noise["b"]))


def test_the_means_noise_is_z_clip_times_the_largest_weight():
    """Clients that did not move: what the DP mean adds to the global is the noise alone,
    std z * C * max_k w_k, here 1.5 * 0.5 * 0.6 with sample counts 6 : 3 : 1."""
    global_params = {"w": jnp.ones((300, 300))}
    clients = {"w": jnp.ones((3, 300, 300))}
    weights = aggregate.fedavg_weights(jnp.array([6.0, 3.0, 1.0]), jnp.ones(3, bool))
    privacy = aggregate.Privacy(clip_norm=CLIP, noise_multiplier=1.5)
    mean, metrics = aggregate.private_mean(global_params, clients, weights, privacy,
                                           jax.random.key(0))
    expected = 1.5 * CLIP * 0.6
    assert abs(float(metrics["noise_std"]) - expected) <= 4 * EPS32 * expected
    values = np.asarray(mean["w"], np.float64) - 1.0
    assert abs(values.std() / expected - 1) < 5 / np.sqrt(2 * values.size)


class ToyModel(nnx.Module):
    """Stands in for SAM where only the aggregation runs: a trainable 'mask_decoder' (what
    decoder mode trains and averages) and a frozen 'image_encoder'."""

    def __init__(self, rngs: nnx.Rngs):
        self.mask_decoder = nnx.Linear(24, 16, rngs=rngs)
        self.image_encoder = nnx.Linear(8, 8, rngs=rngs)


@pytest.fixture(scope="module")
def model():
    return ToyModel(nnx.Rngs(0))


def _moved_state(fed: Federation, seed: int, round_index: int = 0):
    """A state as after local training: every client's trainable weights moved away from
    the global ones by updates of L2 norms 0.1, 0.4, 2 and 9 (two of them above CLIP)."""
    state = fed.init(round_index=round_index)
    rng = np.random.default_rng(seed)
    paths = list(flat(state.global_params))
    norms = np.array([0.1, 0.4, 2.0, 9.0])
    raw = {p: rng.normal(size=(4, *np.shape(v))) for p, v in flat(state.global_params).items()}
    total = np.sqrt(sum(np.sum(x.reshape(4, -1) ** 2, axis=1) for x in raw.values()))
    moved = [np.asarray(v)[None] + raw[p] * (norms / total).reshape(-1, *([1] * np.ndim(v)))
             for p, v in zip(paths, jax.tree.leaves(state.global_params))]
    client_params = jax.tree.unflatten(jax.tree.structure(state.global_params),
                                       [x.astype(np.float32) for x in moved])
    return engine_state(fed, fed.client_trees(state).replace(client_params=client_params))


def test_a_private_round_is_the_clipped_fedavg_plus_the_rounds_noise(model):
    fed = Federation(model, config(clip_norm=CLIP, noise_multiplier=0.8), 4)
    state = _moved_state(fed, seed=1, round_index=3)
    start = host_state(fed, state)
    n = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    state, result = fed.end_round(state, n)
    w = n / n.sum()
    np.testing.assert_allclose(result.update_norm, [0.1, 0.4, 2.0, 9.0], rtol=1e-4)
    assert result.noise_std == pytest.approx(0.8 * CLIP * 0.4, rel=1e-6)
    # The run's key is key(seed): the one the Flower server derives its noise from.
    np.testing.assert_array_equal(start.key, jax.random.key_data(jax.random.key(0)))
    noise = flat(aggregate.gaussian_noise(aggregate.noise_key(start.key, 3),
                                          start.global_params, jnp.float32(result.noise_std)))
    g, c, new = flat(start.global_params), flat(start.client_params), flat(state.global_params)
    for path in g:
        delta = c[path].astype(np.float64) - g[path]
        scale = np.minimum(1.0, CLIP / result.update_norm).reshape(-1, *([1] * g[path].ndim))
        expected = g[path] + np.tensordot(w, delta * scale, axes=1) + noise[path]
        magnitude = float(np.max(np.abs(expected))) or 1.0
        assert float(np.max(np.abs(new[path] - expected))) <= 16 * EPS32 * magnitude, path
    assert int(state.round) == 4

    # The noise is the round's and the run key's alone: a rebuilt federation (a resumed
    # run, or the Flower server) adds the same noise to the same round; another round, not.
    again = Federation(model, config(clip_norm=CLIP, noise_multiplier=0.8), 4)
    same, _ = again.end_round(_moved_state(again, seed=1, round_index=3), n)
    assert_trees_equal(snapshot(same.global_params), snapshot(state.global_params))
    later, _ = again.end_round(_moved_state(again, seed=1, round_index=4), n)
    assert not np.allclose(np.asarray(jax.tree.leaves(later.global_params)[0]),
                           np.asarray(jax.tree.leaves(state.global_params)[0]))


def test_privacy_off_is_plain_fedavg_bit_for_bit(model):
    """clip_norm = noise_multiplier = 0 compiles today's aggregation: the same function,
    the same weights as FedAvg's weighted mean and server step computed by hand."""
    plain = Federation(model, config(), 4)
    off = Federation(model, config(clip_norm=0.0, noise_multiplier=0.0), 4)
    assert off._end_round is plain._end_round and not off.config.privacy.on
    state = _moved_state(off, seed=2)
    start = host_state(off, state)
    n = np.array([3.0, 1.0, 0.0, 5.0], np.float32)
    state, result = off.end_round(state, n)
    assert result.update_norm is None and result.noise_std == 0.0
    weights = aggregate.fedavg_weights(jnp.asarray(n), jnp.asarray(n > 0))
    mean = jax.jit(aggregate.weighted_mean)(start.client_params, weights)
    assert_trees_equal(snapshot(state.global_params), snapshot(mean))
    # Clipping alone (no noise) is a different, noiseless aggregation.
    clipped = Federation(model, config(clip_norm=CLIP), 4)
    assert clipped._end_round is not plain._end_round
    state, result = clipped.end_round(_moved_state(clipped, seed=2), n)
    assert result.noise_std == 0.0 and result.update_norm is not None


@pytest.mark.parametrize("changes, message", [
    ({"clip_norm": -1.0}, "clip_norm must be >= 0"),
    ({"noise_multiplier": -0.5, "clip_norm": 1.0}, "noise_multiplier must be >= 0"),
    ({"noise_multiplier": 1.0}, "needs clip_norm > 0"),
    ({"clip_norm": 1.0, "setting": "local"}, "no aggregation to make private"),
])
def test_bad_privacy_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        FedConfig(**changes)


@pytest.mark.parametrize("z, rounds, delta", [(1.0, 8, 1e-5), (0.7, 30, 1e-6),
                                              (4.0, 200, 1e-5)])
def test_epsilon_equals_dp_accounting_computed_independently(z, rounds, delta):
    ours = Accountant(z, delta, num_clients=3, clients_per_round=3)
    # The same mechanism told to dp-accounting another way: one Gaussian composed `rounds`
    # times through compose(count=...), with the accountant's own default orders.
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(z), count=rounds)
    assert ours.epsilon(rounds) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    # The Gaussian's RDP is rounds * a / (2 z^2) at every order a; the classic conversion
    # eps = rdp + log(1/delta) / (a - 1) (Mironov 2017) bounds dp-accounting's from above,
    # and the PLD accountant (a tighter, different method) from below.
    orders = np.linspace(1.01, 512, 20000)
    classic = np.min(rounds * orders / (2 * z**2) + np.log(1 / delta) / (orders - 1))
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.GaussianDpEvent(z), count=rounds)
    assert pld.get_epsilon(delta) <= ours.epsilon(rounds) <= classic * (1 + 1e-9)
    assert ours.epsilon(rounds) > 0.5 * classic   # the same order: not some other mechanism
    epsilons = [ours.epsilon(r) for r in range(rounds + 1)]
    assert epsilons[0] == 0 and all(np.diff(epsilons) > 0)
    budget = (epsilons[rounds // 2] + epsilons[rounds // 2 + 1]) / 2
    assert ours.rounds_within(budget, rounds) == rounds // 2


def test_the_accountant_names_the_sampling_it_accounts_for():
    assert accountant_for(0.0, 1e-5, 4, 1.0) is None          # clipping alone: no guarantee
    every = accountant_for(1.0, 1e-5, 4, 1.0)
    assert every.clients_per_round == 4 and "no amplification" in every.sampling
    some = accountant_for(1.0, 1e-5, 10, 0.3)
    assert some.clients_per_round == 3 == aggregate.sample_clients(10, 0.3, 0, 0).sum()
    assert "without replacement, 3 of 10" in some.sampling and "upper bound" in some.sampling
    # Conservative: sampling gets no amplification, so epsilon is that of every round.
    assert some.epsilon(5) == every.epsilon(5)


def test_a_resumed_run_adds_the_uninterrupted_runs_noise(model, tmp_path):
    """The noise comes from the checkpointed key and round: a state saved and restored into a
    rebuilt federation aggregates, noise included, bit for bit as the original would."""
    from fedfms_jax.fed.checkpoint import FedCheckpointer

    fed = Federation(model, config(clip_norm=CLIP, noise_multiplier=0.8), 4)
    state = _moved_state(fed, seed=3, round_index=5)
    saver = FedCheckpointer(tmp_path, fed)
    saver.save(state, wait=True)
    saver.close()
    n = np.array([4.0, 1.0, 2.0, 3.0], np.float32)
    straight, _ = fed.end_round(state, n)
    again = Federation(model, config(clip_norm=CLIP, noise_multiplier=0.8), 4)
    restored = FedCheckpointer(tmp_path, again).restore(again.init()).state
    resumed, _ = again.end_round(restored, n)
    assert_trees_equal(snapshot(resumed.global_params), snapshot(straight.global_params))
