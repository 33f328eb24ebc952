"""Tolerances that travel to other CPUs, BLAS builds and XLA flag settings.

A bare absolute tolerance on values of arbitrary size passes or fails with the machine's
float32 accumulation order. These helpers measure errors relative to the output's scale and
take the bound from the computation itself:

- Framework parity: the PyTorch reference runs twice, in float32 and in float64. The float64
  output is the truth; the float32 one shows how much rounding noise this very computation
  has on this very machine. Our float32 output must be as close to the truth as PyTorch's own
  float32 output is, up to a small factor (the two libraries block and order their sums
  differently, so their rounding is not identical, but it is of one size). A port error (a
  wrong eps, a missing term, a transposed weight) is orders of magnitude above that noise.
- Two runs of our own engine that are equal in exact arithmetic (vmap vs a loop, FedProx
  mu=0 vs FedAvg, one device vs four) differ by float32 rounding grown through training;
  `assert_trees_close` compares each leaf relative to its own scale.
"""

from __future__ import annotations

import contextlib
import copy

import jax
import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)
# Ours may round differently from PyTorch, not worse by more than this factor. Measured with
# correct code: at most 3x (native, AVX2 and SSE4.2 code generation); the tanh-approximate
# GELU in place of the exact one (a classic port error) gives 5-15x in the encoder blocks
# and ~350x in the decoder's logits.
NOISE_FACTOR = 8.0
# Below this (relative to the output's scale) differences are the rounding of the output
# itself: a stage whose PyTorch float32 noise happens to be ~0 still gets this much room.
FLOOR = 16 * EPS32


def scale(x) -> float:
    """The output's scale: its largest magnitude (1 for an all-zero output)."""
    value = float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
    return value if value > 0 else 1.0


def relative_error(ours, reference) -> float:
    """max |ours - reference| over the reference's scale."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} vs reference {reference.shape}"
    return float(np.max(np.abs(ours - reference), initial=0.0)) / scale(reference)


def assert_matches_reference(ours, reference32, reference64, stage: str) -> float:
    """ours (float32) against the float64 reference, within NOISE_FACTOR x the float32
    reference's own error (and at least FLOOR), all relative to the output's scale.

    Returns our relative error.
    """
    ours, reference32, reference64 = (np.asarray(a) for a in (ours, reference32, reference64))
    assert ours.shape == reference64.shape, \
        f"{stage}: shape {ours.shape} vs official {reference64.shape}"
    error = relative_error(ours, reference64)
    noise = relative_error(reference32, reference64)
    bound = max(NOISE_FACTOR * noise, FLOOR)
    assert error <= bound, (
        f"{stage}: relative error {error:.3g} against the float64 reference exceeds "
        f"{bound:.3g} ({NOISE_FACTOR:g} x PyTorch float32's own {noise:.3g}, floor {FLOOR:.2g})")
    print(f"{stage}: relative error {error:.2g} (PyTorch float32 {noise:.2g}, bound {bound:.2g})")
    return error


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a PyTorch module: the exact-arithmetic stand-in.

    SAM's PositionEmbeddingRandom casts point coordinates to float32 before its float32
    Gaussian matrix (`coords.to(torch.float)`); in the copy they follow the matrix's dtype.
    """
    module64 = copy.deepcopy(module).double()
    for sub in module64.modules():
        if hasattr(sub, "positional_encoding_gaussian_matrix"):
            encode = sub._pe_encoding
            sub._pe_encoding = lambda coords, encode=encode, sub=sub: encode(
                coords.to(sub.positional_encoding_gaussian_matrix.dtype))
    return module64


def to_float64(value):
    """Tensors (also inside tuples, lists and dicts) converted to float64; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def pinned_matmul_precision():
    """Full float32 matmuls in both frameworks while comparing them: on GPUs and TPUs the
    defaults are TF32 / bfloat16 passes, which would compare precisions, not ports."""
    torch_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.set_float32_matmul_precision(torch_precision)


def tree_relative_errors(actual: dict, expected: dict) -> dict[str, float]:
    """Per-leaf relative error of two flat {name: array} trees with the same names."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    return {k: relative_error(actual[k], expected[k]) for k in expected}
