"""Aggregation, client sampling, layout and communication accounting (no model compiled)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedfms_jax.fed import aggregate, sharding
from fedfms_jax.fed.comm import CommLedger, round_comm
from fedfms_jax.fed.clients import (Segment, client_steps, masked_work, plan_clients,
                                    segment_plan, step_mask)
from fedfms_jax.fed.round import FedConfig
from tests.numerics import EPS32, relative_error


def _clients(rng, k=4):
    """A two-leaf trainable tree with leaves [K, ...]."""
    return {"w": rng.normal(size=(k, 3, 5)).astype(np.float32),
            "b": rng.normal(size=(k, 7)).astype(np.float32)}


def test_fedavg_equals_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)
    clients = _clients(rng)
    n = np.array([120, 37, 0, 843], np.float32)  # weights that do not round to 2 decimals
    weights = aggregate.fedavg_weights(jnp.asarray(n), jnp.array([True, True, True, True]))
    mean = aggregate.weighted_mean(clients, weights)
    for name, x in clients.items():
        expected = sum(float(n[k]) / 1000.0 * x[k].astype(np.float64) for k in range(4))
        # float32 rounding of a 4-term sum, relative to the mean's scale
        assert relative_error(mean[name], expected) <= 8 * EPS32, name
    np.testing.assert_allclose(np.asarray(weights), n / n.sum(), rtol=1e-7)


def test_a_left_out_client_cannot_poison_the_mean():
    rng = np.random.default_rng(1)
    clients = _clients(rng)
    clients["w"][1, 0, 0] = np.nan
    clients["b"][1, 3] = np.inf
    finite = aggregate.client_finite(clients)
    np.testing.assert_array_equal(np.asarray(finite), [True, False, True, True])
    n = jnp.array([1.0, 5.0, 1.0, 2.0])
    weights = aggregate.fedavg_weights(n, finite)
    np.testing.assert_allclose(np.asarray(weights), [0.25, 0.0, 0.25, 0.5])
    mean = aggregate.weighted_mean(clients, weights)
    expected = 0.25 * clients["w"][0] + 0.25 * clients["w"][2] + 0.5 * clients["w"][3]
    np.testing.assert_allclose(np.asarray(mean["w"]), expected, rtol=1e-6)
    assert np.isfinite(np.asarray(mean["b"])).all()


def test_no_included_client_keeps_the_global_weights():
    params = {"w": jnp.ones((3,))}
    tx = aggregate.server_optimizer("fedadam")
    state = tx.init(params)
    new, new_state = aggregate.server_step(params, {"w": jnp.zeros((3,))}, tx, state,
                                           plain=False, any_included=jnp.array(False))
    np.testing.assert_array_equal(np.asarray(new["w"]), 1.0)
    assert int(new_state[0].count) == 0


def test_fedavgm_without_momentum_at_lr_1_is_fedavg():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(5,)).astype(np.float32))}
    mean = {"w": jnp.asarray(rng.normal(size=(5,)).astype(np.float32))}
    tx = aggregate.server_optimizer("fedavgm", server_lr=1.0, server_momentum=0.0)
    new, _ = aggregate.server_step(params, mean, tx, tx.init(params), plain=False,
                                   any_included=jnp.array(True))
    assert relative_error(new["w"], mean["w"]) <= 4 * EPS32


def test_server_momentum_and_fedadam_follow_their_update_rules():
    params = {"w": jnp.array([1.0, -2.0])}
    mean = {"w": jnp.array([0.5, -1.0])}        # pseudo-gradient g = params - mean
    g = np.array([0.5, -1.0])
    # FedAvgM: v1 = g, w1 = w0 - lr v1; round 2 with the same mean: v2 = m v1 + g2.
    tx = aggregate.server_optimizer("fedavgm", server_lr=0.5, server_momentum=0.9)
    w1, s1 = aggregate.server_step(params, mean, tx, tx.init(params), False, jnp.array(True))
    np.testing.assert_allclose(np.asarray(w1["w"]), [1.0, -2.0] - 0.5 * g, rtol=1e-6)
    w2, _ = aggregate.server_step(w1, mean, tx, s1, False, jnp.array(True))
    g2 = np.asarray(w1["w"]) - [0.5, -1.0]
    np.testing.assert_allclose(np.asarray(w2["w"]), np.asarray(w1["w"]) - 0.5 * (0.9 * g + g2),
                               rtol=1e-6)
    # FedAdam, first step (bias-corrected): update = lr * g / (|g| + eps).
    tx = aggregate.server_optimizer("fedadam", server_lr=0.1, server_eps=1e-3)
    w1, _ = aggregate.server_step(params, mean, tx, tx.init(params), False, jnp.array(True))
    np.testing.assert_allclose(np.asarray(w1["w"]),
                               [1.0, -2.0] - 0.1 * g / (np.abs(g) + 1e-3), rtol=1e-6)
    with pytest.raises(ValueError, match="fedyogi"):
        aggregate.server_optimizer("fedyogi")


def test_server_optimizer_defaults_are_filled_and_safe_for_a_pretrained_model():
    """Unset hyper-parameters take the optimizer's defaults; one FedAdam round moves no
    weight by more than its server_lr (1e-3), however large the pseudo-gradient, where
    optax's lr 1 would move every weight by ~1."""
    adam = FedConfig(server_optimizer="fedadam").server
    assert (adam.server_lr, adam.server_b1, adam.server_b2, adam.server_eps) == (
        1e-3, 0.9, 0.99, 1e-3)
    assert adam.server_momentum is None
    assert FedConfig(server_optimizer="fedavgm", server_lr=0.5).server == \
        aggregate.ServerOptimizer("fedavgm", server_lr=0.5, server_momentum=0.9)
    # A hyper-parameter the optimizer does not have does not make it another optimizer.
    assert FedConfig(server_optimizer="none", server_b1=0.5).server == aggregate.ServerOptimizer()
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(0, 0.02, size=(64,)).astype(np.float32))}
    clients = {"w": params["w"][None] + jnp.asarray(rng.normal(0, 0.5, (3, 64)), jnp.float32)}
    new, _, _ = aggregate.aggregate(params, clients, jnp.ones(3), adam,
                                    adam.tx().init(params))
    moved = float(jnp.max(jnp.abs(new["w"] - params["w"])))
    assert 0.5e-3 < moved <= 1e-3 * (1 + 1e-5)


def test_aggregate_is_fedavg_then_the_server_step_over_included_clients():
    rng = np.random.default_rng(4)
    clients = _clients(rng, 3)
    clients["w"][2, 0, 0] = np.nan
    params = {k: v[0] * 0.5 for k, v in clients.items()}
    n = jnp.array([3.0, 1.0, 5.0])
    server = aggregate.ServerOptimizer("fedavgm", server_lr=0.7)
    new, state, metrics = aggregate.aggregate(params, clients, n, server,
                                              server.tx().init(params))
    np.testing.assert_array_equal(np.asarray(metrics["included"]), [True, True, False])
    np.testing.assert_allclose(np.asarray(metrics["weights"]), [0.75, 0.25, 0.0])
    for k, x in clients.items():
        mean = 0.75 * x[0] + 0.25 * x[1]
        np.testing.assert_allclose(np.asarray(new[k]), params[k] - 0.7 * (params[k] - mean),
                                   rtol=1e-5, atol=1e-6)


def test_client_sampling_is_seeded_and_sized():
    draws = [aggregate.sample_clients(10, 0.3, seed=7, round_index=r) for r in range(6)]
    assert all(d.sum() == 3 for d in draws)
    assert len({tuple(np.flatnonzero(d)) for d in draws}) > 1          # varies by round
    again = aggregate.sample_clients(10, 0.3, seed=7, round_index=4)
    np.testing.assert_array_equal(again, draws[4])                     # replays exactly
    assert aggregate.sample_clients(10, 0.01, seed=0, round_index=0).sum() == 1
    assert aggregate.sample_clients(4, 1.0, seed=0, round_index=0).all()
    with pytest.raises(ValueError, match="fraction"):
        aggregate.sample_clients(4, 0.0, 0, 0)


def test_layout_pads_to_devices_and_chunks():
    assert sharding.layout(5, 1) == (5, 5)
    assert sharding.layout(5, 4) == (8, 8)
    assert sharding.layout(5, 4, clients_per_step=4) == (8, 4)
    assert sharding.layout(5, 4, clients_per_step=3) == (8, 4)       # rounded to the devices
    assert sharding.layout(3, 1, clients_per_step=2) == (4, 2)
    assert sharding.layout(2, 8) == (8, 8)
    with pytest.raises(ValueError, match="at least one client"):
        sharding.layout(0, 1)


def test_chunks_round_trip_and_keep_each_devices_clients():
    x = jnp.arange(8 * 3).reshape(8, 3)
    chunks = sharding.to_chunks({"x": x}, chunk=4)["x"]
    assert chunks.shape == (2, 4, 3)
    # With 4 devices each holds 2 consecutive clients; chunk j takes client 2d + j of device d.
    np.testing.assert_array_equal(np.asarray(chunks[0, :, 0]) // 3, [0, 2, 4, 6])
    np.testing.assert_array_equal(np.asarray(sharding.from_chunks({"x": chunks})["x"]),
                                  np.asarray(x))
    padded = sharding.pad_clients({"a": np.ones((3, 2))}, 4)["a"]
    np.testing.assert_array_equal(padded, [[1, 1], [1, 1], [1, 1], [0, 0]])


def test_steps_per_round_and_masks():
    epochs = dict(local_steps=None, local_epochs=1)
    np.testing.assert_array_equal(client_steps([6, 2, 5, 0], 2, **epochs), [3, 1, 3, 0])
    np.testing.assert_array_equal(
        client_steps([6, 2, 5], 2, local_steps=None, local_epochs=2), [6, 2, 6])
    np.testing.assert_array_equal(
        client_steps([6, 2, 0], 2, local_steps=4, local_epochs=None), [4, 4, 0])
    np.testing.assert_array_equal(step_mask([2, 0, 3]),
                                  [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="only 2"):
        step_mask([3], 2)
    with pytest.raises(ValueError, match="exactly one"):
        FedConfig(local_steps=3)
    with pytest.raises(ValueError, match="no server"):
        FedConfig(setting="local", server_optimizer="fedadam")


# FedFMS's multi-site prostate data: training slices per site (BIDMC, HK, I2CVB, ISBI,
# ISBI_1.5, UCL).
PROSTATE_SLICES = (261, 158, 468, 421, 384, 175)


def _replay(plan, steps, widths, max_length):
    """Each client's steps in the order the plan trains them; checks every call's shape."""
    done = np.zeros(len(steps), np.int64)
    for segment in plan:
        assert segment.width in widths and len(segment.clients) <= segment.width
        assert 1 <= segment.length <= max_length
        for k in segment.clients:
            assert done[k] == segment.first_step, (segment, done)  # in order, none skipped
            done[k] += segment.length
    np.testing.assert_array_equal(done, steps)


def test_segment_plans_train_every_step_once_with_little_masked_work():
    rng = np.random.default_rng(0)
    epochs = dict(local_steps=None, local_epochs=1)
    mixes = {"prostate": client_steps(PROSTATE_SLICES, 4, **epochs),
             "prostate / 16": client_steps([n // 16 for n in PROSTATE_SLICES], 4, **epochs),
             "demo": np.array([12, 7, 4]),
             "one client": np.array([7]),
             "an idle client": np.array([5, 0, 9, 2])}
    mixes |= {f"random {i}": rng.integers(0, 60, size=rng.integers(1, 9)) for i in range(20)}
    for name, steps in mixes.items():
        for clients_per_step in (None, 1, 2, 3):
            _, chunk = sharding.layout(len(steps), 1, clients_per_step)
            widths = sharding.group_widths(chunk, 1)
            plan = segment_plan(steps, 16, widths)
            _replay(plan, steps, widths, 16)
            assert masked_work(plan, steps) <= 0.15, (name, clients_per_step)
            # On one device every width down to 1 is allowed: nothing is padded.
            assert masked_work(plan, steps) == 0.0, (name, clients_per_step)
    # One client at a time: each client's steps in calls of up to 16, no cut where another
    # finishes (the prostate sites' 66, 40, 117, 106, 96, 44 steps: 5 + 3 + 8 + 7 + 6 + 3).
    plan = segment_plan(mixes["prostate"], 16, (1,))
    assert [s.clients for s in plan[:5]] == [(0,)] * 5 and len(plan) == 32
    assert [(s.first_step, s.length) for s in plan[:5]] == [(0, 16), (16, 16), (32, 16),
                                                            (48, 16), (64, 2)]
    # Two devices: widths are even, so an odd group pads one member.
    steps = mixes["prostate"]
    _, chunk = sharding.layout(6, 2)
    plan = segment_plan(steps, 16, sharding.group_widths(chunk, 2))
    _replay(plan, steps, sharding.group_widths(chunk, 2), 16)
    assert 0 < masked_work(plan, steps) <= 0.15
    # What every client running the round's longest count costs (the demo's 12 / 7 / 4
    # steps: 36 step-units for 23 useful).
    assert masked_work([Segment(0, 12, (0, 1, 2), 3)], [12, 7, 4]) == 13 / 23
    assert sharding.group_widths(6, 1) == (6, 4, 2, 1)
    assert sharding.group_widths(8, 4) == (8, 4)


def test_baseline_plans():
    sites = {"BIDMC": 30, "HK": 20, "UCL": 50}
    fed = plan_clients(sites)
    assert fed.names == ("BIDMC", "HK", "UCL") and fed.num_samples == (30, 20, 50)
    central = plan_clients(sites, "centralised")
    assert central.names == ("BIDMC+HK+UCL",) and central.num_samples == (100,)
    loso = plan_clients(sites, "federated", held_out=["HK"])
    assert loso.names == ("BIDMC", "UCL") and loso.unseen_sites == ("HK",)
    assert plan_clients(sites, "centralised", held_out=["HK"]).num_samples == (80,)
    assert plan_clients(sites, "local").sites == (("BIDMC",), ("HK",), ("UCL",))
    with pytest.raises(ValueError, match="'RUNMC'"):
        plan_clients(sites, held_out=["RUNMC"])


def test_communication_counts_trainable_leaves_at_their_dtype():
    trainable = {"a": jnp.zeros((10, 4), jnp.float32), "b": jnp.zeros((6,), jnp.bfloat16)}
    from fedfms_jax.fed.partition import num_bytes
    size = num_bytes(trainable)
    assert size == 10 * 4 * 4 + 6 * 2
    taking_part = np.array([True, False, True])
    comm = round_comm(taking_part, size)
    np.testing.assert_array_equal(comm.up, [size, 0, size])
    np.testing.assert_array_equal(comm.down, [size, 0, size])
    assert comm.total == 4 * size
    assert round_comm(taking_part, size, communicates=False).total == 0
    ledger = CommLedger.empty(3)
    ledger.add(comm)
    ledger.add(round_comm(np.array([True, True, True]), size))
    assert ledger.up == [2 * size, size, 2 * size] and ledger.rounds == 2
    assert CommLedger.from_json(ledger.to_json()) == ledger
