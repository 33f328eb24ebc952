"""fedfms_jax.evaluation with stand-in predict functions (numpy, no model): cases, the map
back to the original grid, per-volume scoring, FedFMS's mode, and training-only keep_empty."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from fedfms_jax import metrics
from fedfms_jax.data.preprocessing import Preprocessing
from fedfms_jax.data.records import Record, keep_empty_slices
from fedfms_jax.evaluation import (EvalSettings, group_cases, image_key, mean_scores,
                                   score_records)

L, S = 16, 64


def content_predict(value: float = 5.0):
    """Logits +value where the model input holds image content, -value on SAM's zero
    padding: mapped back correctly, the whole original image is foreground."""
    def predict(batch):
        image = batch["image"]  # f32[B, S, S, 3], unit-normalised content >= 1/255
        content = image[:, ::S // L, ::S // L, :1] > 0
        return np.where(content, value, -value).astype(np.float32)
    return predict


def volume_records(masks, spacing=(3.0, 0.5, 0.7), case="case1", path="/data/s/case1/image.nii.gz"):
    image = np.full(masks.shape[1:] + (3,), 128, np.uint8)
    return [Record(image, m.astype(np.uint8), case, z, spacing, path)
            for z, m in enumerate(masks)]


def test_volume_cases_are_scored_in_3d_on_their_own_grid():
    masks = np.zeros((5, 20, 30), bool)
    masks[1:4, 5:15, 10:25] = True
    records = volume_records(masks)
    prep = Preprocessing(image_size=S, low_res_size=L, normalise="unit", resize="longest_side",
                         prompt="none")
    kept = {}
    scores = score_records(records[::-1], content_predict(), prep, EvalSettings(),
                           predictions=kept)
    assert (scores.cases, scores.images) == (1, 5)
    labels = kept["case1"]  # slice order restored, every voxel predicted foreground
    assert labels.shape == (5, 20, 30) and labels.all()
    expected = metrics.binary_metrics(np.ones_like(masks), masks, (3.0, 0.5, 0.7),
                                      tolerance_mm=2.0)
    for name in metrics.METRICS:
        assert scores.per_case["case1"][name] == pytest.approx(expected[name], abs=1e-9)
    assert scores.dice == pytest.approx(2 * masks.sum() / (masks.sum() + masks.size))


def test_images_are_cases_keyed_by_file_stem_and_empty_ones_are_counted():
    truth = np.zeros((24, 18), np.uint8)
    truth[4:10, 3:9] = 1
    empty = np.zeros_like(truth)
    image = np.full((24, 18, 3), 90, np.uint8)
    records = [Record(image, truth, "a", -1, None, "/x/images/a.png"),
               Record(image, empty, "b", 3, None, "/x/images/b_s003.png"),
               Record(image, truth, "c", -1, None, "")]
    prep = Preprocessing(image_size=S, low_res_size=L, normalise="unit", resize="stretch",
                         prompt="none")
    scores = score_records(records, lambda b: -content_predict()(b), prep, EvalSettings())
    assert list(scores.per_case) == ["a", "b_s003", "c"]
    assert (scores.missed, scores.spurious, scores.both_empty) == (2, 0, 1)
    diagonal = metrics.field_of_view_diagonal((24, 18), (1.0, 1.0))
    assert scores.per_case["a"]["hd95"] == pytest.approx(diagonal)
    assert np.isnan(scores.per_case["b_s003"]["dice"])
    assert scores.dice == 0 and scores.hd95 == pytest.approx(diagonal)


def test_missing_slices_of_a_volume_are_an_error():
    records = volume_records(np.zeros((4, 8, 8), bool))
    with pytest.raises(ValueError, match=r"case 'case1'.*slices \[2\] are missing"):
        group_cases(records[:2] + records[3:])


def test_two_images_with_one_stem_get_distinct_keys():
    image = np.zeros((4, 4, 3), np.uint8)
    records = [Record(image, image[..., 0], "x", -1, None, p) for p in ("/a/x.png", "/b/x.png")]
    assert [c.key for c in group_cases(records)] == ["x", "x#2"]
    assert image_key(Record(image, image[..., 0], "case3", 7)) == "case3_s7"


def test_fedfms_mode_averages_every_figure_over_thresholds():
    truth = np.zeros((1, 16, 16), bool)
    truth[0, 4:12, 4:12] = True
    records = volume_records(truth, spacing=(1.0, 1.0, 1.0))
    prep = Preprocessing(image_size=S, low_res_size=L, normalise="unit", resize="stretch",
                         prompt="none")
    # Logit 0.6 everywhere: foreground at thresholds 0.1, 0.3 and 0.5 only.
    predict = lambda batch: np.full((len(batch["image"]), L, L, 1), 0.6, np.float32)
    standard = score_records(records, predict, prep, EvalSettings())
    fedfms = score_records(records, predict, prep, EvalSettings(mode="fedfms"))
    assert fedfms.dice == pytest.approx(3 / 5 * standard.dice)
    diagonal = metrics.field_of_view_diagonal((1, 16, 16), (1.0, 1.0, 1.0))
    assert fedfms.hd95 == pytest.approx((3 * standard.hd95 + 2 * diagonal) / 5)


def test_mean_scores_of_several_models():
    image = np.zeros((8, 8, 3), np.uint8)
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    records = [Record(image + 50, truth, "a", -1, None, "/a.png")]
    prep = Preprocessing(image_size=S, low_res_size=L, normalise="unit", resize="stretch",
                         prompt="none")
    hit = score_records(records, content_predict(), prep, EvalSettings())
    miss = score_records(records, lambda b: -content_predict()(b), prep, EvalSettings())
    mean = mean_scores([hit, miss])
    assert mean.dice == pytest.approx((hit.dice + miss.dice) / 2)
    assert mean.per_case["a"]["dice"] == pytest.approx(mean.dice)


def test_settings_from_config_name_the_key():
    c = ml_collections.ConfigDict({"metrics": "dice,hd95", "mode": "standard",
                                   "empty": "ignore", "nsd_tolerance_mm": 1.0,
                                   "batch_size": 4})
    assert EvalSettings.from_config(c).metrics == ("dice", "hd95")
    for key, value, message in [("metrics", "dice,hd59", r"eval.metrics: unknown .*'hd59'"),
                                ("metrics", "sigmoid", "is eval.mode now"),
                                ("mode", "fedfm", "eval.mode='fedfm'"),
                                ("empty", "zero", "eval.empty='zero'"),
                                ("nsd_tolerance_mm", 0.0, "eval.nsd_tolerance_mm")]:
        bad = ml_collections.ConfigDict(c.to_dict())
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            EvalSettings.from_config(bad)


def test_keep_empty_thins_only_empty_volume_slices():
    masks = np.zeros((20, 4, 4), bool)
    masks[5:9, 1, 1] = True
    records = volume_records(masks) + [Record(np.zeros((4, 4, 3), np.uint8),
                                              np.zeros((4, 4), np.uint8), "img", -1)]
    kept = keep_empty_slices(records, 0.25, [0, 1])
    slices = [r.slice_index for r in kept if r.case_id == "case1"]
    assert set(range(5, 9)) <= set(slices) and len(slices) == 4 + round(0.25 * 16)
    assert kept[-1].case_id == "img"  # images are never thinned
    assert kept == keep_empty_slices(records, 0.25, [0, 1])  # seeded
    assert keep_empty_slices(records, 1.0, [0]) == records
    with pytest.raises(ValueError, match="keep_empty"):
        keep_empty_slices(records, 1.5, [0])
