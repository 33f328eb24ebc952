"""What a training mode trains: one function splits a SAM into graphdef / trainable / frozen.

Frozen weights are never in optimizer state and never communicated; the prompt encoder's
Gaussian matrix is a Buffer, not a Param, so no filter can make it trainable.
"""

from __future__ import annotations

import jax
from flax import nnx

MODES = ("fedsam", "decoder")

_FILTERS = {
    # FedSAM: the whole image encoder and mask decoder (the prompt encoder stays frozen).
    "fedsam": nnx.All(nnx.Param, nnx.Any(nnx.PathContains("image_encoder"),
                                         nnx.PathContains("mask_decoder"))),
    "decoder": nnx.All(nnx.Param, nnx.PathContains("mask_decoder")),
}


def trainable_filter(mode: str):
    """The NNX filter selecting the trainable variables of a mode."""
    if mode not in _FILTERS:
        raise ValueError(f"unknown training mode {mode!r}; known: {', '.join(_FILTERS)}")
    return _FILTERS[mode]


def split(model: nnx.Module, mode: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """model -> (graphdef, trainable, frozen) for a mode; merge with nnx.merge(graphdef,
    trainable, frozen)."""
    return nnx.split(model, trainable_filter(mode), ...)


def num_params(state: nnx.State) -> int:
    """Number of scalar values in a state."""
    return sum(x.size for x in jax.tree.leaves(state))


def num_bytes(state: nnx.State, itemsize: int | None = None) -> int:
    """Bytes to send a state, at its own dtype or at `itemsize` bytes per value."""
    return sum(x.size * (itemsize or x.dtype.itemsize) for x in jax.tree.leaves(state))
