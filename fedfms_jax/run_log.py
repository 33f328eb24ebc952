"""A run's log: metrics.jsonl (one JSON record per round and per evaluation), optional
TensorBoard events, and the final summary table. Side effects live here, not in the engine.

Records:
    {"kind": "round", "round": r, "loss": {site: f}, "steps": {site: n},
     "bytes_up_per_client": n, "bytes_down_per_client": n, "bytes_total": n,
     "bytes_cumulative": n, "seconds": f, "wall_time": f,
     with privacy.clip_norm > 0 also "epsilon": f | null (cumulative; null: no noise),
     "delta": f, "noise_std": f, "update_norm": {site: f} (before clipping)}
    {"kind": "eval", "round": r, "split": "val" | "test",
     "sites": {site: {"dice": f, "iou": f, "hd95": f, "nsd": f, "cases": n, "images": n,
                      "missed": n, "spurious": n, "both_empty": n,
                      "per_case": {case: {"dice": f, ..., "outcome": s}}}},
     "mean_dice_source": f, "dice_unseen": f | null, "wall_time": f}
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"
# The global model at the end of a run (train and the Flower server write it).
FINAL_WEIGHTS = "final.safetensors"


def save_final(workdir: str | Path, model, config, rounds: int, trained_by: str, *,
               preprocessing=None) -> Path:
    """The global model (frozen + global trainable weights, an NNX Sam) as
    <workdir>/final.safetensors, loadable with fedfms_jax.load_sam and the predict CLI, with
    the preprocessing it was trained with (data.preprocessing.Preprocessing)."""
    from fedfms_jax.weights_file import flat_state, save_weights  # JAX: only when saving

    path = Path(workdir) / FINAL_WEIGHTS
    save_weights(path, flat_state(model), model.config,
                 {"trained_by": trained_by, "mode": config.mode,
                  "algorithm": config.algorithm, "rounds": str(int(rounds))},
                 preprocessing=preprocessing)
    return path


def json_safe(value: Any) -> Any:
    """JSON-safe floats: NaN/inf become null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends records to <workdir>/metrics.jsonl (flushed per record, so a crash loses
    nothing written before it), and mirrors scalars to TensorBoard when asked."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = False):
        self.path = Path(workdir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise RuntimeError("log.tensorboard=True needs tensorboardX: "
                                   "pip install -e '.[tensorboard]'") from None
            self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, record: dict) -> None:
        record = json_safe({**record, "wall_time": time.time()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        step = record["round"]
        if record["kind"] == "round":
            for site, loss in record.get("loss", {}).items():
                self._writer.add_scalar(f"loss/{site}", loss, step)
            self._writer.add_scalar("bytes_cumulative", record["bytes_cumulative"], step)
        else:
            for site, values in record["sites"].items():
                for name, value in values.items():
                    if value is not None:
                        self._writer.add_scalar(f"{record['split']}/{name}/{site}", value, step)
        self._writer.flush()

    def truncate_after(self, round_index: int) -> None:
        """Drops records of rounds after round_index (a resumed run rewrites them)."""
        kept = [r for r in read_records(self.path.parent) if r["round"] <= round_index]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_records(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (of one kind if given)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a fedfms_jax run?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not valid JSON") from None
    return [r for r in records if kind is None or r["kind"] == kind]


def format_table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """A plain-text table with aligned columns."""
    def text(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    rows = [[text(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
            for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
