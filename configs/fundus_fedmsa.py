"""FedFMS fundus, fedmsa (see configs/paper.py for the settings and how to run)."""

from configs import paper


def get_config():
    return paper.config("fundus", "fedmsa")
