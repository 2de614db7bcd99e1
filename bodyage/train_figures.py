"""Figures of a training run: learning curves and predicted vs chronological age."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _save(fig: Any, folder: Path, stem: str) -> list[Path]:
    from bodyage.atomic import write_with

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("pdf", "png"):
        path = folder / f"{stem}.{ext}"
        write_with(path, partial(fig.savefig, format=ext, dpi=150, bbox_inches="tight"))
        out.append(path)
    return out


def learning_curves(log: pd.DataFrame, folder: Path) -> list[Path]:
    """Training loss and validation MAE (years) per epoch, one line per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for k, g in log.groupby("fold"):
        axes[0].plot(g["epoch"] + 1, g["train_loss_years"], lw=1.2, label=f"fold {int(str(k)) + 1}")
        axes[1].plot(g["epoch"] + 1, g["val_mae"], lw=1.2)
    axes[0].set_ylabel("training L1 loss (years)")
    axes[1].set_ylabel("inner-validation MAE (years)")
    top = np.nanpercentile(log["val_mae"], 90) if len(log) else 1.0
    axes[1].set_ylim(0, max(1.0, 1.5 * top))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    paths = _save(fig, folder, "learning_curves")
    plt.close(fig)
    return paths


def figure_titles(preds: pd.DataFrame, metrics: dict[str, Any]) -> tuple[str, str, str]:
    """Titles of :func:`predicted_vs_age`: left panel, right panel, figure (may be ``""``).

    The left panel gives the MAE beside the mean-age baseline's; the right one shows the
    bias-corrected gap and its correlation with age, never an MAE of the corrected
    predictions (they use the true age). An uninformative model says so in the figure title.
    """
    left = f"predicted (MAE {metrics['overall']['mae']:.2f} y"
    if "baseline_mae" in metrics:
        left += f"; mean-age baseline {metrics['baseline_mae']:.2f} y"
    left += ")"
    gap = preds["age_gap_corrected"].to_numpy(float)
    age = preds["age"].to_numpy(float)
    ok = np.isfinite(gap)
    r = float(np.corrcoef(age[ok], gap[ok])[0, 1]) if ok.sum() > 2 and np.ptp(gap[ok]) > 0 else float("nan")
    right = f"bias-corrected age gap (r with age {r:.2f})"
    parts = []
    if "oracle_mae" in metrics:
        parts.append(f"oracle MAE {metrics['oracle_mae']:.2f} y, ratio {metrics['mae_ratio']:.2f}")
    if metrics.get("informative") is False:
        parts.append("UNINFORMATIVE MODEL: not clearly better than the mean age of the training folds")
    return left, right, "; ".join(parts)


def predicted_vs_age(preds: pd.DataFrame, folder: Path, metrics: dict[str, Any]) -> list[Path]:
    """Out-of-fold predicted age against chronological age, and the bias-corrected gap against age."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    left, right, title = figure_titles(preds, metrics)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True)
    lo = float(min(preds["age"].min(), preds["predicted_age"].min())) - 2
    hi = float(max(preds["age"].max(), preds["predicted_age"].max())) + 2
    style = {"s": 9, "alpha": 0.6, "c": preds["fold"], "cmap": "tab10", "vmin": 0, "vmax": 9, "lw": 0}
    axes[0].scatter(preds["age"], preds["predicted_age"], **style)
    axes[0].plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="identity")
    axes[0].set_xlim(lo, hi)
    axes[0].set_ylim(lo, hi)
    axes[0].set_aspect("equal")
    axes[0].set_ylabel("out-of-fold predicted age (years)")
    axes[1].scatter(preds["age"], preds["age_gap_corrected"], **style)
    axes[1].axhline(0.0, color="black", lw=1, ls="--")
    axes[1].set_ylabel("bias-corrected age gap (years)")
    for ax, text in ((axes[0], left), (axes[1], right)):
        ax.set_xlabel("chronological age (years)")
        ax.set_title(text, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10, color="firebrick" if metrics.get("informative") is False else "black")
    axes[0].legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    paths = _save(fig, folder, "predicted_vs_age")
    plt.close(fig)
    return paths
