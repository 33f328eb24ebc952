"""Named arrays packed for the wire: exact round trips whatever the dtypes and shapes, few
Flower objects per message, and errors that name the message and the fault."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedfms_jax.flower import wire


def named_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"b.kernel": rng.standard_normal((3, 4)).astype(np.float32),
            "a.bias": rng.standard_normal(4).astype(np.float32),
            "step": np.array(7, np.int32),            # 0-d stays 0-d
            "empty": np.zeros((0, 5), np.float32),
            "half": rng.standard_normal((2, 2)).astype(np.float16),
            "counts": np.arange(6, dtype=np.int32).reshape(2, 3)}


def test_round_trip_keeps_order_values_dtypes_and_shapes():
    named = named_arrays()
    records = wire.pack(named)
    assert list(records[wire.ARRAYS].keys()) == ["float32", "int32", "float16"]
    back = wire.unpack(RecordDict(records))
    assert list(back) == list(named)
    for name, value in named.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value)


def test_a_message_has_few_objects_whatever_the_number_of_arrays():
    named = {f"layer{i}.kernel": np.full((4, 4), i, np.float32) for i in range(200)}
    content = RecordDict({**wire.pack(named), "config": ConfigRecord({"x": 1})})
    # RecordDict, 2 ConfigRecords, ArrayRecord, Array, ArrayChunk (and the Message): flwr
    # moves each object with a request per hop; one Array per name made 400-odd.
    assert len(get_all_nested_objects(content)) == 6


def test_byte_counts_are_the_records_flower_sends():
    named = named_arrays()
    records = wire.pack(named)
    assert wire.message_bytes(records) == (records[wire.ARRAYS].count_bytes()
                                           + records[wire.LAYOUT].count_bytes())
    assert wire.payload_bytes(named) == sum(v.nbytes for v in named.values())
    assert wire.message_bytes(RecordDict(records)) == wire.message_bytes(records)


def content_with(layout=None, flat=None) -> RecordDict:
    records = wire.pack(named_arrays())
    if flat is not None:
        records[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in flat.items()})
    if layout is not None:
        records[wire.LAYOUT] = ConfigRecord({"layout": layout})
    return RecordDict(records)


GOOD_FLAT = wire.pack_flat(named_arrays())
GOOD_LAYOUT = json.loads(wire.layout_of(named_arrays()))


@pytest.mark.parametrize("content, match", [
    (RecordDict({"config": ConfigRecord({})}), "carries no packed arrays"),
    (content_with(layout="[not json"), "the array layout does not parse"),
    (content_with(layout=json.dumps([["a", "float32", [-1]]])), "does not parse"),
    (content_with(layout=json.dumps([["a", "no-such-dtype", [2]]])), "does not parse"),
    (content_with(layout=json.dumps(GOOD_LAYOUT + [GOOD_LAYOUT[0]])),
     r"names \['b.kernel'\] more than once"),
    (content_with(layout=json.dumps(GOOD_LAYOUT + [["extra", "float32", [9]]])),
     "float32 array has 16 values, too few for the layout .* by extra"),
    (content_with(layout=json.dumps(GOOD_LAYOUT[1:])),
     "packed float32 array has 16 values, the layout names 4"),
    (content_with(layout=json.dumps(GOOD_LAYOUT + [["x", "float64", [1]]])),
     "x is float64, but the message has no packed float64 array"),
    (content_with(flat={**GOOD_FLAT, "int32": GOOD_FLAT["int32"].reshape(7, 1)}),
     r"packed int32 array has shape \(7, 1\), not 1-D"),
])
def test_bad_packing_names_the_message_and_the_fault(content, match):
    with pytest.raises(wire.WireError, match=match) as error:
        wire.unpack(content, "the reply of site 2")
    assert str(error.value).startswith("the reply of site 2")
