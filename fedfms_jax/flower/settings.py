"""What a Flower run is told: the experiment config and the deployment's knobs.

Flower hands a run a flat `run_config` of scalars (the `[tool.flwr.app.config]` table of the
app's pyproject.toml, plus `flwr run --run-config` overrides). Ours carries the whole
ml_collections experiment config as JSON -- the same config `fedfms_jax.train` runs, so the
server and every site agree on model, mode, optimiser and data without sharing files -- and
the deployment settings below, which have no meaning for the in-process simulator.

Each site's own settings come from its SuperNode's `--node-config`:
  site-index   which site of the data set this node is (0-based, in the data layer's order);
               Flower's simulation runtime sets `partition-id` instead, which is accepted too
  data-root    this site's data root, when it differs from the config's `data.root`
  worker-dir   the site worker's directory (added by `python -m fedfms_jax.flower.node`)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

FAILURE_POLICIES = ("fail", "continue")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The deployment settings of one Flower run (all waits bounded)."""

    config_json: str                 # the experiment config (ml_collections) as JSON
    num_sites: int                   # sites that must connect before round 1
    workdir: str = ""                # where the server writes metrics and weights ('' = none)
    connect_timeout: float = 300.0   # s to wait for `num_sites` sites to connect
    round_timeout: float = 3600.0    # s to wait for the replies of one round
    on_site_failure: str = "fail"    # a site errs or is lost mid-round: 'fail' the run, or
                                     # 'continue' with the remaining sites
    min_sites: int = 1               # with 'continue': fewest replies a round may average
    # Secure aggregation (flower/secagg.py): 1 runs every round as SecAgg+, the server
    # seeing only the sum; the sites' updates are clipped to [-secagg_range, secagg_range]
    # per value before quantisation, and a site's masks are removed while at least
    # secagg_threshold of its neighbours answer.
    secagg: int = 0
    secagg_range: float = 1.0
    secagg_threshold: float = 0.67

    def __post_init__(self):
        if self.on_site_failure not in FAILURE_POLICIES:
            raise ValueError(f"on-site-failure must be one of {FAILURE_POLICIES}, got "
                             f"{self.on_site_failure!r}")
        if self.num_sites < 1:
            raise ValueError(f"num-sites must be >= 1, got {self.num_sites}")
        for name in ("connect_timeout", "round_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0 seconds")
        if self.min_sites < 1:
            raise ValueError(f"min-sites must be >= 1, got {self.min_sites}")
        if self.secagg not in (0, 1):
            raise ValueError(f"secagg must be 0 or 1, got {self.secagg}")
        if not self.secagg_range > 0:
            raise ValueError(f"secagg-range must be > 0, got {self.secagg_range}")
        if not 0 < self.secagg_threshold <= 1:
            raise ValueError(f"secagg-threshold must be in (0, 1], got {self.secagg_threshold}")

    @property
    def config(self) -> ml_collections.ConfigDict:
        return config_from_json(self.config_json)

    def to_run_config(self) -> dict[str, Any]:
        """Flower run_config keys (dashes, as Flower's own keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        if "config-json" not in run_config:
            raise ValueError("the run config has no 'config-json': start the run with "
                             "`python -m fedfms_jax.flower.local` or an app directory written "
                             "by its --write_app")
        values = {}
        for key, field in known.items():
            if key in run_config:
                values[field.name] = _cast(field, run_config[key])
        return cls(**values)


def check_secagg(config: ml_collections.ConfigDict, settings: RunSettings) -> None:
    """SecAgg+ gives the server only the sum of the updates: nothing it could clip."""
    from fedfms_jax.config import ConfigError

    privacy = config.privacy
    if settings.secagg and (privacy.clip_norm > 0 or privacy.noise_multiplier > 0):
        raise ConfigError("privacy.clip_norm / privacy.noise_multiplier clip and noise each "
                          "site's update on the server, which SecAgg+ (--secagg) makes "
                          "impossible: the server sees only their sum. Run one or the other")


def _cast(field: dataclasses.Field, value: Any) -> Any:
    kind = {"str": str, "int": int, "float": float}[field.type]
    return kind(value)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def site_index(node_config: Mapping[str, Any]) -> int:
    """This node's site: `site-index`, or Flower simulation's `partition-id`."""
    for key in ("site-index", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise ValueError("this SuperNode does not say which site it is: start it with "
                     "--node-config 'site-index=K' (K = 0, 1, ... in the data's site order)")
