"""The training curves: ``curves.csv`` (one row per validation; :data:`CURVE_FIELDS`), cut back on resume, and
drawn as ``curves.png`` by :func:`plot_curves`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

__all__ = ["CURVE_FIELDS", "plot_curves"]

#: columns of ``curves.csv`` (one row per validation).
CURVE_FIELDS = ["iteration", "train_loss", "train_epe", "train_mtre", "val_epe", "val_mtre_before_mean",
                "val_mtre_p50", "val_mtre_mean", "val_reduction_factor", "seconds"]


def plot_curves(csv_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Draw ``curves.csv`` as a PNG (matplotlib, off-screen Agg canvas; the file is replaced atomically).

    Three panels against the iteration: the training loss (mean over the steps since the previous
    validation), the EPE (validation, and training for comparison; network pixels) and the validation mTRE
    (mean and median after one update, and the mean before it; mm).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with Path(csv_path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    def col(name: str) -> list[float]:
        out = []
        for r in rows:
            try:
                out.append(float(r.get(name) or "nan"))
            except ValueError:
                out.append(math.nan)
        return out

    it = col("iteration")
    fig = Figure(figsize=(13.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_epe, ax_mtre = fig.subplots(1, 3)
    loss = col("train_loss")
    ax_loss.plot(it, loss, "o-", ms=3, color="tab:blue", label="training loss")
    finite = [v for v in loss if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:  # log scale once it spans a decade
        ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (mean since the previous validation)", fontsize=10)
    ax_epe.plot(it, col("val_epe"), "o-", ms=3, color="tab:orange", label="validation")
    ax_epe.plot(it, col("train_epe"), "--", color="tab:gray", label="training")
    ax_epe.set_title("EPE at the contour points [network px]", fontsize=10)
    ax_mtre.plot(it, col("val_mtre_mean"), "o-", ms=3, color="tab:green", label="mean after one update")
    ax_mtre.plot(it, col("val_mtre_p50"), "s-", ms=3, color="tab:olive", label="median after one update")
    ax_mtre.plot(it, col("val_mtre_before_mean"), ":", color="tab:gray", label="mean before (initial)")
    ax_mtre.set_title("validation mTRE [mm]", fontsize=10)
    for ax in (ax_loss, ax_epe, ax_mtre):
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png = Path(png_path)
    tmp = png.with_name(f"{png.stem}.tmp{os.getpid()}.png")
    fig.savefig(str(tmp))
    os.replace(tmp, png)
    return png


def _truncate_curves(csv_path: Path, last_iteration: int) -> None:
    """Drop the rows of validations after ``last_iteration`` (written after the checkpoint a run resumes from)."""
    with csv_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and float(r[0]) <= last_iteration]
    if len(keep) != len(rows):
        with csv_path.open("w", newline="") as fh:
            csv.writer(fh).writerows(keep)
