import json
import subprocess
import sys

import numpy as np
import pytest

from fedfms_jax.data import load_sites
from fedfms_jax.data.__main__ import main
from tests.data.conftest import make_fedfms_site, nifti_volume, save_nifti, write_png

SYNTH = ["--num-sites", "3", "--per-site", "12", "--size", "32"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_inspect_synthetic_json_counts_match_load_sites(capsys):
    code, out, _ = _run(capsys, "inspect", "--layout", "synthetic", "--json", *SYNTH)
    assert code == 0
    summary = _last_json(out)
    sites = load_sites("synthetic", num_sites=3, per_site=12, image_size=32)
    assert summary["sites"].keys() == sites.keys()
    for name, site in sites.items():
        entry = summary["sites"][name]
        assert (entry["train"], entry["val"]) == (site.num_train, site.num_val)
        train = entry["details"]["train"]
        assert train["image_shapes"] == [[32, 32, 3]] and train["label_values"] == [0, 1]
        assert 0 < train["foreground_fraction"] < 0.5
    assert "site1: train 12" in out


def test_synth_then_inspect_folders_and_fedfms(tmp_path, capsys):
    code, out, _ = _run(capsys, "synth", "--out", str(tmp_path / "png"), "--sites", "2",
                        "--per-site", "8", "--size", "32")
    assert code == 0 and "wrote" in out
    assert (tmp_path / "png" / "site1" / "train" / "images" / "case00000.png").exists()
    code, out, _ = _run(capsys, "inspect", "--layout", "folders", "--root",
                        str(tmp_path / "png"), "--json")
    assert code == 0
    assert {n: (s["train"], s["val"]) for n, s in _last_json(out)["sites"].items()} == {
        "site1": (8, 2), "site2": (4, 2)}
    _run(capsys, "synth", "--out", str(tmp_path / "npy"), "--format", "fedfms", "--sites", "1",
         "--per-site", "16", "--size", "32", "--volumes", "--depth", "8")
    code, out, _ = _run(capsys, "inspect", "--layout", "fedfms", "--root",
                        str(tmp_path / "npy"), "--json")
    site = _last_json(out)["sites"]["site1"]
    assert (site["train"], site["details"]["train"]["cases"]) == (16, 2)


def test_inspect_nifti_with_options(tmp_path, capsys):
    image, label = nifti_volume()
    for case in ("a", "b"):
        save_nifti(tmp_path / "site1" / case / "image.nii.gz", image)
        save_nifti(tmp_path / "site1" / case / "label.nii.gz", label)
    code, out, _ = _run(capsys, "inspect", "--layout", "nifti", "--root", str(tmp_path),
                        "--label-map", "1:1,2:1", "--option", "keep_empty=0", "--json")
    assert code == 0
    site = _last_json(out)["sites"]["site1"]
    assert (site["train"], site["val"]) == (3, 3)
    assert site["details"]["train"]["spacing"] == [[3.0, 0.9, 0.8]]  # (z, row, col) mm


def test_bad_input_exits_non_zero_naming_the_file(tmp_path, capsys):
    make_fedfms_site(tmp_path, "s", train=3)
    np.save(tmp_path / "s" / "label_npy" / "case1_s1.npy", np.full((8, 8, 1), 3, np.uint8))
    code, out, err = _run(capsys, "inspect", "--layout", "fedfms", "--root", str(tmp_path),
                          "--json")
    assert code == 1
    assert "s/label_npy/case1_s1.npy: unexpected label values [3]" in err
    assert _last_json(out)["path"].endswith("case1_s1.npy")
    code, out, _ = _run(capsys, "inspect", "--layout", "fedfms", "--root", str(tmp_path),
                        "--json", "--skip-bad")
    assert code == 0
    summary = _last_json(out)
    assert summary["sites"]["s"]["train"] == 2 and summary["totals"]["skipped"] == 1
    assert "skipped 1 bad inputs" in out
    assert summary["skipped"][0]["path"].endswith("case1_s1.npy")


def test_missing_root_and_bad_options(tmp_path, capsys):
    code, _, err = _run(capsys, "inspect", "--layout", "folders", "--root",
                        str(tmp_path / "absent"))
    assert code == 1 and "absent: data root does not exist" in err
    write_png(tmp_path / "s" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "s" / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    code, _, err = _run(capsys, "inspect", "--layout", "folders", "--root", str(tmp_path),
                        "--option", "no_such_option=1")
    assert code == 2 and "no_such_option" in err
    with pytest.raises(SystemExit):
        main(["inspect", "--layout", "folders", "--label-map", "one"])


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fedfms_jax.data", "inspect", "--layout",
                             "synthetic", "--json", "--num-sites", "2", "--per-site", "4",
                             "--size", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(_last_json(result.stdout)["sites"]) == {"site1", "site2"}


def test_bench_reports_records_per_second(capsys):
    code, out, _ = _run(capsys, "bench", "--num-sites", "1", "--per-site", "8", "--size", "16",
                        "--image-size", "32", "--batch-size", "2", "--epochs", "2")
    assert code == 0 and "site1: 14 records at 32px" in out and "records/s" in out
