"""Choosing how many clients train at once and the encoder's rematerialisation (fed.fit)."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.monitoring
import numpy as np
import pytest

from fedfms_jax.fed import fit
from fedfms_jax.fed.partition import num_bytes
from tests.fed.helpers import BATCH, NUM_CLIENTS, NUM_SAMPLES, config, round_batches, tiny_model

GB = 10**9


@contextlib.contextmanager
def recorded_compiles():
    """The XLA compiles that happen inside the block (jax.monitoring events), as a list."""
    compiles = []

    def listener(name, *_, **__):
        if "backend_compile" in name:
            compiles.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def fake_measure(per_client_temp: dict[str, float], fixed: float = 1.0):
    """measure(remat, width) of a model whose activations cost per_client_temp[remat] GB per
    client at once, on top of `fixed` GB; records the calls (the compiles)."""
    calls = []

    def measure(remat, width):
        calls.append((remat, width))
        return fit.MemoryNeed(arguments=int(fixed * GB), temporaries=int(
            per_client_temp[remat] * width * GB), outputs=0, resident=0, host_batches=0)
    return measure, calls


def fake_step_flops(client_step_flops: float):
    """step_flops(width) of a step that costs client_step_flops per client; records the
    widths read."""
    read = []

    def step_flops(width):
        read.append(width)
        return client_step_flops * width
    return step_flops, read


TEMP = {"off": 14.0, "blocks": 5.7, "full": 4.2}  # ViT-B 1024 FedMSA, one image, compiled


def test_all_clients_without_recomputation_when_they_fit():
    measure, calls = fake_measure(TEMP)
    layout = fit.choose_layout(measure, 2, 1, available=80 * GB)
    assert (layout.remat, layout.clients_per_step, layout.chosen) == ("off", 2, True)
    assert calls == [("off", 2)]  # the first candidate fits: one compile, reused by round 1


def test_more_clients_at_once_before_less_recomputation():
    # 24 GB free: off fits one client (15 GB) but blocks fits both (12.4 GB).
    measure, calls = fake_measure(TEMP)
    layout = fit.choose_layout(measure, 2, 1, available=24 * GB)
    assert (layout.remat, layout.clients_per_step) == ("blocks", 2)
    assert calls == [("off", 2), ("blocks", 2)]


def test_narrower_width_predicted_then_confirmed():
    # 6 clients, 15.5 GB free (budget 13.2): at full width nothing fits; blocks at 2 clients
    # (1 + 11.4 GB) is the widest predicted fit, so it is the only narrower one compiled.
    measure, calls = fake_measure(TEMP)
    layout = fit.choose_layout(measure, 6, 1, available=15.5 * GB)
    assert (layout.remat, layout.clients_per_step) == ("blocks", 2)
    assert calls == [("off", 6), ("blocks", 6), ("full", 6), ("blocks", 2)]
    assert layout.need <= fit.HEADROOM * 15.5 * GB


def test_on_the_cpu_less_recomputation_first_within_half_the_free_ram():
    # ViT-B 1024, K=2, 20 GB free: half of it planned for. off needs 15 GB even one client
    # at a time (predicted from its full-width compile, not compiled), blocks at 2 clients
    # 12.4 GB, blocks one at a time 6.7 GB.
    measure, calls = fake_measure(TEMP)
    cpu = fit.policy("cpu")
    layout = fit.choose_layout(measure, 2, 1, available=20 * GB, **cpu)
    assert (layout.remat, layout.clients_per_step) == ("blocks", 1)
    assert calls == [("off", 2), ("blocks", 2), ("blocks", 1)]
    # With room for everything (and steps too small to cap the width: no flops here) the
    # CPU policy also trains all clients at once, no remat.
    assert fit.choose_layout(fake_measure(TEMP)[0], 2, 1, available=80 * GB,
                             **cpu).remat == "off"
    assert fit.policy("gpu") == {"prefer": "width", "headroom": fit.HEADROOM}


def test_on_the_cpu_clients_are_batched_only_while_a_step_is_small():
    """call_flops caps the width at the narrowest whose step has that much work, read from
    the narrowest width's lowering before anything is compiled; wider layouts are never compiled,
    and memory is chosen below the cap as before."""
    small = {"off": 0.1, "blocks": 0.05, "full": 0.04}
    # 6 clients of 0.7 GFLOP a step, 2 GFLOP wanted per call: 3 at once (2.1), not 2 (1.4).
    measure, calls = fake_measure(small)
    step_flops, read = fake_step_flops(0.7e9)
    layout = fit.choose_layout(measure, 6, 1, available=80 * GB, prefer="recompute",
                               call_flops=2e9, step_flops=step_flops)
    assert (layout.remat, layout.clients_per_step) == ("off", 3)
    assert (read, calls) == ([1], [("off", 3)])
    # A step that alone has the work: one client at a time, the only compile.
    measure, calls = fake_measure(small)
    assert fit.choose_layout(measure, 6, 1, available=80 * GB, prefer="recompute",
                             call_flops=2e9,
                             step_flops=fake_step_flops(5.7e9)[0]).clients_per_step == 1
    assert calls == [("off", 1)]
    # Below the cap memory still decides: 1 client of "off" does not fit 0.5 x 2.2 GB free
    # (1 + 1.2 GB), one of "blocks" does; the full width (6) is never compiled.
    big = {"off": 1.2, "blocks": 0.05, "full": 0.04}
    measure, calls = fake_measure(big)
    layout = fit.choose_layout(measure, 6, 1, available=2.2 * GB, prefer="recompute",
                               headroom=0.5, call_flops=2e9,
                               step_flops=fake_step_flops(5.7e9)[0])
    assert (layout.remat, layout.clients_per_step, calls) == (
        "blocks", 1, [("off", 1), ("blocks", 1)])
    # Tiny steps: all at once. A configured width is kept whatever its work (and no FLOPs
    # are read for it).
    assert fit.choose_layout(fake_measure(small)[0], 6, 1, available=80 * GB,
                             prefer="recompute", call_flops=2e9,
                             step_flops=fake_step_flops(0.1e9)[0]).clients_per_step == 6
    step_flops, read = fake_step_flops(5.7e9)
    assert fit.choose_layout(fake_measure(small)[0], 6, 1, available=80 * GB,
                             prefer="recompute", call_flops=2e9, step_flops=step_flops,
                             clients_per_step=4).clients_per_step == 4
    assert read == []
    cpu = fit.policy("cpu")
    assert cpu["call_flops"] == fit.CPU_CALL_FLOPS_PER_CORE * len(os.sched_getaffinity(0))


def test_fixed_settings_are_kept():
    measure, calls = fake_measure(TEMP)
    layout = fit.choose_layout(measure, 4, 1, remat="full", clients_per_step=3)
    assert (layout.remat, layout.clients_per_step, layout.chosen, calls) == ("full", 3, False, [])
    # A fixed remat mode: only the width is chosen, with that mode.
    layout = fit.choose_layout(measure, 4, 1, remat="off", available=40 * GB)
    assert (layout.remat, layout.clients_per_step) == ("off", 2)
    assert {remat for remat, _ in calls} == {"off"}


def test_nothing_fits_is_a_clear_error():
    measure, _ = fake_measure(TEMP, fixed=8.0)
    with pytest.raises(fit.DoesNotFit, match=r"10\.0 GB free.*data\.batch_size") as refused:
        fit.choose_layout(measure, 2, 1, available=10 * GB)
    # The narrowest layout of the leanest mode, estimated: 8 GB fixed + 4.2 GB of one client.
    assert "1 client(s) at once with model.remat=full, needs about 12.2 GB" in str(
        refused.value), refused.value


def test_candidate_widths_are_device_multiples_without_extra_padding():
    assert fit.candidate_widths(6, 1) == [6, 3, 2, 1]
    assert fit.candidate_widths(5, 1) == [5, 3, 2, 1]
    assert fit.candidate_widths(6, 4) == [8, 4]
    assert fit.candidate_widths(1, 1) == [1]


def test_available_memory_is_the_hosts_free_memory():
    free = fit.available_memory()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < free <= total


def test_compiled_memory_is_reused_by_the_first_round_and_donates_the_state():
    """The estimate compiles exactly the round's local steps, and compile_round_edges (as
    Federation.fitted calls it) the rest of a round: the first round then compiles nothing
    more, and the donated client state is written in place (no second copy)."""
    from fedfms_jax.fed.round import Federation

    fed = Federation(tiny_model(), config(local_steps=2, local_epochs=None), NUM_CLIENTS)
    batches = {k: v[:, :2] for k, v in round_batches(0).items()}
    example = {k: v[0, 0] for k, v in batches.items()}
    steps = [2] * NUM_CLIENTS
    need = fed.compiled_memory(example, steps, segment=2)
    fed.compile_round_edges()
    state = fed.init()
    with recorded_compiles() as compiles:
        state = fed.begin_round(state)
        state, losses, _ = fed.local_round(state, steps, lambda todo, length: batches, segment=2)
        state, _ = fed.end_round(state, NUM_SAMPLES)
        jax.block_until_ready(state)
    assert compiles == []
    assert np.isfinite(losses).all()
    client_state = num_bytes(state.client_params) + num_bytes(state.client_opt_state)
    assert need.outputs < client_state / 10  # outputs beyond the donated inputs: the losses
    assert need.host_batches == 2 * sum(v.nbytes for v in batches.values())  # + the next
    assert need.resident == num_bytes(fed.frozen)
    assert BATCH == example["image"].shape[0]


def test_release_free_heap_returns_what_was_freed_to_the_os():
    """Memory freed below a live allocation stays in the RSS until malloc_trim (what
    XLA's compiles leave after fitting a layout)."""
    from bench.timing import rss_mb

    if not fit.release_free_heap():
        pytest.skip("no glibc malloc_trim here")
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 128 MB below the mmap threshold
    for block in blocks:
        block[::4096] = b"\1" * len(block[::4096])  # touch every page
    last = blocks[-1]  # keeps the heap's top, so free() alone cannot shrink it
    del blocks
    kept = rss_mb()
    assert fit.release_free_heap()
    assert kept - rss_mb() > 64, (kept, rss_mb())
    del last


def test_step_flops_are_read_without_compiling_and_match_the_compiled_count():
    """The width cap's FLOPs come from the lowered program (XLA's cost analysis, nothing
    compiled) and agree with the compiled program's count to a few percent (XLA's rewrites
    add a little: 3% here, 0.4-1.5% for the small variant), plenty for choosing a width."""
    from fedfms_jax.fed.round import Federation

    fed = Federation(tiny_model(), config(local_steps=2, local_epochs=None), NUM_CLIENTS)
    example = {k: v[0, 0] for k, v in round_batches(0).items()}
    steps = [2] * NUM_CLIENTS
    with recorded_compiles() as compiles:
        flops = fed.step_flops(example, steps, segment=2)
    assert compiles == []
    compiled = fed._lower_call(example, fed.plan(steps, 2)[0], 2).compile().cost_analysis()
    assert flops > 0
    assert flops == pytest.approx(compiled["flops"], rel=0.05)
