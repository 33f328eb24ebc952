"""What a training mode trains: one function splits a SAM into graphdef / trainable / frozen.

    fedsam   image encoder + mask decoder (FedSAM: full fine-tuning)
    fedmsa   Medical SAM Adapters + mask decoder (FedMSA)
    fedlora  LoRA on the encoder's qkv + mask decoder
    decoder  mask decoder only

The multi-class head (when the model has one) is trained in every mode. Frozen weights are
never in optimizer state and never communicated; the prompt encoder's Gaussian matrix is a
Buffer, not a Param, so no filter can make it trainable.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models.adapters import AdapterParam, LoRAParam
from fedfms_jax.models.variants import SamConfig

MODES = ("fedsam", "fedmsa", "fedlora", "decoder")

# LoRA rank a fedlora model gets when its config asks for none (as SAMed).
DEFAULT_LORA_RANK = 4

_HEADS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("mask_decoder"),
                                    nnx.PathContains("class_head")))

_FILTERS = {
    # FedSAM: the whole image encoder and mask decoder (the prompt encoder stays frozen).
    "fedsam": nnx.Any(nnx.All(nnx.Param, nnx.PathContains("image_encoder")), _HEADS),
    "fedmsa": nnx.Any(AdapterParam, _HEADS),
    "fedlora": nnx.Any(LoRAParam, _HEADS),
    "decoder": _HEADS,
}

# The parameter type a mode cannot do without: a model lacking it was built for another mode.
_REQUIRED = {"fedmsa": (AdapterParam, "adapter='msa'"), "fedlora": (LoRAParam, "lora_rank > 0")}


def _check_mode(mode: str) -> None:
    if mode not in _FILTERS:
        raise ValueError(f"unknown training mode {mode!r}; known: {', '.join(MODES)}")


def trainable_filter(mode: str):
    """The NNX filter selecting the trainable variables of a mode."""
    _check_mode(mode)
    return _FILTERS[mode]


def config_for_mode(config: SamConfig, mode: str) -> SamConfig:
    """The model config a mode needs: fedmsa adds the Medical SAM Adapter and fedlora adds
    LoRA (rank DEFAULT_LORA_RANK) when `config` has none; other settings are kept."""
    _check_mode(mode)
    if mode == "fedmsa" and config.adapter == "none":
        return config.replace(adapter="msa")
    if mode == "fedlora" and config.lora_rank == 0:
        return config.replace(lora_rank=DEFAULT_LORA_RANK)
    return config


def split(model: nnx.Module, mode: str) -> tuple[nnx.GraphDef, dict, dict]:
    """model -> (graphdef, trainable, frozen) for a mode; merge with nnx.merge(graphdef,
    trainable, frozen). Works on abstract models (nnx.eval_shape) too.

    trainable and frozen are nested dicts of arrays ({'mask_decoder': {...: {'kernel':
    f32[...]}}}, nnx.to_pure_dict), not nnx.States: the engine passes them through every
    jitted call, and a State's Variable leaves cost ~4 us each to rebuild on the host (about
    10 ms per call for a decoder-mode FedState, as much as a cached decoder step)."""
    _check_mode(mode)
    graphdef, trainable, frozen = nnx.split(model, _FILTERS[mode], ...)
    if mode in _REQUIRED:
        kind, setting = _REQUIRED[mode]
        if not jax.tree.leaves(nnx.state(model, kind)):
            raise ValueError(f"mode {mode!r} trains {kind.__name__}s but the model has none; "
                             f"build it with {setting} (see config_for_mode)")
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """The trainable weights as one vector: every leaf of the nested dict, in tree order
    (jax.tree.leaves), raveled and concatenated.

    The engine keeps each client's weights and optimizer moments in this form (leaves
    [K, N]), so that what a client does to all its weights (Adam, FedProx's drift, the
    masked-step select, gathering a client's row, the finite check, the average) is a few
    operations on one array instead of one per leaf: XLA's programs are that much smaller,
    and on the CPU every program holds host memory in proportion to its size. The order is
    the tree order, so a vector cut at `sizes` is the leaves, and a draw of N values is the
    same draw cut into leaves (aggregate.gaussian_noise). Hashable: it keys compiled code.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtype: np.dtype

    @classmethod
    def of(cls, tree) -> "FlatLayout":
        """The layout of a tree of arrays (or ShapeDtypeStructs) of one floating dtype."""
        leaves, treedef = jax.tree.flatten(tree)
        dtypes = {np.dtype(x.dtype) for x in leaves}
        if len(dtypes) != 1:
            raise ValueError(f"the trainable weights must share one dtype to travel as one "
                             f"vector; got {sorted(map(str, dtypes))}")
        return cls(treedef, tuple(tuple(np.shape(x)) for x in leaves), dtypes.pop())

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def size(self) -> int:
        """N, the number of trainable values."""
        return sum(self.sizes)

    def ravel(self, tree, batch_dims: int = 0):
        """tree (leaves [*lead, *shape], lead = the first batch_dims axes) -> [*lead, N].
        numpy in, numpy out (host copies for checkpoints and sites); jax arrays otherwise."""
        leaves = self.treedef.flatten_up_to(tree)
        lead = np.shape(leaves[0])[:batch_dims]
        xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
        return xp.concatenate([xp.reshape(x, (*lead, -1)) for x in leaves], axis=-1)

    def unravel(self, vector):
        """[*lead, N] -> the tree, leaves [*lead, *shape] (numpy views of a numpy vector)."""
        lead = np.shape(vector)[:-1]
        if np.shape(vector)[-1] != self.size:
            raise ValueError(f"a trainable vector has {self.size} values, got shape "
                             f"{np.shape(vector)}")
        starts = np.cumsum((0, *self.sizes))
        leaves = [vector[..., a:b].reshape(*lead, *shape)
                  for a, b, shape in zip(starts[:-1], starts[1:], self.shapes)]
        return self.treedef.unflatten(leaves)

    def ravel_state(self, state, batch_dims: int = 0):
        """An optimizer state of the tree (e.g. optax Adam's count, mu, nu) -> the same
        optimizer's state of the vector: every subtree shaped as the weights raveled."""
        is_weights = lambda x: jax.tree.structure(x) == self.treedef
        return jax.tree.map(lambda x: self.ravel(x, batch_dims) if is_weights(x) else x,
                            state, is_leaf=is_weights)

    def unravel_state(self, state):
        """`ravel_state`'s inverse: every floating leaf of N trailing values unraveled."""
        def unravel(x):
            floating = np.issubdtype(np.dtype(x.dtype), np.floating)
            return self.unravel(x) if floating and np.shape(x)[-1:] == (self.size,) else x
        return jax.tree.map(unravel, state)


def num_params(state) -> int:
    """Number of scalar values in a state (a pytree of arrays)."""
    return sum(x.size for x in jax.tree.leaves(state))


def num_bytes(state, itemsize: int | None = None) -> int:
    """Bytes to send a state, at its own dtype or at `itemsize` bytes per value."""
    return sum(x.size * (itemsize or x.dtype.itemsize) for x in jax.tree.leaves(state))


_LAYER_LEAVES = ("kernel", "bias", "scale", "embedding")


def module_name(path: tuple) -> str:
    """A variable's path -> the module it is counted under in `breakdown`: encoder blocks are
    merged ('image_encoder.blocks.*.attn'), LoRA and adapters kept apart, other modules are
    named to their second level ('mask_decoder.transformer')."""
    parts = [str(p) for p in path]
    if parts[:2] == ["image_encoder", "blocks"]:
        sub = parts[3:-1]
        depth = 2 if sub[:2] == ["attn", "qkv_lora"] else 1
        return ".".join(["image_encoder", "blocks", "*"] + sub[:depth])
    if len(parts) == 2 and parts[1] in _LAYER_LEAVES:  # a top-level layer: class_head
        return parts[0]
    return ".".join(parts[:2])  # a module, or a variable held directly (pos_embed)


def breakdown(model: nnx.Module, mode: str) -> list[tuple[str, int, int]]:
    """(module, parameters, trainable parameters) per module, in model order. Buffers are
    not parameters and are left out."""
    _, trainable, _ = split(model, mode)
    trainable_paths = set(nnx.traversals.flatten_mapping(trainable))
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        row = totals[module_name(path)]
        size = variable.get_value().size
        row[0] += size
        row[1] += size if path in trainable_paths else 0
    return [(name, total, train) for name, (total, train) in totals.items()]
