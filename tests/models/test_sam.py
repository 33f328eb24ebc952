"""SAM assembly: pre/post-processing, configs, the bf16 compute option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedfms_jax.models import Sam, SamConfig, get_config, postprocess_masks, preprocess
from fedfms_jax.models.sam import PIXEL_MEAN, resized_shape


@pytest.mark.parametrize("h, w, expected", [
    (480, 640, (768, 1024)),   # rounding as official get_preprocess_shape
    (1024, 683, (1024, 683)),
    (97, 150, (662, 1024)),
    (333, 333, (1024, 1024)),
])
def test_resized_shape(h, w, expected):
    assert resized_shape(h, w, 1024) == expected


def test_preprocess_normalises_and_pads_bottom_right():
    image = np.full((97, 150, 3), 200, np.uint8)
    model_input, input_size = preprocess(image, 128)
    assert model_input.shape == (128, 128, 3) and model_input.dtype == np.float32
    assert input_size == (83, 128)
    h, w = input_size
    np.testing.assert_allclose(model_input[:h, :w], np.broadcast_to(
        (200 - PIXEL_MEAN) / [58.395, 57.12, 57.375], (h, w, 3)),
                               rtol=1e-6)
    assert not model_input[h:].any()


def test_postprocess_upsamples_and_crops():
    logits = jnp.zeros((1, 32, 32, 2)).at[:, :16].set(1.0)
    out = postprocess_masks(logits, (96, 128), (48, 64), 128)
    assert out.shape == (1, 48, 64, 2)
    # Rows 0..15 of 32 cover input rows 0..63 of 96 kept, i.e. the top 2/3 of the original.
    assert float(out[0, 0, 0, 0]) == 1.0 and float(out[0, -1, 0, 0]) == 0.0


def test_config_json_round_trip_and_unknown_fields():
    config = get_config("small")
    assert SamConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown SamConfig fields"):
        SamConfig.from_json('{"variant": "x", "hidden_size": 3}')
    with pytest.raises(ValueError, match="unknown SAM variant"):
        get_config("vit_z")


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    config = get_config("tiny")
    f32 = Sam(config, rngs=nnx.Rngs(0))
    bf16 = Sam(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
    images = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    boxes = jnp.array([[10.0, 20.0, 90.0, 100.0]] * 2)
    assert nnx.jit(lambda m, x: m.image_encoder(x))(bf16, images).dtype == jnp.bfloat16
    forward = nnx.jit(lambda m, x, b: m(x, boxes=b, multimask_output=True))
    logits32, _ = forward(f32, images, boxes)
    logits16, _ = forward(bf16, images, boxes)
    scale = float(jnp.max(jnp.abs(logits32)))
    error = float(jnp.max(jnp.abs(logits16.astype(jnp.float32) - logits32))) / scale
    assert error < 0.05, f"bf16 logits differ by {error:.3f} of the output scale"
    assert error > 0, "bf16 compute gave bit-identical float32 results: dtype not applied"
