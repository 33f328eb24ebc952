"""Timing on a shared machine: both frameworks' repetitions interleaved, medians reported.

Each workload gives one zero-argument callable per framework that runs the work once and
returns only when it is finished (JAX: block_until_ready; PyTorch: eager, or synchronize on
a GPU). The first call of each is timed on its own (JAX: tracing and XLA compilation are
timed separately before it, see `timed`); then `warmup` untimed calls; then `reps` rounds in
which the frameworks alternate, in a different order each round, so a burst of load from
other processes falls on both alike.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping


@dataclasses.dataclass
class Timing:
    """Seconds of one workload in one framework."""

    first_s: float            # the first call (after any separate compilation)
    times: list[float]        # the timed repetitions

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree."""
        return (max(self.times) - min(self.times)) / self.median

    def to_json(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "first_s": self.first_s,
                "spread": self.spread, "times_s": self.times}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1
            ) -> dict[str, Timing]:
    """Interleaved medians of several callables doing the same work (see the module doc)."""
    names = list(fns)
    first = {name: timed(fns[name])[1] for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(fns[name])[1])
    return {name: Timing(first[name], times[name]) for name in names}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other processes share this machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """This process's peak resident memory since start or the last `reset_peak_rss`, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
