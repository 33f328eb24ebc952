"""Data layer: sites of 2-D segmentation records, read from disk or generated, and grain
pipelines that turn them into SAM batches.

    sites = load_sites("synthetic")                      # or "fedfms" | "folders" | "volumes", root
    pipeline = make_pipeline(sites["site1"].train, image_size=1024, batch_size=4, seed=0)
    for batch in pipeline: ...                           # batch["image"]: f32[B,1024,1024,3]
"""

import importlib

# Names are imported on first use: grain alone takes seconds to import, and the command
# line (python -m fedfms_jax.data inspect) does not need it.
_EXPORTS = {
    "make_dataset": "pipeline", "make_pipeline": "pipeline", "SAM_PIXEL_MEAN": "pipeline",
    "SAM_PIXEL_STD": "pipeline",
    "box_from_mask": "prompts", "points_from_mask": "prompts",
    "component_prompts": "prompts",
    "LAYOUTS": "readers", "load_sites": "readers",
    "Volume": "volumes", "read_volume": "volumes", "write_label_volume": "volumes",
    "BadInput": "records", "DataError": "records", "Record": "records", "Site": "records",
    "VolumeInfo": "records",
    "steps_per_epoch": "records",
    "summarise_sites": "summary",
    "make_synthetic_sites": "synthetic", "write_sites": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
