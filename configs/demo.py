"""The demo: a tiny SAM pretrained on generic shapes (weights/sam_tiny_natural.safetensors),
fine-tuned on the embedded synthetic multi-site set with site4 held out as the unseen site.
Runs on a 2-core CPU; `make demo` runs it in the four settings and prints one table.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "fedmsa"
    c.rounds = 8
    c.model.weights = "weights/sam_tiny_natural.safetensors"
    c.data.layout = "synthetic"
    c.data.unseen_site = "site4"
    c.data.batch_size = 8
    c.data.normalise = "sam"
    c.data.options.num_sites = 4
    c.data.options.per_site = 48
    c.data.options.image_size = 128
    c.train.learning_rate = 1e-3
    c.eval.every = 2
    return c
