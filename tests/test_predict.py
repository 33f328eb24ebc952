"""The predict CLI: original-pixel prompts, any image size, parity with the official model,
and clear errors for bad images, prompts and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedfms_jax.data.preprocessing import Preprocessing
from fedfms_jax.models import get_config, transform_coords
from fedfms_jax.models.sam import resized_shape
from fedfms_jax.predict import main
from fedfms_jax.weights_file import save_weights
from tests.numerics import (assert_matches_reference, float64_copy, pinned_matmul_precision,
                            to_float64)
from fedfms_jax_reference.sam import build_torch_sam, state_dict_numpy
from weights.convert import torch_to_flax

HEIGHT, WIDTH = 97, 150  # landscape, odd sizes: exercises resize, pad, crop and upsample


@pytest.fixture(scope="module")
def torch_sam():
    return build_torch_sam(get_config("tiny"), seed=7)


@pytest.fixture(scope="module")
def weights(torch_sam, tmp_path_factory):
    tensors, config = torch_to_flax(state_dict_numpy(torch_sam))
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(path, tensors, config,
                 preprocessing=Preprocessing.official_sam(config.image_size, config.low_res_size))
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("images") / "scan.png"
    Image.fromarray(image).save(path)
    return path


def official_prediction(torch_sam, image_path, box, points, labels, multimask, float64=False):
    """The official Sam.forward on the same resized image and transformed prompts (with
    float64=True, a float64 copy of the model on float64 inputs)."""
    size = torch_sam.image_encoder.img_size
    image = np.asarray(Image.open(image_path).convert("RGB"))
    h, w = resized_shape(HEIGHT, WIDTH, size)
    # Official ResizeLongestSide.apply_image is PIL bilinear through torchvision.
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    record = {"image": torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1),
              "original_size": (HEIGHT, WIDTH)}
    if box is not None:
        record["boxes"] = torch.from_numpy(
            transform_coords(np.reshape(box, (2, 2)), (HEIGHT, WIDTH), size).reshape(1, 4))
    if points is not None:
        record["point_coords"] = torch.from_numpy(
            transform_coords(np.asarray(points), (HEIGHT, WIDTH), size)[None])
        record["point_labels"] = torch.tensor([labels])
    if float64:
        torch_sam, record = float64_copy(torch_sam), to_float64(record)
    with torch.no_grad():
        return torch_sam([record], multimask_output=multimask)[0]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with pinned_matmul_precision():
        yield


@pytest.mark.parametrize("prompt_args, box, points, labels, multimask", [
    (["--box", "20,10,120,80"], [20, 10, 120, 80], None, None, False),
    (["--point", "75,40,1", "--point", "10,90,0", "--multimask"], None,
     [[75, 40], [10, 90]], [1, 0], True),
    (["--box", "20,10,120,80", "--point", "60,50,1"], [20, 10, 120, 80], [[60, 50]], [1], False),
])
def test_predict_matches_official(tmp_path, torch_sam, weights, image_path, prompt_args, box,
                                  points, labels, multimask, capsys):
    out, logits_path = tmp_path / "mask.png", tmp_path / "logits.npy"
    code = main(["--weights", str(weights), "--image", str(image_path), "--out", str(out),
                 "--save-logits", str(logits_path), *prompt_args])
    assert code == 0
    official = official_prediction(torch_sam, image_path, box, points, labels, multimask)
    official64 = official_prediction(torch_sam, image_path, box, points, labels, multimask,
                                     float64=True)
    logits = np.load(logits_path)
    n = 3 if multimask else 1
    low_res = get_config("tiny").low_res_size
    assert logits.shape == (n, low_res, low_res) and logits.dtype == np.float32
    assert_matches_reference(logits, official["low_res_logits"][0], official64["low_res_logits"][0],
                             "predict CLI low-res logits")
    printed = capsys.readouterr().out
    ious = official["iou_predictions"][0].numpy()
    assert "predicted IoU: " + ", ".join(f"{v:.4f}" for v in ious) in printed
    mask = np.asarray(Image.open(out))
    assert mask.shape == (HEIGHT, WIDTH) and set(np.unique(mask)) <= {0, 255}
    best = int(np.argmax(ious))
    official_mask = official["masks"][0, best].numpy()
    assert np.mean((mask > 0) == official_mask) > 0.999


def test_grey_16_bit_image(tmp_path, weights):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 10).save(path)
    out = tmp_path / "mask.png"
    assert main(["--weights", str(weights), "--image", str(path), "--box", "5,5,60,50",
                 "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (64, 80)


@pytest.mark.parametrize("args, message", [
    (["--box", "20,10,200,80"], "box 20,10,200,80 must satisfy"),
    (["--box", "50,10,20,80"], "box 50,10,20,80 must satisfy"),
    (["--point", "75,140,1"], "point 75,140 lies outside the 150x97 image"),
    (["--point", "75,40,2"], "point 75,40 has label 2"),
    (["--box", "1,2,3"], "expected 4 comma-separated numbers"),
    (["--box", "20,10,120,80", "--variant", "vit_b"], "holds a tiny model, not vit_b"),
])
def test_bad_prompts_and_variant(tmp_path, weights, image_path, args, message, capsys):
    out = tmp_path / "mask.png"
    code = main(["--weights", str(weights), "--image", str(image_path), "--out", str(out), *args])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_image(tmp_path, weights, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--weights", str(weights), "--image", str(bad), "--box", "1,1,5,5",
                 "--out", str(tmp_path / "m.png")]) != 0
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["--weights", str(weights), "--image", str(tmp_path / "none.png"), "--box",
                 "1,1,5,5", "--out", str(tmp_path / "m.png")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_weights_that_do_not_fit_their_config(tmp_path, weights, image_path, capsys):
    """A file whose tensors miss a key fails with the key's name, before any compute."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    del tensors["mask_decoder.iou_token.embedding"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    assert main(["--weights", str(broken), "--image", str(image_path), "--box", "1,1,5,5",
                 "--out", str(tmp_path / "m.png")]) != 0
    err = capsys.readouterr().err
    assert "1 missing" in err and "mask_decoder.iou_token.embedding" in err


def test_official_sam_needs_a_prompt(tmp_path, weights, image_path, capsys):
    assert main(["--weights", str(weights), "--image", str(image_path), "--out",
                 str(tmp_path / "m.png")]) == 2
    assert "needs prompts" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


# --- models trained prompt-free (what `train` writes) ------------------------------------


@pytest.fixture(scope="module")
def prompt_free_weights(tmp_path_factory):
    """A random tiny 2-class model recorded as trained prompt-free on unit-scaled,
    stretched images (FedFMS's fundus setting)."""
    from fedfms_jax.weights_file import flat_state
    from tests.fast_build import random_sam

    config = get_config("tiny", num_classes=2)
    model = random_sam(config, seed=3, scale=0.5)
    prep = Preprocessing(image_size=config.image_size, low_res_size=config.low_res_size,
                         normalise="unit", resize="stretch", prompt="none", num_classes=2,
                         class_head=True)
    path = tmp_path_factory.mktemp("weights") / "two_class.safetensors"
    save_weights(path, flat_state(model), config, {"trained_by": "test"}, preprocessing=prep)
    return path


def test_prompt_free_model_writes_label_maps_for_a_folder(tmp_path, prompt_free_weights,
                                                          image_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 52), np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (33, 30, 3), np.uint8)).save(folder / "sub" / "rgb.tif")
    Image.fromarray(np.zeros((40, 52), np.uint8)).save(folder / "sub" / "mask.png")  # a label
    out = tmp_path / "out"
    assert main(["--weights", str(prompt_free_weights), "--input", str(folder), "--input",
                 str(image_path), "--out", str(out), "--overlay"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["grey.png", "grey_overlay.png", "scan.png", "scan_overlay.png",
                       "sub/rgb.png", "sub/rgb_overlay.png"]
    labels = np.asarray(Image.open(out / "grey.png"))
    # A label map with content (values 0..2, not 0/255); tests/test_trained_model.py checks
    # that predict's masks are evaluation's.
    assert labels.shape == (40, 52) and set(np.unique(labels)) <= {0, 1, 2}
    assert len(np.unique(labels)) > 1
    assert np.asarray(Image.open(out / "sub" / "rgb_overlay.png")).shape == (33, 30, 3)
    # Without --force nothing is rewritten.
    assert main(["--weights", str(prompt_free_weights), "--input", str(folder),
                 "--out", str(out)]) == 2


def four_d_volume(path, volumes=2):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, volumes), np.float32), np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("prompt", "was trained prompt-free: it takes no --box/--point"),
    ("four_d", "4-D file with 2 volumes"),
    ("corrupt_volume", "cannot read volume"),
    ("empty_folder", "no DICOM series in this folder"),  # the last thing a folder can be
    ("not_an_input", "not an image"),
    ("volume_to_png", "a volume's labels are written as a volume file"),
])
def test_bad_inputs_name_the_culprit(tmp_path, prompt_free_weights, image_path, case, message,
                                     capsys):
    out = tmp_path / "out.nii.gz"
    extra = []
    if case == "prompt":
        source, out, extra = image_path, tmp_path / "m.png", ["--box", "1,1,5,5"]
    elif case == "four_d":
        source = four_d_volume(tmp_path / "scan4d.nii.gz")
    elif case == "corrupt_volume":
        source = tmp_path / "broken.nii.gz"
        source.write_bytes(b"\x1f\x8b not a gzip stream")
    elif case == "empty_folder":
        source = tmp_path / "nothing"
        source.mkdir()
        (source / "notes.txt").write_text("")
        (source / "sub").mkdir()
        (source / "sub" / "x.txt").write_text("")
    elif case == "not_an_input":
        source = tmp_path / "table.csv"
        source.write_text("a,b\n")
    else:
        source, out = four_d_volume(tmp_path / "scan.nii.gz", 1), tmp_path / "m.png"
    code = main(["--weights", str(prompt_free_weights), "--input", str(source), "--out",
                 str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    if case in ("four_d", "corrupt_volume", "not_an_input", "empty_folder"):
        assert str(source) in err
    assert not out.exists()


def test_volumes_come_back_in_their_format_and_geometry(tmp_path, prompt_free_weights):
    """A folder with a DICOM series (labels as NIfTI with the series' geometry) and an NRRD
    volume (labels as NRRD); a series given alone with --out x.nrrd gets NRRD."""
    import SimpleITK as sitk

    from fedfms_jax.data import volumes
    from tests import real_volumes
    from tests.data.conftest import colin_crop, write_dicom_series

    image = colin_crop(real_volumes.COLIN27_T1, 80, 3)
    folder = tmp_path / "in"
    write_dicom_series(sitk.Flip(image, [False, True, True]), folder / "patient1")
    (folder / "patient2").mkdir()
    sitk.WriteImage(image, str(folder / "patient2" / "scan.nrrd"))
    out = tmp_path / "out"
    assert main(["--weights", str(prompt_free_weights), "--input", str(folder),
                 "--out", str(out)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["patient1.nii.gz", "patient2/scan.nrrd"]
    for name, source in (("patient1.nii.gz", folder / "patient1"),
                         ("patient2/scan.nrrd", folder / "patient2" / "scan.nrrd")):
        label, like = volumes.read_volume(out / name), volumes.read_volume(source)
        assert (label.stored_shape, label.orientation) == (like.stored_shape, like.orientation)
        assert volumes.grid_mismatch(like, label, tolerance=1e-3) is None, name
        assert set(np.unique(label.voxels)) <= {0, 1, 2}
    alone = tmp_path / "alone.nrrd"
    assert main(["--weights", str(prompt_free_weights), "--input", str(folder / "patient1"),
                 "--out", str(alone)]) == 0
    np.testing.assert_array_equal(volumes.read_volume(alone).voxels,
                                  volumes.read_volume(out / "patient1.nii.gz").voxels)
