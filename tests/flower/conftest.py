"""Running the Flower launcher as users do, in a subprocess, and making sure that nothing
it started outlives a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedfms_jax.flower.processes import RUN_TAG_ENV, tagged_processes

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = "tests/tiny_config.py"


class Launch:
    """`python -m fedfms_jax.flower.local ...` in the background, its output in a file."""

    def __init__(self, workdir: Path, args: list[str], cache: Path):
        self.tag = uuid.uuid4().hex
        self.workdir = workdir
        self.output_path = workdir.parent / f"{workdir.name}.out"
        env = {**os.environ, RUN_TAG_ENV: self.tag, "JAX_COMPILATION_CACHE_DIR": str(cache),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._out = open(self.output_path, "w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fedfms_jax.flower.local", "--workdir", str(workdir), *args],
            cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.output_path.read_text()

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.popen.poll() is not None:
                raise AssertionError(f"the launcher exited ({self.popen.returncode}) before "
                                     f"printing {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the launcher did not finish within {timeout} s:\n"
                                 f"{self.output}") from None

    def leftovers(self, grace: float = 15.0) -> list:
        """Processes of this run still alive `grace` seconds after the launcher exited."""
        deadline = time.monotonic() + grace
        while (alive := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive]

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        for p in tagged_processes(self.tag):
            p.kill()
        self._out.close()


@pytest.fixture
def launch(jax_cache):
    """launch(workdir, *args) -> Launch; everything it started is killed at teardown."""
    launched = []

    def start(workdir: Path, *args: str) -> Launch:
        run = Launch(workdir, list(args), jax_cache)
        launched.append(run)
        return run

    yield start
    for run in launched:
        run.close()
