"""How many clients train at once, and with which rematerialisation, so that a round fits.

Before the first round the engine compiles its local steps for a candidate layout with
abstract inputs (no data moves) and reads XLA's compiled memory analysis: the bytes a
segment of local steps needs beyond what is already resident (the frozen weights, which the
model holds anyway), i.e. the clients' state, the segment's batches (on the device and their
host copy) and XLA's temporary buffers (the activations kept for the backward). It compares
that with the memory the device has free now (an accelerator's allocator limit minus what is
in use; on the CPU the host's available RAM), of which it plans to use a share (`policy`).

Candidates: how many clients at once (up to all of them) and how much recomputation
(`model.remat` off < blocks < full); on an accelerator the widest first, on the CPU the
least recomputation first and no wider than a step's work needs (`policy` says why; the
work is read from the lowered program, so a width above that is never compiled). The
activations grow linearly with the clients trained at once, so a narrower layout is
compiled only when the compile of its remat mode at the widest width worth running
predicts that it fits.
Compiling the chosen layout fills JAX's compilation caches, so the first round does not
compile it again; the candidates that do not run are released (`Federation.fitted`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Mapping

import jax

from fedfms_jax.models.image_encoder import REMAT_MODES

log = logging.getLogger(__name__)

# Fraction of an accelerator's free memory a round may plan to use: the allocator's
# fragmentation and what XLA's analysis does not see.
HEADROOM = 0.85
# ... and of the host's free RAM on the CPU backend (see `policy`).
HOST_SHARE = 0.5
# On the CPU, clients are batched together only until a call's step has this much work per
# core (XLA's cost analysis of the lowered program): ~10 ms at a 2-core host's fp32 roof,
# past which per-operation overheads no longer dominate and more clients at once only add
# memory. Measured on a 2-core AMD EPYC, fedmsa, batch 4: the tiny variant (0.2 GFLOP a
# client-step) trains 3 clients 15% faster at once than one at a time; the small variant at
# 256 px (5.7 GFLOP) as fast one at a time at K = 4 (0.92 against 0.97 s a round of 2
# steps) and faster at K = 8 (1.87 against 2.34 s), with a quarter of the temporaries.
CPU_CALL_FLOPS_PER_CORE = 1e9
GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    """Compiled memory of one segment of local steps, bytes."""

    arguments: int    # the state, the batches and the frozen weights
    temporaries: int  # XLA's temporary buffers (activations kept for the backward)
    outputs: int      # what is not written in place of a donated input
    resident: int     # of the arguments, what is held anyway (the frozen weights)
    host_batches: int  # the segment's batches as numpy arrays on the host

    @property
    def total(self) -> int:
        """Bytes the segment needs beyond what is already resident."""
        return (self.arguments - self.resident + self.temporaries + self.outputs
                + self.host_batches)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The chosen layout and why."""

    remat: str
    clients_per_step: int
    num_clients: int
    need: int         # bytes (MemoryNeed.total of the chosen layout)
    available: int    # bytes free when chosen
    chosen: bool      # False: both were fixed by the config, nothing was chosen

    def describe(self) -> str:
        if not self.chosen:
            return (f"memory: {self.clients_per_step} of {self.num_clients} client(s) at "
                    f"once, model.remat={self.remat} (as configured)")
        return (f"memory: {self.clients_per_step} of {self.num_clients} client(s) at once, "
                f"model.remat={self.remat} (chosen from the compiled memory analysis: a "
                f"segment needs {self.need / GB:.2f} GB, {self.available / GB:.1f} GB free)")


class DoesNotFit(RuntimeError):
    """Not even one client at a time with full rematerialisation fits."""


def available_memory(device: jax.Device | None = None) -> int:
    """Bytes free on `device` (default: the first visible): an accelerator's allocator
    limit minus its use; on the CPU the host's MemAvailable, or the cgroup's limit minus its
    use when that is smaller."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    free = _meminfo_available()
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), g.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            free = min(free, int(limit) - int(usage))
    return free


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def release_free_heap() -> bool:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim). XLA's compiler frees
    hundreds of MB after each compile, which glibc otherwise keeps in the process's resident
    memory (measured: fitting a small-variant fedmsa round of K = 4, 1,024 -> 706 MB RSS).
    False where there is no glibc (nothing to do there)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    gc.collect()  # the candidate layouts' executables, compiled and not kept
    trim(0)
    return True


def candidate_widths(num_clients: int, num_devices: int) -> list[int]:
    """Clients at once worth trying, widest first: multiples of the device count up to all
    clients, each the narrowest width that needs that many chunks (so no width pads more)."""
    widths = []
    for chunks in range(1, num_clients + 1):
        width = -(-num_clients // chunks)
        width = -(-width // num_devices) * num_devices
        if not widths or width < widths[-1]:
            widths.append(width)
    return widths


def policy(platform: str) -> dict:
    """choose_layout's preferences on a platform. An accelerator's memory is its own and
    more clients at once fill it better, so: the widest layout first, up to HEADROOM of its
    free memory. On the CPU the 'device' memory is the host's RAM, which the data pipeline,
    the Python heap and every other process share, and one client-step of a real model
    already keeps the cores busy (more clients at once only cost memory): so less
    recomputation first, plan for at most HOST_SHARE of the free RAM, and batch clients
    only up to CPU_CALL_FLOPS_PER_CORE of work per core and step."""
    if platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        return {"prefer": "recompute", "headroom": HOST_SHARE,
                "call_flops": CPU_CALL_FLOPS_PER_CORE * cores}
    return {"prefer": "width", "headroom": HEADROOM}


def choose_layout(measure: Callable[[str, int], MemoryNeed], num_clients: int,
                  num_devices: int, *, remat: str = "auto", clients_per_step: int = 0,
                  available: int | None = None, prefer: str = "width",
                  headroom: float = HEADROOM, call_flops: float = 0.0,
                  step_flops: Callable[[int], float] | None = None) -> Layout:
    """The layout to run: `measure(remat, clients_per_step)` compiles one candidate and
    returns its MemoryNeed. remat "auto" and clients_per_step 0 are chosen; a fixed value is
    kept (and, when both are fixed, nothing is compiled here). prefer "width": the most
    clients at once, then the least recomputation; "recompute": the other way round (see
    `policy`). call_flops > 0 and `step_flops(width)` (the FLOPs of one step of that many
    clients, read without compiling, at the narrowest width) with a chosen width: no wider
    than the narrowest candidate whose step has that much work; wider ones are never
    compiled. The first candidate whose need is within headroom x the free memory wins."""
    if remat != "auto" and clients_per_step:
        return Layout(remat, min(clients_per_step, num_clients), num_clients, 0, 0, False)
    free = available_memory() if available is None else available
    budget = headroom * free
    modes = REMAT_MODES if remat == "auto" else (remat,)
    widths = ([min(clients_per_step, num_clients)] if clients_per_step
              else candidate_widths(num_clients, num_devices))
    if call_flops and step_flops is not None and not clients_per_step:
        # Read at the narrowest width, the one a step of a real model (small, ViT-B) runs
        # at: its lowering is then the one compiled, where another would leave ~50 MB of
        # the lowering's native memory behind (small variant, measured).
        per_client = step_flops(widths[-1]) / widths[-1]
        cap = min((w for w in widths if w * per_client >= call_flops), default=widths[0])
        widths = [w for w in widths if w <= cap]
    widest = widths[0]  # worth running: its compile predicts the narrower ones' needs
    order = ([(mode, width) for width in widths for mode in modes] if prefer == "width"
             else [(mode, width) for mode in modes for width in widths])
    needs: dict[tuple[str, int], MemoryNeed] = {}
    least = None  # (bytes, mode, width, compiled?) of the leanest candidate seen
    for mode, width in order:
        if (mode, widest) not in needs:
            needs[mode, widest] = measure(mode, widest)
        full = needs[mode, widest]
        # The activations scale with the clients at once; the state and batches do not.
        estimate = full.total - full.temporaries * (1 - width / widest)
        if estimate > budget:
            if least is None or estimate < least[0]:
                least = (estimate, mode, width, False)
            continue
        if (mode, width) not in needs:
            needs[mode, width] = measure(mode, width)
        total = needs[mode, width].total
        if total <= budget:
            return Layout(mode, width, num_clients, total, free, True)
        if least is None or total < least[0]:
            least = (total, mode, width, True)
    need, mode, width, compiled = least
    raise DoesNotFit(
        f"one round does not fit in memory: {free / GB:.1f} GB free ({headroom:.0%} of it, "
        f"{budget / GB:.1f} GB, planned for), and the leanest layout, {width} client(s) at "
        f"once with model.remat={mode}, needs about {need / GB:.1f} GB "
        f"({'compiled' if compiled else 'estimated from the widest layout compiled'}); "
        "lower data.batch_size or train.steps_per_segment, use a smaller model.variant, or "
        "free memory")


__all__ = ["HEADROOM", "HOST_SHARE", "DoesNotFit", "Layout", "MemoryNeed", "available_memory",
           "candidate_widths", "choose_layout", "policy", "release_free_heap"]
