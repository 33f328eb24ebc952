"""DP-FedAvg through the train runner: epsilon in every round record, the budget stop
(checkpointed, resumable), and every bad privacy setting named before any data is read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedfms_jax.config import ConfigError, load_config_file, validate
from fedfms_jax.fed.accounting import Accountant
from fedfms_jax.run_log import read_records
from fedfms_jax.train import run


def private_config(**privacy):
    config = load_config_file(Path(__file__).parent / "tiny_config.py")
    config.mode = "decoder"   # the aggregation is what is tested: the cheapest model to train
    config.rounds = 3
    config.eval.every = 3
    config.privacy.update(privacy)
    return config


def test_epsilon_in_every_round_and_the_budget_stops_the_run_checkpointed(tmp_path):
    accountant = Accountant(1.0, 1e-5, num_clients=2, clients_per_round=2)
    # Room for two rounds, not three.
    budget = (accountant.epsilon(2) + accountant.epsilon(3)) / 2
    config = private_config(noise_multiplier=1.0, clip_norm=0.1, target_epsilon=budget)
    printed = []
    result = run(config, tmp_path / "dp", echo=printed.append)
    records = read_records(tmp_path / "dp", "round")
    assert [r["round"] for r in records] == [1, 2]
    epsilons = [r["epsilon"] for r in records]
    assert all(math.isfinite(e) for e in epsilons) and epsilons[0] < epsilons[1]
    assert epsilons == pytest.approx([accountant.epsilon(1), accountant.epsilon(2)], rel=1e-12)
    for r in records:
        assert r["noise_std"] > 0 and set(r["update_norm"]) == {"site1", "site2"}
    assert result["rounds"] == 2 and result["epsilon"] == pytest.approx(epsilons[-1])
    assert any("privacy budget: round 3 would reach epsilon" in line for line in printed)
    assert any(line.startswith("privacy: epsilon") for line in printed)
    assert read_records(tmp_path / "dp", "eval")[-1]["round"] == 2   # evaluated where it stopped
    saved = [int(p.name) for p in (tmp_path / "dp" / "checkpoints").iterdir()
             if p.name.isdigit()]
    assert max(saved) == 2


@pytest.mark.parametrize("privacy, message", [
    ({"clip_norm": -0.1}, "privacy.clip_norm=-0.1 must be >= 0"),
    ({"noise_multiplier": -1.0, "clip_norm": 1.0}, "privacy.noise_multiplier=-1.0 must be >= 0"),
    ({"noise_multiplier": 1.0}, "privacy.noise_multiplier=1.0 needs privacy.clip_norm > 0"),
    ({"delta": 0.0}, "privacy.delta=0.0 must be > 0"),
    ({"delta": 1.0}, "privacy.delta=1.0 must be < 1"),
    ({"target_epsilon": 3.0, "clip_norm": 1.0}, "privacy.target_epsilon=3.0 needs "
                                                "privacy.noise_multiplier > 0"),
    ({"target_epsilon": 1.0, "clip_norm": 1.0, "noise_multiplier": 1.0},
     "privacy.target_epsilon=1.0 is below the epsilon of a single round (4.7"),
])
def test_bad_privacy_settings_are_named_before_any_data_is_read(privacy, message):
    with pytest.raises(ConfigError) as error:
        validate(private_config(**privacy))
    assert message in str(error.value)


def test_privacy_needs_an_aggregation():
    config = private_config(clip_norm=1.0)
    config.algorithm = "local"
    with pytest.raises(ConfigError, match="privacy.clip_norm and privacy.noise_multiplier "
                                          "apply to a federation's aggregation"):
        validate(config)


def test_a_checkpoint_from_before_privacy_resumes_only_without_it():
    """Runs checkpointed before the privacy keys existed resume at their defaults (their
    trajectory had no DP); asking for DP on resume changes the trajectory: refused."""
    from fedfms_jax.config import resume_conflicts, trajectory
    old = {k: v for k, v in trajectory(private_config()).items()
           if not k.startswith("privacy.")}
    assert resume_conflicts(old, private_config()) == []
    assert resume_conflicts(old, private_config(clip_norm=0.1)) == [
        "privacy.clip_norm: checkpoint None, this run 0.1"]
