"""The engine end to end on the tiny SAM: five clients of different sizes, one local epoch
each per round, against an independent plain-optax reference trained one client at a time.

One module fixture trains the standard federation once; every test reuses its compiled
local-steps function (the settings and options below differ only in what is not compiled
into it), so the module compiles the model's training step twice: engine and reference.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.fed.checkpoint import FedCheckpointer
from fedfms_jax.fed.clients import masked_work
from fedfms_jax.fed.comm import CommLedger
from fedfms_jax.fed.round import Federation
from tests.fed import helpers
from tests.fed.helpers import (NUM_CLIENTS, NUM_SAMPLES, PRODUCTION_EPS, ROUNDS, RTOL_NOISE_FED_BACK,
                               RTOL_ORDER, STEPS, adam_noise_bound, assert_training_matches,
                               assert_trees_close, assert_trees_equal, client_slice, config,
                               engine_state, flat, host_state, reference_train, round_batches,
                               round_mask, snapshot, tiny_model)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run():
    """The standard federation trained ROUNDS rounds; snapshots after every round."""
    model = tiny_model()
    fed = Federation(model, config(), NUM_CLIENTS)
    state = fed.init()
    initial = host_state(fed, state)
    frozen_before = snapshot(fed.frozen)
    states, results = [], []
    for r in range(ROUNDS):
        state, result = fed.run_round(state, round_batches(r), round_mask(), NUM_SAMPLES)
        states.append(host_state(fed, state))
        results.append(result)
    return types.SimpleNamespace(model=model, fed=fed, initial=initial, states=states,
                                 results=results, frozen_before=frozen_before)


def _reference_round(fed, start, round_index, *, mu=0.0, eps=helpers.EPS,
                     clients=range(NUM_CLIENTS)):
    """Each client trained alone for its steps from start's global weights and its own
    optimizer state: {k: (params, opt_state)}."""
    data = round_batches(round_index)
    out = {}
    for k in clients:
        out[k] = reference_train(fed.graphdef, fed.frozen, start.global_params,
                                 client_slice(start.client_opt_state, k),
                                 client_slice(data, k), STEPS[k], mu=mu, eps=eps)
    return out


def _weighted_mean(clients, weights):
    return jax.tree.map(lambda *xs: sum(w * x.astype(np.float64) for w, x in zip(weights, xs)),
                        *clients)


def test_vmapped_clients_equal_sequential_runs(run):
    """Every round: client k under jit(vmap) == client k trained alone, weights and Adam
    state, starting from the previous round's global weights and k's carried Adam state."""
    starts = [run.initial] + run.states[:-1]
    for r, (start, after) in enumerate(zip(starts, run.states)):
        reference = _reference_round(run.fed, start, r)
        for k, (params, opt_state) in reference.items():
            assert_training_matches(client_slice(after.client_params, k), params,
                                    start.global_params, rtol=RTOL_ORDER,
                                    noise_bound=adam_noise_bound(STEPS[k]))
            assert_training_matches(client_slice(after.client_opt_state, k), opt_state,
                                    client_slice(start.client_opt_state, k), rtol=RTOL_ORDER)


def test_masked_steps_change_nothing(run):
    # Adam's step count is the number of real steps: the masked ones left it alone.
    counts = np.asarray(run.states[-1].client_opt_state[0].count)
    np.testing.assert_array_equal(counts, np.array(STEPS) * ROUNDS)
    fed = run.fed
    state = fed.begin_round(engine_state(fed, run.states[-1]))
    before = host_state(fed, state)
    state, losses = fed.local_steps(state, round_batches(9),
                                    np.zeros((NUM_CLIENTS, helpers.ROUND_STEPS), bool))
    assert np.isnan(losses).all()
    after = host_state(fed, state)
    assert_trees_equal(after.client_params, before.client_params)
    assert_trees_equal(after.client_opt_state, before.client_opt_state)


def test_planned_round_trains_as_every_client_masked_to_the_longest(run):
    """A round trains in the calls of `Federation.plan` (only the clients still training,
    no masked step: [3, 1, 2, 2, 3] steps are 5 + 4 + 2 client-steps, not 5 x 3); the same
    round with every client stepping through the longest count, masked (the engine before
    the plans), gives the same clients to float32 rounding (the vmap widths differ) and
    bit-identical Adam step counts."""
    fed = run.fed
    plan = fed.plan(STEPS, 16)
    assert [(g.first_step, g.length, g.clients) for g in plan] == [
        (0, 1, (0, 1, 2, 3, 4)), (1, 1, (0, 2, 3, 4)), (2, 1, (0, 4))]
    assert masked_work(plan, STEPS) == 0.0
    state = fed.begin_round(fed.init())
    state, losses = fed.local_steps(state, round_batches(0), round_mask())
    state, _ = fed.finish_local(state)
    state, result = fed.end_round(state, NUM_SAMPLES, losses=losses)
    state = host_state(fed, state)
    np.testing.assert_array_equal(result.steps, run.results[0].steps)
    np.testing.assert_allclose(result.mean_loss, run.results[0].mean_loss, rtol=1e-5)
    for k in range(NUM_CLIENTS):
        assert_training_matches(client_slice(state.client_params, k),
                                client_slice(run.states[0].client_params, k),
                                run.initial.global_params, rtol=RTOL_ORDER,
                                noise_bound=adam_noise_bound(STEPS[k]))
        assert_training_matches(client_slice(state.client_opt_state, k),
                                client_slice(run.states[0].client_opt_state, k),
                                client_slice(run.initial.client_opt_state, k), rtol=RTOL_ORDER)


def test_one_client_at_a_time_trains_each_client_in_one_call_of_one_program(run):
    """One client at a time (the CPU's layout for a real model): each client's [3, 1, 2, 2,
    3] steps are one call, every call of the one compiled program (the step count is an
    argument; the batches are padded to the longest call, the padding never computed), and
    the clients train as in the standard run, whose vmap width differs (float32 rounding)."""
    fed = Federation(run.model, config(clients_per_step=1), NUM_CLIENTS)
    plan = fed.plan(STEPS, 16)
    assert [(g.first_step, g.length, g.clients) for g in plan] == [
        (0, steps, (k,)) for k, steps in enumerate(STEPS)]
    state, result = fed.run_round(fed.init(), round_batches(0), round_mask(), NUM_SAMPLES)
    assert fed._local_steps._cache_size() == 1
    np.testing.assert_array_equal(result.steps, STEPS)
    np.testing.assert_allclose(result.mean_loss, run.results[0].mean_loss, rtol=1e-5)
    state = host_state(fed, state)
    counts = np.asarray(state.client_opt_state[0].count)
    np.testing.assert_array_equal(counts, STEPS)  # no padding step was taken
    for k in range(NUM_CLIENTS):
        assert_training_matches(client_slice(state.client_params, k),
                                client_slice(run.states[0].client_params, k),
                                run.initial.global_params, rtol=RTOL_ORDER,
                                noise_bound=adam_noise_bound(STEPS[k]))


def test_global_weights_are_the_fedavg_of_the_clients(run):
    weights = np.array(NUM_SAMPLES, np.float64) / sum(NUM_SAMPLES)
    for state, result in zip(run.states, run.results):
        np.testing.assert_allclose(result.weights, weights, rtol=1e-6)
        clients = [client_slice(state.client_params, k) for k in range(NUM_CLIENTS)]
        assert_trees_close(state.global_params, _weighted_mean(clients, weights))
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(run.states[-1].global_params),
                                                 jax.tree.leaves(run.initial.global_params))]
    assert max(moved) > 1e-3   # training did something


def test_frozen_weights_never_change(run):
    assert_trees_equal(snapshot(run.fed.frozen), run.frozen_before)
    # The global model differs from the initial one only in the trainable subtree.
    trainable = set(flat(run.initial.global_params))
    start, end = flat(nnx.state(run.model)), flat(nnx.state(run.fed.global_model(
        engine_state(run.fed, run.states[-1]))))
    assert start.keys() == end.keys()
    changed = {k for k in start if not np.array_equal(start[k], end[k])}
    assert changed and changed <= trainable
    assert not any("image_encoder" in k or "prompt_encoder" in k for k in trainable)


def test_losses_and_communication_are_reported(run):
    first, last = run.results[0], run.results[-1]
    np.testing.assert_array_equal(first.steps, STEPS)
    assert np.isfinite(first.mean_loss).all()
    assert last.mean_loss.mean() < first.mean_loss.mean()
    size = run.fed.trainable_bytes
    assert size == sum(x.size * 4 for x in jax.tree.leaves(run.initial.global_params))
    ledger = CommLedger.empty(NUM_CLIENTS)
    for result in run.results:
        np.testing.assert_array_equal(result.comm.up, size)
        np.testing.assert_array_equal(result.comm.down, size)
        ledger.add(result.comm)
    assert ledger.total == 2 * ROUNDS * NUM_CLIENTS * size


def test_fedprox(run):
    """mu = 0 is FedAvg; mu > 0 matches the reference's proximal gradient and keeps the
    clients nearer the global weights."""
    start = run.states[0]
    plain = run.states[1]
    for mu in (0.0, 20.0):
        fed = Federation(run.model, config(prox_mu=mu), NUM_CLIENTS)
        state, _ = fed.run_round(engine_state(fed, start), round_batches(1), round_mask(),
                                 NUM_SAMPLES)
        state = host_state(fed, state)
        if mu == 0.0:
            assert_trees_equal(state, plain)
            continue
        reference = _reference_round(run.fed, start, 1, mu=mu, clients=[0, 4])
        for k, (params, _) in reference.items():
            # The pull mu (w - w_global) feeds the shift-invariant leaves' rounding noise
            # back into the others: RTOL_NOISE_FED_BACK, not RTOL_ORDER.
            assert_training_matches(client_slice(state.client_params, k), params,
                                    start.global_params, rtol=RTOL_NOISE_FED_BACK,
                                    noise_bound=adam_noise_bound(STEPS[k]))

        def drift(s):
            return sum(float(np.sum((np.asarray(c)[0] - g) ** 2)) for c, g in
                       zip(jax.tree.leaves(s.client_params), jax.tree.leaves(start.global_params)))
        assert drift(state) < 0.9 * drift(plain)


@pytest.mark.slow  # a third compile of the training step (~1.5 min); resume at 1e-8 is default
def test_equivalences_hold_at_the_production_adam_eps(run):
    """FedFMS's Adam eps 1e-8: vmap = the sequential reference and FedProx = its proximal
    gradient, one round from the standard run's first state. At this eps Adam turns the
    shift-invariant leaves' rounding noise into steps of up to ~3 lr in arbitrary
    directions, so those leaves are only bounded by Adam's step bound; every other leaf
    must still follow the reference to RTOL_NOISE_FED_BACK of its movement."""
    start, mu = run.states[0], 20.0  # FedProx: plain FedAvg is the mu=0 case of the same code
    fed = Federation(run.model, config(eps=PRODUCTION_EPS, prox_mu=mu), NUM_CLIENTS)
    state, _ = fed.run_round(engine_state(fed, start), round_batches(1), round_mask(),
                             NUM_SAMPLES)
    state = host_state(fed, state)
    reference = _reference_round(run.fed, start, 1, mu=mu, eps=PRODUCTION_EPS, clients=[0, 4])
    for k, (params, _) in reference.items():
        assert_training_matches(client_slice(state.client_params, k), params,
                                start.global_params, rtol=RTOL_NOISE_FED_BACK,
                                noise_bound=adam_noise_bound(STEPS[k]))



def test_non_finite_client_is_left_out_with_a_warning(run, caplog):
    fed = run.fed
    data = round_batches(0)
    data["image"][1, 0] = np.nan
    with caplog.at_level(logging.WARNING, logger="fedfms_jax.fed.round"):
        state, result = fed.run_round(fed.init(), data, round_mask(), NUM_SAMPLES)
    assert "client1 sent a non-finite update" in caplog.text
    state = host_state(fed, state)
    np.testing.assert_array_equal(result.included, [True, False, True, True, True])
    kept = [k for k in range(NUM_CLIENTS) if k != 1]
    weights = np.array([NUM_SAMPLES[k] for k in kept], np.float64)
    weights /= weights.sum()
    np.testing.assert_allclose(result.weights[kept], weights, rtol=1e-6)
    assert result.weights[1] == 0
    clients = [client_slice(state.client_params, k) for k in kept]
    assert_trees_close(state.global_params, _weighted_mean(clients, weights))
    # The others trained exactly as in the clean run; the bad client's Adam state restarts.
    for k in kept:
        assert_trees_equal(client_slice(state.client_params, k),
                           client_slice(run.states[0].client_params, k))
    assert int(np.asarray(state.client_opt_state[0].count)[1]) == 0


def test_client_sampling_trains_only_the_drawn_clients(run):
    fed = Federation(run.model, config(client_fraction=0.4, seed=3), NUM_CLIENTS)
    drawn = fed.participants(0)
    assert drawn.sum() == 2
    state, result = fed.run_round(fed.init(), round_batches(0), round_mask(), NUM_SAMPLES)
    np.testing.assert_array_equal(result.participating, drawn)
    np.testing.assert_array_equal(result.steps, np.where(drawn, STEPS, 0))
    np.testing.assert_array_equal(result.comm.up > 0, drawn)
    n = np.where(drawn, NUM_SAMPLES, 0).astype(np.float64)
    np.testing.assert_allclose(result.weights, n / n.sum(), rtol=1e-6)
    state = host_state(fed, state)
    for k in np.flatnonzero(drawn):
        # A drawn client trains as in the full round, but vmapped with only the drawn ones:
        # XLA's CPU matmuls block their sums by the operands' sizes, so the width changes
        # the float32 rounding, not the steps.
        assert_training_matches(client_slice(state.client_params, k),
                                client_slice(run.states[0].client_params, k),
                                run.initial.global_params, rtol=RTOL_ORDER,
                                noise_bound=adam_noise_bound(STEPS[k]))
    for k in np.flatnonzero(~drawn):  # the others hold the round's starting weights
        assert_trees_equal(client_slice(state.client_params, k), run.initial.global_params)


def test_local_only_baseline_keeps_each_clients_weights(run):
    fed = Federation(run.model, config(setting="local"), NUM_CLIENTS)
    state, results = helpers.run_federation(fed, rounds=2)
    state = host_state(fed, state)
    assert_trees_equal(state.global_params, run.initial.global_params)
    assert all(r.comm.total == 0 for r in results)
    for k in (0, 3):  # client k trained alone for two rounds, never averaged
        params, opt_state = run.initial.global_params, None
        for r in range(2):
            params, opt_state = reference_train(fed.graphdef, fed.frozen, params, opt_state,
                                                client_slice(round_batches(r), k), STEPS[k])
        assert_training_matches(client_slice(state.client_params, k), params,
                                run.initial.global_params, rtol=RTOL_ORDER,
                                noise_bound=adam_noise_bound(2 * STEPS[k]))


def test_one_client_federation_is_centralised_training(run):
    """A federation of one client and centralised training on its data (both settings) are
    the plain training loop: FedAvg over one client is the identity."""
    results = {}
    for setting in ("federated", "centralised"):
        fed = Federation(run.model, config(setting=setting), 1)
        state = fed.init()
        for r in range(2):
            state, _ = fed.run_round(state, round_batches(r, num_clients=1), round_mask(1),
                                     NUM_SAMPLES[:1])
        results[setting] = snapshot(state.global_params)
    params, opt_state = run.initial.global_params, None
    for r in range(2):
        params, opt_state = reference_train(run.fed.graphdef, run.fed.frozen, params, opt_state,
                                            client_slice(round_batches(r, num_clients=1), 0),
                                            STEPS[0])
    assert_trees_equal(results["federated"], results["centralised"])
    assert_training_matches(results["federated"], params, run.initial.global_params,
                            rtol=RTOL_ORDER, noise_bound=adam_noise_bound(2 * STEPS[0]))


def test_resume_after_a_round_is_bit_identical(run, tmp_path):
    fed = Federation(run.model, config(), NUM_CLIENTS)
    state, results = helpers.run_federation(fed, rounds=1)
    ledger = CommLedger.empty(NUM_CLIENTS)
    ledger.add(results[0].comm)
    saver = FedCheckpointer(tmp_path / "ckpt", fed)
    saver.save(state, data_state={"next_round": 1, "iterators": [{"pos": 3}]}, ledger=ledger,
               wait=True)
    saver.close()
    del state, fed  # a new process would start here

    fed = Federation(tiny_model(), config(), NUM_CLIENTS)  # rebuilt, as a new process would
    restored = FedCheckpointer(tmp_path / "ckpt", fed).restore(fed.init())
    assert restored.round == 1 and int(restored.state.round) == 1
    assert restored.data_state == {"next_round": 1, "iterators": [{"pos": 3}]}
    assert restored.ledger == ledger
    state, _ = helpers.run_federation(fed, rounds=ROUNDS - 1, state=restored.state,
                                      first_round=1)
    assert_trees_equal(host_state(fed, state), run.states[-1])


def test_four_devices_equal_one_device(run, tmp_path):
    """The same federation on 4 forced CPU devices, 4 clients per step (so 5 clients are
    padded to 8 and trained in 2 chunks) matches one device to float32 rounding."""
    out = tmp_path / "four.npz"
    # Appended, so a portability run's --xla_cpu_max_isa applies here too.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.fed.helpers", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as f:
        info = json.loads(str(f["info"]))
        arrays = {k: f[k] for k in f.files if k != "info"}
    assert info["devices"] == 4 and info["client_devices"] == 4
    assert info["num_padded"] == 8 and info["chunk"] == 4
    assert "clients" in info["client_spec"] and info["frozen_replicated"]
    one = run.states[1]
    noise = adam_noise_bound(2 * max(STEPS))
    four_global = {k: arrays[f"global.{k}"] for k in flat(one.global_params)}
    assert_training_matches(four_global, flat(one.global_params), flat(run.initial.global_params),
                            rtol=RTOL_ORDER, noise_bound=noise)
    for c in range(NUM_CLIENTS):
        four_client = {k: arrays[f"clients.{k}"][c] for k in flat(one.client_params)}
        assert_training_matches(four_client, flat(client_slice(one.client_params, c)),
                                flat(run.initial.global_params), rtol=RTOL_ORDER,
                                noise_bound=noise)


def test_compiled_functions_are_keyed_by_what_they_are_built_from(run):
    """The jitted local steps are shared by configs whose local training is the same, and
    rebuilt when any field of it changes (the cache key is the frozen LocalTraining, the
    only thing the function sees); the round edges likewise follow the server optimizer."""
    same = Federation(run.model, config(prox_mu=1.0, client_fraction=0.4, seed=3,
                                        server_optimizer="fedadam"), NUM_CLIENTS)
    assert same._local_steps is run.fed._local_steps
    assert same._end_round is not run.fed._end_round
    for change in ({"pos_weight": 3.0}, {"eps": 1e-8}, {"b2": 0.99}, {"learning_rate": 2e-3}):
        other = Federation(run.model, config(**change), NUM_CLIENTS)
        assert other._local_steps is not run.fed._local_steps, change
    assert Federation(run.model, config(server_optimizer="fedadam", server_lr=0.01),
                      NUM_CLIENTS)._end_round is not same._end_round
