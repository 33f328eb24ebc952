"""Trainable state <-> named arrays <-> a message's packed records: names, exact values,
dtypes, byte counts, and errors that name the culprit."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from flwr.app import RecordDict

from fedfms_jax.fed.partition import split
from fedfms_jax.flower import arrays, wire
from fedfms_jax.models import Sam, get_config
from fedfms_jax.weights_file import flat_path


@pytest.fixture(scope="module")
def trainable():
    abstract = nnx.eval_shape(lambda: Sam(get_config("tiny"), rngs=nnx.Rngs(0)))
    _, state, _ = split(abstract, "decoder")
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), state)


def test_round_trip_is_exact_and_named_by_flat_paths(trainable):
    records = wire.pack(arrays.state_to_arrays(trainable))
    # One packed array for the whole state: a handful of Flower objects per message.
    assert list(records[wire.ARRAYS].keys()) == ["float32"]
    names = {flat_path(path) for path in nnx.traversals.flatten_mapping(trainable)}
    unpacked = wire.unpack(RecordDict(records))
    assert set(unpacked) == names and len(unpacked) == len(jax.tree.leaves(trainable))
    assert all(name.startswith("mask_decoder.") for name in names)
    back = arrays.from_arrays(unpacked, trainable)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(b).dtype == np.asarray(a).dtype


def test_byte_counts(trainable):
    named = arrays.state_to_arrays(trainable)
    records = wire.pack(named)
    payload = sum(np.asarray(x).nbytes for x in jax.tree.leaves(trainable))
    assert wire.payload_bytes(named) == payload
    # On top of the payload: one .npy header (about 128 bytes) and the layout, which names
    # every array with its dtype and shape (about 20 bytes more than the name).
    overhead = wire.message_bytes(records) - payload
    assert sum(len(k) for k in named) < overhead < 200 + sum(len(k) + 40 for k in named)


def test_mismatch_names_every_culprit(trainable):
    good = arrays.state_to_arrays(trainable)
    names = sorted(good)
    bad = dict(good)
    del bad[names[0]]
    bad["image_encoder.neck.0.kernel"] = np.zeros(3, np.float32)
    bad[names[1]] = np.zeros((7, 7), np.float32)
    bad[names[2]] = good[names[2]].astype(np.float16)
    with pytest.raises(arrays.ArrayRecordMismatch) as error:
        arrays.from_arrays(bad, trainable, source="reply of site 3")
    message = str(error.value)
    assert message.startswith("reply of site 3 does not fit")
    for expected in (f"1 missing", names[0], "1 unexpected", "image_encoder.neck.0.kernel",
                     "1 mis-shaped", f"{names[1]}: got (7, 7)", "1 mis-typed",
                     f"{names[2]}: got float16, expected float32"):
        assert expected in message


def test_optimizer_state_round_trip(trainable):
    opt_state = optax.adam(1e-3).init(trainable)
    opt_state = jax.tree.map(lambda x: x + 1, opt_state)
    named = arrays.tree_to_arrays(opt_state)
    assert named["[0].count"].shape == ()  # 0-d leaves stay 0-d
    back = arrays.tree_from_arrays(named, opt_state)
    assert jax.tree.structure(back) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wrong = {**named, "[0].count": np.zeros(2, np.int32)}
    with pytest.raises(arrays.ArrayRecordMismatch, match=r"\[0\]\.count: shape \(2,\)"):
        arrays.tree_from_arrays(wrong, opt_state)
    with pytest.raises(arrays.ArrayRecordMismatch, match=r"missing \['\[0\]\.count'\]"):
        arrays.tree_from_arrays({k: v for k, v in named.items() if k != "[0].count"},
                                opt_state)
