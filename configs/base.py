"""Defaults shared by every experiment: FedFMS's protocol (Adam 1e-4, BCE pos_weight 2, one
local epoch, FedAvg by sample counts, 100 rounds, leave-one-site-out, evaluation every 5
rounds). Every key is documented in `fedfms_jax.config.base_config` (the package owns the
schema, so the validator that refuses unknown keys needs no file outside it). Experiment
files start from `get_config()` and change a few keys; the command line overrides any key:
--config configs/x.py --config.rounds=20.
"""

from fedfms_jax.config import base_config


def get_config():
    return base_config()
