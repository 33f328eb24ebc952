"""How long flwr 1.42 waits between polls, where flwr sets it in code and not in a flag.

Three waits cost a round seconds for nothing, at every site and every hop:
  * the SuperNode sleeps 3 s after an empty pull from the SuperLink (and 0.5 s between
    checks for its ClientApp's reply), hard-coded in `flwr.supernode.
    start_client_internal`: every round's message reaches a site just after the site sent
    its previous reply, so it would wait ~3 s. `cap_idle_sleep` caps both at
    FEDFMS_SUPERNODE_POLL seconds (default 0.2: five pulls a second, cheap for a SuperLink).
  * every receiver of a message (SuperNode from SuperLink, ClientApp from SuperNode,
    ServerApp from SuperLink) gets the message before all its objects have arrived (the
    sender registers the message, then uploads its objects), and pulls an object that is not
    there yet again after 1 s, then 2 s, 4 s ... (`flwr.supercore.inflatable.
    inflatable_utils.pull_objects`, initial backoff PULL_INITIAL_BACKOFF = 1 s): most
    messages paid one or two of these waits per hop. `fast_object_pulls` starts the
    backoff at 0.05 s (same doubling, same 10 s cap and try limit, so a large upload still
    costs few requests).
tests/flower/test_polling.py checks that flwr still waits where this expects it to.
"""

from __future__ import annotations

import os
import time

POLL_ENV = "FEDFMS_SUPERNODE_POLL"
DEFAULT_POLL = 0.2
PULL_INITIAL_BACKOFF = 0.05


class _CappedSleep:
    """The `time` module, with sleep(s) capped at `poll` seconds."""

    def __init__(self, poll: float):
        self.poll = poll

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))

    def __getattr__(self, name: str):
        return getattr(time, name)


def seconds_from_env(name: str, default: float, low: float, high: float) -> float:
    """Seconds from environment variable `name` (`default` when unset); a value that is not
    a number in [low, high] exits naming the variable."""
    raw = os.environ.get(name, "")
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        seconds = -1.0
    if not low <= seconds <= high:
        raise SystemExit(f"error: {name}={raw!r}: give seconds between {low:g} and {high:g}")
    return seconds


def poll_interval() -> float:
    """The SuperNode's capped idle sleep (FEDFMS_SUPERNODE_POLL)."""
    return seconds_from_env(POLL_ENV, DEFAULT_POLL, 0.01, 3.0)


def cap_idle_sleep(poll: float) -> None:
    """Installs the capped sleep into flwr's SuperNode loop."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(poll)


def fast_object_pulls(initial_backoff: float = PULL_INITIAL_BACKOFF) -> None:
    """Every object pull of this process retries a missing object after `initial_backoff`
    seconds, doubling from there (flwr: 1 s). Its callers all take the defaults."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        function.__kwdefaults__["initial_backoff"] = initial_backoff
