"""Trainable weights <-> Flower ArrayRecords of named arrays.

On the wire a state is an ArrayRecord whose keys are the flat paths of the weights files
('mask_decoder.output_upscaling.0.kernel'), so a message can be read without the model and
checked name by name. Arrays keep their dtype; bytes are what Flower serialises (numpy .npy
payloads plus key names), which is what `message_bytes` reports.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from flwr.app import Array, ArrayRecord

from fedfms_jax.weights_file import flat_path


class ArrayRecordMismatch(ValueError):
    """An ArrayRecord whose names, shapes or dtypes do not fit the expected state."""


def _array(value) -> Array:
    # order="C", not np.ascontiguousarray, which turns 0-d arrays (step counts) into 1-d.
    return Array(np.asarray(value, order="C"))


def state_to_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """nnx.State -> {flat path: numpy array} (host copies, original dtype)."""
    return {flat_path(path): np.asarray(jax.device_get(variable.get_value()))
            for path, variable in nnx.to_flat_state(state)}


def to_arrayrecord(state: nnx.State) -> ArrayRecord:
    """nnx.State -> ArrayRecord keyed by flat paths."""
    return ArrayRecord({name: _array(value) for name, value in state_to_arrays(state).items()})


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {name: numpy array}."""
    return {name: array.numpy() for name, array in record.items()}


def check_arrays(arrays: Mapping[str, np.ndarray], like: nnx.State, source: str) -> None:
    """Raises ArrayRecordMismatch listing every missing, unexpected, mis-shaped and
    mis-typed name of `arrays` against the state `like`."""
    expected = {flat_path(path): variable.get_value()
                for path, variable in nnx.to_flat_state(like)}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    common = sorted(set(arrays) & set(expected))
    misshaped = [f"{k}: got {tuple(arrays[k].shape)}, expected {tuple(expected[k].shape)}"
                 for k in common if tuple(arrays[k].shape) != tuple(expected[k].shape)]
    mistyped = [f"{k}: got {arrays[k].dtype}, expected {np.dtype(expected[k].dtype)}"
                for k in common if np.dtype(arrays[k].dtype) != np.dtype(expected[k].dtype)]
    problems = [(title, items) for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
        ("mis-typed", mistyped)) if items]
    if problems:
        lines = [f"{source} does not fit the trainable weights of this model and mode:"]
        for title, items in problems:
            shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
            lines.append(f"  {len(items)} {title}: " + "\n    ".join([""] + shown))
        raise ArrayRecordMismatch("\n".join(lines))


def from_arrays(arrays: Mapping[str, np.ndarray], like: nnx.State,
                source: str = "message") -> nnx.State:
    """{flat path: array} -> a state shaped like `like` (which is left unchanged)."""
    check_arrays(arrays, like, source)
    flat = nnx.to_flat_state(like)
    values = [jax.numpy.asarray(arrays[flat_path(path)]) for path, _ in flat]
    leaves_like = [variable for _, variable in flat]
    new_flat = [(path, variable.replace(value))
                for (path, _), variable, value in zip(flat, leaves_like, values)]
    return nnx.from_flat_state(new_flat)


def from_arrayrecord(record: ArrayRecord, like: nnx.State,
                     source: str = "message") -> nnx.State:
    """ArrayRecord -> a state shaped like `like`, checked name by name."""
    return from_arrays(arrays_of(record), like, source)


def tree_to_arrays(tree) -> dict[str, np.ndarray]:
    """Any pytree of arrays (an optimizer state) -> {tree path: numpy array}. For state a
    site keeps between rounds (its worker's saved state); it never leaves the site."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf), order="C")
            for path, leaf in leaves}


def tree_from_arrays(named: Mapping[str, np.ndarray], like):
    """Inverse of tree_to_arrays, onto the structure of `like`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    if set(names) != set(named):
        missing = sorted(set(names) - set(named))[:5]
        unexpected = sorted(set(named) - set(names))[:5]
        raise ArrayRecordMismatch(f"saved state does not fit: missing {missing}, "
                                  f"unexpected {unexpected}")
    values = []
    for name, (_, leaf) in zip(names, leaves):
        value = np.asarray(named[name])
        if value.shape != np.shape(leaf):
            raise ArrayRecordMismatch(f"saved state {name}: shape {value.shape}, expected "
                                      f"{np.shape(leaf)}")
        values.append(jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, values)


def message_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord as Flower serialises it (payloads and key names)."""
    return record.count_bytes()


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the array values alone (size x itemsize), the engine's accounting."""
    total = 0
    for array in record.values():
        total += int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return total
