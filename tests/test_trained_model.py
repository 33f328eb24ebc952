"""What train learns, evaluate scores and predict applies are one model: a tiny prompt-free,
unit-normalised SAM trained for a step on real NIfTI volumes (Colin27 T1 with a binarised AAL
region, downsampled to anisotropic voxels and stored in a non-RAS voxel order), then
`evaluate --json` and `predict` on a validation volume and on validation images."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedfms_jax import evaluation
from fedfms_jax.data.readers import load_sites
from fedfms_jax.evaluate import main as evaluate_main
from fedfms_jax.experiment import load_config_file
from fedfms_jax.predict import main as predict_main
from fedfms_jax.predict import read_volume, segment_fn
from fedfms_jax.train import FINAL_WEIGHTS, run
from fedfms_jax.weights_file import WeightsError, load_trained, read_preprocessing
from tests.real_volumes import AAL_ATLAS, COLIN27_T1, require

nib = pytest.importorskip("nibabel")

STRIDES = (4, 4, 6)  # 4 x 4 x 6 mm voxels from the 1 mm templates
REGION = (7, 8)  # AAL middle frontal gyri, left and right: absent from many slices
CASES = {"case1": (0, 0, 0), "case2": (2, 1, 3), "case3": (1, 3, 2)}


def write_site(root):
    """<root>/site1/<case>/{image,label}.nii.gz: three differently subsampled copies of
    Colin27 with the region as label, each with its x axis stored reversed (LAS), so
    reading and writing back must undo a reorientation."""
    t1 = nib.load(str(require(COLIN27_T1)))
    atlas = nib.load(str(require(AAL_ATLAS)))
    image, labels = np.asanyarray(t1.dataobj), np.asanyarray(atlas.dataobj)
    for case, offset in CASES.items():
        crop = tuple(slice(o, None, s) for o, s in zip(offset, STRIDES))
        affine = t1.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array(offset, float)
        affine[:3, :3] = affine[:3, :3] @ np.diag(STRIDES)
        sub_image = image[crop].astype(np.int16)
        sub_label = np.isin(labels[crop], REGION).astype(np.uint8)
        flip = np.diag([-1.0, 1, 1, 1])
        flip[0, 3] = sub_image.shape[0] - 1
        las = affine @ flip
        folder = root / "site1" / case
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(sub_image[::-1], las), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(sub_label[::-1], las), str(folder / "label.nii.gz"))


def volume_config(root):
    config = load_config_file("tests/tiny_config.py")
    config.data.layout = "volumes"
    config.data.root = str(root)
    config.data.unseen_site = ""
    config.data.normalise = "unit"
    config.data.prompt = "none"
    config.data.val_fraction = 0.34  # one of the three cases
    config.data.options = ml_collections.ConfigDict({"keep_empty": 0.3})
    config.rounds = 1
    config.eval.every = 1
    config.eval.batch_size = 4
    config.train.local_steps = 2
    config.data.batch_size = 2
    config.mode = "decoder"  # the cheapest gradient to compile; what is trained is not the point
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, config, workdir, evaluate --json's report, its saved predictions folder)."""
    root = tmp_path_factory.mktemp("volumes")
    write_site(root)
    config = volume_config(root)
    workdir = tmp_path_factory.mktemp("run")
    run(config, workdir, echo=lambda line: None)
    scored = tmp_path_factory.mktemp("scored")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = evaluate_main(["--workdir", str(workdir), "--json", "--save-predictions",
                              str(scored)])
    assert code == 0
    report = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return root, config, workdir, report, scored


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_predict_writes_the_volume_evaluate_scored(trained, tmp_path, capsys):
    root, config, workdir, report, scored = trained
    prep = read_preprocessing(workdir / FINAL_WEIGHTS)
    assert (prep.normalise, prep.prompt, prep.resize, prep.slab) == ("unit", "none",
                                                                      "stretch", 3)
    cases = report["splits"]["val"]["site1"]["cases"]
    assert len(cases) == 1 and set(cases) <= set(CASES)
    case = next(iter(cases))
    reported = cases[case]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["sites"]["site1"]["per_case"][case]["dice"] == pytest.approx(
        reported["dice"], abs=1e-12)
    # Every slice was scored, though training kept only 30% of the empty ones.
    assert report["splits"]["val"]["site1"]["counts"]["images"] == nib.load(
        str(root / "site1" / case / "image.nii.gz")).shape[2]

    image_path = root / "site1" / case / "image.nii.gz"
    label_path = root / "site1" / case / "label.nii.gz"
    out = tmp_path / f"{case}_pred.nii.gz"
    assert predict_main(["--weights", str(workdir / FINAL_WEIGHTS), "--input", str(image_path),
                         "--out", str(out), "--batch-size", str(config.eval.batch_size),
                         "--overlay"]) == 0
    written, source = nib.load(str(out)), nib.load(str(image_path))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    mask = np.asanyarray(written.dataobj) > 0
    label = np.asanyarray(nib.load(str(label_path)).dataobj) > 0
    measured = dice(mask, label)
    with capsys.disabled():
        print(f"\n{case}: evaluate --json Dice {reported['dice']:.6f}, Dice(label, predict's "
              f"mask) {measured:.6f}")
    assert measured == pytest.approx(reported["dice"], abs=1e-3)
    assert (tmp_path / f"{case}_pred_overlay.png").is_file()

    # Voxel for voxel, the written mask is the one evaluate scored (and saved).
    evaluated = nib.load(str(scored / "val" / "site1" / f"{case}.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(evaluated.dataobj), np.asanyarray(written.dataobj))
    assert read_volume(out, None).spacing == pytest.approx((6.0, 4.0, 4.0))

    # Nothing is overwritten without --force.
    before = out.read_bytes()
    assert predict_main(["--weights", str(workdir / FINAL_WEIGHTS), "--input",
                         str(image_path), "--out", str(out)]) == 2
    assert "exist already" in capsys.readouterr().err and out.read_bytes() == before


def test_predict_on_validation_images_matches_their_evaluation(trained, tmp_path, capsys):
    """Validation slices saved as PNG images: predict's masks equal evaluation's."""
    root, config, workdir, _, _ = trained
    sites = load_sites("volumes", root, keep_empty=1.0, val_fraction=0.34, seed=config.seed)
    val = sites["site1"].val
    picked = [r for r in val if r.mask.any()][:2] + [r for r in val if not r.mask.any()][:1]
    images = tmp_path / "site1" / "images"
    masks = tmp_path / "site1" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for r in picked:
        Image.fromarray(r.image).save(images / f"{r.case_id}_s{r.slice_index:03d}.png")
        Image.fromarray(r.mask * 255).save(masks / f"{r.case_id}_s{r.slice_index:03d}.png")
    records = load_sites("folders", tmp_path, val_fraction=0)["site1"].train  # as read in a run
    model, prep = load_trained(workdir / FINAL_WEIGHTS)
    settings = evaluation.EvalSettings(batch_size=config.eval.batch_size)
    scored = {}
    scores = evaluation.score_records(records, segment_fn(model), prep, settings,
                                      predictions=scored)
    assert scores.cases == len(picked) and set(scored) == {p.stem for p in images.iterdir()}

    out = tmp_path / "predicted"  # outside the data: predict reads every image below --input
    assert predict_main(["--weights", str(workdir / FINAL_WEIGHTS), "--input", str(images),
                         "--out", str(out), "--batch-size", str(config.eval.batch_size)]) == 0
    for stem, labels in scored.items():
        written = np.asarray(Image.open(out / f"{stem}.png"))
        np.testing.assert_array_equal(written > 0, labels > 0, err_msg=stem)


def test_weights_without_preprocessing_are_refused(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    root, _, workdir, _, _ = trained
    with safe_open(str(workdir / FINAL_WEIGHTS), framework="numpy") as f:
        metadata = dict(f.metadata())
    del metadata["preprocessing"]
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(workdir / FINAL_WEIGHTS)), str(bare), metadata=metadata)
    with pytest.raises(WeightsError, match="records no preprocessing"):
        read_preprocessing(bare)
    image = root / "site1" / "case1" / "image.nii.gz"
    assert predict_main(["--weights", str(bare), "--input", str(image),
                         "--out", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "records no preprocessing" in err
    assert not (tmp_path / "m.nii.gz").exists()
