"""`make demo`: FedFMS's question at small scale, on a 2-core CPU, with no download.

A tiny SAM pretrained on generic shapes (weights/sam_tiny_natural.safetensors, made by
configs/pretrain_tiny.py) is fine-tuned on the embedded synthetic multi-site set (configs/
demo.py; site4 is the unseen site) four ways: centralised (all source sites pooled),
local-only (each site alone), FedSAM (whole model averaged) and FedMSA (adapters + mask
decoder averaged). Prints one table and writes the runs and plots under out/demo/.

    python -m fedfms_jax.demo [--out out/demo] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fedfms_jax import plot
from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.config import ConfigError, load_config_file, validate
from fedfms_jax.data.records import DataError
from fedfms_jax.run_log import format_table
from fedfms_jax.train import run
from fedfms_jax.weights_file import WeightsError

CONFIG = "configs/demo.py"
SETTINGS = [
    ("centralised", {"algorithm": "central", "mode": "fedsam"}),
    ("local-only", {"algorithm": "local", "mode": "fedsam"}),
    ("FedSAM", {"algorithm": "fedavg", "mode": "fedsam"}),
    ("FedMSA", {"algorithm": "fedavg", "mode": "fedmsa"}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--rounds", type=int, help="override configs/demo.py's rounds")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    configs = []
    try:
        for _, overrides in SETTINGS:  # every setting checked before the first one trains
            config = load_config_file(CONFIG)
            config.update(overrides)
            if args.rounds is not None:
                config.rounds = args.rounds
            validate(config)
            configs.append(config)
        return _run(args, configs)
    except (ConfigError, DataError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args, configs) -> int:
    rows, workdirs = [], []
    for (name, _), config in zip(SETTINGS, configs):
        workdir = args.out / name.lower()
        print(f"\n== {name}: {config.algorithm}, mode {config.mode} -> {workdir}")
        began = time.perf_counter()
        result = run(config, workdir, fresh=True)
        seconds = time.perf_counter() - began
        source = np.mean([s.dice for s in result["val"].values()])
        unseen = np.mean([s.dice for s in result["test"].values()])
        rows.append([name, float(source), float(unseen), f"{result['trainable_params']:,}",
                     result["bytes_up_per_client_per_round"] / 1e6, seconds])
        workdirs.append(workdir)
    plot.main(["--workdir", *map(str, workdirs), "--out", str(args.out)])
    print("\n" + format_table(["setting", "Dice source (val)", "Dice unseen", "trainable",
                               "MB up/client/round", "seconds"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
