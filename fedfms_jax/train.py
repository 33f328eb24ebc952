"""Train: federated (FedSAM / FedMSA / FedLoRA), centralised or local-only runs.

    python -m fedfms_jax.train --config configs/demo.py --workdir runs/demo \
        [--config.rounds=20 ...] [--fresh]

Running again into the same workdir resumes from its last checkpoint (with a larger
`rounds` it continues to the new count); --fresh starts over. The workdir receives
config.json, metrics.jsonl, checkpoints/, final.safetensors (the global model, loadable
with fedfms_jax.load_sam) and predictions.npz (for fedfms_jax.plot).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.config import ConfigError, resume_conflicts, trajectory
from fedfms_jax.data.records import DataError
from fedfms_jax.experiment import (CHECKPOINTS, SUMMARY_HEADER, Experiment, eval_record,
                                   summary_rows)
from fedfms_jax.fed.accounting import accountant_for, budget_message
from fedfms_jax.fed.checkpoint import CheckpointMismatch, FedCheckpointer, latest_meta
from fedfms_jax.fed.comm import CommLedger
from fedfms_jax.plot import PREDICTIONS_FILE
from fedfms_jax.run_log import FINAL_WEIGHTS, RunLog, format_table, save_final  # noqa: F401
from fedfms_jax.weights_file import WeightsError


def run_identity(experiment: Experiment) -> dict:
    """What a checkpoint records of the run's config (config.trajectory) and its data."""
    return {"trajectory": trajectory(experiment.config),
            "num_samples": list(experiment.plan.num_samples)}


def check_resume(meta: dict, experiment: Experiment, where: Path) -> None:
    """Refuses, naming every field, a config that would change the checkpointed run's
    trajectory (config.RESUMABLE lists what may change)."""
    saved = meta.get("run_config")
    if saved is None:  # a checkpoint from before run configs were saved: nothing to compare
        return
    problems = resume_conflicts(saved["trajectory"], experiment.config)
    ours = list(experiment.plan.num_samples)
    if saved.get("num_samples") != ours:
        problems.append(f"training samples per client: checkpoint {saved.get('num_samples')}, "
                        f"this run {ours}")
    if problems:
        raise CheckpointMismatch(
            f"{where} was trained with another config; resuming would change its "
            "trajectory:\n  " + "\n  ".join(problems)
            + "\n(--fresh starts over; rounds, eval.*, checkpoint_every, logging and file "
            "locations may change on resume)")


def save_predictions(experiment: Experiment, state, workdir: Path) -> None:
    """One validation (or test) example per site with its prediction, for the plots."""
    images, masks, predictions, names = [], [], [], []
    for site in [s for group in experiment.plan.sites for s in group] + list(
            experiment.plan.unseen_sites):
        records = experiment.sites[site].val or experiment.sites[site].train
        image, mask, prediction = experiment.example_prediction(state, records[0], site)
        images.append(image)
        masks.append(mask)
        predictions.append(prediction)
        names.append(site)
    np.savez_compressed(workdir / PREDICTIONS_FILE, sites=np.array(names),
                        images=np.stack(images), masks=np.stack(masks),
                        predictions=np.stack(predictions))


def privacy_rounds(config: ml_collections.ConfigDict, accountant, start: int, echo) -> int:
    """The round the run trains to: config.rounds, or fewer where privacy.target_epsilon
    would be exceeded (validate has refused a budget that allows no round)."""
    target = float(config.privacy.target_epsilon)
    if accountant is None or not target > 0:
        return int(config.rounds)
    allowed = accountant.rounds_within(target, int(config.rounds))
    if allowed < config.rounds:
        echo(budget_message(accountant, target, max(allowed, start)))
    return max(allowed, start)


def privacy_record(config: ml_collections.ConfigDict, accountant, done: int, outcome,
                   names) -> dict:
    """The round record's privacy fields: cumulative epsilon (None: clipping without noise,
    no guarantee), the noise std and each client's update norm before clipping."""
    if not config.privacy.clip_norm > 0:
        return {}
    norms = outcome.update_norm if outcome.update_norm is not None else []
    return {"epsilon": accountant.epsilon(done) if accountant is not None else None,
            "delta": float(config.privacy.delta), "noise_std": outcome.noise_std,
            "update_norm": {n: float(v) for n, v, drawn in zip(names, norms,
                                                              outcome.participating) if drawn}}


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, fresh: bool = False,
        echo=print) -> dict:
    """Trains to config.rounds (resuming the workdir's last checkpoint) and returns the
    final evaluation: {"val": {site: SiteScores}, "test": {...}, "seconds": f, ...}."""
    workdir = Path(workdir).resolve()  # Orbax refuses relative checkpoint paths
    # Checks config, reads data, builds model: no compile until the checkpoint is accepted.
    experiment = Experiment(config, train=False)
    accountant = accountant_for(config.privacy.noise_multiplier, config.privacy.delta,
                                len(experiment.plan.names), config.train.client_fraction)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    meta = latest_meta(workdir / CHECKPOINTS)
    if meta is not None:  # refused before the fit's compile (minutes at ViT-B), not after
        check_resume(meta, experiment, workdir / CHECKPOINTS)
    experiment.fit()
    echo(experiment.describe())
    federation = experiment.federation
    checkpointer = FedCheckpointer(workdir / CHECKPOINTS, federation, max_to_keep=2)
    log = RunLog(workdir, config.tensorboard)
    state = experiment.init_state()
    ledger = CommLedger.empty(len(experiment.plan.names))
    if meta is not None:
        restored = checkpointer.restore(state)
        state = restored.state
        ledger = restored.ledger or ledger
        experiment.streams.set_states(restored.data_state["iterators"])
        log.truncate_after(restored.round)
        echo(f"resumed {workdir} at round {restored.round}")
    # Written only once any checkpoint has been accepted, so a refused resume changes nothing.
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    unseen = experiment.plan.unseen_sites
    start = int(state.round)
    rounds = privacy_rounds(config, accountant, start, echo)
    result = {}
    seconds = 0.0
    progress = tqdm(range(start, rounds), desc="rounds", unit="round", initial=start,
                    total=rounds, disable=not sys.stderr.isatty())
    for round_index in progress:
        began = time.perf_counter()
        state, outcome = experiment.train_round(state)
        ledger.add(outcome.comm)
        took = time.perf_counter() - began
        seconds += took
        losses = {n: float(l) for n, l in zip(experiment.plan.names, outcome.mean_loss)}
        log.write({"kind": "round", "round": round_index + 1, "loss": losses,
                   **privacy_record(config, accountant, round_index + 1, outcome,
                                    experiment.plan.names),
                   "steps": {n: int(s) for n, s in zip(experiment.plan.names, outcome.steps)},
                   "bytes_up_per_client": int(outcome.comm.up.max(initial=0)),
                   "bytes_down_per_client": int(outcome.comm.down.max(initial=0)),
                   "bytes_total": outcome.comm.total, "bytes_cumulative": ledger.total,
                   "excluded": [n for n, drawn, ok in zip(experiment.plan.names,
                                                          outcome.participating,
                                                          outcome.included) if drawn and not ok],
                   "seconds": took})
        progress.set_postfix(loss=f"{np.nanmean(outcome.mean_loss):.4f}",
                             steps=int(outcome.steps.sum()))
        done = round_index + 1
        if done % config.eval.every == 0 or done == rounds:
            result = {"val": experiment.evaluate(state, "val")}
            log.write(eval_record(done, "val", result["val"], unseen))
            if unseen:
                result["test"] = experiment.evaluate(state, "test")
                log.write(eval_record(done, "test", result["test"], unseen))
            mean = np.mean([s.dice for s in result["val"].values()])
            echo(f"round {done}: loss {np.nanmean(outcome.mean_loss):.4f}, val Dice {mean:.4f}"
                 + (f", unseen Dice {np.mean([s.dice for s in result['test'].values()]):.4f}"
                    if unseen else "") + f", {took:.1f}s")
        if done % config.checkpoint_every == 0 or done == rounds:
            checkpointer.save(state, data_state={"iterators": experiment.streams.states()},
                              ledger=ledger, run_config=run_identity(experiment))
    checkpointer.wait()
    checkpointer.close()
    if not result:  # nothing left to train: evaluate what the checkpoint holds
        result = {"val": experiment.evaluate(state, "val")}
        if unseen:
            result["test"] = experiment.evaluate(state, "test")
    save_final(workdir, federation.global_model(state), config, int(state.round),
               "fedfms_jax.train", preprocessing=experiment.preprocessing)
    save_predictions(experiment, state, workdir)
    scores = {**result["val"], **result.get("test", {})}
    echo(format_table(SUMMARY_HEADER, summary_rows(scores, unseen)))
    if accountant is not None:
        result["epsilon"] = accountant.epsilon(int(state.round))
        echo(f"privacy: epsilon {result['epsilon']:.4f} at delta {accountant.delta:g} after "
             f"{int(state.round)} round(s); noise multiplier {accountant.noise_multiplier:g}, "
             f"clip norm {config.privacy.clip_norm:g}; {accountant.sampling}")
    result.update(seconds=seconds, trainable_params=experiment.trainable_params,
                  total_params=experiment.total_params,
                  bytes_up_per_client_per_round=int(federation.trainable_bytes)
                  if federation.config.setting == "federated" else 0,
                  rounds=int(state.round))
    return result


_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: logs, checkpoints, final weights")
_FRESH = flags.DEFINE_bool("fresh", False, "delete the workdir's previous run and start over")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax narrates every save at INFO
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    enable_compilation_cache()
    try:
        run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
    except (ConfigError, DataError, WeightsError, CheckpointMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
