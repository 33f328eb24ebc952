"""A site's node (SuperNode, SuperExec, site worker): none outlives the others or the
command, and a dead worker is restarted.

The SuperNodes here point at a port nothing listens on: they keep retrying (as a site does
while its SuperLink is down), which is all a lifetime test needs, and costs no federation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedfms_jax.flower import channel, node
from fedfms_jax.flower.processes import RUN_TAG_ENV, free_port, tagged_processes
from tests.flower.conftest import REPO
from tests.flower.test_processes import wait_until


@pytest.fixture
def tag():
    tag = uuid.uuid4().hex
    yield tag
    for p in tagged_processes(tag):
        p.kill()


def start_node(tmp_path: Path, tag: str) -> subprocess.Popen:
    """A node whose SuperNode retries an empty port; returns once its worker answers. SIGINT
    ignored at start, as for a background job of a script: Ctrl-C must stop it all the same."""
    argv = [sys.executable, "-m", "fedfms_jax.flower.node", "--worker_dir",
            str(tmp_path / "worker"), "--", "--insecure", "--superlink",
            f"127.0.0.1:{free_port()}", "--node-config", "site-index=0", "--max-wait-time", "300"]
    popen = subprocess.Popen(argv, cwd=REPO, env={**os.environ, RUN_TAG_ENV: tag},
                             stdout=open(tmp_path / "node.log", "ab"), stderr=subprocess.STDOUT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert wait_until(lambda: ping(tmp_path) is not None or popen.poll() is not None, 120), \
        (tmp_path / "node.log").read_text()
    assert popen.poll() is None, (tmp_path / "node.log").read_text()
    assert wait_until(lambda: process(tag, "fedfms_jax.flower.supernode") is not None)
    assert wait_until(lambda: process(tag, "fedfms_jax.flower.superexec") is not None)
    return popen


def ping(tmp_path: Path) -> int | None:
    """The worker's pid, or None when none answers."""
    try:
        return channel.call(tmp_path / "worker", {"kind": "ping"}, timeout=10)["pid"]
    except (channel.WorkerUnavailable, channel.WorkerDied, TimeoutError):
        return None


def process(tag: str, module: str):
    for p in tagged_processes(tag):
        if module in p.cmdline():
            return p
    return None


# SIGKILL is the hard case (no cleanup runs: PR_SET_PDEATHSIG and the worker's parent poll);
# every deployment test stops its nodes with SIGTERM and checks that nothing is left.
@pytest.mark.parametrize("how", [pytest.param("SIGINT", marks=pytest.mark.slow),
                                 pytest.param("SIGTERM", marks=pytest.mark.slow), "SIGKILL"])
def test_stopping_the_node_stops_supernode_and_worker(tmp_path, tag, how):
    popen = start_node(tmp_path, tag)
    assert len(tagged_processes(tag)) >= 4  # node, worker, SuperNode, SuperExec
    popen.send_signal(getattr(signal, how))
    assert popen.wait(timeout=60) == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[how]
    assert wait_until(lambda: not tagged_processes(tag), timeout=20), tagged_processes(tag)


def test_a_dead_worker_is_restarted_and_a_dead_supernode_ends_the_node(tmp_path, tag):
    popen = start_node(tmp_path, tag)
    first = ping(tmp_path)
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: ping(tmp_path) not in (None, first), timeout=120), \
        (tmp_path / "node.log").read_text()
    assert "the site worker exited with code -9; restarting it (1 of 5)" in \
        (tmp_path / "node.log").read_text()
    superexec = process(tag, "fedfms_jax.flower.superexec")
    superexec.kill()
    assert wait_until(lambda: (p := process(tag, "fedfms_jax.flower.superexec")) is not None
                      and p.pid != superexec.pid, timeout=30), (tmp_path / "node.log").read_text()
    assert "the SuperExec exited with code -9; restarting it (1 of 5)" in \
        (tmp_path / "node.log").read_text()
    process(tag, "fedfms_jax.flower.supernode").kill()
    assert popen.wait(timeout=60) != 0
    assert "the SuperNode exited with code -9; stopping the site worker and the SuperExec" in \
        (tmp_path / "node.log").read_text()
    assert wait_until(lambda: not tagged_processes(tag), timeout=20), tagged_processes(tag)


def test_the_worker_dir_joins_the_node_config(tmp_path):
    args = node.with_worker_dir(["--insecure", "--node-config", 'site-index=2 data-root="/d"'],
                                tmp_path)
    assert args == ["--insecure", "--node-config",
                    f'site-index=2 data-root="/d" worker-dir="{tmp_path}"']
    assert node.with_worker_dir(["--node-config=site-index=0"], tmp_path) == [
        f'--node-config=site-index=0 worker-dir="{tmp_path}"']
    for argv, match in [(["--insecure"], "no --node-config"),
                        (["--node-config", 'data-root="/d"'], "does not say which site"),
                        (["--node-config", 'site-index=0 worker-dir="/x"'], "--worker_dir does")]:
        with pytest.raises(ValueError, match=match):
            node.with_worker_dir(argv, tmp_path)


def test_node_arguments_are_checked_before_anything_starts(tmp_path, capsys):
    assert node.main(["--worker_dir", str(tmp_path)]) == 2
    assert "give the SuperNode's arguments after --" in capsys.readouterr().err
    assert node.main(["--worker_dir", str(tmp_path), "--", "--insecure"]) == 2
    assert "no --node-config" in capsys.readouterr().err
    assert not (tmp_path / channel.KEY_FILE).exists()
