"""The benchmark harness runs end to end on its smallest plan and reports what it promises.

bench.run --smoke (tiny variant, one repetition, no memory cases) in a subprocess, with
XLA's cheap compilation settings: the numbers are meaningless, the record's shape is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")


def test_device_check_smoke_form_writes_parity_timings_and_memory(tmp_path):
    """bench/device.sh --device cpu --smoke: the accelerator check's script end to end
    (parity, bench.run --smoke, the memory cases), as a lent GPU machine runs it."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}",
               PYTHON=sys.executable)
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
