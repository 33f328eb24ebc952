"""configs/demo.py shrunk for the runner and Flower tests: a random tiny SAM in FedMSA mode,
3 small synthetic sites of different sizes (so the sites take different numbers of local
steps), site3 unseen, 2 rounds with one evaluation at the end."""

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
    # With Adam's eps at 1e-8, gradients that are pure rounding noise (attention key biases,
    # which softmax ignores) become +-lr steps whose signs differ between any two compiled
    # programs; 1e-4 keeps them at ~1e-6 so the Flower run must match the simulator to 1e-5.
    config.train.adam_eps = 1e-4
    return config
