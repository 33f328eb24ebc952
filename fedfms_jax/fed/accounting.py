"""The privacy loss of DP-FedAvg (fed/aggregate.py), from Google's dp-accounting package.

Each round releases one Gaussian mechanism of noise multiplier z: the noisy weighted mean,
whose sensitivity to one client's update (zero-out, dp_accounting's ADD_OR_REMOVE_ONE) is
max_k w_k * C, with noise std z * C * max_k w_k. T rounds compose; the RDP accountant turns
the composition into (epsilon, delta).

Sampling, as the run really samples (aggregate.sample_clients):
  train.client_fraction = 1   every client every round: T-fold Gaussian, no amplification.
  train.client_fraction < 1   fixed-size sampling without replacement: m = max(1,
                              round(f * K)) of the K clients each round, independent across
                              rounds. dp-accounting amplifies that scheme only under the
                              replace-one relation (SampledWithoutReplacementDpEvent), not
                              under the zero-out relation the mechanism above is calibrated
                              for, and Poisson amplification would be wrong for a fixed-size
                              draw. So it is accounted conservatively, as if every client
                              took part every round: a client not drawn releases nothing in
                              that round, so the T-fold Gaussian bounds its loss. The
                              reported epsilon is an upper bound, the same as with f = 1.
Epsilon depends only on (z, delta, T), so it is recomputed from the round count (nothing to
checkpoint, a resumed run reports what the uninterrupted one did).
"""

from __future__ import annotations

import dataclasses

import dp_accounting

from fedfms_jax.fed.aggregate import clients_per_round

# The RDP orders the accountant optimises epsilon over: dp-accounting's defaults.
ORDERS = tuple(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
ADJACENCY = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


@dataclasses.dataclass(frozen=True)
class Accountant:
    """(epsilon, delta) after T rounds of DP-FedAvg with noise multiplier z over K clients
    of which `clients_per_round` are drawn each round."""

    noise_multiplier: float
    delta: float
    num_clients: int
    clients_per_round: int

    def __post_init__(self):
        if not self.noise_multiplier > 0:
            raise ValueError(f"accounting needs noise_multiplier > 0, got "
                             f"{self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def sampling(self) -> str:
        """How the rounds draw clients and how that is accounted (for logs and docs)."""
        if self.clients_per_round >= self.num_clients:
            return f"all {self.num_clients} clients every round (no amplification)"
        return (f"fixed-size sampling without replacement, {self.clients_per_round} of "
                f"{self.num_clients} clients per round; accounted without amplification "
                "(an upper bound)")

    def event(self, rounds: int) -> dp_accounting.DpEvent:
        """The DpEvent of `rounds` rounds (see the module docstring for the sampling)."""
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(self.noise_multiplier), int(rounds))

    def epsilon(self, rounds: int) -> float:
        """Cumulative epsilon at `delta` after `rounds` rounds (0 before the first)."""
        if rounds <= 0:
            return 0.0
        accountant = dp_accounting.rdp.RdpAccountant(ORDERS, ADJACENCY)
        accountant.compose(self.event(rounds))
        return float(accountant.get_epsilon(self.delta))

    def rounds_within(self, target_epsilon: float, limit: int) -> int:
        """The most rounds (<= limit) whose epsilon does not exceed target_epsilon."""
        low, high = 0, int(limit)
        while low < high:  # epsilon grows with the rounds: bisect
            middle = (low + high + 1) // 2
            if self.epsilon(middle) <= target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low


def accountant_for(noise_multiplier: float, delta: float, num_clients: int,
                   client_fraction: float) -> Accountant | None:
    """A run's accountant (None when noise_multiplier is 0: there is no guarantee)."""
    if not noise_multiplier > 0:
        return None
    return Accountant(float(noise_multiplier), float(delta), num_clients,
                      clients_per_round(num_clients, client_fraction))


def budget_message(accountant: Accountant, target: float, done: int) -> str:
    """Why a run stops at `done` rounds under privacy.target_epsilon."""
    return (f"privacy budget: round {done + 1} would reach epsilon "
            f"{accountant.epsilon(done + 1):.4g} > privacy.target_epsilon={target:g} "
            f"(delta {accountant.delta:g}); stopping after {done} round(s) at epsilon "
            f"{accountant.epsilon(done):.4g}")
