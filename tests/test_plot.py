"""Run log records and the plots made from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedfms_jax.plot import PREDICTIONS_FILE, main
from fedfms_jax.run_log import RunLog, format_table, read_records


def fake_run(workdir, dice_offset):
    log = RunLog(workdir)
    for r in range(1, 4):
        log.write({"kind": "round", "round": r, "loss": {"a": 1.0 / r}, "bytes_cumulative": r})
        log.write({"kind": "eval", "round": r, "split": "val",
                   "sites": {"a": {"dice": 0.3 + dice_offset + 0.1 * r, "hd95": float("nan")},
                             "b": {"dice": 0.2 + 0.1 * r}}})
        log.write({"kind": "eval", "round": r, "split": "test",
                   "sites": {"c": {"dice": 0.1 * r}}})
    rng = np.random.default_rng(0)
    np.savez(workdir / PREDICTIONS_FILE, sites=np.array(["a", "b", "c"]),
             images=rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
             masks=rng.random((3, 32, 32)) > 0.5, predictions=rng.random((3, 32, 32)) > 0.5)


def test_run_log_round_trip_and_truncate(tmp_path):
    fake_run(tmp_path, 0.0)
    evals = read_records(tmp_path, "eval")
    assert len(evals) == 6
    assert evals[0]["sites"]["a"]["hd95"] is None  # NaN is stored as null
    RunLog(tmp_path).truncate_after(2)
    assert max(r["round"] for r in read_records(tmp_path)) == 2


def test_read_records_names_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "round", "round": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_records(tmp_path)


def test_plot_cli_writes_pngs(tmp_path):
    runs = [tmp_path / "fedsam", tmp_path / "fedmsa"]
    for offset, run in zip((0.0, 0.1), runs):
        run.mkdir()
        fake_run(run, offset)
    out = tmp_path / "plots"
    assert main(["--workdir", *map(str, runs), "--out", str(out)]) == 0
    for name in ["dice_per_site.png", "predictions_fedsam.png", "predictions_fedmsa.png"]:
        image = np.asarray(Image.open(out / name))
        assert image.shape[0] > 100 and image.std() > 0, name


def test_plot_cli_missing_run(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "nothing")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_format_table_aligns():
    table = format_table(["mode", "dice"], [["fedsam", 0.81234], ["fedmsa", None]])
    lines = table.splitlines()
    assert lines[0].startswith("mode") and "0.8123" in lines[2] and lines[3].endswith("-")
    assert len({len(line) for line in lines}) == 1
