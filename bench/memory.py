"""Peak memory of one federated round, one process per case.

    python -m bench.memory --framework jax|torch --clients K [--variant small ...]

The process builds the federation (JAX: the engine with train's default settings, i.e. the
clients at once and the encoder's rematerialisation chosen to fit the free memory, frozen
weights held once and shared by the vmapped clients; PyTorch: FedFMS's K full model copies), runs one round to warm up
(JAX compiles; a persistent compilation cache shared with the parent makes that cheap), then
resets the kernel's peak-RSS counter and runs one more round. It prints one JSON line:
resident memory after the imports, before the measured round (weights, optimizer states and
data held between rounds) and the peak during it, in MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from bench.timing import peak_rss_mb, reset_peak_rss, rss_mb


def measure_case(framework: str, variant: str, mode: str, clients: int, steps: int,
                 batch: int, device: str, dtype: str) -> dict:
    import jax
    import torch

    from bench import torch_reference as ref
    from bench import workloads as w
    from fedfms_jax_reference.fedfms import build_torch_fedfms

    baseline = rss_mb()
    env = w.Env(device, dtype)
    config = w.model_config(variant, mode)
    images, targets, num_samples = w.client_data(config, clients, steps, batch)
    if framework == "jax":
        torch_model, sam = w.build_models(config, env)
        del torch_model
        batches = {"image": images, "mask_low_res": targets}
        # The default settings: train's choice of clients at once and remat (fed.fit).
        federation = w.jax_federation(sam, mode, clients, steps,
                                      {k: v[0, 0] for k, v in batches.items()})
        layout = federation.layout
        extra = {"remat": layout.remat, "clients_per_step": layout.clients_per_step,
                 "compiled_need_mb": layout.need / 2**20}
        del sam
        mask = [[True] * steps] * clients
        state = [federation.init()]

        def run_round():
            state[0], _ = federation.run_round(state[0], batches, mask, num_samples,
                                               sample=False)
            jax.block_until_ready(state[0])
    else:
        torch_model = build_torch_fedfms(config).to(env.torch_device)
        fedfms = ref.FedFMSRound(torch_model, mode, clients, env.autocast)
        torch_batches = [[(w.to_torch(images[k, s], env), w.to_torch(targets[k, s], env))
                          for s in range(steps)] for k in range(clients)]

        def run_round():
            fedfms.run_round(torch_batches, num_samples)
        extra = {}

    run_round()
    before = rss_mb()
    reset_peak_rss()
    if device == "gpu" and framework == "torch":
        torch.cuda.reset_peak_memory_stats()
    run_round()
    peak = peak_rss_mb()
    if device == "gpu":  # the accelerator's own peak (JAX's counter includes the warm-up)
        extra["device_peak_mb"] = (
            jax.devices()[0].memory_stats()["peak_bytes_in_use"] if framework == "jax"
            else torch.cuda.max_memory_allocated()) / 2**20
    return {"framework": framework, "variant": variant, "mode": mode, "clients": clients,
            "batch": batch, "baseline_mb": baseline, "before_round_mb": before, "peak_mb": peak,
            "torch_threads": torch.get_num_threads(), **extra}


def compiled_need(variant: str, mode: str, clients: int, steps: int, batch: int, remat: str,
                  clients_per_step: int) -> dict:
    """XLA's compiled memory of one segment of local steps for a fixed layout, nothing run:
    the figure `fed.fit` compares with the free memory (and the basis for extrapolating to
    larger devices)."""
    from bench import workloads as w
    from fedfms_jax.fed.round import FedConfig, Federation

    config = w.model_config(variant, mode)
    _, sam = w.build_models(config, w.Env())
    sam.set_remat(remat)
    images, targets = w.random_batch(config, batch, 0)
    federation = Federation(sam, FedConfig(mode=mode, local_steps=steps, local_epochs=None,
                                           clients_per_step=clients_per_step), clients)
    need = federation.compiled_memory({"image": images, "mask_low_res": targets},
                                      [steps] * clients, steps)
    return {"variant": variant, "mode": mode, "clients": clients, "batch": batch,
            "remat": remat, "clients_per_step": federation.chunk,
            **{k: v / 2**20 for k, v in dataclasses.asdict(need).items()},
            "need_mb": need.total / 2**20}


def run_case(framework: str, clients: int, *, variant: str, mode: str, steps: int, batch: int,
             device: str, dtype: str, cache_dir: str | None, timeout: float = 600) -> dict:
    """measure_case in a fresh process; its result, or {'error': ...}."""
    cmd = [sys.executable, "-m", "bench.memory", "--framework", framework, "--clients",
           str(clients), "--variant", variant, "--mode", mode, "--steps", str(steps),
           "--batch", str(batch), "--device", device, "--dtype", dtype]
    env = dict(os.environ)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "clients": clients, "error": f"timed out ({timeout} s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"framework": framework, "clients": clients,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["jax", "torch"], required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--variant", default="small")
    parser.add_argument("--mode", default="fedmsa")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--compile-only", metavar="REMAT:CLIENTS_PER_STEP", default=None,
                        help="print the compiled memory of this fixed layout; run nothing")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.compile_only:
        remat, width = args.compile_only.split(":")
        print(json.dumps(compiled_need(args.variant, args.mode, args.clients, args.steps,
                                       args.batch, remat, int(width))))
        return 0
    print(json.dumps(measure_case(args.framework, args.variant, args.mode, args.clients,
                                  args.steps, args.batch, args.device, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
