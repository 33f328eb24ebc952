"""Communication accounting: bytes each client downloads and uploads, per round and in total.

A participating client downloads the global trainable weights and uploads its trainable
weights once per round; frozen weights never travel. Byte counts come from the actual
trainable leaves (their sizes and dtypes), so a bf16 or LoRA setup is counted as it is.
Centralised and local-only runs communicate nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RoundComm:
    """Bytes moved in one round; up/down: int64[K] per client."""

    up: np.ndarray
    down: np.ndarray

    @property
    def total(self) -> int:
        return int(self.up.sum() + self.down.sum())


def round_comm(participating: np.ndarray, trainable_bytes: int,
               communicates: bool = True) -> RoundComm:
    """A round's traffic: trainable_bytes each way for every participating client (bool[K]),
    nothing at all when the setting does not communicate."""
    per_client = np.where(participating, trainable_bytes, 0).astype(np.int64)
    if not communicates:
        per_client = np.zeros_like(per_client)
    return RoundComm(up=per_client, down=per_client.copy())


@dataclasses.dataclass
class CommLedger:
    """Cumulative bytes per client over a run (JSON-able, so it rides in checkpoints)."""

    up: list[int]
    down: list[int]
    rounds: int = 0

    @classmethod
    def empty(cls, num_clients: int) -> "CommLedger":
        return cls(up=[0] * num_clients, down=[0] * num_clients)

    def add(self, comm: RoundComm) -> None:
        self.up = [a + int(b) for a, b in zip(self.up, comm.up)]
        self.down = [a + int(b) for a, b in zip(self.down, comm.down)]
        self.rounds += 1

    @property
    def total(self) -> int:
        return sum(self.up) + sum(self.down)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CommLedger":
        return cls(up=[int(x) for x in data["up"]], down=[int(x) for x in data["down"]],
                   rounds=int(data["rounds"]))
