"""The train CLI and runner: config checks before any compile, logs, resume, final weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedfms_jax.evaluate import RunError, evaluate
from fedfms_jax.fed.checkpoint import CheckpointMismatch
from fedfms_jax.experiment import ConfigError, load_config_file
from fedfms_jax.run_log import read_records
from fedfms_jax.train import FINAL_WEIGHTS, run
from fedfms_jax.weights_file import read_weights


def small_config(**changes):
    """tests/tiny_config.py (configs/demo.py shrunk: random tiny SAM, 3 small synthetic
    sites, site3 unseen, 2 rounds) with `changes`."""
    config = load_config_file("tests/tiny_config.py")
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
    config.mode = "decoder"
    with pytest.raises(CheckpointMismatch, match="mode"):
        run(config, straight)
    assert (straight / "config.json").read_text() == saved
    assert [r["round"] for r in read_records(straight, "round")] == [1, 2, 3]


def set_weights(c):
    c.model.weights = "missing.safetensors"


def set_missing_root(c):
    c.data.layout, c.data.root = "folders", "/no/such/folder"


def set_empty_root(c):
    c.data.layout, c.data.root = "fedfms", ""


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


def test_cli_error_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedfms_jax.train", "--config", "configs/demo.py",
         "--workdir", str(tmp_path / "run"), "--config.model.weights=nowhere.safetensors"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "nowhere.safetensors does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unseen_site_must_exist(tmp_path):
    config = small_config()
    config.data.unseen_site = "site9"
    with pytest.raises(ConfigError, match="data.unseen_site='site9' is not a site"):
        run(config, tmp_path / "run")


