"""Checkpoints: refusing another run's checkpoint, and surviving a failed save (no training,
so nothing is compiled; resume equality is in test_round.py)."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fedfms_jax.fed import checkpoint
from fedfms_jax.fed.checkpoint import CheckpointMismatch, FedCheckpointer
from fedfms_jax.fed.partition import trainable_filter
from fedfms_jax.fed.round import Federation
from tests.fed.helpers import assert_trees_equal, config, snapshot, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _nudged(state, value: float):
    """A state whose global and client weights are all shifted by value (so rounds differ)."""
    shift = lambda x: x + value
    return state.replace(round=state.round + int(value),
                         global_params=jax.tree.map(shift, state.global_params),
                         client_params=jax.tree.map(shift, state.client_params))


def _real(state, k: int):
    cut = lambda x: x[:k]
    return state.replace(client_params=jax.tree.map(cut, state.client_params),
                         client_opt_state=jax.tree.map(cut, state.client_opt_state))


def test_round_trip_on_a_padded_layout(model, tmp_path):
    """3 clients trained 2 at a time are padded to 4 slots; the checkpoint holds 3."""
    fed = Federation(model, config(clients_per_step=2), 3)
    assert fed.num_padded == 4
    state = _nudged(fed.init(), 2.0)
    expected = snapshot(state)
    saver = FedCheckpointer(tmp_path, fed)
    saver.save(state, wait=True)
    meta = saver.read_meta()
    leaf = next(k for k in meta["arrays"] if k.startswith("client_params."))
    assert meta["arrays"][leaf][0][0] == 3 and meta["round"] == 2
    restored = snapshot(FedCheckpointer(tmp_path, fed).restore(fed.init()).state)
    assert_trees_equal(_real(restored, 3), _real(expected, 3))
    # The padding slot comes back empty, whatever it held.
    assert all((x[3] == 0).all() for x in jax.tree.leaves(restored.client_params))
    restored = FedCheckpointer(tmp_path, fed).restore(fed.init())
    assert restored.ledger is None and restored.data_state == {}


def test_a_format_1_checkpoint_resumes(model, tmp_path, monkeypatch):
    """Format 1 saved the weights as nnx.States (names and frozen paths ending in '.value');
    a run saved by it restores into today's state, value for value."""
    fed = Federation(model, config(clients_per_step=2), 3)
    state = _nudged(fed.init(), 1.0)
    _, trainable_like, frozen_like = nnx.split(model, trainable_filter(fed.config.mode), ...)

    def as_state(pure):
        state = jax.tree.map(lambda v: v, trainable_like)  # a copy, filled in place
        nnx.replace_by_pure_dict(state, pure)
        return state

    moments = lambda o: o._replace(mu=as_state(o.mu), nu=as_state(o.nu))
    trees = fed.client_trees(state)
    old = trees.replace(global_params=as_state(trees.global_params),
                        client_params=as_state(trees.client_params),
                        client_opt_state=(moments(trees.client_opt_state[0]),
                                          *trees.client_opt_state[1:]))
    saver = FedCheckpointer(tmp_path, fed)
    monkeypatch.setattr(checkpoint, "FORMAT", "fedfms_jax.fed/1")
    # Format 1 was written from a state whose clients' fields were trees, as `old`'s are.
    monkeypatch.setattr(fed, "client_trees", lambda s, copy=True: s)
    monkeypatch.setattr(saver, "frozen_sha256",
                        lambda suffix="": checkpoint.frozen_fingerprint(frozen_like))
    saver.save(old, wait=True)
    monkeypatch.undo()
    meta = saver.read_meta()
    assert meta["format"] == "fedfms_jax.fed/1"
    assert "global_params.mask_decoder.iou_token.embedding.value" in meta["arrays"]
    assert "client_opt_state.0.mu.mask_decoder.iou_token.embedding.value" in meta["arrays"]
    restored = FedCheckpointer(tmp_path, fed).restore(fed.init()).state
    assert_trees_equal(_real(snapshot(restored), 3), _real(snapshot(state), 3))

    reseeded = Federation(tiny_model(seed=1), config(clients_per_step=2), 3)
    with pytest.raises(CheckpointMismatch, match="frozen weights"):
        FedCheckpointer(tmp_path, reseeded).restore(reseeded.init())


def test_checkpoint_of_another_mode_or_model_is_refused(model, tmp_path):
    fed = Federation(model, config(), 3)
    FedCheckpointer(tmp_path, fed).save(fed.init(), wait=True)

    fedsam = Federation(model, config(mode="fedsam"), 3)
    with pytest.raises(CheckpointMismatch) as info:
        FedCheckpointer(tmp_path, fedsam).restore(fedsam.init())
    message = str(info.value)
    assert "mode: checkpoint 'decoder', this run 'fedsam'" in message
    assert "missing from the checkpoint" in message and "image_encoder" in message

    two_class = tiny_model(num_classes=2)
    other = Federation(two_class, config(), 3)
    with pytest.raises(CheckpointMismatch, match=r"model_config\.num_classes: checkpoint 1, "
                                                 r"this run 2"):
        FedCheckpointer(tmp_path, other).restore(other.init())

    reseeded = Federation(tiny_model(seed=1), config(), 3)  # same shapes, other base weights
    with pytest.raises(CheckpointMismatch, match="frozen weights"):
        FedCheckpointer(tmp_path, reseeded).restore(reseeded.init())
    FedCheckpointer(tmp_path, reseeded).restore(reseeded.init(), check_frozen=False)

    fewer = Federation(model, config(), 2)
    with pytest.raises(CheckpointMismatch, match="num_clients: checkpoint 3, this run 2"):
        FedCheckpointer(tmp_path, fewer).restore(fewer.init())

    with pytest.raises(FileNotFoundError, match="rounds saved: \\[0\\]"):
        FedCheckpointer(tmp_path, fed).restore(fed.init(), round_index=7)


def test_failed_save_leaves_the_previous_checkpoint_intact(model, tmp_path, monkeypatch):
    fed = Federation(model, config(), 3)
    state = _nudged(fed.init(), 1.0)
    first = snapshot(state)
    saver = FedCheckpointer(tmp_path, fed)
    saver.save(state, data_state={"epoch": 1}, wait=True)

    # Round 2's save dies after the arrays are written, while the JSON is being written.
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device (simulated)")
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", disk_full)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
    with pytest.raises(OSError, match="simulated"):
        saver.save(_nudged(fed.init(), 2.0), data_state={"epoch": 2}, wait=True)
    monkeypatch.undo()
    # A process killed mid-save leaves an unfinished temporary step behind.
    leftover = tmp_path / "3.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "garbage").write_bytes(b"\0" * 64)

    reader = FedCheckpointer(tmp_path, fed)
    assert reader.all_rounds() == [1]
    restored = reader.restore(fed.init())
    assert restored.round == 1 and restored.data_state == {"epoch": 1}
    assert_trees_equal(snapshot(restored.state), first)
    np.testing.assert_array_equal(np.asarray(restored.state.round), 1)
