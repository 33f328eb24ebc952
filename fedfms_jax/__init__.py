"""fedfms_jax: federated fine-tuning of Segment Anything (FedSAM / FedMSA) in JAX/Flax."""

from fedfms_jax.weights_file import load_sam, load_trained

__all__ = ["load_sam", "load_trained"]
