"""The train CLI and runner: config checks before any compile, logs, resume, final weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfms_jax.config import ConfigError, load_config_file, validate
from fedfms_jax.evaluate import RunError, evaluate
from fedfms_jax.fed.checkpoint import CheckpointMismatch
from fedfms_jax.fed.round import Federation
from fedfms_jax.run_log import FINAL_WEIGHTS, read_records
from fedfms_jax.train import run
from fedfms_jax.weights_file import read_weights


def small_config(**changes):
    """tests/tiny_config.py (configs/demo.py shrunk: random tiny SAM, 3 small synthetic
    sites, site3 unseen, 2 rounds) with `changes`."""
    config = load_config_file(Path(__file__).parent / "tiny_config.py")
    config.update(changes)
    return config


def final_weights(workdir):
    return read_weights(workdir / FINAL_WEIGHTS)[1]


def test_run_logs_evaluates_and_resumes_exactly(tmp_path, monkeypatch):
    """2 rounds, then resumed to 3, equals 3 uninterrupted rounds bit for bit, at the
    production Adam eps 1e-8 (where any difference in the restored state would show as
    diverging +-lr steps); evaluate rescores the run; a checkpoint of another mode is refused
    and changes nothing."""
    config = small_config(mode="fedmsa")
    config.train.adam_eps = 1e-8
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    monkeypatch.chdir(tmp_path)
    first = run(config, "interrupted")  # a relative workdir, as users type it
    assert set(first["val"]) == {"site1", "site2"} and set(first["test"]) == {"site3"}
    assert 0 <= first["val"]["site1"].dice <= 1
    printed = []
    config.rounds = 3
    config.eval.every = 3   # how often it evaluates cannot change the trajectory: allowed
    config.data.num_threads = 1
    run(config, interrupted, echo=printed.append)
    assert any("resumed" in line and "round 2" in line for line in printed)
    run(config, straight)
    records = read_records(interrupted, "round")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[0]["bytes_up_per_client"] > 0
    a, b = final_weights(interrupted), final_weights(straight)
    assert set(a) == set(b)
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differing, f"the resumed run differs from the uninterrupted one in {differing}"

    # The evaluate CLI rebuilds the run from its config.json and scores its last checkpoint
    # exactly as the run's own final evaluation did.
    logged = read_records(straight, "eval")[-1]
    assert logged["split"] == "test"
    again = evaluate(straight, "test", echo=printed.append)
    assert again["site3"].dice == pytest.approx(logged["sites"]["site3"]["dice"], abs=1e-6)
    assert read_records(straight, "eval")[-1]["round"] == 3
    with pytest.raises(RunError, match="config.json not found"):
        evaluate(tmp_path / "nowhere")

    saved = (straight / "config.json").read_text()
    # A config that would change the trajectory is refused, naming every field, before the
    # engine is fitted (a compile: minutes at ViT-B); nothing of the run is touched.
    def no_fit(*_, **__):
        raise AssertionError("the federation was fitted before the checkpoint was checked")
    monkeypatch.setattr(Federation, "fitted", no_fit)
    changed = small_config()
    changed.update(mode="fedmsa", rounds=4, seed=5)
    changed.data.batch_size = 2
    changed.train.local_epochs = 2
    changed.train.client_fraction = 0.5
    changed.train.learning_rate = 3e-3
    with pytest.raises(CheckpointMismatch) as refused:
        run(changed, straight)
    for field in ("seed: checkpoint 0, this run 5", "data.batch_size: checkpoint 4, this run 2",
                  "train.local_epochs", "train.client_fraction", "train.learning_rate"):
        assert field in str(refused.value)
    assert "rounds" not in str(refused.value).split("(")[0]
    config.mode = "decoder"
    with pytest.raises(CheckpointMismatch, match="mode"):
        run(config, straight)
    assert (straight / "config.json").read_text() == saved
    assert [r["round"] for r in read_records(straight, "round")] == [1, 2, 3]


def set_weights(c):
    c.model.weights = "missing.safetensors"


def set_missing_root(c):
    c.data.layout, c.data.root = "folders", "/no/such/folder"
    c.data.options = {}


def set_empty_root(c):
    c.data.layout, c.data.root = "fedfms", ""
    c.data.options = {}


def set_algorithm(c):
    c.algorithm = "fedsgd"


def set_metric_typo(c):
    c.eval.metrics = "dice,hd59"


def set_resize(c):
    c.data.resize = "crop"


@pytest.mark.parametrize("change, message", [
    (set_weights, "model.weights: missing.safetensors does not exist"),
    (set_missing_root, "data.root: /no/such/folder does not exist"),
    (set_empty_root, "data.root is empty"),
    (set_algorithm, "algorithm='fedsgd'"),
    (set_metric_typo, "eval.metrics: unknown metric(s) ['hd59']"),
    (set_resize, "data.resize='crop'"),
])
def test_bad_config_fails_before_compiling(tmp_path, change, message):
    config = small_config()
    change(config)
    with pytest.raises(ConfigError) as error:
        run(config, tmp_path / "run")
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def _bad_run(workdir):
    """A workdir whose config.json names an unknown server optimizer (as a hand edit would)."""
    workdir.mkdir()
    config = load_config_file("configs/demo.py").to_dict()
    config["train"]["server_optimizer"] = "adam"
    (workdir / "config.json").write_text(json.dumps(config))
    return str(workdir)


@pytest.mark.parametrize("command, message", [
    (["fedfms_jax.train", "--config", "configs/demo.py", "--workdir", "{tmp}/run",
      "--config.model.weights=nowhere.safetensors"], "nowhere.safetensors does not exist"),
    # The demo's synthetic options do not belong to the NIfTI layout (was a TypeError).
    (["fedfms_jax.train", "--config", "configs/demo.py", "--workdir", "{tmp}/run",
      "--config.data.layout=nifti", "--config.data.root={tmp}"],
     "data.options image_size, num_sites, per_site do not belong to the nifti layout, whose "
     "options are: slab, percentiles, window, keep_empty, modality, resample_label, "
     "geometry_tolerance, seed"),
    (["fedfms_jax.evaluate", "--workdir", "{bad_run}"],
     "train.server_optimizer='adam' is not one of: none, fedavgm, fedadam"),
    (["fedfms_jax.demo", "--rounds", "0", "--out", "{tmp}/run"], "rounds=0 must be >= 1"),
    (["fedfms_jax.flower.local", "--config", "configs/demo.py", "--sites", "3", "--workdir",
      "{tmp}/run", "--config.algorithm=central"], "algorithm=central is a baseline"),
])
def test_cli_config_errors_exit_2_with_one_sentence(tmp_path, command, message):
    bad_run = _bad_run(tmp_path / "bad") if "{bad_run}" in command else ""
    args = [a.format(tmp=tmp_path, bad_run=bad_run) for a in command]
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]  # one sentence, the last line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _set(config, key, value):
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node[parent]
    node[leaf] = value


@pytest.mark.parametrize("key, value, message", [
    ("mode", "fedsamx", "mode='fedsamx' is not one of: fedsam, fedmsa, fedlora, decoder"),
    ("data.layout", "dicom", "data.layout='dicom' is not one of: fedfms, folders, volumes, "
                             "nifti, synthetic"),
    ("data.normalise", "imagenet", "data.normalise='imagenet' is not one of: unit, sam"),
    ("data.prompt", "boxes", "data.prompt='boxes' is not one of: none, box, points"),
    ("model.dtype", "float16", "model.dtype='float16' is not one of: float32, bfloat16"),
    ("model.remat", "some", "model.remat='some' is not one of: auto, off, blocks, full"),
    ("train.embedding_cache", "ram", "train.embedding_cache='ram' is not one of: auto, "
                                     "memory, disk, off"),
    ("eval.mode", "fast", "eval.mode='fast' is not one of: standard, fedfms"),
    ("eval.metrics", "dice,sensitivity", "eval.metrics: "),
    ("train.server_optimizer", "momentum", "train.server_optimizer='momentum' is not one of"),
    ("train.client_fraction", 0.0, "train.client_fraction=0.0 must be > 0 and <= 1"),
    ("data.batch_size", 0, "data.batch_size=0 must be >= 1"),
    ("train.learning_rate", "1e-3", "train.learning_rate='1e-3' must be a number"),
    ("train.server_momentum", 0.5, "train.server_momentum is set, but "
                                   "train.server_optimizer='none' (plain FedAvg) has no"),
    ("data.options.window", (0, 1), "data.options window do not belong to the synthetic "
                                    "layout"),
    ("data.root", "/tmp", "data.root='/tmp' is set, but the synthetic layout is generated"),
    ("data.label_map", "1-1", "data.label_map='1-1' must be 'raw:class' pairs"),
    ("train.sever_lr", 0.1, "unknown key train.sever_lr; section 'train' has: adam_eps"),
])
def test_every_bad_value_is_named_before_any_data_is_read(key, value, message):
    config = small_config().to_dict()  # a dict: ConfigDict would refuse a str for a float
    _set(config, key, value)
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert message in str(error.value)


def test_server_optimizer_keys_follow_the_optimizer():
    config = small_config()
    config.train.server_optimizer = "fedadam"
    config.train.server_b2 = 0.999
    validate(config)
    config.train.server_momentum = 0.9
    with pytest.raises(ConfigError, match="takes only train.server_lr, train.server_b1"):
        validate(config)
    config = small_config(algorithm="local")
    config.train.server_optimizer = "fedavgm"
    with pytest.raises(ConfigError, match="algorithm=local has no server"):
        validate(config)


def test_model_remat_reaches_the_image_encoder():
    from fedfms_jax.build import build_model

    config = small_config()
    config.model.remat = "full"
    assert build_model(config).image_encoder.remat == "full"


def test_unseen_site_must_exist(tmp_path):
    config = small_config()
    config.data.unseen_site = "site9"
    with pytest.raises(ConfigError, match="data.unseen_site='site9' is not a site"):
        run(config, tmp_path / "run")




def test_prompt_and_resize_keys_reach_the_pipeline():
    """data.prompt / box_jitter / resize are config keys the training streams use."""
    from fedfms_jax.build import load_data
    from fedfms_jax.streams import ClientStreams, pipeline_options

    config = small_config()
    config.data.prompt, config.data.box_jitter, config.data.resize = "box", 0.0, "longest_side"
    validate(config)
    site = load_data(config)["site1"]
    streams = ClientStreams(config, [site.train], [0], pipeline_options(config, 128, 32))
    batch = streams.next_batches([1])
    assert batch["boxes"].shape == (1, 1, config.data.batch_size, 4)
    # The images travel as u8 pixels with their content size, normalised on the device;
    # nothing the loss does not read (the full-size mask, record indices).
    assert batch["pixels"].shape == (1, 1, config.data.batch_size, 128, 128, 3)
    assert batch["pixels"].dtype == np.uint8 and batch["mask_low_res"].dtype == np.uint8
    assert batch["content"].shape == (1, 1, config.data.batch_size, 2)
    assert set(batch) == {"pixels", "content", "mask_low_res", "valid", "boxes"}


def test_a_calls_batches_are_written_once_and_trained_where_they_lie():
    """next_batches(todo, length) gives each drawing client the draws it would give without
    `length`, then zeros to the call's length, in buffers that a CPU device trains without
    copying them (the engine's calls hold batches of one length, `clients.call_length`)."""
    import jax

    from fedfms_jax.build import load_data
    from fedfms_jax.fed import sharding
    from fedfms_jax.streams import ClientStreams, pipeline_options

    config = small_config()
    validate(config)
    sites = load_data(config)
    records = [sites["site1"].train, sites["site2"].train]
    streams, again = (ClientStreams(config, records, [0, 1], pipeline_options(config, 128, 32))
                      for _ in range(2))
    padded, plain = streams.next_batches([0, 2], length=3), again.next_batches([0, 2])
    assert set(padded) == set(plain)
    for field, value in padded.items():
        assert value.shape == (1, 3, *plain[field].shape[2:]), field
        np.testing.assert_array_equal(value[:, :2], plain[field], err_msg=field)
        assert not value[:, 2].any(), field
        assert value.ctypes.data % sharding.HOST_ALIGNMENT == 0, field
    placed = sharding.place_clients(padded, sharding.client_mesh(jax.devices()[:1]))
    if jax.devices()[0].platform == "cpu":
        for field, value in padded.items():
            assert placed[field].addressable_shards[0].data.unsafe_buffer_pointer() == \
                value.ctypes.data, f"{field} was copied"


def test_decoder_mode_encodes_each_image_once_and_trains_identically():
    """Decoder mode's frozen encoder runs once per training image (the cache, here on disk),
    and two rounds train bit-identically to the encoder running at every step; with
    data.augment the images change every epoch, so nothing is cached and the log says so."""
    from fedfms_jax.experiment import Experiment
    from tests.fed.helpers import assert_trees_equal, snapshot

    states, caches = {}, {}
    for storage in ("disk", "off"):
        config = small_config(mode="decoder")
        config.train.embedding_cache = storage
        # 2 steps of 4 for both clients (12 and 7 images): every image is drawn in the two
        # rounds, and one compiled program per storage instead of two (a 3-step client
        # alone would need a second).
        config.train.local_steps = 2
        experiment = Experiment(config)
        state = experiment.init_state()
        for _ in range(2):
            state, _ = experiment.train_round(state)
        states[storage], caches[storage] = snapshot(state), experiment.embedding_cache
    cache = caches["disk"]
    assert caches["off"] is None and cache.storage == "disk" and cache.path
    # 19 training images, 16 draws per client: each encoded exactly once.
    assert cache.computed == len(cache.done) == 19 and cache.done.all()
    assert_trees_equal(states["disk"], states["off"])

    config = small_config(mode="decoder")
    config.data.augment = True
    augmented = Experiment(config)
    assert augmented.embedding_cache is None
    assert "data.augment" in augmented.describe() and "every step" in augmented.describe()
