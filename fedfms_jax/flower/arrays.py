"""Trainable weights <-> named arrays, checked name by name against the model.

A state's arrays are named by the flat paths of the weights files
('mask_decoder.output_upscaling.0.kernel') and keep their dtype, so a message can be read
without the model and checked name by name; on the wire they travel packed (wire.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from fedfms_jax.flower.wire import WireError
from fedfms_jax.weights_file import flat_arrays


class ArrayRecordMismatch(WireError):
    """Named arrays whose names, shapes or dtypes do not fit the expected state."""


def state_to_arrays(state: dict) -> dict[str, np.ndarray]:
    """Trainable weights -> {flat path: numpy array} (host copies, original dtype)."""
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in flat_arrays(state).items()}


def check_arrays(arrays: Mapping[str, np.ndarray], like: dict, source: str) -> None:
    """Raises ArrayRecordMismatch listing every missing, unexpected, mis-shaped and
    mis-typed name of `arrays` against the weights `like`."""
    expected = flat_arrays(like)
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


def from_arrays(arrays: Mapping[str, np.ndarray], like: dict,
                source: str = "message") -> dict:
    """{flat path: array} -> weights shaped like `like` (which is left unchanged)."""
    check_arrays(arrays, like, source)
    names = list(flat_arrays(like))
    return jax.tree.unflatten(jax.tree.structure(like),
                              [jax.numpy.asarray(arrays[name]) for name in names])


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
        values.append(jax.device_put(value))
    return jax.tree_util.tree_unflatten(treedef, values)
