"""fedfms_jax: federated fine-tuning of Segment Anything (FedSAM / FedMSA) in JAX/Flax."""

__all__ = ["load_sam", "load_trained"]


def __getattr__(name: str):
    # Lazy, so that importing a light submodule (the Flower ClientApp, which Flower starts
    # afresh for every message) does not import JAX.
    if name in __all__:
        from fedfms_jax import weights_file

        return getattr(weights_file, name)
    raise AttributeError(f"module 'fedfms_jax' has no attribute {name!r}")
