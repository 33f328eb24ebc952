"""Gradients of FedFMS's training loss against the official PyTorch model's, and the
hand-written backward of `common.dense` against autodiff's.

The forward is compared stage by stage in test_parity; training also needs the backward
right. The model's linear layers use their own backward (`common.dense`), so the whole
gradient is checked against PyTorch's autograd: our float32 gradient must be as close to the
float64 one as PyTorch's float32 gradient is, up to NOISE_FACTOR (tests/numerics.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bench import torch_reference as ref
from bench.workloads import Env, build_models, to_torch
from fedfms_jax.fed.partition import split
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models import get_config
from fedfms_jax.models.common import dense
from fedfms_jax.weights_file import flat_arrays
from fedfms_jax_reference.sam import state_dict_numpy
from tests.fed.helpers import shift_invariant
from tests.numerics import (EPS32, NOISE_FACTOR, assert_matches_reference, float64_copy,
                            pinned_matmul_precision, relative_error, scale)
from weights.convert import torch_to_flax


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 5)])
def test_dense_backward_is_autodiffs(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(shape[-1], 7)), jnp.float32)
    gradient = jnp.asarray(rng.normal(size=(*shape[:-1], 7)), jnp.float32)
    ours_out, ours_vjp = jax.vjp(dense, x, kernel)
    plain_out, plain_vjp = jax.vjp(lambda a, b: a @ b, x, kernel)
    np.testing.assert_array_equal(ours_out, plain_out)
    for ours, plain, name in zip(ours_vjp(gradient), plain_vjp(gradient), ("x", "kernel")):
        assert ours.shape == plain.shape and ours.dtype == plain.dtype, name
        # The same sums, possibly accumulated in another order.
        assert relative_error(ours, plain) <= 16 * EPS32, name


def torch_gradients(model: torch.nn.Module, variant: str, mode: str, images: np.ndarray,
                    targets: np.ndarray) -> dict[str, np.ndarray]:
    """FedFMS's loss gradients of the official model, as Flax-named tensors."""
    ref.set_trainable(model, mode)
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x, y = to_torch(images, Env()).to(dtype), to_torch(targets, Env()).to(dtype)
    ref.loss_fn().to(dtype)(ref.segment(model, x), y).backward()
    # Converted as a state_dict is (the conversion only transposes and renames), with the
    # frozen tensors' places taken by zeros.
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
             .to(torch.float64).numpy() for name, p in model.named_parameters()}
    buffers = {k: v for k, v in state_dict_numpy(model).items() if k not in grads}
    tensors, _ = torch_to_flax({**buffers, **grads}, variant, report=lambda *_: None)
    return tensors


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_loss_gradients_match_pytorch(mode):
    config = get_config("tiny", adapter="msa" if mode == "fedmsa" else "none")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, config.image_size, config.image_size, 3)).astype(np.float32)
    targets = (rng.uniform(size=(2, config.low_res_size, config.low_res_size, 1)) < 0.3
               ).astype(np.float32)
    model32, sam = build_models(config, Env())
    model64 = float64_copy(model32)
    graphdef, trainable, frozen = split(sam, mode)

    def loss(params):
        model = nnx.merge(graphdef, params, frozen)
        return weighted_bce(model.segment(jnp.asarray(images)), jnp.asarray(targets),
                            ref.POS_WEIGHT)

    with pinned_matmul_precision():
        grads = jax.jit(jax.grad(loss))(trainable)
        ours = {path: np.asarray(v) for path, v in flat_arrays(grads).items()}
        reference32 = torch_gradients(model32, config.variant, mode, images, targets)
        reference64 = torch_gradients(model64, config.variant, mode, images, targets)
    assert ours, "no trainable parameters"
    largest = max(scale(reference64[name]) for name in ours)
    for name, gradient in ours.items():
        if shift_invariant(name):  # zero in exact arithmetic: rounding noise either way
            bound = NOISE_FACTOR * 16 * EPS32 * largest
            assert np.max(np.abs(gradient - reference64[name])) <= bound, name
        else:
            assert_matches_reference(gradient, reference32[name], reference64[name], name)
