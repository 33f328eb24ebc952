"""weights/convert.py: the table, the strict checks, variant inference and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfms_jax.models import get_config
from fedfms_jax.weights_file import WeightsError, load_sam, read_weights, flat_state
from fedfms_jax_reference.sam import build_torch_sam, state_dict_numpy
from weights.convert import ConversionError, flax_to_torch, infer_config, main, torch_to_flax


@pytest.fixture(scope="module")
def tiny_state_dict():
    return state_dict_numpy(build_torch_sam(get_config("tiny"), seed=2))


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_state_dict):
    path = tmp_path / "sam_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, path)
    return path


def vit_b_round_trip(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official ViT-B's 314 tensors to Flax (checked: variant, parameter count) and back
    (checked: the same names)."""
    assert len(state_dict) == 314
    tensors, config = torch_to_flax(state_dict)
    assert config.variant == "vit_b"
    assert sum(v.size for k, v in tensors.items() if "gaussian" not in k) == 93_735_472
    back = flax_to_torch(tensors)
    assert set(back) == set(state_dict)
    return back


def test_vit_b_official_keys_and_shapes_convert_both_ways():
    """Names and shapes of the official ViT-B (built on torch's meta device: no memory, no
    values); values are checked on the tiny variant here and on ViT-B in the slow test."""
    with torch.device("meta"):
        official = build_torch_sam(get_config("vit_b"), seed=0, randomise_values=False)
    zeros = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
             for k, v in official.state_dict().items()}
    back = vit_b_round_trip(zeros)
    for key, value in zeros.items():
        assert back[key].shape == value.shape, key


@pytest.mark.slow  # a 94M-parameter torch model with random values
def test_vit_b_round_trip_is_exact():
    """All 314 official ViT-B tensors go to Flax and back bit for bit."""
    state_dict = state_dict_numpy(build_torch_sam(get_config("vit_b"), seed=0))
    back = vit_b_round_trip(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def shapes_only(variant: str) -> dict[str, np.ndarray]:
    """The tensors infer_config reads, as zeros with the variant's official shapes."""
    config = get_config(variant)
    grid, d = config.embedding_size, config.embed_dim
    head_dim = d // config.num_heads
    tensors = {"image_encoder.patch_embed.proj.weight": np.zeros((d, 3, 16, 16), np.float32),
               "image_encoder.pos_embed": np.zeros((1, grid, grid, d), np.float32)}
    for i in range(config.depth):
        rows = 2 * (grid if i in config.global_attn_indexes else config.window_size) - 1
        tensors[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = np.zeros((rows, head_dim))
    return tensors


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h", "tiny", "small"])
def test_infer_config_reads_the_variant_off_the_shapes(variant):
    assert infer_config(shapes_only(variant)) == get_config(variant)


def test_infer_config_rejects_unknown_shapes():
    tensors = shapes_only("vit_b")
    tensors["image_encoder.pos_embed"] = np.zeros((1, 32, 32, 768), np.float32)
    with pytest.raises(ConversionError, match="match no known variant"):
        infer_config(tensors)
    with pytest.raises(ConversionError, match="not a SAM checkpoint"):
        infer_config({"encoder.weight": np.zeros(3)})


def test_truncated_state_dict_lists_missing_keys(tiny_state_dict):
    truncated = {k: v for k, v in tiny_state_dict.items() if "mask_decoder.iou_prediction_head" not in k}
    with pytest.raises(ConversionError) as error:
        torch_to_flax(truncated)
    message = str(error.value)
    assert "6 missing" in message
    assert "mask_decoder.iou_prediction_head.layers.2.kernel" in message


def test_wrong_shape_is_named(tiny_state_dict):
    bad = dict(tiny_state_dict)
    bad["mask_decoder.iou_token.weight"] = np.zeros((1, 7), np.float32)
    with pytest.raises(ConversionError, match=r"mask_decoder\.iou_token\.embedding: file \(1, 7\) "
                                              r"vs model \(1, 32\)"):
        torch_to_flax(bad)


def test_unconsumed_source_tensor_is_named(tiny_state_dict):
    extra = dict(tiny_state_dict)
    extra["mask_decoder.extra_head.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError, match="source tensors no rule consumes:\n    "
                                              r"mask_decoder\.extra_head\.weight"):
        torch_to_flax(extra)


def test_explicit_variant_must_fit(tiny_state_dict):
    with pytest.raises(ConversionError, match="mis-shaped"):
        torch_to_flax(tiny_state_dict, "small")


def test_cli_round_trip(tmp_path, tiny_checkpoint, tiny_state_dict, capsys):
    flax_path = tmp_path / "sam_tiny.safetensors"
    assert main([str(tiny_checkpoint), str(flax_path)]) == 0
    config, tensors = read_weights(flax_path)
    assert config == get_config("tiny")
    model = load_sam(flax_path)
    assert model.config == config
    assert set(flat_state(model)) == set(tensors)
    back_path = tmp_path / "back.pth"
    assert main([str(flax_path), str(back_path), "--to-torch"]) == 0
    back = torch.load(back_path, weights_only=True)
    assert set(back) == set(tiny_state_dict)
    for key, value in tiny_state_dict.items():
        assert np.array_equal(back[key].numpy(), value), key
    # The round-tripped file loads into the official model unchanged.
    build_torch_sam(get_config("tiny")).load_state_dict(back, strict=True)


def test_cli_accepts_wrapped_checkpoints(tmp_path, tiny_state_dict):
    """Training scripts save {'model': state_dict} with DataParallel's 'module.' prefix."""
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": torch.from_numpy(v) for k, v in tiny_state_dict.items()},
                "epoch": 3}, path)
    assert main([str(path), str(tmp_path / "out.safetensors")]) == 0


def test_cli_error_keeps_existing_output(tmp_path, tiny_state_dict, capsys):
    """A failed conversion exits non-zero, names the culprits and leaves dst untouched."""
    dst = tmp_path / "sam.safetensors"
    dst.write_bytes(b"previous result")
    truncated = {k: torch.from_numpy(v) for k, v in tiny_state_dict.items()
                 if not k.startswith("mask_decoder.mask_tokens")}
    src = tmp_path / "truncated.pth"
    torch.save(truncated, src)
    assert main([str(src), str(dst)]) == 1
    assert "mask_decoder.mask_tokens.embedding" in capsys.readouterr().err
    assert dst.read_bytes() == b"previous result"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a pickle", "cannot read"),
])
def test_cli_bad_source(tmp_path, content, message, capsys):
    src = tmp_path / "bad.pth"
    if content is not None:
        src.write_bytes(content)
    assert main([str(src), str(tmp_path / "out.safetensors")]) == 1
    assert message in capsys.readouterr().err


def test_load_sam_rejects_other_files(tmp_path, tiny_checkpoint):
    with pytest.raises(WeightsError, match="convert it first"):
        load_sam(tiny_checkpoint)
    with pytest.raises(WeightsError, match="does not exist"):
        load_sam(tmp_path / "missing.safetensors")
