"""`flower-supernode` with a shorter idle poll: the command `fedfms_jax.flower.node` runs.

Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none, sleeps
3 s before asking again (and polls its ClientApp's reply every 0.5 s), hard-coded in
`flwr.supernode.start_client_internal`; no flag or environment variable sets either. Every
round's message reaches a site just after the site sent its previous reply, so each round
would wait about 3 s at every site for nothing. This entry point caps both sleeps at
FEDFMS_SUPERNODE_POLL seconds (default 0.2: five pulls a second, cheap for a SuperLink)
and is otherwise `flower-supernode`, with the same arguments. tests/flower/test_node.py
checks that flwr's code still sleeps where this expects it to.
"""

from __future__ import annotations

import os
import sys
import time

POLL_ENV = "FEDFMS_SUPERNODE_POLL"
DEFAULT_POLL = 0.2


class _CappedSleep:
    """The `time` module, with sleep(s) capped at `poll` seconds."""

    def __init__(self, poll: float):
        self.poll = poll

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))

    def __getattr__(self, name: str):
        return getattr(time, name)


def poll_interval() -> float:
    raw = os.environ.get(POLL_ENV, "")
    try:
        poll = float(raw) if raw else DEFAULT_POLL
    except ValueError:
        poll = -1.0
    if not 0.01 <= poll <= 3.0:
        raise SystemExit(f"error: {POLL_ENV}={raw!r}: give seconds between 0.01 and 3")
    return poll


def cap_idle_sleep(poll: float) -> None:
    """Installs the capped sleep into flwr's SuperNode loop."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(poll)


def main() -> None:
    cap_idle_sleep(poll_interval())
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
