"""One bounded request/reply exchange with the sites, with every outcome accounted for.

Flower's `Grid.send_and_receive` returns whatever replies came before its timeout; to tell a
slow site from a dead one and to name them, `exchange` pushes the messages itself, polls the
SuperLink for replies (every 0.1 s rather than Flower's three), and sorts each site
into replied, erred (the SuperLink answers for a node whose heartbeats stopped, or the
ClientApp raised) or silent (nothing before the deadline).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


@dataclasses.dataclass
class Outcome:
    """Replies of one exchange, by destination node id."""

    replies: dict[int, Message]
    errors: dict[int, str]
    silent: list[int]
    seconds: float

    @property
    def failed(self) -> dict[int, str]:
        """node id -> why it gave no usable reply."""
        return {**self.errors, **{node: "no reply before the round timeout"
                                  for node in self.silent}}


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             poll_interval: float = 0.1) -> Outcome:
    """Sends `messages` and waits at most `timeout` seconds for their replies."""
    messages = list(messages)
    start = time.monotonic()
    ids = list(grid.push_messages(messages))
    node_of: dict[str, int] = {}
    errors: dict[int, str] = {}
    for message_id, message in zip(ids, messages, strict=True):
        if message_id is None:
            errors[message.metadata.dst_node_id] = "the SuperLink did not accept the message"
        else:
            node_of[message_id] = message.metadata.dst_node_id
    pending = set(node_of)
    replies: dict[int, Message] = {}
    deadline = start + timeout
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            node = node_of[message_id]
            if reply.has_error():
                errors[node] = f"{reply.error.reason} (error code {reply.error.code})"
            else:
                replies[node] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    return Outcome(replies, errors, sorted(node_of[m] for m in pending),
                   time.monotonic() - start)
