"""The launcher's process supervision: no process of a run outlives it, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from fedfms_jax.flower.processes import (ChildExited, Processes, free_port, tagged_processes,
                                         wait_for_port)

# A child that detaches a grandchild into a session of its own (as Flower's SuperLink does
# with SuperExec), then either exits at once (orphaning the grandchild) or waits.
SPAWNER = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                     start_new_session=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
""")


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def tag():
    tag = uuid.uuid4().hex
    yield tag
    for p in tagged_processes(tag):  # never leave anything behind, even when a test fails
        p.kill()


def test_stop_ends_children_and_detached_grandchildren(tag, tmp_path):
    with Processes(tag, grace=4) as procs:
        procs.start("waiting", [sys.executable, "-c", SPAWNER, "wait"], tmp_path / "a.log")
        procs.start("orphaning", [sys.executable, "-c", SPAWNER, "exit"], tmp_path / "b.log")
        # two children, two grandchildren (one of them orphaned and re-parented to us)
        assert wait_until(lambda: len(tagged_processes(tag)) == 3)
        assert procs.subreaper
        assert wait_until(lambda: len(procs.descendants()) >= 3)
    assert wait_until(lambda: not tagged_processes(tag), timeout=10), tagged_processes(tag)


def test_check_names_the_child_that_exited(tag, tmp_path):
    with Processes(tag, grace=2) as procs:
        procs.start("superlink", [sys.executable, "-c", "print('bad port'); raise SystemExit(3)"],
                    tmp_path / "superlink.log")
        with pytest.raises(ChildExited, match=r"superlink \(pid \d+\) exited with code 3"
                                              r"(.|\n)*bad port"):
            assert wait_until(lambda: procs.children[0].popen.poll() is not None)
            procs.check()


LAUNCHER = textwrap.dedent("""
    import sys, time
    from fedfms_jax.flower.processes import Processes, exit_on_signals
    exit_on_signals()
    with Processes(sys.argv[1]) as procs:
        procs.start("child", [sys.executable, "-c", "import time; time.sleep(600)"],
                    sys.argv[2])
        print("started", flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_launcher_death_takes_children_along(tag, tmp_path, how):
    """Ctrl-C and SIGTERM run the cleanup; SIGKILL leaves it to PR_SET_PDEATHSIG. The
    launcher starts with SIGINT ignored, as a background job of a script does: Ctrl-C must
    stop it all the same."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, tag, str(tmp_path / "child.log")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "FEDFMS_FLOWER_RUN": tag},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert launcher.stdout.readline().strip() == "started"
        assert wait_until(lambda: len(tagged_processes(tag)) == 2)  # launcher + child
        launcher.send_signal(getattr(signal, how))
        code = launcher.wait(timeout=30)
        assert code == {"SIGINT": -2, "SIGTERM": 143, "SIGKILL": -9}[how]
        assert wait_until(lambda: not tagged_processes(tag), timeout=15), tagged_processes(tag)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_wait_for_port(tmp_path):
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    with pytest.raises(RuntimeError, match="exited before listening"):
        wait_for_port("127.0.0.1", port, timeout=5, alive=lambda: False)
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        wait_for_port("127.0.0.1", port, timeout=5)


def test_tagged_processes_sees_only_live_tagged_ones(tag):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env={**os.environ, "FEDFMS_FLOWER_RUN": tag})
    try:
        assert wait_until(lambda: [p.pid for p in tagged_processes(tag)] == [child.pid])
    finally:
        child.kill()
        child.wait()
    assert tagged_processes(tag) == []
    assert psutil.pid_exists(os.getpid())
