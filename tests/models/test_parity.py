"""Parity with the official PyTorch SAM, stage by stage, on random weights.

Each stage is compared separately so that a failure names the stage that broke: patch
embedding, every ViT block, the neck, the prompt encoder's sparse/dense embeddings and
dense PE, and the mask decoder's logits and IoUs for each kind of prompt. The official model
runs in float32 and float64; our float32 output must be as close to the float64 one as the
official float32 output is, up to a small factor (tests/numerics.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedfms_jax.models import get_config
from fedfms_jax.models.image_encoder import get_rel_pos
from fedfms_jax.weights_file import load_sam, save_weights
from tests.numerics import (assert_matches_reference, float64_copy, pinned_matmul_precision,
                            to_float64)
from fedfms_jax_reference.sam import build_torch_sam, modeling, state_dict_numpy
from weights.convert import torch_to_flax


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with pinned_matmul_precision():
        yield


def official_pair(module, method=None):
    """Run `module` (or its `method`) in float32 and, on float64 copies of it and of the
    arguments, in float64: (fn32, fn64) taking the same float32 arguments."""
    module64 = float64_copy(module)

    def call(m, args, kwargs):
        fn = getattr(m, method) if method else m
        with torch.no_grad():
            return fn(*args, **kwargs)
    return (lambda *a, **k: call(module, a, k),
            lambda *a, **k: call(module64, to_float64(a), to_float64(k)))


def convert(torch_sam, tmp_path, variant="auto"):
    tensors, config = torch_to_flax(state_dict_numpy(torch_sam), variant)
    path = tmp_path / "sam.safetensors"
    save_weights(path, tensors, config)
    return load_sam(path)


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request, tmp_path_factory):
    config = get_config(request.param)
    torch_sam = build_torch_sam(config, seed=1)
    return torch_sam, convert(torch_sam, tmp_path_factory.mktemp(request.param)), config


@pytest.fixture(scope="module")
def images(pair):
    _, _, config = pair
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, config.image_size, config.image_size, 3)).astype(np.float32)


def test_image_encoder_stage_by_stage(pair, images):
    """The stages of the model's own forward (ImageEncoder.__call__), each fed the previous
    stage's output of the same framework and precision."""
    torch_sam, sam, _ = pair
    official, official64 = torch_sam.image_encoder, float64_copy(torch_sam.image_encoder)
    encoder = sam.image_encoder
    with torch.no_grad():
        x_t = official.patch_embed(nchw(images)) + official.pos_embed
        x_64 = official64.patch_embed(nchw(images).double()) + official64.pos_embed
        x = encoder.embed_patches(jnp.asarray(images)) + encoder.pos_embed[...]
        assert_matches_reference(x, x_t, x_64, "patch_embed + pos_embed")
        for i, block in enumerate(encoder.blocks):
            x_t, x_64, x = official.blocks[i](x_t), official64.blocks[i](x_64), block(x)
            kind = "global" if block.window_size == 0 else f"window {block.window_size}"
            assert_matches_reference(x, x_t, x_64, f"block {i} ({kind})")
        neck_t = to_nhwc(official.neck(x_t.permute(0, 3, 1, 2)))
        neck_64 = to_nhwc(official64.neck(x_64.permute(0, 3, 1, 2)))
    neck = encoder.neck_norm2(encoder.neck_conv2(encoder.neck_norm1(encoder.neck_conv1(x))))
    assert_matches_reference(neck, neck_t, neck_64, "neck")
    run, run64 = official_pair(official)
    assert_matches_reference(encoder(jnp.asarray(images)), to_nhwc(run(nchw(images))),
                             to_nhwc(run64(nchw(images))), "image_encoder")


def test_rel_pos_resize_matches_torch():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(27, 8)).astype(np.float32)
    get_rel_pos_t = modeling().image_encoder.get_rel_pos
    for q, k in [(14, 14), (20, 20), (7, 7), (10, 14)]:
        official = get_rel_pos_t(q, k, torch.from_numpy(table)).numpy()
        official64 = get_rel_pos_t(q, k, torch.from_numpy(table).double()).numpy()
        assert_matches_reference(get_rel_pos(q, k, jnp.asarray(table)), official, official64,
                                 f"get_rel_pos({q},{k})")


def prompts(config, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    size = config.image_size
    coords = rng.uniform(0, size, (batch, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, -1], [1, 1, 0]] * batch)[:batch].astype(np.int64)
    corners = np.sort(rng.uniform(0, size, (batch, 2, 2)), axis=1)
    boxes = corners.reshape(batch, 4).astype(np.float32)  # (x0, y0, x1, y1)
    masks = rng.normal(size=(batch, config.low_res_size, config.low_res_size, 1)).astype(np.float32)
    return coords, labels, boxes, masks


PROMPT_KINDS = ["points", "box", "box+points", "mask", "points+mask", "none"]


def prompt_arguments(kind, coords, labels, boxes, masks):
    """The same prompts for the official encoder (torch, NCHW) and ours (jax, NHWC)."""
    use_points = "points" in kind
    use_box = "box" in kind
    use_mask = "mask" in kind
    official = dict(
        points=(torch.from_numpy(coords), torch.from_numpy(labels)) if use_points else None,
        boxes=torch.from_numpy(boxes) if use_box else None,
        masks=nchw(masks) if use_mask else None)
    ours = dict(
        points=(jnp.asarray(coords), jnp.asarray(labels, jnp.int32)) if use_points else None,
        boxes=jnp.asarray(boxes) if use_box else None,
        masks=jnp.asarray(masks) if use_mask else None)
    return official, ours


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_prompt_encoder(pair, kind):
    torch_sam, sam, config = pair
    official_args, our_args = prompt_arguments(kind, *prompts(config, 2, seed=3))
    encode, encode64 = official_pair(torch_sam.prompt_encoder)
    (sparse_t, dense_t), (sparse_64, dense_64) = encode(**official_args), encode64(**official_args)
    pe, pe64 = official_pair(torch_sam.prompt_encoder, "get_dense_pe")
    sparse, dense = sam.prompt_encoder(**our_args)
    assert_matches_reference(sparse, sparse_t, sparse_64, f"sparse embeddings ({kind})")
    assert_matches_reference(dense, to_nhwc(dense_t), to_nhwc(dense_64),
                             f"dense embeddings ({kind})")
    assert_matches_reference(sam.prompt_encoder.dense_pe(), to_nhwc(pe())[0], to_nhwc(pe64())[0],
                             "dense positional encoding")


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_mask_decoder(pair, images, kind, multimask):
    """One image, a batch of 2 prompts (the official decoder's repeat_interleave case);
    without prompts, one empty prompt."""
    torch_sam, sam, config = pair

    def official_decoder(model, image, args):
        with torch.no_grad():
            sparse_t, dense_t = model.prompt_encoder(**args)
            return model.mask_decoder(
                image_embeddings=model.image_encoder(image),
                image_pe=model.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse_t,
                dense_prompt_embeddings=dense_t, multimask_output=multimask)

    official_args, our_args = prompt_arguments(kind, *prompts(config, 2, seed=4))
    logits_t, iou_t = official_decoder(torch_sam, nchw(images[:1]), official_args)
    logits_64, iou_64 = official_decoder(float64_copy(torch_sam), nchw(images[:1]).double(),
                                         to_float64(official_args))
    embedding = sam.image_encoder(jnp.asarray(images[:1]))
    sparse, dense = sam.prompt_encoder(**our_args)
    logits, iou = sam.mask_decoder(embedding, sam.prompt_encoder.dense_pe(), sparse, dense,
                                   multimask)
    stage = f"mask decoder ({kind}, multimask={multimask})"
    assert logits.shape[-1] == (3 if multimask else 1)
    assert_matches_reference(logits, to_nhwc(logits_t), to_nhwc(logits_64),
                             f"{stage} low-res logits")
    assert_matches_reference(iou, iou_t, iou_64, f"{stage} IoU predictions")


def test_end_to_end_matches_official_forward(pair, images):
    """Sam.__call__ plus postprocess_masks against the official Sam.forward."""
    from fedfms_jax.models import postprocess_masks

    torch_sam, sam, config = pair
    coords, labels, boxes, _ = prompts(config, 1, seed=5)
    input_size = (config.image_size, config.image_size * 3 // 4)
    original_size = (input_size[0] * 2 - 7, input_size[1] * 2 - 5)
    image = images[:1].copy()
    image[:, :, input_size[1]:] = 0  # the padded area of a preprocessed portrait image
    batched_input = [{"image": nchw(image)[0], "original_size": original_size,
                      "point_coords": torch.from_numpy(coords),
                      "point_labels": torch.from_numpy(labels), "boxes": torch.from_numpy(boxes)}]
    # Official preprocessing normalises raw pixels; ours is already normalised: undo theirs.
    torch_sam.pixel_mean.zero_()
    torch_sam.pixel_std.fill_(1.0)
    batched_input[0]["image"] = batched_input[0]["image"][:, :input_size[0], :input_size[1]]
    forward, forward64 = official_pair(torch_sam)
    out_t = forward(batched_input, multimask_output=True)[0]
    out_64 = forward64(batched_input, multimask_output=True)[0]
    logits, iou = sam(jnp.asarray(image), point_coords=jnp.asarray(coords),
                      point_labels=jnp.asarray(labels, jnp.int32), boxes=jnp.asarray(boxes),
                      multimask_output=True)
    assert_matches_reference(logits, to_nhwc(out_t["low_res_logits"]),
                             to_nhwc(out_64["low_res_logits"]), "end-to-end low-res logits")
    assert_matches_reference(iou, out_t["iou_predictions"], out_64["iou_predictions"],
                             "end-to-end IoUs")
    # The upsampling alone, from the same low-res logits in both frameworks.
    upsample, upsample64 = official_pair(torch_sam, "postprocess_masks")
    upsampled = postprocess_masks(logits, input_size, original_size, config.image_size)
    logits_nchw = torch.from_numpy(np.asarray(logits).transpose(0, 3, 1, 2).copy())
    assert_matches_reference(upsampled, to_nhwc(upsample(logits_nchw, input_size, original_size)),
                             to_nhwc(upsample64(logits_nchw, input_size, original_size)),
                             "postprocess_masks")
    agreement = np.mean((np.asarray(upsampled) > 0) == to_nhwc(out_t["masks"]))
    assert agreement > 0.999, f"binary masks agree on only {agreement:.4%} of pixels"
