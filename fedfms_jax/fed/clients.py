"""Who trains, and how much: sites -> clients for a setting, local steps per round.

Baselines are settings of the same engine: 'centralised' (one client holding the pooled
source sites), 'local' (no averaging; each client keeps training its own weights) and
leave-one-site-out (the held-out site has no client and is only tested). The simulator
and the Flower server plan with the same function, so they agree on clients and weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

SETTINGS = ("federated", "centralised", "local")


@dataclasses.dataclass(frozen=True)
class ClientPlan:
    """Who trains in a run: clients (each a group of pooled sites) and the unseen sites.

    names: one per client; sites: the sites pooled into each client; num_samples: each
    client's training-sample count (its FedAvg weight); unseen_sites: held out of training,
    only tested (weight 0; they get no client slot, which under vmap would cost a client's
    compute for nothing).
    """

    setting: str
    names: tuple[str, ...]
    sites: tuple[tuple[str, ...], ...]
    num_samples: tuple[int, ...]
    unseen_sites: tuple[str, ...] = ()


def plan_clients(site_samples: Mapping[str, int], setting: str = "federated",
                 held_out: Sequence[str] = ()) -> ClientPlan:
    """Sites -> clients for a setting: 'federated' and 'local' make one client per source
    site; 'centralised' pools all source sites into one client. `held_out` sites
    (leave-one-site-out) train in no setting and are only tested."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    unknown = [s for s in held_out if s not in site_samples]
    if unknown:
        raise ValueError(f"held-out sites {unknown} are not among the sites {list(site_samples)}")
    sources = [s for s in site_samples if s not in held_out]
    if not sources:
        raise ValueError("every site is held out: nothing to train on")
    if setting == "centralised":
        return ClientPlan(setting, ("+".join(sources),), (tuple(sources),),
                          (sum(site_samples[s] for s in sources),), tuple(held_out))
    return ClientPlan(setting, tuple(sources), tuple((s,) for s in sources),
                      tuple(site_samples[s] for s in sources), tuple(held_out))


def client_steps(num_samples: Sequence[int], batch_size: int, *, local_steps: int | None,
                 local_epochs: int | None) -> np.ndarray:
    """int32[K] local steps per round: `local_steps` for every client with data, or
    local_epochs * ceil(n_k / batch) (the short last batch is trained, as FedFMS), 0 for a
    client with no data."""
    n = np.asarray(num_samples, np.int64)
    if local_steps is not None:
        return np.where(n > 0, local_steps, 0).astype(np.int32)
    return (local_epochs * -(-n // batch_size)).astype(np.int32)


def step_mask(steps: Sequence[int], total: int | None = None) -> np.ndarray:
    """bool[K, T]: step t of client k is real when t < steps[k]; T = max(steps) by default."""
    steps = np.asarray(steps)
    total = int(steps.max()) if total is None else total
    if steps.max(initial=0) > total:
        raise ValueError(f"a client has {steps.max()} steps but the round has only {total}")
    return np.arange(total)[None, :] < steps[:, None]


@dataclasses.dataclass(frozen=True)
class Segment:
    """One call of the compiled local steps: `clients` (indices into the round's K) each take
    steps first_step .. first_step + length - 1 of the round, vmapped `width` wide (width -
    len(clients) padding members compute and are discarded)."""

    first_step: int
    length: int
    clients: tuple[int, ...]
    width: int


def _cover(n: int, sizes: Sequence[int]) -> list[int]:
    """n split greedily into the allowed sizes (largest first); a remainder below the
    smallest size takes the smallest (padded)."""
    sizes = sorted(set(int(s) for s in sizes), reverse=True)
    out = []
    while n > 0:
        size = next((s for s in sizes if s <= n), sizes[-1])
        out.append(size)
        n -= size
    return out


def segment_plan(steps: Sequence[int], max_length: int, widths: Sequence[int]
                 ) -> list[Segment]:
    """A round's local steps as calls of the compiled steps, with no masked step.

    steps: int32[K] each client's steps this round (0: not training); max_length: the most
    steps one call streams through memory (train.steps_per_segment); widths: the vmap widths
    the layout allows (sharding.group_widths). Every client starts at step 0 and takes each
    of its steps in order, so at step t the clients still training are exactly those with
    steps > t, all at step t: the round is cut where a client finishes, each stretch into
    calls of max_length steps and one of the rest, and its clients into groups of the
    allowed widths. Only a group narrower than the smallest width (several devices) is
    padded. One client at a time (widths (1,)) needs no cuts where another finishes: each
    client takes its steps in calls of max_length and one of the rest, client by client
    (fewer calls; on the CPU each costs ~30 ms beyond its steps, small variant). The calls'
    lengths vary; the compiled steps take the step count as an argument (`call_length`).
    """
    steps = np.asarray(steps, np.int64)
    max_length = max(1, int(max_length))
    if tuple(widths) == (1,):
        return [Segment(t, min(max_length, int(n) - t), (int(k),), 1)
                for k, n in enumerate(steps) for t in range(0, int(n), max_length)]
    ends = sorted(set(int(s) for s in steps if s > 0))
    plan, t = [], 0
    for end in ends:
        active = tuple(int(k) for k in np.flatnonzero(steps >= end))
        whole, rest = divmod(end - t, max_length)
        for length in [max_length] * whole + [rest] * (rest > 0):
            start = 0
            for width in _cover(len(active), widths):
                plan.append(Segment(t, length, active[start:start + width], width))
                start += width
            t += length
    return plan


def call_length(steps: Sequence[int], max_length: int) -> int:
    """The steps one call of the compiled local steps holds batches for: min(max_length,
    max(steps)), at least 1. Every call of a round has this shape, whatever steps it takes
    (fewer are padded, not computed), so a round compiles one program per vmap width."""
    return max(1, min(int(max_length), int(np.max(steps, initial=0))))


def masked_work(plan: Sequence[Segment], steps: Sequence[int]) -> float:
    """Wasted / useful step-work of a plan: (client-steps computed - client-steps trained) /
    client-steps trained (0 for a round without steps)."""
    useful = int(np.sum(np.maximum(np.asarray(steps, np.int64), 0)))
    computed = sum(s.width * s.length for s in plan)
    return (computed - useful) / useful if useful else 0.0
