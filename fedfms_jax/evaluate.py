"""Evaluate a saved run: the global model (or, local-only, each site's own) of its last
checkpoint, on its sites' validation splits and its unseen site(s).

    python -m fedfms_jax.evaluate --workdir runs/demo [--split val|test|all] [--round N] [--json]
        [--save-predictions DIR]

The run is rebuilt from the workdir's config.json (the exact config it trained with), so
the same data root and weights file must still be there. Every slice of every validation /
test volume is predicted, mapped back to its original grid and scored per case (Dice, IoU,
HD95 and NSD in mm; fedfms_jax.metrics). Prints the per-site table and appends one "eval"
record per split (per-site means, counts and every case's figures) to metrics.jsonl; with
--json the last line printed is one JSON object:
    {"workdir": ..., "round": r, "splits": {split: {site: {"means": {metric: f},
     "counts": {...}, "cases": {case id: {metric: f, "outcome": ...}}}}}}
Case ids: a volume's case folder name (case7 for <site>/case7/image.nii.gz), an image's
file stem. NaN (nothing to score, see fedfms_jax.metrics) is written as null.
--save-predictions writes what was scored: DIR/<split>/<site>/<case id> as a label volume in
the input's format and geometry (volumes) or a PNG mask (images; 0/255 for one class, else
the label values), exactly what `fedfms_jax.predict` writes for that input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections

from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.data.records import DataError
from fedfms_jax.experiment import (CHECKPOINTS, SUMMARY_HEADER, ConfigError, Experiment,
                                   SiteScores, eval_record, summary_rows)
from fedfms_jax.fed.checkpoint import CheckpointMismatch, FedCheckpointer
from fedfms_jax.run_log import RunLog, json_safe, format_table
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


def evaluate_run(workdir: str | Path, splits: tuple[str, ...] = ("val", "test"),
                 round_index: int | None = None, echo=print,
                 predictions: dict | None = None) -> dict:
    """{"round": r, "splits": {split: {site: SiteScores}}} of the run in `workdir` at its last
    (or `round_index`) checkpoint; "test" is skipped when the run has no unseen site unless
    it is the only split asked for (then RunError). `predictions`, when given, receives
    {split: {site: {case: labels}}}, the label maps that were scored."""
    workdir = Path(workdir).resolve()
    for split in splits:
        if split not in ("val", "test"):
            raise RunError(f"split must be 'val' or 'test', got {split!r}")
    config = run_config(workdir)
    experiment = Experiment(config, train=False)
    unseen = experiment.plan.unseen_sites
    if not unseen:
        if tuple(splits) == ("test",):
            raise RunError(f"the run in {workdir} has no unseen site (data.unseen_site is "
                           "empty), so there is no test split; use --split val")
        splits = tuple(s for s in splits if s != "test")
    checkpointer = FedCheckpointer(workdir / CHECKPOINTS, experiment.federation)
    try:
        if checkpointer.latest_round() is None:
            raise RunError(f"{workdir / CHECKPOINTS} holds no checkpoint to evaluate")
        restored = checkpointer.restore(experiment.init_state(), round_index)
    finally:
        checkpointer.close()
    out = {"round": int(restored.round), "splits": {}, "experiment": experiment}
    log = RunLog(workdir, False)
    for split in splits:
        kept = None if predictions is None else predictions.setdefault(split, {})
        scores = experiment.evaluate(restored.state, split, kept)
        log.write(eval_record(restored.round, split, scores, unseen))
        echo(f"{workdir} at round {restored.round}, split {split}:")
        echo(format_table(SUMMARY_HEADER, summary_rows(scores, unseen)))
        out["splits"][split] = scores
    return out


def evaluate(workdir: str | Path, split: str = "val", round_index: int | None = None,
             echo=print) -> dict[str, SiteScores]:
    """Scores per site of one split of the run in `workdir` (see evaluate_run)."""
    return evaluate_run(workdir, (split,), round_index, echo)["splits"][split]


def save_predictions(out: Path, predictions: dict, experiment: Experiment) -> int:
    """Writes each scored case (module docstring); returns the number of files."""
    from PIL import Image

    from fedfms_jax.data import volumes
    from fedfms_jax.predict import mask_png

    by_case = {}
    for site in experiment.sites.values():
        for record in site.train + site.val:
            by_case.setdefault((site.name, record.case_id), record)
    written = 0
    for split, sites in predictions.items():
        for site, cases in sites.items():
            for case, labels in cases.items():
                folder = out / split / site
                folder.mkdir(parents=True, exist_ok=True)
                if labels.ndim == 3:  # a volume case: its key is the case id
                    like = volumes.read_volume(by_case[(site, case)].path,
                                               experiment.preprocessing.modality)
                    volumes.write_label_volume(labels, like, folder / case)
                else:
                    Image.fromarray(mask_png(labels, experiment.preprocessing.num_classes)
                                    ).save(folder / f"{case}.png")
                written += 1
    return written


def as_json(workdir: Path, result: dict) -> dict:
    """evaluate_run's result as the --json object (module docstring)."""
    splits = {}
    for split, scores in result["splits"].items():
        splits[split] = {site: {"means": s.means(),
                                "counts": {c: getattr(s, c) for c in
                                           ("cases", "images", "missed", "spurious",
                                            "both_empty")},
                                "cases": s.per_case} for site, s in scores.items()}
    return json_safe({"workdir": str(Path(workdir).resolve()), "round": result["round"],
                   "splits": splits})


def main(argv: list[str] | None = None) -> int:
    # argparse, not absl flags: train defines --workdir as an absl flag and both modules are
    # imported side by side (tests, the demo).
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a fedfms_jax.train run folder")
    parser.add_argument("--split", choices=("val", "test", "all"), default="all",
                        help="val: the source sites' validation splits; test: the unseen "
                             "site(s); all: both (test only when the run has an unseen site)")
    parser.add_argument("--round", type=int, default=None,
                        help="a saved round (default: the last one)")
    parser.add_argument("--json", action="store_true",
                        help="print the figures as one JSON object on the last line")
    parser.add_argument("--save-predictions", type=Path, default=None, metavar="DIR",
                        help="write the scored masks under DIR/<split>/<site>/")
    args = parser.parse_args(argv)
    splits = ("val", "test") if args.split == "all" else (args.split,)
    enable_compilation_cache()
    try:
        # With --json the tables go to stderr, so stdout's last line is the object alone.
        echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
        predictions = {} if args.save_predictions else None
        result = evaluate_run(args.workdir, splits, args.round, echo=echo,
                              predictions=predictions)
        if args.save_predictions:
            count = save_predictions(args.save_predictions, predictions, result["experiment"])
            echo(f"wrote {count} predictions under {args.save_predictions}")
    except (RunError, ConfigError, DataError, WeightsError, CheckpointMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(Path(args.workdir), result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
