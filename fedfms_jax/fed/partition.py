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

import jax
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
