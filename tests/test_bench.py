"""The benchmark harness runs end to end and reports what it promises.

Default suite: bench.run's smallest run (--smoke --only encoder: the roof and the tiny
encoder, seconds) in a subprocess with all of XLA's cheap compile settings (the suite
itself takes only the first two, tests/conftest.py: the legacy fusion emitters would break
decoder mode's bit-identity tests): its numbers are
meaningless, its record is not; and the summary's figures from given records. The
accelerator check's whole smoke form (bench/device.sh: parity, every workload, the memory
cases; ~3 minutes on 2 quiet cores, mostly compiling the rounds) is @slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from tests.fast_build import FAST_COMPILE

ROOT = Path(__file__).resolve().parent.parent
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())


def fast_env() -> dict:
    """The suite's environment plus XLA's cheap compile settings, for a subprocess."""
    return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}",
                PYTHON=sys.executable)


def test_smallest_run_writes_its_record_and_prints_the_summary_last(tmp_path):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(fast_env(), TMPDIR=str(scratch))
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--only", "encoder",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    record = json.loads(out.read_text())
    assert record["summary"] == summary
    assert not list(scratch.iterdir()), "the run left its compilation cache behind"
    assert record["workloads_run"] == ["encoder"]
    assert [r["workload"] for r in record["workloads"]] == ["encoder tiny fwd"]
    (encoder,) = record["workloads"]
    assert encoder["batch"] == bench_run.PLANS["smoke"].small_batch and encoder["flops"] > 0
    for framework in ("jax", "torch"):
        timing = encoder[framework]
        assert len(timing["times_s"]) == 1 and all(t > 0 for t in timing["times_s"])
        assert 0 < timing["roof_fraction"], timing
    assert encoder["jax_compile_s"] > 0
    assert summary["encoder_speedup"] == pytest.approx(
        encoder["torch"]["median_s"] / encoder["jax"]["median_s"])
    assert summary["encoder_variant"] == "tiny" and summary["plan"] == "smoke"
    # Only what ran is summarised: no training, round or memory figure from nothing.
    assert not {"train_step_speedup", "fedfms_round_speedup", "decoder_cache_speedup",
                "memory_ratio"} & set(summary), sorted(summary)
    environment = record["environment"]
    assert environment["torch_threads"] == environment["usable_cores"]
    assert environment["omp_wait_policy"] == "PASSIVE"
    assert len(summary["load_average"]["start"]) == len(summary["load_average"]["end"]) == 3


def test_only_names_the_unknown_workload(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_run.parse_args(["--smoke", "--only", "encoder,trian"])
    assert exit_info.value.code == 2
    assert "trian" in capsys.readouterr().err
    assert bench_run.parse_args(["--only", " train , fedfms"]).only == ("train", "fedfms")


def timing(median):
    return {"median_s": median, "min_s": median, "times_s": [median]}


def test_summary_reads_each_target_figure_from_its_workload():
    plan = bench_run.PLANS["quick"]
    records = [
        {"workload": "encoder small fwd", "variant": "small", "speedup": 0.9,
         "jax": {**timing(0.1), "roof_fraction": 0.5}, "torch": {**timing(0.09)}},
        {"workload": "train step fedsam small", "variant": "small", "mode": "fedsam",
         "speedup": 1.4},
        {"workload": "train step fedmsa small", "variant": "small", "mode": "fedmsa",
         "speedup": 0.8},
        {"workload": "round fedmsa small K=8", "clients": 8, "speedup": 1.1},
        {"workload": "round fedmsa small K=4", "clients": 4, "speedup": 1.2},
        {"workload": "fedfms round fedmsa small K=6", "clients": 6, "speedup": 1.7,
         "masked_work": 0.0},
    ]
    memory = [
        {"framework": "jax", "clients": 4, "baseline_mb": 400, "peak_mb": 1000},
        {"framework": "torch", "clients": 4, "baseline_mb": 300, "peak_mb": 700},
        {"framework": "jax", "clients": 8, "baseline_mb": 400, "peak_mb": 9000},
        {"framework": "torch", "clients": 1, "error": "timed out"},
    ]
    env = {"device": "cpu", "torch_threads": 2, "usable_cores": 2}
    summary = bench_run.summarise(records, {"jax": 1e11, "torch": 1e11}, plan, {}, env,
                                  {"speedup": 6.5}, memory)
    # The least favourable training mode; the largest K for the round.
    assert summary["train_step_speedup"] == 0.8
    assert (summary["round_speedup"], summary["round_clients"]) == (1.1, 8)
    assert summary["fedfms_round_speedup"] == 1.7 and summary["fedfms_masked_work"] == 0.0
    assert summary["decoder_cache_speedup"] == 6.5
    # Each round's own memory (peak minus the process's baseline), K = 4 only.
    assert summary["memory_ratio"] == pytest.approx(600 / 400)
    assert bench_run.memory_ratio(memory, clients=1) is None  # the torch case failed


@pytest.mark.slow
def test_device_check_smoke_form_writes_parity_timings_and_memory(tmp_path):
    """bench/device.sh --device cpu --smoke: the accelerator check's script end to end
    (parity, bench.run --smoke, the memory cases), as a lent GPU machine runs it."""
    env = fast_env()
    proc = subprocess.run(["bash", "bench/device.sh", str(tmp_path), "--device", "cpu",
                           "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    device = json.loads(proc.stdout.strip().splitlines()[-1])
    assert device == json.loads((tmp_path / "device.json").read_text())
    parity = device["parity"]
    assert parity["passed"] and parity["relative_error_vs_float64"] <= parity["bound"], parity
    memory = {(m["framework"], m["mode"], m["batch"]): m for m in device["memory"]}
    assert set(memory) == {("jax", "fedmsa", 1), ("torch", "fedmsa", 1)}, device["memory"]
    assert all(m["peak_mb"] > 0 for m in memory.values()), device["memory"]
    jax_case = memory["jax", "fedmsa", 1]
    assert (jax_case["remat"], jax_case["clients_per_step"]) == ("off", 2)  # tiny: all fit
    out = tmp_path / "bench.json"
    summary = device["bench"]
    for key in ("encoder_speedup", "train_step_speedup", "round_speedup",
                "encoder_roof_fraction", "fedfms_round_speedup", "decoder_cache_speedup"):
        assert key in summary, f"summary lacks {key}: {sorted(summary)}"
        assert summary[key] > 0, f"{key} = {summary[key]}"
    record = json.loads(out.read_text())
    assert record["summary"] == summary
    assert {"encoder tiny fwd", "train step fedsam tiny"} <= {
        r["workload"] for r in record["workloads"]}
    for r in record["workloads"]:
        for framework in ("jax", "torch"):
            assert all(t > 0 for t in r[framework]["times_s"]), (r["workload"], framework)
        assert r["jax_compile_s"] > 0, r["workload"]
    assert record["environment"]["torch_threads"] == record["environment"]["usable_cores"]
    # FedFMS's protocol runs no masked step (every client stepping through the longest
    # count would waste 50% here), and the decoder round was timed both ways.
    protocol = next(r for r in record["workloads"] if r["workload"].startswith("fedfms round"))
    assert protocol["clients"] == 6 and len(set(protocol["steps"])) > 1
    assert summary["fedfms_masked_work"] == protocol["masked_work"] == 0.0
    assert protocol["masked_work_longest"] > 0.15
    assert set(record["decoder_cache"]) >= {"cached", "uncached", "speedup"}


def test_flower_bound_holds_every_round_after_the_first_to_the_simulators_median():
    from bench import flower

    # Round 1 of both compiles and is left out; the simulator's median of the rest is 0.5 s.
    summary = flower.summarise([90.0, 1.9, 2.6, 2.4], [20.0, 0.4, 0.5, 0.6])
    assert summary["bound_s"] == pytest.approx(2.5)  # max(2 s, 25 %) over 0.5 s
    assert summary["over_bound"] == [3] and not summary["within_bound"]
    assert summary["flower_overhead_s"] == pytest.approx(1.9)  # median 2.4 - 0.5
    assert flower.summarise([90.0, 12.0], [20.0, 10.0])["within_bound"]  # 25 % of 10 s
    assert not flower.summarise([90.0, 12.6], [20.0, 10.0])["within_bound"]
    with pytest.raises(ValueError, match="two rounds or more"):
        flower.summarise([90.0], [20.0])
