"""Seconds per federated round, K clients vmapped vs the same clients one after another, and
peak memory per K.

    python -m bench.fed_round                      # K = 1, 4, 8; tiny; fedmsa; this machine
    python -m bench.fed_round --variant small --clients 1 8 --steps 4 --batch 2

Every configuration runs in its own subprocess so that its peak memory is its own: host
peak RSS (ru_maxrss) on CPU, the device allocator's peak_bytes_in_use on an accelerator.
Each round is timed after one warm-up round (the compile), with every client taking
`--steps` local steps of `--batch` images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _batches(num_clients: int, steps: int, batch: int, image: int, low: int, seed: int):
    rng = np.random.default_rng(seed)
    shape = (num_clients, steps, batch)
    return {"image": rng.uniform(size=(*shape, image, image, 3)).astype(np.float32),
            "mask_low_res": (rng.uniform(size=(*shape, low, low, 1)) > 0.8).astype(np.float32)}


def _peak_bytes() -> int:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(variant: str, mode: str, clients: int, steps: int, batch: int, rounds: int,
            sequential: bool) -> dict:
    """One configuration in this process: seconds per round (mean of `rounds` after a
    warm-up round), compile+first-round seconds and peak memory."""
    import jax
    from flax import nnx

    from fedfms_jax.fed.partition import config_for_mode
    from fedfms_jax.fed.clients import step_mask
    from fedfms_jax.fed.round import FedConfig, Federation
    from fedfms_jax.models import Sam, get_config

    config = config_for_mode(get_config(variant), mode)
    model = Sam(config, rngs=nnx.Rngs(0))
    fed_config = FedConfig(mode=mode, local_steps=steps, local_epochs=None)
    width = 1 if sequential else clients
    fed = Federation(model, fed_config, width)
    states = [fed.init() for _ in range(clients if sequential else 1)]
    data = [_batches(clients, steps, batch, config.image_size, config.low_res_size, r)
            for r in range(rounds + 1)]
    mask = step_mask([steps] * width)
    n = [batch * steps] * width

    def one_round(r):
        for i, state in enumerate(states):
            part = {k: v[i:i + 1] for k, v in data[r].items()} if sequential else data[r]
            states[i], _ = fed.run_round(state, part, mask, n)
        jax.block_until_ready([s.global_params for s in states])

    start = time.perf_counter()
    one_round(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        one_round(r)
    per_round = (time.perf_counter() - start) / rounds
    return {"variant": variant, "mode": mode, "clients": clients, "steps": steps,
            "batch": batch, "sequential": sequential, "seconds_per_round": per_round,
            "first_round_seconds": first, "peak_bytes": _peak_bytes(),
            "device": str(jax.devices()[0].platform), "num_devices": len(jax.devices())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--mode", default="fedmsa")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.variant, args.mode, args.clients[0], args.steps,
                                 args.batch, args.rounds, args.sequential)))
        return
    rows = []
    for k in args.clients:
        for sequential in ((False,) if k == 1 else (False, True)):
            cmd = [sys.executable, "-m", "bench.fed_round", "--one", "--variant", args.variant,
                   "--mode", args.mode, "--clients", str(k), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--rounds", str(args.rounds)]
            cmd += ["--sequential"] if sequential else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"K={k:2d} {'sequential' if sequential else 'vmapped   '} "
                  f"{r['seconds_per_round']:8.3f} s/round  first round {r['first_round_seconds']:6.1f} s"
                  f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB  ({r['device']}, {r['variant']}, "
                  f"{r['mode']}, {r['steps']} steps x batch {r['batch']})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
