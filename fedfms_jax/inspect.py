"""What a training mode trains and what each client sends, without allocating the model.

    python -m fedfms_jax.inspect --variant vit_b --mode fedmsa [--classes 2] [--json]

Prints the total and trainable parameter counts, a per-module breakdown, and the bytes each
client sends (its trainable state) and receives (the aggregated trainable state) per round,
at fp32 and bf16. With --json the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from flax import nnx

from fedfms_jax.fed.partition import (DEFAULT_LORA_RANK, MODES, breakdown, config_for_mode,
                                      num_bytes, num_params, split)
from fedfms_jax import models
from fedfms_jax.models import VARIANTS, Sam, SamConfig, get_config

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}


@functools.lru_cache(maxsize=8)
def abstract_sam(config: SamConfig) -> Sam:
    """`models.abstract_sam`, cached (only read here): ViT-H costs no memory, but tracing
    its initialiser takes seconds."""
    return models.abstract_sam(config)


def report(config: SamConfig, mode: str) -> dict:
    """Counts and per-round traffic of one model config trained in one mode."""
    abstract = abstract_sam(config)
    _, trainable, _ = split(abstract, mode)
    total = num_params(nnx.state(abstract, nnx.Param))
    trained = num_params(trainable)
    result = {
        "variant": config.variant, "mode": mode, "num_classes": config.num_classes,
        "adapter": config.adapter, "lora_rank": config.lora_rank,
        "total_params": total, "trainable_params": trained, "frozen_params": total - trained,
        "trainable_fraction": trained / total,
    }
    for precision, itemsize in BYTES_PER_VALUE.items():
        # FedAvg: a client uploads its trainable state and downloads the average, same size.
        result[f"bytes_up_per_client_{precision}"] = num_bytes(trainable, itemsize)
        result[f"bytes_down_per_client_{precision}"] = num_bytes(trainable, itemsize)
    result["modules"] = [{"module": name, "params": params, "trainable_params": train}
                         for name, params, train in breakdown(abstract, mode)]
    return result


def format_report(result: dict) -> str:
    width = max(len(row["module"]) for row in result["modules"])
    lines = [f"{result['variant']} ({result['num_classes']} class"
             f"{'es' if result['num_classes'] > 1 else ''}, adapter={result['adapter']}, "
             f"lora_rank={result['lora_rank']}) trained as {result['mode']}",
             f"  {'module':<{width}}  {'params':>13}  {'trainable':>13}"]
    for row in result["modules"]:
        lines.append(f"  {row['module']:<{width}}  {row['params']:>13,}  "
                     f"{row['trainable_params']:>13,}")
    lines += [f"  {'total':<{width}}  {result['total_params']:>13,}  "
              f"{result['trainable_params']:>13,}",
              f"trainable: {result['trainable_params']:,} of {result['total_params']:,} "
              f"({100 * result['trainable_fraction']:.2f}%)",
              "per client per round:"]
    for precision in BYTES_PER_VALUE:
        up, down = (result[f"bytes_{d}_per_client_{precision}"] for d in ("up", "down"))
        lines.append(f"  {precision}: up {up:,} B ({up / 1e6:.1f} MB), "
                     f"down {down:,} B ({down / 1e6:.1f} MB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b", choices=sorted(VARIANTS))
    parser.add_argument("--mode", default="fedmsa", choices=MODES)
    parser.add_argument("--classes", type=int, default=1,
                        help="output classes; more than 1 adds FedFMS's 1x1 class head")
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK,
                        help="LoRA rank for --mode fedlora")
    parser.add_argument("--json", action="store_true",
                        help="end with one line holding the report as a JSON object")
    args = parser.parse_args(argv)
    if args.classes < 1:
        parser.error(f"--classes must be >= 1, got {args.classes}")
    if args.lora_rank < 1:
        parser.error(f"--lora-rank must be >= 1, got {args.lora_rank}")
    config = get_config(args.variant, num_classes=args.classes)
    if args.mode == "fedlora":
        config = config.replace(lora_rank=args.lora_rank)
    result = report(config_for_mode(config, args.mode), args.mode)
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
