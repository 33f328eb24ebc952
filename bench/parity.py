"""Parity of the Flax SAM with the official PyTorch one, on the device the benchmarks run on.

    python -m bench.parity [--variant vit_b] [--device cpu|gpu]

Both frameworks get the same random weights (through weights/convert.py) and images and
run FedFMS's prompt-free forward (image encoder + mask decoder -> low-res logits). The
Flax output is compared with PyTorch's in float32 and in float64, the latter computed on the
same device: the float32 PyTorch model's own distance from float64 is the noise any float32
implementation has, and the Flax model is within NOISE_FACTOR of it (tests/numerics.py's
bound). Matmuls run at full float32 precision in both (no TF32 on GPUs). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# The default suite's parity bound and helpers: one definition of what parity means.
from tests.numerics import FLOOR, NOISE_FACTOR, float64_copy, relative_error

def measure(variant: str, device: str, batch: int = 1, seed: int = 0) -> dict:
    import jax
    import torch

    from bench import torch_reference as ref
    from bench import workloads as w

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = w.Env(device, "f32")
    config = w.model_config(variant, None)
    torch_model, sam = w.build_models(config, env, seed)
    images, _ = w.random_batch(config, batch, seed)
    began = time.perf_counter()
    with jax.default_matmul_precision("highest"):
        flax_logits = np.asarray(jax.jit(lambda x: sam.segment(x))(images)).astype(np.float64)
    jax_s = time.perf_counter() - began
    torch_model.eval()
    x = w.to_torch(images, env)
    with torch.no_grad():
        torch32 = ref.segment(torch_model, x).permute(0, 2, 3, 1).cpu().numpy()
        torch64 = ref.segment(float64_copy(torch_model), x.double()).permute(0, 2, 3, 1).cpu().numpy()
    noise = relative_error(torch32, torch64)
    error = relative_error(flax_logits, torch64)
    bound = max(NOISE_FACTOR * noise, FLOOR)
    return {"variant": variant, "device": device, "image_size": config.image_size,
            "batch": batch, "jax_device": str(jax.devices()[0]),
            "relative_error_vs_float64": error, "torch_float32_noise": noise,
            "bound": bound, "passed": bool(error <= bound),
            "jax_vs_torch_float32": relative_error(flax_logits, torch32),
            "jax_forward_s_with_compile": jax_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = measure(args.variant, args.device, args.batch)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
