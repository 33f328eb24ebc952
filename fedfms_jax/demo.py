"""`make demo`: the predict path end to end, until the federated demo lands.

Saves a seeded, randomly initialised tiny SAM as a weights file, draws an image and runs
the predict CLI on it with a box prompt. The weights are untrained, so the mask shows the
plumbing (weights file -> load_sam -> preprocess -> SAM -> postprocess), not segmentation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from fedfms_jax import predict
from fedfms_jax.models import Sam, get_config
from fedfms_jax.weights_file import flat_state, save_weights


def main(out_dir: str = "out/demo") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = get_config("tiny")
    weights = out / "sam_tiny_random.safetensors"
    save_weights(weights, {k: np.asarray(v) for k, v in flat_state(Sam(config, rngs=nnx.Rngs(0))).items()},
                 config)
    yy, xx = np.mgrid[:180, :240]
    image = np.where(((yy - 90) ** 2 + (xx - 120) ** 2) < 50 ** 2, 200, 40).astype(np.uint8)
    image_path = out / "disc.png"
    Image.fromarray(image).save(image_path)
    print(f"python -m fedfms_jax.predict --weights {weights} --image {image_path} "
          f"--box 60,30,180,150 --multimask --out {out / 'mask.png'}")
    return predict.main(["--weights", str(weights), "--image", str(image_path),
                         "--box", "60,30,180,150", "--multimask", "--out", str(out / "mask.png"),
                         "--save-logits", str(out / "logits.npy")])


if __name__ == "__main__":
    sys.exit(main())
