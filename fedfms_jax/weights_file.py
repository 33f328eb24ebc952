"""fedfms_jax weights files: safetensors with flat Flax paths as keys and the model's
`SamConfig` in the metadata, so a file rebuilds its model with no other argument, and the
`Preprocessing` it was trained with (or official SAM's, for converted checkpoints), so it
is applied as it was trained.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from fedfms_jax.data.preprocessing import Preprocessing
from fedfms_jax.models import Sam, SamConfig, abstract_sam

FORMAT = "fedfms_jax.sam"


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit its model."""


def flat_path(path: tuple) -> str:
    """('image_encoder', 'blocks', 0, 'attn', 'qkv', 'kernel') -> 'image_encoder.blocks.0.attn.qkv.kernel'."""
    return ".".join(str(part) for part in path)


def flat_arrays(tree) -> dict[str, Any]:
    """Weights as nested dicts (`partition.split`'s pieces, their gradients) or an nnx.State
    -> {flat path: leaf}, in pytree leaf order."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {flat_path(tuple(key.key for key in path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_state(model: nnx.Module) -> dict[str, jax.Array]:
    """Every variable of the model (parameters and buffers) under its flat path."""
    return {flat_path(path): variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model))}


def shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of every variable of the model (abstract or not)."""
    return {key: tuple(value.shape) for key, value in flat_state(model).items()}


def expected_shapes(config: SamConfig) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of every variable of a model with this config, without allocating it."""
    return shapes(abstract_sam(config))


def check_shapes(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                 source: str) -> None:
    """Raises WeightsError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
                       for k in set(tensors) & set(expected)
                       if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title}: " + "\n    ".join([""] + shown))
        raise WeightsError("\n".join(lines))


def check_preprocessing(preprocessing: Preprocessing, config: SamConfig, source: str) -> None:
    """Raises WeightsError when the preprocessing does not fit the model's input and outputs."""
    expected = {"image_size": config.image_size, "low_res_size": config.low_res_size,
                "num_classes": config.num_classes}
    wrong = [f"{k}={getattr(preprocessing, k)} but the model has {v}"
             for k, v in expected.items() if getattr(preprocessing, k) != v]
    if wrong:
        raise WeightsError(f"{source}: preprocessing does not fit the model: " + "; ".join(wrong))


def save_weights(path: str | os.PathLike, tensors: dict[str, np.ndarray], config: SamConfig,
                 extra_metadata: dict[str, str] | None = None,
                 preprocessing: Preprocessing | None = None) -> None:
    """Writes tensors (flat Flax paths), the config and the preprocessing; atomic, so an
    existing file at `path` is never left half-written."""
    check_shapes(tensors, expected_shapes(config), "weights to save")
    metadata = {"format": FORMAT, "variant": config.variant, "config": config.to_json(),
                **(extra_metadata or {})}
    if preprocessing is not None:
        check_preprocessing(preprocessing, config, "weights to save")
        metadata["preprocessing"] = preprocessing.to_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the weights from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metadata(path: str | os.PathLike, *, tensors: bool = False
                  ) -> tuple[dict[str, str], dict[str, np.ndarray] | None]:
    """(metadata, tensors or None) of a fedfms_jax weights file; WeightsError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        arrays = load_file(str(path)) if tensors else None
    except (SafetensorError, OSError, ValueError) as error:
        hint = (" (a PyTorch checkpoint? convert it first: python weights/convert.py SRC.pth "
                "DST.safetensors)" if path.suffix in {".pth", ".pt", ".bin"} else "")
        raise WeightsError(f"{path} is not a readable safetensors file{hint}: {error}") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise WeightsError(f"{path} has no fedfms_jax model metadata (format={metadata.get('format')!r});"
                           " write it with weights/convert.py or fedfms_jax.weights_file.save_weights")
    return metadata, arrays


def read_weights(path: str | os.PathLike) -> tuple[SamConfig, dict[str, np.ndarray]]:
    """The config and tensors of a fedfms_jax weights file, with clear errors for anything else."""
    metadata, tensors = read_metadata(path, tensors=True)
    try:
        config = SamConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{path}: bad model config in metadata: {error}") from None
    return config, tensors


def load_sam(path: str | os.PathLike, **config_overrides) -> Sam:
    """Builds the SAM stored in a weights file; config_overrides (e.g. dtype='bfloat16')
    change settings that do not affect shapes."""
    config, tensors = read_weights(path)
    return sam_from_tensors(config.replace(**config_overrides), tensors, str(path))


def sam_from_tensors(config: SamConfig, tensors: dict[str, np.ndarray], source: str) -> Sam:
    """The SAM of `config` holding `tensors` (flat Flax paths, shapes checked; the error
    names `source`). jax.device_put, not jnp.asarray: the latter compiles one small XLA
    program per distinct shape (ViT-B: 35 of them, 1.2 s and ~60 MB of resident memory)."""
    abstract = abstract_sam(config)  # traced once: for the check and for the variables
    check_shapes(tensors, shapes(abstract), source)
    graphdef, state = nnx.split(abstract)
    for key_path, variable in nnx.to_flat_state(state):
        variable.set_value(jax.device_put(tensors[flat_path(key_path)]))
    return nnx.merge(graphdef, state)


def read_preprocessing(path: str | os.PathLike) -> Preprocessing:
    """The preprocessing a weights file records; WeightsError naming the file when it has
    none (weights written before fedfms_jax recorded it) or it does not fit the model."""
    metadata, _ = read_metadata(path)
    if "preprocessing" not in metadata:
        raise WeightsError(
            f"{path} records no preprocessing (how images became model input), so it cannot "
            "be applied as it was trained; retrain or re-save it with fedfms_jax, or re-convert "
            "an official checkpoint with weights/convert.py")
    try:
        preprocessing = Preprocessing.from_json(metadata["preprocessing"])
        config = SamConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{path}: bad metadata: {error}") from None
    check_preprocessing(preprocessing, config, str(path))
    return preprocessing


def load_trained(path: str | os.PathLike, **config_overrides) -> tuple[Sam, Preprocessing]:
    """`load_sam` and the preprocessing the model was trained with (`read_preprocessing`)."""
    preprocessing = read_preprocessing(path)
    return load_sam(path, **config_overrides), preprocessing
