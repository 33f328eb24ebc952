"""Rematerialised encoder blocks (Sam.set_remat): the same gradients, less memory for the
backward at the resolution SAM runs at."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.fed.partition import split
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models import Sam, get_config
from tests.fast_build import FAST_COMPILE
from tests.fed.helpers import flat, shift_invariant
from tests.numerics import EPS32, relative_error, scale

# The recomputed forward may be fused differently: float32 rounding, grown where a gradient
# is a small difference of large terms (measured <= 1.6e-5 of a leaf's scale, tiny variant).
RTOL = 1e-4


def grad_function(model: Sam, mode: str):
    """jit(grad) of FedFMS's loss over the mode's trainable subtree, with the trainable and
    frozen states: grad(trainable, frozen, images, targets)."""
    graphdef, trainable, frozen = split(model, mode)

    def loss(params, frozen, images, targets):
        return weighted_bce(nnx.merge(graphdef, params, frozen).segment(images), targets, 2.0)
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE), trainable, frozen


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_remat_keeps_the_gradients(mode):
    config = get_config("tiny", adapter="msa" if mode == "fedmsa" else "none")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 128, 128, 3)).astype(np.float32)
    targets = (rng.uniform(size=(2, 32, 32, 1)) < 0.3).astype(np.float32)
    grads = {}
    for remat in ("off", "blocks", "full"):
        model = Sam(config, rngs=nnx.Rngs(0))
        model.set_remat(remat)
        grad, trainable, frozen = grad_function(model, mode)
        grads[remat] = flat(grad(trainable, frozen, images, targets))
    largest = max(scale(g) for g in grads["off"].values())
    for remat in ("blocks", "full"):
        for name, reference in grads["off"].items():
            ours = grads[remat][name]
            if shift_invariant(name):  # zero in exact arithmetic: rounding noise either way
                assert np.max(np.abs(ours - reference)) <= 16 * EPS32 * largest, (remat, name)
            else:
                assert relative_error(ours, reference) <= RTOL, (remat, name)


def test_remat_shrinks_the_backward_at_1024_pixels():
    """Compiled (not run): the small variant at SAM's 1024 px, FedMSA, one image. Measured
    temp 1816 MB off, 963 MB blocks, 926 MB full (ViT-B: 14.0 GB, 5.7 GB, 4.2 GB)."""
    config = get_config("small", adapter="msa", image_size=1024)
    images = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
    temp = {}
    for remat in ("off", "full"):
        model = nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0)))
        model.set_remat(remat)
        grad, trainable, frozen = grad_function(model, "fedmsa")
        compiled = grad.lower(trainable, frozen, images, targets).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.6 * temp["off"], temp


def test_unknown_remat_mode_names_the_valid_ones():
    model = Sam(get_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown remat mode 'some'; expected one of off, "
                                         "blocks, full"):
        model.set_remat("some")
