"""ViT-B at 1024 against the official model (slow: `make test-slow`).

A randomly initialised official ViT-B checkpoint goes through the converter CLI and the
predict CLI; image embeddings and low-res logits must match within 1e-3 of the output scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from fedfms_jax.models import get_config, preprocess, transform_coords
from fedfms_jax.predict import main as predict_main
from fedfms_jax.weights_file import load_sam
from fedfms_jax_reference.sam import build_torch_sam
from weights.convert import main as convert_main

pytestmark = pytest.mark.slow


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_vit_b_converted_checkpoint_matches_official(tmp_path):
    torch_sam = build_torch_sam(get_config("vit_b"), seed=0)
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(torch_sam.state_dict(), checkpoint)
    weights = tmp_path / "sam_vit_b_random.safetensors"
    assert convert_main([str(checkpoint), str(weights)]) == 0

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    image_path = tmp_path / "image.png"
    Image.fromarray(image).save(image_path)
    model_input, input_size = preprocess(image, 1024)
    with torch.no_grad():
        embedding_t = torch_sam.image_encoder(
            torch.from_numpy(model_input).permute(2, 0, 1)[None]).permute(0, 2, 3, 1).numpy()
    embedding = load_sam(weights).image_encoder(jnp.asarray(model_input)[None])
    embedding_error = relative_error(embedding, embedding_t)
    print(f"ViT-B image embedding max relative error {embedding_error:.2e}")
    assert embedding_error <= 1e-3

    box = np.array([150.0, 100.0, 520.0, 430.0])
    logits_path = tmp_path / "logits.npy"
    assert predict_main(["--weights", str(weights), "--image", str(image_path),
                         "--box", ",".join(f"{v:g}" for v in box), "--multimask",
                         "--out", str(tmp_path / "mask.png"),
                         "--save-logits", str(logits_path)]) == 0
    resized = torch.from_numpy(np.asarray(Image.fromarray(image).resize(
        (input_size[1], input_size[0]), Image.Resampling.BILINEAR)).astype(np.float32))
    record = {"image": resized.permute(2, 0, 1), "original_size": image.shape[:2],
              "boxes": torch.from_numpy(transform_coords(box.reshape(2, 2), image.shape[:2],
                                                         1024).reshape(1, 4))}
    with torch.no_grad():
        official = torch_sam([record], multimask_output=True)[0]
    logits_error = relative_error(np.load(logits_path), official["low_res_logits"][0].numpy())
    print(f"ViT-B low-res logits max relative error {logits_error:.2e}")
    assert logits_error <= 1e-3
