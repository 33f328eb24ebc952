"""`flower-supernode` with shorter waits (polling.py): the command `fedfms_jax.flower.node`
runs, with the same arguments as flower-supernode."""

from __future__ import annotations

import sys

from fedfms_jax.flower.polling import cap_idle_sleep, fast_object_pulls, poll_interval


def main() -> None:
    cap_idle_sleep(poll_interval())
    fast_object_pulls()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
