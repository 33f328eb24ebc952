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


def segments(steps: Sequence[int], segment: int):
    """The round's local steps streamed `segment` at a time: yields (first step, int32[K]
    steps of each client in this segment). Per-step keys depend on the step's index in the
    round, not on the segmentation, so any `segment` trains the same steps."""
    steps = np.asarray(steps, np.int32)
    segment = max(1, int(segment))
    for start in range(0, int(steps.max(initial=0)), segment):
        yield start, np.clip(steps - start, 0, segment).astype(np.int32)
