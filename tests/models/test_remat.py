"""Rematerialised encoder blocks (Sam.set_remat): the same gradients, less memory for the
backward at the resolution SAM runs at; with blocks or full, global attention over query
chunks (image_encoder.QUERY_CHUNK) as well."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.fed.partition import split
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models import Sam, get_config
from fedfms_jax.models import image_encoder
from fedfms_jax.models.image_encoder import query_chunk_rows
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
    assert_same_gradients(grads, "off")


def assert_same_gradients(grads: dict[str, dict], reference: str) -> None:
    """Every run's gradients against grads[reference], leaf by leaf: relative to the leaf
    (RTOL), or, where the gradient is zero in exact arithmetic, to the largest gradient."""
    largest = max(scale(g) for g in grads[reference].values())
    for run, ours in grads.items():
        for name, expected in grads[reference].items():
            if shift_invariant(name):  # zero in exact arithmetic: rounding noise either way
                assert np.max(np.abs(ours[name] - expected)) <= 16 * EPS32 * largest, (run, name)
            else:
                assert relative_error(ours[name], expected) <= RTOL, (run, name)


def test_chunked_global_attention_keeps_the_gradients(monkeypatch):
    """The tiny variant's global block (8 x 8 tokens) over query chunks of 2 grid rows (4
    chunks) against one pass, both under remat=full, and against remat=off."""
    config = get_config("tiny")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 128, 128, 3)).astype(np.float32)
    targets = (rng.uniform(size=(2, 32, 32, 1)) < 0.3).astype(np.float32)
    grads = {}
    for name, chunk, remat in (("off", 16, "off"), ("one pass", 0, "full"),
                               ("chunked", 16, "full")):
        monkeypatch.setattr(image_encoder, "QUERY_CHUNK", chunk)
        model = Sam(config, rngs=nnx.Rngs(0))
        # The random init leaves the relative positions at zero; give them values (the same
        # in every model) that a wrong chunk slice of their table would change.
        tables = np.random.default_rng(2)
        for block in model.image_encoder.blocks:
            for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                table[...] = tables.normal(size=table.shape).astype(np.float32) * 0.5
        model.set_remat(remat)
        chunks = [block.attn.query_chunk for block in model.image_encoder.blocks]
        assert chunks == ([0, 16] if name == "chunked" else [0, 0]), (name, chunks)
        grad, trainable, frozen = grad_function(model, "fedsam")
        grads[name] = flat(grad(trainable, frozen, images, targets))
    assert_same_gradients(grads, "off")


def test_query_chunks_take_whole_grid_rows():
    assert query_chunk_rows(64, 64, 1024) == 16      # ViT-B at 1024: 4 chunks
    assert query_chunk_rows(64, 64, 0) == 64         # off: one pass
    assert query_chunk_rows(16, 16, 1024) == 16      # fits in one chunk
    assert query_chunk_rows(6, 8, 20) == 2           # the most rows that divide 6
    assert query_chunk_rows(7, 8, 20) == 1           # 7 is prime
    assert query_chunk_rows(4, 2000, 1024) == 1      # one row is over the chunk: one row


def test_remat_shrinks_the_backward_at_1024_pixels(monkeypatch):
    """Compiled (not run): the small variant at SAM's 1024 px, FedMSA, one image. Measured
    temp 1816 MB off, 963 MB blocks, 926 MB full with the global attention in one pass,
    375 MB full over query chunks (ViT-B FedSAM, blocks: see the README)."""
    config = get_config("small", adapter="msa", image_size=1024)
    images = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
    temp = {}
    for name, remat, chunk in (("off", "off", 0), ("full, one pass", "full", 0),
                               ("full", "full", image_encoder.QUERY_CHUNK)):
        monkeypatch.setattr(image_encoder, "QUERY_CHUNK", chunk)
        model = nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0)))
        model.set_remat(remat)
        grad, trainable, frozen = grad_function(model, "fedmsa")
        compiled = grad.lower(trainable, frozen, images, targets).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full, one pass"] < 0.6 * temp["off"], temp
    assert temp["full"] < 0.6 * temp["full, one pass"], temp


def test_unknown_remat_mode_names_the_valid_ones():
    model = Sam(get_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown remat mode 'some'; expected one of off, "
                                         "blocks, full"):
        model.set_remat("some")
