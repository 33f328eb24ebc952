"""Defaults shared by every experiment: FedFMS's protocol (Adam 1e-4, BCE pos_weight 2, one
local epoch, FedAvg by sample counts, 100 rounds, leave-one-site-out, evaluation every 5
rounds). Experiment files start from `get_config()` and change a few keys; the command line
overrides any key: --config configs/x.py --config.rounds=20.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "fedmsa"          # fedsam | fedmsa | fedlora | decoder: what is trained and sent
    c.algorithm = "fedavg"     # fedavg | fedprox | central | local
    c.rounds = 100
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = "vit_b"  # used when model.weights is empty (random init)
    c.model.weights = ""       # a fedfms_jax .safetensors (weights/convert.py makes one)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.num_classes = 1
    c.model.adapter_ratio = 0.25
    c.model.adapter_scale = 0.5
    c.model.adapter_init = "torch_default"  # torch_default (upstream) | zero
    c.model.lora_rank = 4
    c.model.lora_alpha = 4.0

    c.data = ml_collections.ConfigDict()
    c.data.layout = "fedfms"   # fedfms | folders | volumes (alias nifti) | synthetic
    c.data.root = ""           # <root>/<site>/...; not used by the synthetic layout
    c.data.sites = ""          # comma-separated subset, in order; empty: all
    c.data.unseen_site = ""    # held out of training, tested only (leave-one-site-out)
    c.data.image_size = 0      # model input side; 0: the model's (1024 for SAM)
    c.data.batch_size = 4
    c.data.normalise = "unit"  # unit (FedFMS: x / 255) | sam (ImageNet mean/std)
    c.data.resize = "stretch"  # stretch (to S x S, FedFMS) | longest_side (SAM's, zero-padded)
    c.data.prompt = "none"     # none (FedFMS's prompt-free mode) | box | points
    c.data.augment = False
    c.data.skip_bad = False    # skip (and count) bad files instead of stopping
    c.data.label_map = ""      # e.g. "1:1,2:1" to merge labels 1 and 2 into class 1
    c.data.val_fraction = 0.2  # seeded by-case validation split for sites that have none
    c.data.num_threads = 2
    # Layout options, each layout its own (e.g. synthetic sizes; volumes: keep_empty, window,
    # modality, resample_label, geometry_tolerance): set them in a config file.
    c.data.options = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.learning_rate = 1e-4
    c.train.adam_eps = 1e-8    # torch's (and FedFMS's) Adam epsilon
    c.train.pos_weight = 2.0
    c.train.local_epochs = 1   # FedFMS: one epoch per client per round ...
    c.train.local_steps = 0    # ... or, when > 0, this many steps for every client
    c.train.reset_optimizer = False  # FedFMS keeps each client's Adam state across rounds
    c.train.prox_mu = 0.01     # FedProx's mu (algorithm=fedprox only)
    c.train.client_fraction = 1.0
    c.train.server_optimizer = "none"  # none (FedAvg) | momentum (FedAvgM) | adam (FedAdam)
    c.train.server_lr = 1.0
    c.train.clients_per_step = 0  # 0: all clients at once; else chunks of this many
    c.train.steps_per_segment = 16  # local steps streamed through memory at a time

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 5           # rounds between evaluations (and the last round)
    # Per case on the original grid (volumes in 3-D, mm): any of dice, iou, hd95, nsd.
    c.eval.metrics = "dice,iou,hd95,nsd"
    c.eval.mode = "standard"   # standard (sigmoid > 0.5) | fedfms (thresholds 0.1..0.9 averaged)
    c.eval.empty = "ignore"    # ignore (MONAI's ignore_empty) | score (both empty scores 1)
    c.eval.nsd_tolerance_mm = 2.0  # Normalised Surface Dice tolerance
    c.eval.batch_size = 8

    c.checkpoint_every = 1     # rounds between checkpoints
    c.tensorboard = False
    return c
