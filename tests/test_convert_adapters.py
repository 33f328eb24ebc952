"""weights/convert.py on FedFMS / Medical-SAM-Adapter checkpoints: adapters, LoRA and the
class head land in the model, Depth_Adapter is reported and skipped, the rest stays strict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfms_jax.models import get_config
from fedfms_jax.weights_file import flat_state, load_sam, read_weights
from fedfms_jax_reference.fedfms import build_torch_fedfms
from fedfms_jax_reference.sam import state_dict_numpy
from weights.convert import ConversionError, flax_to_torch, infer_config, main, torch_to_flax

MSA = get_config("tiny", adapter="msa")


@pytest.fixture(scope="module")
def msa_state_dict():
    """A FedFMS checkpoint: SAM + Space/MLP adapters + the unused 3-D Depth_Adapter."""
    return state_dict_numpy(build_torch_fedfms(MSA, seed=4, depth_adapter=True))


def depth_keys(state_dict):
    return sorted(k for k in state_dict if ".Depth_Adapter." in k)


def test_adapters_land_and_depth_adapter_is_reported(msa_state_dict):
    assert len(depth_keys(msa_state_dict)) == 2 * 4  # 2 blocks x D_fc{1,2}.{weight,bias}
    messages = []
    tensors, config = torch_to_flax(msa_state_dict, report=messages.append)
    assert config == MSA
    assert len(messages) == 1
    assert messages[0].startswith("skipped 8 tensors of the Depth_Adapter")
    assert "image_encoder.blocks.0.Depth_Adapter.D_fc1.bias" in messages[0]
    torch_fc1 = msa_state_dict["image_encoder.blocks.1.Space_Adapter.D_fc1.weight"]
    assert np.array_equal(tensors["image_encoder.blocks.1.space_adapter.fc1.kernel"], torch_fc1.T)
    assert np.array_equal(tensors["image_encoder.blocks.0.mlp_adapter.fc2.bias"],
                          msa_state_dict["image_encoder.blocks.0.MLP_Adapter.D_fc2.bias"])
    # Back to torch: every tensor but the skipped ones, bit for bit.
    back = flax_to_torch(tensors)
    assert set(back) == set(msa_state_dict) - set(depth_keys(msa_state_dict))
    for key, value in back.items():
        assert back[key].dtype == value.dtype and np.array_equal(value, msa_state_dict[key]), key


def test_without_depth_adapter_nothing_is_reported():
    state_dict = state_dict_numpy(build_torch_fedfms(MSA, seed=5))
    messages = []
    torch_to_flax(state_dict, report=messages.append)
    assert messages == []


def test_explicit_variant_still_reads_the_adapters(msa_state_dict):
    _, config = torch_to_flax(msa_state_dict, "tiny", report=lambda _: None)
    assert config.adapter == "msa" and config.adapter_hidden_dim == 16


def test_lora_and_class_head_round_trip():
    config = get_config("tiny", adapter="msa", lora_rank=3, lora_blocks=(0,), lora_alpha=6.0,
                        num_classes=2)
    state_dict = state_dict_numpy(build_torch_fedfms(config, seed=6))
    assert state_dict["image_encoder.blocks.0.attn.qkv.lora_A.weight"].shape == (3, 64)
    assert state_dict["class_head.weight"].shape == (2, 4, 1, 1)
    assert infer_config(state_dict) == config.replace(lora_alpha=get_config("tiny").lora_alpha)
    tensors, converted = torch_to_flax(state_dict, lora_alpha=6.0)
    assert converted == config
    assert tensors["image_encoder.blocks.0.attn.qkv_lora.lora_b"].shape == (3, 192)
    assert tensors["class_head.kernel"].shape == (1, 1, 4, 2)
    back = flax_to_torch(tensors)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        assert np.array_equal(back[key], value), key


def test_still_strict(msa_state_dict):
    extra = dict(msa_state_dict)
    extra["image_encoder.blocks.0.Prompt_Adapter.D_fc1.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(ConversionError, match=r"1 source tensors no rule consumes:\n    "
                                              r"image_encoder\.blocks\.0\.Prompt_Adapter"):
        torch_to_flax(extra, report=lambda _: None)
    partial = {k: v for k, v in msa_state_dict.items()
               if not k.startswith("image_encoder.blocks.1.Space_Adapter.")}
    missing = r"4 missing: \n    image_encoder\.blocks\.1\.space_adapter\.fc1\.bias"
    with pytest.raises(ConversionError, match=missing):
        torch_to_flax(partial, report=lambda _: None)
    outside = dict(msa_state_dict)
    outside["image_encoder.blocks.7.attn.qkv.lora_A.weight"] = np.zeros((2, 64), np.float32)
    with pytest.raises(ConversionError, match=r"lora_blocks \[7\] are outside the 2 encoder"):
        torch_to_flax(outside, "tiny", report=lambda _: None)
    mixed = dict(msa_state_dict)
    mixed["image_encoder.blocks.1.MLP_Adapter.D_fc1.weight"] = np.zeros((8, 64), np.float32)
    with pytest.raises(ConversionError, match=r"adapters of different widths \[8, 16\]"):
        torch_to_flax(mixed, report=lambda _: None)


def test_cli_rebuilds_the_adapter_model_from_the_file(tmp_path, msa_state_dict, capsys):
    src = tmp_path / "fedmsa.pth"
    # FedFMS trains under DataParallel and may wrap the state_dict.
    torch.save({"model": {f"module.{k}": torch.from_numpy(v) for k, v in msa_state_dict.items()}},
               src)
    dst = tmp_path / "fedmsa.safetensors"
    assert main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "skipped 8 tensors of the Depth_Adapter" in out
    assert "(tiny, adapter=msa)" in out
    config, tensors = read_weights(dst)
    assert config == MSA
    model = load_sam(dst)  # the file alone rebuilds the adapter model
    assert model.config == MSA and model.image_encoder.blocks[0].space_adapter is not None
    assert set(flat_state(model)) == set(tensors)
    back_path = tmp_path / "back.pth"
    assert main([str(dst), str(back_path), "--to-torch"]) == 0
    back = torch.load(back_path, weights_only=True)
    assert set(back) == set(msa_state_dict) - set(depth_keys(msa_state_dict))
    for key, value in back.items():
        assert np.array_equal(value.numpy(), msa_state_dict[key]), key
