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


def predicted_vs_age(preds: pd.DataFrame, folder: Path, metrics: dict[str, Any]) -> list[Path]:
    """Out-of-fold predicted age against chronological age, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
    lo = float(min(preds["age"].min(), preds["predicted_age"].min())) - 2
    hi = float(max(preds["age"].max(), preds["predicted_age"].max())) + 2
    corrected = preds["age"] + preds["age_gap_corrected"]
    for ax, y, title in ((axes[0], preds["predicted_age"], "predicted"), (axes[1], corrected, "bias-corrected")):
        ax.scatter(preds["age"], y, s=9, alpha=0.6, c=preds["fold"], cmap="tab10", vmin=0, vmax=9, lw=0)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="identity")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("chronological age (years)")
        mae = float(np.mean(np.abs(y - preds["age"])))
        ax.set_title(f"{title} (MAE {mae:.2f} y)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("out-of-fold predicted age (years)")
    if "oracle_mae" in metrics:
        fig.suptitle(f"oracle MAE {metrics['oracle_mae']:.2f} y, ratio {metrics['mae_ratio']:.2f}", fontsize=10)
    axes[0].legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    paths = _save(fig, folder, "predicted_vs_age")
    plt.close(fig)
    return paths
