"""Named arrays on the wire: one flat array per dtype and the layout that names them.

flwr 1.42 moves every Array of a message as separate objects (the Array and its chunks),
each one HTTP request per hop -- ServerApp -> SuperLink -> SuperNode -> ClientApp and back
-- with at most min(2, cores) requests in flight. A state of 136 named arrays (the tiny
FedMSA model) was 270-odd requests per hop, seconds a round on a loaded machine. So the
named arrays of a state travel packed:

    content["arrays"]         ArrayRecord {dtype name: 1-D array of every value of that dtype}
    content["arrays-layout"]  ConfigRecord {"layout": JSON [[name, dtype, [dims...]], ...]}

about half a dozen objects per message whatever the model. The layout lists the arrays in
order; each one's values are the next prod(dims) values of its dtype's flat array. Unpacking
checks that the two agree (every flat array used exactly, no name twice) and returns
{name: array}, which arrays.check_arrays then checks name by name against the model. This
module imports only numpy and flwr: the ClientApp adapter uses it and must not pay for JAX.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ARRAYS = "arrays"
LAYOUT = "arrays-layout"
_LAYOUT_FIELD = "layout"


class WireError(ValueError):
    """Packed arrays whose layout is missing, malformed or disagrees with the arrays."""


def layout_of(named: Mapping[str, np.ndarray]) -> str:
    """The layout (JSON) of `named`, in its order."""
    return json.dumps([[name, np.dtype(v.dtype).name, [int(d) for d in np.shape(v)]]
                       for name, v in named.items()], separators=(",", ":"))


def pack_flat(named: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: array} -> {dtype name: 1-D array of their values in order}."""
    by_dtype: dict[str, list[np.ndarray]] = {}
    for value in named.values():
        value = np.asarray(value)
        by_dtype.setdefault(value.dtype.name, []).append(value.reshape(-1))
    return {dtype: np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
            for dtype, parts in by_dtype.items()}


def unpack_flat(flat: Mapping[str, np.ndarray], layout: str,
                source: str = "message") -> dict[str, np.ndarray]:
    """{dtype name: 1-D array} and their layout -> {name: array} (views of `flat`).
    WireError naming `source` and the fault when the two do not fit."""
    try:
        entries = json.loads(layout)
        if not isinstance(entries, list):
            raise TypeError("not a list")
        parsed = []
        for entry in entries:
            name, dtype, dims = entry
            if not isinstance(name, str) or not isinstance(dims, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
                raise TypeError(f"bad entry {entry!r}")
            parsed.append((name, np.dtype(dtype).name, tuple(dims)))
    except (ValueError, TypeError) as error:
        raise WireError(f"{source}: the array layout does not parse ({error}); expected "
                        "JSON [[name, dtype, [dims...]], ...]") from None
    counts = Counter(name for name, _, _ in parsed)
    twice = sorted(n for n, count in counts.items() if count > 1)
    if twice:
        raise WireError(f"{source}: the array layout names {twice[:5]} more than once")
    offsets = {dtype: 0 for dtype in flat}
    out = {}
    for name, dtype, dims in parsed:
        if dtype not in flat:
            raise WireError(f"{source}: {name} is {dtype}, but the message has no packed "
                            f"{dtype} array (it has {sorted(flat) or 'none'})")
        size = int(np.prod(dims, dtype=np.int64))
        start = offsets[dtype]
        values = flat[dtype]
        if start + size > values.size:
            raise WireError(f"{source}: the packed {dtype} array has {values.size} values, "
                            f"too few for the layout (which needs more by {name})")
        out[name] = values[start:start + size].reshape(dims)
        offsets[dtype] = start + size
    for dtype, values in flat.items():
        if np.ndim(values) != 1:
            raise WireError(f"{source}: the packed {dtype} array has shape "
                            f"{tuple(np.shape(values))}, not 1-D")
        if offsets[dtype] != values.size:
            raise WireError(f"{source}: the packed {dtype} array has {values.size} values, "
                            f"the layout names {offsets[dtype]}")
    return out


def pack(named: Mapping[str, np.ndarray]) -> dict[str, ArrayRecord | ConfigRecord]:
    """{name: array} -> the records of a message's content ({ARRAYS: ..., LAYOUT: ...})."""
    return {ARRAYS: ArrayRecord({dtype: Array(values)
                                 for dtype, values in pack_flat(named).items()}),
            LAYOUT: ConfigRecord({_LAYOUT_FIELD: layout_of(named)})}


def unpack(content: RecordDict, source: str = "message") -> dict[str, np.ndarray]:
    """A message's content -> {name: array}; WireError naming `source` when the packed
    arrays or their layout are missing or do not fit together."""
    if ARRAYS not in content.array_records or LAYOUT not in content.config_records:
        raise WireError(f"{source} carries no packed arrays (records {ARRAYS!r} and "
                        f"{LAYOUT!r}; it has {sorted(content.keys())})")
    layout = content.config_records[LAYOUT].get(_LAYOUT_FIELD)
    if not isinstance(layout, str):
        raise WireError(f"{source}: {LAYOUT!r} has no string {_LAYOUT_FIELD!r}")
    flat = {dtype: array.numpy() for dtype, array in content.array_records[ARRAYS].items()}
    return unpack_flat(flat, layout, source)


def message_bytes(records: Mapping[str, ArrayRecord | ConfigRecord]) -> int:
    """Bytes of the packed arrays and their layout as Flower serialises them."""
    return sum(records[key].count_bytes() for key in (ARRAYS, LAYOUT) if key in records)


def payload_bytes(named: Mapping[str, np.ndarray]) -> int:
    """Bytes of the array values alone (size x itemsize), the engine's accounting."""
    return sum(int(np.prod(np.shape(v), dtype=np.int64)) * np.dtype(v.dtype).itemsize
               for v in named.values())
