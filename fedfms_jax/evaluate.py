"""Evaluate a saved run: the global model (or, local-only, each site's own) of its last
checkpoint, on its sites' validation splits or its unseen site(s).

    python -m fedfms_jax.evaluate --workdir runs/demo [--split val|test] [--round N]

The run is rebuilt from the workdir's config.json (the exact config it trained with), so
the same data root and weights file must still be there. Prints the per-site table and
appends one "eval" record (kind, round, split, per-site scores) to metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections

from fedfms_jax.data.records import DataError
from fedfms_jax.experiment import (CHECKPOINTS, ConfigError, Experiment, SiteScores,
                                   eval_record, summary_rows)
from fedfms_jax.fed.checkpoint import CheckpointMismatch, FedCheckpointer
from fedfms_jax.run_log import RunLog, format_table
from fedfms_jax.weights_file import WeightsError


class RunError(ValueError):
    """A workdir that holds no run this command can evaluate."""


def run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` trained with (its config.json)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise RunError(f"{path} not found: is {workdir} a fedfms_jax.train workdir?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from None


def evaluate(workdir: str | Path, split: str = "val", round_index: int | None = None,
             echo=print) -> dict[str, SiteScores]:
    """Scores per site of the run in `workdir` at its last (or `round_index`) checkpoint."""
    workdir = Path(workdir).resolve()
    if split not in ("val", "test"):
        raise RunError(f"split must be 'val' or 'test', got {split!r}")
    config = run_config(workdir)
    experiment = Experiment(config)
    if split == "test" and not experiment.plan.unseen_sites:
        raise RunError(f"the run in {workdir} has no unseen site (data.unseen_site is empty), "
                       "so there is no test split; use --split val")
    checkpointer = FedCheckpointer(workdir / CHECKPOINTS, experiment.federation)
    try:
        if checkpointer.latest_round() is None:
            raise RunError(f"{workdir / CHECKPOINTS} holds no checkpoint to evaluate")
        restored = checkpointer.restore(experiment.init_state(), round_index)
    finally:
        checkpointer.close()
    scores = experiment.evaluate(restored.state, split)
    unseen = experiment.plan.unseen_sites
    RunLog(workdir, False).write(eval_record(restored.round, split, scores, unseen))
    echo(f"{workdir} at round {restored.round}, split {split}:")
    echo(format_table(["site", "dice", "iou", "hd95", "case dice", "images"],
                      summary_rows(scores, unseen)))
    return scores


def main(argv: list[str] | None = None) -> int:
    # argparse, not absl flags: train defines --workdir as an absl flag and both modules are
    # imported side by side (tests, the demo).
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a fedfms_jax.train run folder")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="val: the source sites' validation splits; test: the unseen site(s)")
    parser.add_argument("--round", type=int, default=None,
                        help="a saved round (default: the last one)")
    args = parser.parse_args(argv)
    try:
        evaluate(args.workdir, args.split, args.round)
    except (RunError, ConfigError, DataError, WeightsError, CheckpointMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
