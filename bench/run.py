"""JAX versus the PyTorch reference, side by side in one run.

    python -m bench.run [--quick | --smoke] [--device cpu|gpu] [--dtype f32|bf16] [--reps N]

Workloads (each on the same weights and inputs in both frameworks, see workloads.py):
  roof      a large float32 matmul per framework: the machine's practical FLOP/s
  encoder   the image encoder's forward
  train     one training step (loss, backward, Adam) in fedsam and fedmsa modes
  round     one federated round, K = 4 and 8 clients: the engine's vmapped round versus
            FedFMS's sequential per-client loop (torch_reference.FedFMSRound)
  fedfms    FedFMS's protocol in small: 6 clients sized as the prostate sites' slice
            counts (scaled down), one local epoch of batch 4, fedmsa: the engine's planned
            round (only the clients still training) versus FedFMS's sequential loop
  decoder   decoder mode's whole training round (synthetic sites, streams, engine) with
            the embedding cache and without (JAX against JAX)
  memory    peak resident memory of a fedmsa round for K = 1, 4, 8, one process per case

Plans: --quick (the small variant), the default full run (adds ViT-B at 1024, batch 1, for
the encoder and training step) and --smoke (the tiny variant, one repetition, no memory
cases; for the accelerator check's smoke form). --only runs some workloads of a plan (the
roof always runs: every FLOP/s figure is read against it), e.g. `--smoke --only encoder`.

Prints a table, writes the whole record as JSON under bench/results/ and prints the summary
(PyTorch time / JAX time ratios and the encoder's fraction of the matmul roof) as the last
line of output.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    matmul: int
    reps: int
    small: str                                   # the small variant for every workload
    small_batch: int                             # encoder and training-step batch
    big: str | None = None                       # full runs: ViT-B at batch 1 as well
    big_reps: int = 3
    round_clients: tuple[int, ...] = (4, 8)
    round_steps: int = 2
    round_batch: int = 4
    memory_clients: tuple[int, ...] = (1, 4, 8)
    # FedFMS's protocol: 6 clients of the prostate sites' slice counts / fedfms_scale, one
    # local epoch of fedfms_batch; decoder mode's round with and without the embedding
    # cache on decoder_per_site synthetic images per site.
    fedfms_batch: int = 4
    fedfms_scale: int = 16
    decoder_per_site: int = 24


PLANS = {
    "full": Plan("full", matmul=4096, reps=5, small="small", small_batch=8, big="vit_b"),
    "quick": Plan("quick", matmul=2048, reps=3, small="small", small_batch=8),
    "smoke": Plan("smoke", matmul=512, reps=1, small="tiny", small_batch=2,
                  round_clients=(2,), round_steps=1, round_batch=2, memory_clients=(),
                  fedfms_batch=2, fedfms_scale=100, decoder_per_site=5),
}


WORKLOADS = ("encoder", "train", "round", "fedfms", "decoder", "memory")


def workload_list(text: str) -> tuple[str, ...]:
    """--only's value: comma-separated names from WORKLOADS."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown) or repr(text)}; known: "
            f"{', '.join(WORKLOADS)}")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--quick", action="store_true", help="small variant only (< 5 min)")
    plan.add_argument("--smoke", action="store_true", help="tiny variant, 1 repetition")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per workload")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    parser.add_argument("--only", type=workload_list, default=WORKLOADS, metavar="W[,W...]",
                        help=f"run only these workloads ({', '.join(WORKLOADS)}; "
                             "default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: "
                        "bench/results/<time>-<plan>-<device>-<dtype>.json)")
    return parser.parse_args(argv)


def setup_frameworks(device: str) -> None:
    """Pin the platforms before either framework starts: JAX on the chosen device, and the
    same number of CPU threads for PyTorch as XLA's CPU client uses (one per usable core).

    PyTorch's OpenMP threads wait passively between parallel regions (OMP_WAIT_POLICY, unless
    set): with GNU OpenMP's default spin-wait and as many threads as cores, every other
    process on a shared machine makes each of the backward's many small regions wait for a
    descheduled thread. Measured here at load average 8 on 2 cores, a small fedmsa training
    step of batch 4 took 6.7 s with the default and 0.58 s passive (0.44 s on 1 thread);
    XLA's thread pool does not use OpenMP. The memory cases' processes inherit it."""
    os.environ["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda,cpu"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def environment(device: str) -> dict:
    import jax
    import torch

    from bench.timing import cpu_model, usable_cores

    return {
        "cpu": cpu_model(), "usable_cores": usable_cores(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "xla_threads": f"XLA CPU client default: one intra-op thread per usable core "
                       f"({usable_cores()})",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "device": device,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def row(pair, timings, roof: dict) -> dict:
    """One workload's record: medians, ratio, images/s and FLOP/s against each roof."""
    jax_t, torch_t = timings["jax"], timings["torch"]
    record = {"workload": pair.name, **pair.info, "flops": pair.flops, "images": pair.images,
              "jax_compile_s": pair.compile_s, "jax": jax_t.to_json(),
              "torch": torch_t.to_json(), "speedup": torch_t.median / jax_t.median,
              # Best of the repetitions: less sensitive to bursts of load from other processes.
              "speedup_best": torch_t.min / jax_t.min}
    for name, t in (("jax", jax_t), ("torch", torch_t)):
        if pair.images:
            record[name]["images_per_s"] = pair.images / t.median
        if pair.flops:
            rate = pair.flops / t.median
            record[name]["gflops"] = rate / 1e9
            if roof:
                record[name]["roof_fraction"] = rate / roof[name]
    return record


def fmt_table(records: list[dict], memory: list[dict], roof: dict, env: dict,
              loads: dict) -> str:
    lines = [f"machine: {env['cpu']}, {env['usable_cores']} cores; torch {env['torch']} "
             f"({env['torch_threads']} threads), jax {env['jax']} ({env['xla_threads']}); "
             f"load average at start {loads['start']}, at end {loads['end']}",
             f"roof (float32 matmul, best of the run): JAX {roof['jax'] / 1e9:.0f} GFLOP/s, "
             f"PyTorch {roof['torch'] / 1e9:.0f} GFLOP/s", ""]
    header = (f"{'workload':34} {'JAX s':>8} {'torch s':>8} {'torch/JAX':>9} {'(best)':>7} "
              f"{'JAX img/s':>9} {'torch img/s':>11} {'JAX GFLOP/s':>14} {'torch GFLOP/s':>14} "
              f"{'compile s':>9}")
    lines += [header, "-" * len(header)]
    for r in records:
        j, t = r["jax"], r["torch"]

        def rate(x):
            if "gflops" not in x:
                return "-"
            frac = f" ({100 * x['roof_fraction']:.0f}%)" if "roof_fraction" in x else ""
            return f"{x['gflops']:.0f}{frac}"

        ips = lambda x: f"{x['images_per_s']:.2f}" if "images_per_s" in x else "-"
        name = r["workload"] + (f" B={r['batch']}" if "batch" in r else "")
        lines.append(f"{name:34} {j['median_s']:8.3f} {t['median_s']:8.3f} "
                     f"{r['speedup']:8.2f}x {r['speedup_best']:6.2f}x {ips(j):>9} {ips(t):>11} {rate(j):>14} "
                     f"{rate(t):>14} {r['jax_compile_s']:9.1f}")
    if memory:
        lines += ["", "peak resident memory of one fedmsa round (MB; before the round -> peak "
                  "during it, process baseline after imports subtracted)"]
        lines.append(f"{'K':>3} {'JAX':>22} {'PyTorch (FedFMS loop)':>24}")
        by_k = {}
        for m in memory:
            by_k.setdefault(m["clients"], {})[m["framework"]] = m

        def mem(m):
            if m is None:
                return "-"
            if "error" in m:
                return "error"
            return (f"{m['before_round_mb'] - m['baseline_mb']:.0f} -> "
                    f"{m['peak_mb'] - m['baseline_mb']:.0f}")

        for k, ms in sorted(by_k.items()):
            lines.append(f"{k:>3} {mem(ms.get('jax')):>22} {mem(ms.get('torch')):>24}")
    return "\n".join(lines)


def summarise(records: list[dict], roof: dict, plan: Plan, loads: dict, env: dict,
              decoder: dict | None = None, memory: list[dict] = ()) -> dict:
    """The last line's figures: torch/JAX ratios of the workloads that ran (the least
    favourable training mode as train_step_speedup), the decoder cache's speedup and
    memory_ratio (fedmsa round, K = 4) when those ran."""
    def find(prefix):
        return [r for r in records if r["workload"].startswith(prefix)]

    headline = plan.big or plan.small
    encoder = find(f"encoder {headline} ")
    summary: dict = {"plan": plan.name, "device": env["device"],
                     "encoder_variant": headline}
    if encoder:
        summary["encoder_speedup"] = encoder[0]["speedup"]
        summary["encoder_roof_fraction"] = encoder[0]["jax"].get("roof_fraction")
        summary["torch_encoder_roof_fraction"] = encoder[0]["torch"].get("roof_fraction")
        summary["encoder_jax_s"] = encoder[0]["jax"]["median_s"]
        summary["encoder_torch_s"] = encoder[0]["torch"]["median_s"]
    steps = [r for r in find("train step") if r["variant"] == headline]
    for r in steps:
        summary[f"train_step_speedup_{r['mode']}"] = r["speedup"]
    if steps:
        # The least favourable mode, so the headline figure is not the best case.
        summary["train_step_speedup"] = min(r["speedup"] for r in steps)
    protocol = find("fedfms round")
    if protocol:
        summary["fedfms_round_speedup"] = protocol[0]["speedup"]
        summary["fedfms_masked_work"] = protocol[0]["masked_work"]
    rounds = sorted(find("round "), key=lambda r: r["clients"])
    for r in rounds:
        summary[f"round_speedup_k{r['clients']}"] = r["speedup"]
    if rounds:
        summary["round_speedup"] = rounds[-1]["speedup"]
        summary["round_clients"] = rounds[-1]["clients"]
    if decoder is not None:
        summary["decoder_cache_speedup"] = decoder["speedup"]
    ratio = memory_ratio(list(memory), clients=4)
    if ratio is not None:
        summary["memory_ratio"] = ratio
    summary["roof_gflops"] = {k: v / 1e9 for k, v in roof.items()}
    summary["load_average"] = loads
    summary["threads"] = {"torch": env["torch_threads"], "xla": env["usable_cores"]}
    return summary


def memory_ratio(memory: list[dict], clients: int) -> float | None:
    """JAX's peak / PyTorch's for the fedmsa round of K = `clients`, each the round's own
    memory (peak minus the process's baseline after its imports); None without both."""
    cases = {m["framework"]: m for m in memory
             if m.get("clients") == clients and "error" not in m}
    if {"jax", "torch"} - set(cases):
        return None
    own = {k: m["peak_mb"] - m["baseline_mb"] for k, m in cases.items()}
    return own["jax"] / own["torch"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["quick" if args.quick else "smoke" if args.smoke else "full"]
    if args.reps is not None:
        plan = dataclasses.replace(plan, reps=args.reps, big_reps=args.reps)
    setup_frameworks(args.device)
    # The run's own compilation cache (the memory cases' processes reuse its programs).
    cache_dir = tempfile.mkdtemp(prefix="bench-xla-cache-")
    atexit.register(shutil.rmtree, cache_dir, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir

    import torch

    from bench import workloads as w
    from bench.timing import load_average, measure, usable_cores

    torch.set_num_threads(usable_cores())
    env = environment(args.device)
    bench_env = w.Env(args.device, args.dtype)
    loads = {"start": load_average()}
    started = time.perf_counter()
    records, roofs = [], {"jax": [], "torch": []}

    def run(pair, reps):
        timings = measure({"jax": pair.jax_fn, "torch": pair.torch_fn}, reps)
        print(f"  {pair.name}: JAX {timings['jax'].median:.3f} s, PyTorch "
              f"{timings['torch'].median:.3f} s (compile {pair.compile_s:.1f} s)", flush=True)
        return timings

    def roof_now():
        pair = w.matmul(plan.matmul, bench_env)
        timings = run(pair, max(plan.reps, 3))
        for name in roofs:
            roofs[name].append(pair.flops / timings[name].median)

    def add(pair, reps):
        records.append((pair, run(pair, reps)))

    print(f"bench: plan {plan.name}, device {args.device}, dtype {args.dtype}", flush=True)
    roof_now()
    modes = ["fedsam", "fedmsa"]
    variants = [(plan.small, plan.small_batch, plan.reps)]
    if plan.big:
        variants.append((plan.big, 1, plan.big_reps))
    for variant, batch, reps in variants:
        if "encoder" in args.only:
            add(w.encoder_forward(variant, batch, bench_env), reps)
        for mode in modes if "train" in args.only else ():
            add(w.train_step(variant, mode, batch, bench_env), reps)
    round_mode = "fedmsa"
    for clients in plan.round_clients if "round" in args.only else ():
        add(w.fed_round(plan.small, round_mode, clients, plan.round_steps, plan.round_batch,
                        bench_env), plan.reps)
    if "fedfms" in args.only:
        add(w.fedfms_protocol(plan.small, round_mode, plan.fedfms_batch, bench_env,
                              plan.fedfms_scale), plan.reps)
    decoder = None
    if "decoder" in args.only:
        decoder_fns, decoder_first = w.decoder_rounds(plan.small, plan.fedfms_batch,
                                                      plan.decoder_per_site)
        decoder = measure(decoder_fns, plan.reps)
        decoder = {"workload": f"decoder round {plan.small}", "first_round_s": decoder_first,
                   **{name: t.to_json() for name, t in decoder.items()},
                   "speedup": decoder["uncached"].median / decoder["cached"].median,
                   "speedup_best": decoder["uncached"].min / decoder["cached"].min}
        print(f"  {decoder['workload']}: cached {decoder['cached']['median_s']:.3f} s, "
              f"uncached {decoder['uncached']['median_s']:.3f} s", flush=True)
    roof_now()
    roof = {name: max(values) for name, values in roofs.items()}
    records = [row(pair, timings, roof) for pair, timings in records]

    memory = []
    if plan.memory_clients and not args.no_memory and "memory" in args.only:
        from bench.memory import run_case

        for clients in plan.memory_clients:
            for framework in ("jax", "torch"):
                memory.append(run_case(framework, clients, variant=plan.small,
                                       mode=round_mode, steps=plan.round_steps,
                                       batch=plan.round_batch, device=args.device,
                                       dtype=args.dtype, cache_dir=cache_dir))
                print(f"  memory {framework} K={clients}: {memory[-1]}", flush=True)
    loads["end"] = load_average()

    summary = summarise(records, roof, plan, loads, env, decoder, memory)
    summary["dtype"] = args.dtype
    summary["wall_s"] = time.perf_counter() - started
    result = {"environment": env, "plan": dataclasses.asdict(plan), "dtype": args.dtype,
              "workloads_run": list(args.only),
              "roof_flops_per_s": roof, "roof_runs": roofs, "workloads": records,
              "decoder_cache": decoder, "memory": memory, "summary": summary}
    out = args.out or RESULTS / (f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{plan.name}-"
                                 f"{args.device}-{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print(fmt_table(records, memory, roof, env, loads))
    if decoder is not None:
        print(f"\ndecoder-mode round (JAX, whole training path): cached "
              f"{decoder['cached']['median_s']:.3f} s, uncached "
              f"{decoder['uncached']['median_s']:.3f} s: {decoder['speedup']:.2f}x")
    print(f"\nwritten {out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
