"""Plots of finished (or running) runs.

    python -m fedfms_jax.plot --workdir runs/fedmsa [runs/fedsam ...] [--out DIR]

Writes dice_per_site.png (Dice per site vs round, the runs overlaid: one colour per site,
one line style per run; the unseen site dashed-dotted in bold) and, for each run with a
predictions.npz from its last evaluation, predictions_<run>.png (image, ground truth,
prediction; one row per site).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedfms_jax.run_log import read_records  # noqa: E402

PREDICTIONS_FILE = "predictions.npz"
LINE_STYLES = ["-", "--", ":", "-."]


def plot_dice(workdirs: list[Path], out: Path) -> Path:
    """Dice per site vs round for one or more runs, on one axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, workdir in enumerate(workdirs):
        evals = [r for r in read_records(workdir, "eval")]
        if not evals:
            continue
        sites = sorted({s for r in evals for s in r["sites"]})
        for site in sites:
            points = [(r["round"], r["sites"][site]["dice"]) for r in evals
                      if site in r["sites"] and r["sites"][site]["dice"] is not None]
            if not points:
                continue
            colour = colours.setdefault(site, palette[len(colours) % len(palette)])
            unseen = any(r["split"] == "test" and site in r["sites"] for r in evals)
            rounds, dice = zip(*points)
            ax.plot(rounds, dice, LINE_STYLES[run_index % len(LINE_STYLES)], color=colour,
                    marker="o", markersize=3, linewidth=2.5 if unseen else 1.2,
                    label=f"{workdir.name}: {site}" + (" (unseen)" if unseen else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Dice per site")
    fig.tight_layout()
    path = out / "dice_per_site.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_predictions(workdir: Path, out: Path) -> Path | None:
    """A grid of (image, ground truth, prediction) per site from predictions.npz."""
    path = workdir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    data = np.load(path)
    sites = [str(s) for s in data["sites"]]
    fig, axes = plt.subplots(len(sites), 3, figsize=(7.5, 2.5 * len(sites)), squeeze=False)
    for row, site in enumerate(sites):
        for col, (title, image) in enumerate([("image", data["images"][row]),
                                              ("ground truth", data["masks"][row]),
                                              ("prediction", data["predictions"][row])]):
            ax = axes[row, col]
            ax.imshow(image, cmap=None if image.ndim == 3 else "gray", vmin=0,
                      vmax=255 if image.ndim == 3 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(site)
    fig.tight_layout()
    target = out / f"predictions_{workdir.name}.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: first workdir)")
    args = parser.parse_args(argv)
    out = args.out or args.workdir[0]
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = [plot_dice(args.workdir, out)]
        written += [p for w in args.workdir if (p := plot_predictions(w, out))]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
