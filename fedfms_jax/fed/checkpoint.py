"""Checkpoint and resume a federated run with Orbax.

One checkpoint per saved round, in <directory>/<round>/:
  state/  every array of the FedState (round, key, global weights, per-client weights and
          optimizer states of the K real clients, server optimizer state), as a flat dict
          keyed by pytree path, so the padding to a device layout is not saved and a run
          can resume on another device count;
  meta/   JSON: what the run is (mode, setting, model config, clients), the FedConfig, the
          shape and dtype of every saved array, the data-iterator states (an opaque
          JSON-able dict) and the communication ledger.
Orbax writes a step into a temporary directory and renames it only when every item is
complete, so a save that fails or a process that dies mid-save leaves the previous
checkpoint as the latest one. Saves are asynchronous: the device-to-host copy happens in
`save`, the writing in the background, and errors surface in `wait()` or the next `save`.

Frozen weights are not saved (they are the base model's, rebuilt by the run); a sha256 of
them is, and restoring checks the checkpoint against the federation first, naming every
mismatch (mode, model config fields, clients, array shapes, other frozen weights) instead
of failing inside Orbax or resuming silently on the wrong base model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedfms_jax.fed.comm import CommLedger
from fedfms_jax.fed.round import Federation, FedState

FORMAT = "fedfms_jax.fed/2"
# Format 1 held the weights as nnx.States: every weight and optimizer-moment array name, and
# every frozen path in the fingerprint, ended in ".value". Still read: a run saved by it
# resumes.
_LEGACY = {"fedfms_jax.fed/1": ".value"}


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this federation (model, mode or clients)."""


@dataclasses.dataclass
class Restored:
    """A restored run: the placed state, the data-iterator states and the ledger."""

    state: FedState
    data_state: dict
    ledger: CommLedger | None
    round: int


def _flat(tree) -> dict[str, Any]:
    """A pytree -> {'client_params.mask_decoder.iou_token.embedding': leaf, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def _real_clients(state: FedState, num_clients: int) -> FedState:
    """The state without its padding clients (per-client leaves [K_pad] -> [K]); the
    clients' fields as trees (`Federation.client_trees`), as saved."""
    if jax.tree.leaves(state.client_params)[0].shape[0] == num_clients:
        return state
    cut = lambda x: x[:num_clients]
    return state.replace(client_params=jax.tree.map(cut, state.client_params),
                         client_opt_state=jax.tree.map(cut, state.client_opt_state))


def run_signature(federation: Federation) -> dict:
    """What a checkpoint of this federation must match (JSON-able): mode, setting, model
    config, clients."""
    model_config = federation.model_config
    if hasattr(model_config, "to_json"):
        model_config = json.loads(model_config.to_json())
    return {"mode": federation.config.mode, "setting": federation.config.setting,
            "model_config": model_config, "num_clients": federation.num_clients,
            "client_names": list(federation.client_names)}


def frozen_fingerprint(frozen, suffix: str = "") -> str:
    """sha256 of frozen weights (paths, dtypes, shapes, bytes). Checkpoints hold only what
    training changes; this tells whether a resumed run froze the same (e.g. pretrained)
    weights. suffix: what an older format appended to every path (_LEGACY)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        value = np.asarray(leaf)
        name = jax.tree_util.keystr(path) + suffix
        digest.update(f"{name}|{value.dtype}|{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _saved_names(expected: dict[str, Any], saved: dict[str, list], suffix: str
                 ) -> dict[str, str]:
    """Each array's name in a checkpoint: its own, or with an older format's `suffix` where
    the checkpoint has that name instead (the weights and moments of format 1)."""
    return {k: k + suffix if suffix and k not in saved and k + suffix in saved else k
            for k in expected}


def _spec(flat: dict[str, Any]) -> dict[str, list]:
    return {k: [list(np.shape(v)), str(np.dtype(v.dtype))] for k, v in flat.items()}


def latest_meta(directory) -> dict | None:
    """The JSON part of the latest checkpoint in `directory` (None: there is none), read
    without a federation: a run checks it before it builds and compiles its engine."""
    if not Path(directory).is_dir():
        return None
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step()
        return None if step is None else _read_meta(manager, step)
    finally:
        manager.close()


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


class FedCheckpointer:
    """Save and restore a Federation's state every round (or as often as called).

    directory: where the rounds go; max_to_keep: latest checkpoints kept (None: all).
    """

    def __init__(self, directory, federation: Federation, *, max_to_keep: int | None = 3,
                 async_save: bool = True):
        self.federation = federation
        self._fingerprints: dict[str, str] = {}
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def frozen_sha256(self, suffix: str = "") -> str:
        """The federation's frozen fingerprint (as a format with this path suffix wrote
        it), computed once, on the host."""
        if suffix not in self._fingerprints:
            self._fingerprints[suffix] = frozen_fingerprint(self.federation.frozen, suffix)
        return self._fingerprints[suffix]

    def save(self, state: FedState, *, data_state: dict | None = None,
             ledger: CommLedger | None = None, run_config: dict | None = None,
             wait: bool = False) -> None:
        """Checkpoint `state` as its round number. data_state: JSON-able (e.g. grain
        iterator states); run_config: JSON-able, what the run was started with (the caller
        compares it on resume, see `read_meta`); returns once the arrays are on the host
        unless wait=True."""
        fed = self.federation
        arrays = _flat(_real_clients(fed.client_trees(state), fed.num_clients))
        meta = {"format": FORMAT, "round": int(state.round), **run_signature(fed),
                "frozen_sha256": self.frozen_sha256(),
                "fed_config": fed.config.to_json(), "arrays": _spec(arrays),
                "run_config": run_config, "data_state": data_state or {},
                "ledger": None if ledger is None else ledger.to_json()}
        self.manager.save(int(state.round), args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until pending saves are written (raises what a failed save raised)."""
        self.manager.wait_until_finished()

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, round_index: int | None = None) -> dict:
        """The JSON part of a checkpoint (the latest by default)."""
        return _read_meta(self.manager, self._step(round_index))

    def restore(self, like: FedState, round_index: int | None = None, *,
                check_frozen: bool = True) -> Restored:
        """Restore a round (the latest by default) into the structure of `like` (a state of
        this federation, e.g. `federation.init()`), placed on the federation's mesh.

        Raises CheckpointMismatch naming what differs when the checkpoint is another run's,
        including (with check_frozen) frozen weights other than those it was trained on.
        """
        fed = self.federation
        step = self._step(round_index)
        meta = self.read_meta(step)
        template = _real_clients(fed.client_trees(like, copy=False), fed.num_clients)
        expected = _flat(template)
        suffix = _LEGACY.get(meta.get("format"), "")
        names = _saved_names(expected, meta.get("arrays", {}), suffix)
        self._check(meta, {names[k]: v for k, v in _spec(expected).items()}, step,
                    check_frozen, suffix)
        targets = {names[k]: np.zeros(np.shape(v), v.dtype) for k, v in expected.items()}
        arrays = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(targets))).state
        treedef = jax.tree.structure(template)
        state = jax.tree.unflatten(treedef, [np.asarray(arrays[names[k]]) for k in expected])
        pad = lambda x: np.concatenate(
            [x, np.zeros((fed.num_padded - x.shape[0], *x.shape[1:]), x.dtype)])
        if fed.num_padded != fed.num_clients:
            state = state.replace(client_params=jax.tree.map(pad, state.client_params),
                                  client_opt_state=jax.tree.map(pad, state.client_opt_state))
        ledger = None if meta.get("ledger") is None else CommLedger.from_json(meta["ledger"])
        return Restored(state=fed.place(fed.from_client_trees(state)),
                        data_state=meta.get("data_state", {}),
                        ledger=ledger, round=step)

    def close(self) -> None:
        self.manager.close()

    # --- checks ------------------------------------------------------------------------

    def _step(self, round_index: int | None) -> int:
        steps = self.all_rounds()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        if round_index is None:
            return max(steps)
        if round_index not in steps:
            raise FileNotFoundError(f"no checkpoint of round {round_index} in "
                                    f"{self.manager.directory}; rounds saved: {sorted(steps)}")
        return round_index

    def _check(self, meta: dict, expected: dict[str, list], step: int,
               check_frozen: bool, suffix: str) -> None:
        where = f"checkpoint {self.manager.directory}/{step}"
        if meta.get("format") != FORMAT and meta.get("format") not in _LEGACY:
            raise CheckpointMismatch(f"{where} has format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r}")
        ours = run_signature(self.federation)
        problems = []
        for name in ("mode", "setting", "num_clients", "client_names"):
            if meta.get(name) != ours[name]:
                problems.append(f"{name}: checkpoint {meta.get(name)!r}, this run {ours[name]!r}")
        theirs_model, ours_model = meta.get("model_config"), ours["model_config"]
        if isinstance(theirs_model, dict) and isinstance(ours_model, dict):
            fields = sorted(set(theirs_model) | set(ours_model))
            problems += [f"model_config.{f}: checkpoint {theirs_model.get(f)!r}, this run "
                         f"{ours_model.get(f)!r}" for f in fields
                         if theirs_model.get(f) != ours_model.get(f)]
        elif theirs_model != ours_model:
            problems.append(f"model_config: checkpoint {theirs_model!r}, this run {ours_model!r}")
        saved = meta.get("arrays", {})
        missing = [k for k in expected if k not in saved]
        extra = [k for k in saved if k not in expected]
        reshaped = [f"{k}: checkpoint {saved[k]}, this run {expected[k]}"
                    for k in expected if k in saved and saved[k] != expected[k]]
        for label, keys in (("missing from the checkpoint", missing),
                            ("not in this run", extra), ("shape/dtype differs", reshaped)):
            if keys:
                shown = "\n    ".join(keys[:8]) + (f"\n    ... {len(keys) - 8} more"
                                                   if len(keys) > 8 else "")
                problems.append(f"{len(keys)} arrays {label}:\n    {shown}")
        if (check_frozen and not problems
                and meta.get("frozen_sha256") != self.frozen_sha256(suffix)):
            problems.append("frozen weights: this run's frozen (e.g. pretrained) weights are "
                            "not those the checkpoint was trained with (sha256 "
                            f"{str(meta.get('frozen_sha256'))[:12]}... vs "
                            f"{self.frozen_sha256(suffix)[:12]}...); load the same "
                            "base weights, or pass check_frozen=False")
        if problems:
            raise CheckpointMismatch(f"{where} is not a checkpoint of this federation:\n  "
                                     + "\n  ".join(problems))
