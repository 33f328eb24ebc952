"""The issue's acceptance check: one real volume stored as NIfTI, NRRD, MetaImage and a DICOM
series gives identical slice records, identical weights after two training steps of the tiny
pretrained SAM's decoder, and identical per-volume Dice, IoU, HD95 and NSD (with the
volume's spacing)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.data import load_sites, make_dataset
from fedfms_jax.fed.partition import split
from fedfms_jax.fed.round import segmentation_loss
from fedfms_jax.data.preprocessing import Preprocessing
from fedfms_jax.evaluation import EvalSettings, score_records
from fedfms_jax.weights_file import load_sam
from tests import real_volumes
from tests.data.conftest import colin_crop, make_format_sites
from tests.fast_build import FAST_COMPILE

FORMATS = ("nii.gz", "nrrd", "mha", "dicom")
SITES = ("nii_gz", "nrrd", "mha", "dicom")


def test_same_volume_in_four_formats_trains_and_scores_identically(tmp_path):
    crops = [(colin_crop(real_volumes.COLIN27_T1, z, 4), colin_crop(real_volumes.AAL_ATLAS, z, 4))
             for z in (80, 86)]
    root = make_format_sites(tmp_path, crops, FORMATS)
    sites = load_sites("volumes", root, label_map={77: 1, 78: 1}, unmapped="background",
                       keep_empty=1.0)  # the thalami, one class
    reference_records = sites["nii_gz"].train + sites["nii_gz"].val
    for site in SITES:
        records = sites[site].train + sites[site].val
        assert [(r.case_id, r.slice_index, r.spacing) for r in records] == [
            (r.case_id, r.slice_index, r.spacing) for r in reference_records]
        for a, b in zip(records, reference_records):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)

    # The demo's tiny SAM pretrained on shapes: a random one predicts one value everywhere,
    # and a Dice of 0 on every format would prove nothing.
    model = load_sam("weights/sam_tiny_natural.safetensors")
    graphdef, trainable, frozen = split(model, "decoder")
    optimizer = optax.adam(1e-2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(trainable, opt_state, batch):
        loss = lambda t: segmentation_loss(nnx.merge(graphdef, t, frozen), batch, None)
        grads = jax.grad(loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def segment(trainable, image):
        return nnx.merge(graphdef, trainable, frozen).segment(image)

    # Scored as evaluation scores a volume: per case, in 3-D with the records' spacing.
    prep = Preprocessing(image_size=128, low_res_size=32, normalise="sam", resize="stretch",
                         prompt="none")
    scores = lambda params, records: score_records(
        records, lambda batch: segment(params, batch["image"]), prep,
        EvalSettings(batch_size=4)).per_case

    batches = lambda records: list(make_dataset(records, image_size=128, batch_size=4,
                                                shuffle=False, normalise="sam"))
    results = {}
    for site in SITES:
        train, val = sites[site].train, sites[site].val
        assert len(train) == len(val) == 4
        params, opt_state = trainable, optimizer.init(trainable)
        for batch in batches(train) * 2:  # two steps
            params, opt_state = step(params, opt_state, {
                k: batch[k] for k in ("image", "mask_low_res", "valid")})
        results[site] = (params, scores(params, val))
    reference_params, reference = results["nii_gz"]
    (case,) = reference
    assert 0 < reference[case]["dice"] < 1 and reference[case]["hd95"] > 0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable,
                                         reference_params))
    assert any(moved)  # the steps trained something
    for site, (params, metrics) in results.items():
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                params, reference_params))), site
        assert metrics == reference, site
