"""The Medical SAM Adapter, LoRA and the class head: their init, the pretrained function at
step 0, and stage-by-stage parity with a PyTorch reference (official SAM modules plus the
upstream adapter formula, fedfms_jax_reference/fedfms.py) converted through weights/convert.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fedfms_jax.models import Sam, SamConfig, get_config
from fedfms_jax.models.adapters import Adapter, AdapterParam, LoRAParam, QkvLoRA
from fedfms_jax.models.sam import extend
from fedfms_jax.weights_file import load_sam, save_weights
from tests.fast_build import FAST_COMPILE, random_sam
from tests.numerics import assert_matches_reference, float64_copy, pinned_matmul_precision
from fedfms_jax_reference.fedfms import build_torch_fedfms, torch_segment
from fedfms_jax_reference.sam import state_dict_numpy
from weights.convert import torch_to_flax


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------- init

def test_torch_default_init_is_torch_linear_init():
    """kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases."""
    adapter = Adapter(768, 192, skip_connect=True, init="torch_default", dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    reference = torch.nn.Linear(768, 192)  # the same fan_in as fc1
    for layer, fan_in in ((adapter.fc1, 768), (adapter.fc2, 192)):
        bound = 1 / math.sqrt(fan_in)
        for name in ("kernel", "bias"):
            values = np.asarray(getattr(layer, name)[...])
            assert isinstance(getattr(layer, name), AdapterParam)
            assert np.abs(values).max() <= bound, f"fan_in {fan_in} {name} exceeds the bound"
            assert np.abs(values).max() > 0.95 * bound, f"fan_in {fan_in} {name} too narrow"
        kernel = np.asarray(layer.kernel[...])
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.02)
        assert abs(kernel.mean()) < 0.01 * bound
    torch_weight = reference.weight.detach().numpy()
    np.testing.assert_allclose(torch_weight.std(), np.asarray(adapter.fc1.kernel[...]).std(),
                               rtol=0.02)
    assert adapter.fc1.kernel.shape == (768, 192) and adapter.fc2.kernel.shape == (192, 768)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(adapter))) == 295_872


def test_zero_init_zeroes_only_the_up_projection():
    adapter = Adapter(64, 16, skip_connect=True, init="zero", dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
    assert not np.any(adapter.fc2.kernel[...]) and not np.any(adapter.fc2.bias[...])
    assert np.all(np.asarray(adapter.fc1.kernel[...]) != 0)
    x = jax.random.normal(jax.random.key(1), (2, 3, 64))
    assert np.array_equal(adapter(x), x)
    lora = QkvLoRA(64, 192, rank=4, alpha=8.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert isinstance(lora.lora_a, LoRAParam) and isinstance(lora.lora_b, LoRAParam)
    assert lora.lora_a.shape == (64, 4) and lora.lora_b.shape == (4, 192)
    assert not np.any(lora.lora_b[...]) and np.abs(lora.lora_a[...]).max() <= 1 / 8
    assert lora.scaling == 2.0
    with pytest.raises(ValueError, match="unknown adapter init 'xavier'"):
        Adapter(64, 16, skip_connect=True, init="xavier", dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_config_defaults_keep_plain_sam_and_validate():
    config = get_config("vit_b")
    assert (config.adapter, config.lora_rank, config.num_classes) == ("none", 0, 1)
    assert get_config("vit_b", adapter="msa").adapter_hidden_dim == 192
    assert get_config("vit_l", adapter="msa").adapter_hidden_dim == 256
    peft = get_config("tiny", adapter="msa", lora_rank=2, lora_blocks=(1,), num_classes=3)
    assert SamConfig.from_json(peft.to_json()) == peft
    assert [peft.has_lora(i) for i in range(2)] == [False, True]
    for bad, message in [(dict(adapter="lora"), "unknown adapter 'lora'"),
                         (dict(adapter_init="he"), "unknown adapter_init 'he'"),
                         (dict(lora_rank=2, lora_blocks=(5,)), r"lora_blocks \[5\] are outside"),
                         (dict(num_classes=0), "num_classes must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            get_config("tiny", **bad)


# ------------------------------------------------------------------- the pretrained function

def test_zero_init_adapters_and_lora_compute_exactly_the_plain_sam():
    """adapter_init='zero' and LoRA's zero B: at step 0 the output is bit for bit the
    pretrained model's, in both the windowed and the global block."""
    config = get_config("tiny")
    plain = random_sam(config, seed=0)
    peft_config = config.replace(adapter="msa", adapter_init="zero", lora_rank=2)
    peft = extend(plain, peft_config, rngs=nnx.Rngs(1))
    assert peft.config == peft_config and plain.config == config
    assert jax.tree.leaves(nnx.state(peft, AdapterParam))
    assert jax.tree.leaves(nnx.state(peft, LoRAParam))
    images = jax.random.normal(jax.random.key(2), (2, 128, 128, 3))
    segment = jax.jit(lambda model, x: model.segment(x), compiler_options=FAST_COMPILE)
    expected = np.asarray(segment(plain, images))
    assert np.array_equal(np.asarray(segment(peft, images)), expected)
    # With one up-projection moved it is a different function: the adapters are wired in.
    block = peft.image_encoder.blocks[0]
    block.mlp_adapter.fc2.bias[...] = jnp.full_like(block.mlp_adapter.fc2.bias[...], 0.1)
    assert not np.array_equal(np.asarray(segment(peft, images)), expected)


def test_extend_rejects_a_base_that_does_not_fit():
    base = nnx.eval_shape(lambda: Sam(get_config("tiny", num_classes=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"class_head\.bias: not in the new model"):
        extend(base, get_config("tiny", adapter="msa"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"class_head\.bias: \(2,\) vs \(3,\) in the new model"):
        extend(base, get_config("tiny", num_classes=3), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- parity

# Adapters in both blocks (windowed with padding 8 -> 9, and global), LoRA on the global
# block only (so block 0 runs without), FedFMS's 3-class head.
PARITY_CONFIG = get_config("tiny", adapter="msa", lora_rank=2, lora_alpha=3.0, lora_blocks=(1,),
                           num_classes=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    config = PARITY_CONFIG
    torch_model = build_torch_fedfms(config, seed=3, depth_adapter=True)
    messages = []
    tensors, converted = torch_to_flax(state_dict_numpy(torch_model),
                                       lora_alpha=config.lora_alpha, report=messages.append)
    assert converted == config, "the converter did not read the PEFT settings off the keys"
    assert len(messages) == 1 and "Depth_Adapter" in messages[0]
    path = tmp_path_factory.mktemp("fedfms") / "model.safetensors"
    save_weights(path, tensors, converted)
    return torch_model, load_sam(path), config


def test_adapter_parity_stage_by_stage(pair):
    """The stages of the model's own forward against the reference in float32 and float64
    (tests/numerics.py), each fed the previous stage's output of its own framework."""
    torch_model, model, config = pair
    torch_model64 = float64_copy(torch_model)
    images = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
    official, official64 = torch_model.image_encoder, torch_model64.image_encoder
    encoder = model.image_encoder
    errors = {}
    # Compiled per stage: cheaper than eager op-by-op dispatch on a small CPU.
    run = jax.jit(lambda module, x: module(x), compiler_options=FAST_COMPILE)
    with pinned_matmul_precision(), torch.no_grad():
        x_t = official.patch_embed(nchw(images)) + official.pos_embed
        x_64 = official64.patch_embed(nchw(images).double()) + official64.pos_embed
        x = jax.jit(lambda e, i: e.embed_patches(i) + e.pos_embed[...],
                    compiler_options=FAST_COMPILE)(encoder, jnp.asarray(images))
        errors["patch_embed"] = assert_matches_reference(x, x_t, x_64, "patch_embed + pos_embed")
        for i, block in enumerate(encoder.blocks):
            x_t, x_64, x = official.blocks[i](x_t), official64.blocks[i](x_64), run(block, x)
            kind = "global" if block.window_size == 0 else f"window {block.window_size}"
            errors[f"block {i}"] = assert_matches_reference(x, x_t, x_64,
                                                            f"adapter block {i} ({kind})")
        embedding_t = to_nhwc(official(nchw(images)))
        embedding_64 = to_nhwc(official64(nchw(images).double()))
        logits_t = to_nhwc(torch_segment(torch_model, nchw(images), config.num_classes))
        logits_64 = to_nhwc(torch_segment(torch_model64, nchw(images).double(),
                                          config.num_classes))
        errors["image_encoder"] = assert_matches_reference(
            run(encoder, jnp.asarray(images)), embedding_t, embedding_64, "image_encoder")
        logits = jax.jit(lambda m, x: m.segment(x), compiler_options=FAST_COMPILE)(
            model, jnp.asarray(images))
    assert logits.shape == (2, 32, 32, config.num_classes)
    errors["segment"] = assert_matches_reference(logits, logits_t, logits_64, "segment logits")
    # A parity test on near-constant outputs would prove little.
    assert np.std(logits_t) > 0.1, f"reference logits too flat: std {np.std(logits_t):.3g}"
    print(f"{config.num_classes} classes, lora_blocks={config.lora_blocks}, |logits| <= "
          f"{np.abs(logits_t).max():.3g}, relative errors: "
          + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))
