"""python -m fedfms_jax.inspect: counts, breakdown and bytes per round."""

from __future__ import annotations

import json

import pytest

from fedfms_jax.inspect import main


def run(capsys, *argv) -> tuple[str, dict]:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_fedmsa_vit_b(capsys):
    out, report = run(capsys, "--variant", "vit_b", "--mode", "fedmsa", "--json")
    assert report["total_params"] == 100_836_400
    assert report["trainable_params"] == 11_159_268
    assert report["bytes_up_per_client_fp32"] == 4 * 11_159_268
    assert report["bytes_down_per_client_fp32"] == 4 * 11_159_268
    assert report["bytes_up_per_client_bf16"] == 2 * 11_159_268
    assert sum(row["trainable_params"] for row in report["modules"]) == 11_159_268
    assert "image_encoder.blocks.*.space_adapter" in out and "11,159,268" in out


def test_classes_add_the_class_head(capsys):
    """Two classes: a 1x1 conv from 4 maps, 4 * 2 weights + 2 biases, trained (in every mode,
    see tests/fed/test_partition.py)."""
    _, one = run(capsys, "--variant", "tiny", "--mode", "fedlora", "--json")
    _, two = run(capsys, "--variant", "tiny", "--mode", "fedlora", "--classes", "2", "--json")
    assert one["lora_rank"] == two["lora_rank"] == 4
    assert two["total_params"] - one["total_params"] == 10
    assert two["trainable_params"] - one["trainable_params"] == 10
    assert {"module": "class_head", "params": 10, "trainable_params": 10} in two["modules"]


def test_without_json_prints_no_json(capsys):
    assert main(["--variant", "tiny", "--mode", "decoder"]) == 0
    out = capsys.readouterr().out
    assert "per client per round" in out and "{" not in out


@pytest.mark.parametrize("argv, message", [
    (["--mode", "fedavg"], "invalid choice: 'fedavg'"),
    (["--classes", "0"], "--classes must be >= 1"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
