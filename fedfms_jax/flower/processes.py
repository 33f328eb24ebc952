"""Child processes that never outlive the command that started them.

Flower's SuperLink and SuperNodes detach helpers into sessions of their own (SuperExec, and
per message a `flwr-serverapp` or `flwr-clientapp`), so stopping the processes we started is
not enough: their helpers would linger. `Processes` therefore
  * makes this process a child subreaper (Linux), so detached grandchildren whose parent
    exits are re-parented here instead of to init, where they can still be found and stopped;
  * starts each child in its own session (a terminal's Ctrl-C reaches only us, and we stop
    the children in order) with PR_SET_PDEATHSIG, so the kernel sends SIGTERM to each child
    if we are killed outright and get no chance to clean up;
  * stops everything on exit: SIGTERM to the processes it started, then to every remaining
    descendant, SIGKILL after a grace period, and reaps the zombies.
Every child also gets FEDFMS_FLOWER_RUN=<tag> in its environment, which its own children
inherit, so a test can check that no process of a run is left anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

RUN_TAG_ENV = "FEDFMS_FLOWER_RUN"

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(option, value, 0, 0, 0) == 0


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux >= 3.4); False elsewhere."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it exits."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tie_to_parent(parent: int, poll: float = 0.5) -> None:
    """This process ends when process `parent` does: PR_SET_PDEATHSIG (Linux; SIGTERM when
    the parent thread that started it exits) and, for a parent that is not our direct one
    or a platform without it, a daemon thread that polls the pid and exits at once."""
    import threading

    _die_with_parent()
    if os.getppid() != parent and not psutil.pid_exists(parent):
        os._exit(1)  # the parent died before the signal was armed

    def watch():
        while True:
            try:
                alive = psutil.Process(parent).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                os._exit(1)
            time.sleep(poll)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_on_signals() -> None:
    """SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt in the main thread, so
    `with Processes(...)` blocks unwind and stop their children.

    SIGINT is set explicitly: a process started with SIGINT ignored (a background job of a
    non-interactive shell, a pytest-xdist worker's child) inherits SIG_IGN, and Python then
    leaves it ignored, so Ctrl-C / kill -INT would leave the whole federation running."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True,
                  what: str = "server") -> None:
    """Blocks until `host:port` accepts TCP connections; TimeoutError after `timeout` s,
    RuntimeError as soon as `alive()` turns False."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if not alive():
            raise RuntimeError(f"{what} exited before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.1)


def tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last lines of a text file ('' if it does not exist)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class ChildExited(RuntimeError):
    """A process the launcher started exited while it was still needed."""


class Processes:
    """Starts named child processes and guarantees that they and all their descendants
    are gone when the `with` block ends, however it ends.

        with Processes(tag) as procs:
            procs.start("superlink", ["flower-superlink", ...], log_dir / "superlink.log")
    """

    def __init__(self, tag: str, env: Mapping[str, str] | None = None,
                 grace: float = 10.0):
        self.tag = tag
        self.env = {**os.environ, **(env or {}), RUN_TAG_ENV: tag}
        self.grace = grace
        self.children: list[Child] = []
        self._seen: dict[int, psutil.Process] = {}
        self.subreaper = False

    def __enter__(self) -> "Processes":
        self.subreaper = become_subreaper()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, name: str, argv: Sequence[str], log_path: str | os.PathLike | None,
              env: Mapping[str, str] | None = None) -> Child:
        """Starts `argv` with stdout and stderr appended to `log_path` (None: ours)."""
        if log_path is None:
            out = contextlib.nullcontext(None)
        else:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")
        with out as out:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=None if log_path is None else subprocess.STDOUT,
                env={**self.env, **(env or {})}, start_new_session=True,
                preexec_fn=_die_with_parent)
        child = Child(name, popen, log_path)
        self.children.append(child)
        log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return child

    def descendants(self) -> list[psutil.Process]:
        """Every live process below this one (children, and orphans re-parented here)."""
        try:
            found = psutil.Process().children(recursive=True)
        except psutil.Error:
            found = []
        for p in found:
            self._seen.setdefault(p.pid, p)
        return found

    def check(self) -> None:
        """Raises ChildExited naming the first started process that has exited, with the end
        of its log; also reaps re-parented zombies."""
        self.reap()
        for child in self.children:
            code = child.popen.poll()
            if code is not None:
                raise ChildExited(f"{child.name} (pid {child.pid}) exited with code {code}; "
                                  f"end of {child.log_path}:\n{tail(child.log_path)}")

    def reap(self) -> None:
        """Collects exit statuses of re-parented children, so that their pids disappear
        (Flower's helpers watch their parent's pid to know when to exit)."""
        ours = {c.pid for c in self.children}
        for p in self.descendants():
            with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
                if p.pid not in ours and p.ppid() == os.getpid() and \
                        p.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(p.pid, os.WNOHANG)
        for child in self.children:
            child.popen.poll()

    def stop(self) -> None:
        """SIGTERM the started processes (newest first), then every remaining descendant;
        SIGKILL whatever is left after the grace period; reap. Idempotent."""
        self.descendants()  # remember the tree before parents die and orphans move
        for child in reversed(self.children):
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        self._wait_children(self.grace / 2)
        remaining = self._alive()
        for p in remaining:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, remaining = psutil.wait_procs(remaining, timeout=self.grace / 2)
        for p in remaining + self._alive():
            log.warning("killing %s (pid %d), still running %.0f s after SIGTERM",
                        _describe(p), p.pid, self.grace)
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(self._alive(), timeout=5)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=5)
        self.reap()

    def _wait_children(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.reap()

    def _alive(self) -> list[psutil.Process]:
        """Descendants now, and every process seen earlier that still runs (it may have been
        re-parented away if this is no subreaper)."""
        self.descendants()
        alive = []
        for pid, p in list(self._seen.items()):
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
                    continue
            except psutil.Error:
                pass
            del self._seen[pid]
        return alive


def _describe(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()[:3]) or p.name()
    return "?"


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes (of this user) whose environment carries FEDFMS_FLOWER_RUN=tag."""
    found = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(RUN_TAG_ENV) == tag:
                found.append(p)
    return found
