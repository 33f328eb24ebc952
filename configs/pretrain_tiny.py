"""Pretrains the demo's foundation model: a tiny SAM trained centrally, from scratch, on the
generic "natural shapes" synthetic set (not the medical-like sites), as SAM is pretrained
on natural images before FedFMS fine-tunes it. Reproduce the committed weights with:

    python -m fedfms_jax.train --config configs/pretrain_tiny.py --workdir runs/pretrain_tiny
    cp runs/pretrain_tiny/final.safetensors weights/sam_tiny_natural.safetensors
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "fedsam"
    c.algorithm = "central"
    c.rounds = 40
    c.seed = 0
    c.model.variant = "tiny"
    c.model.weights = ""
    c.data.layout = "synthetic"
    c.data.batch_size = 16
    c.data.normalise = "sam"
    c.data.augment = True
    c.data.options.kind = "natural"
    c.data.options.num_sites = 1
    c.data.options.per_site = 512
    c.data.options.image_size = 128
    c.data.options.seed = 1000  # shapes unrelated to the demo's sites
    c.train.learning_rate = 1e-3
    c.eval.every = 10
    return c
