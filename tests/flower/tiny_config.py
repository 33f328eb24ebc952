"""configs/demo.py shrunk for the Flower tests: a random tiny SAM in FedMSA mode, 3 small
synthetic sites of different sizes (so the sites take different numbers of local steps),
site3 unseen, 2 rounds with one evaluation at the end."""

from configs import demo


def get_config():
    config = demo.get_config()
    config.model.weights = ""
    config.model.variant = "tiny"
    config.data.options.num_sites = 3
    config.data.options.per_site = 12
    config.data.unseen_site = "site3"
    config.data.batch_size = 4
    config.data.num_threads = 0
    config.rounds = 2
    config.eval.every = 2
    config.eval.batch_size = 4
    return config
