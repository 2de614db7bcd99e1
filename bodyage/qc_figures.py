"""Figures of ``bodyage qc``: the most extreme scan of each raised flag, and an overview.

Scans are named by their row in ``qc.csv`` (``qc.csv row 7``), never by participant id:
figures end up in theses and slides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from bodyage.qc import QcThresholds
    from bodyage.study import Study

#: flags that get a figure of their most extreme scan, and how to pick it (column, largest?)
_WORST: dict[str, tuple[str, bool]] = {
    "fat_water_swap": ("swap_run_mm", True),
    "missing_coverage": ("coverage_ratio", False),
    "extreme_intensity": ("_intensity_dev", True),
    "nonfinite": ("n_nonfinite", True),
}


def _pick(table: pd.DataFrame, flag: str) -> int | None:
    """Row position of the most extreme scan raising ``flag`` (None if none does)."""
    hit = table[table[flag].astype(bool)]
    if hit.empty:
        return None
    col, largest = _WORST[flag]
    if col == "_intensity_dev":
        ratios = hit[["water_p99_ratio", "fat_p99_ratio"]].apply(pd.to_numeric, errors="coerce")
        values = np.log(ratios.where(ratios > 0)).abs().max(axis=1).fillna(0.0)
    else:
        values = pd.to_numeric(hit[col], errors="coerce").fillna(0.0)
    label = values.idxmax() if largest else values.idxmin()
    return list(table.index).index(label)


def qc_figures(study: Study, table: pd.DataFrame, thresholds: QcThresholds) -> list[Path]:
    """Write ``figures/qc_<flag>.png`` per raised flag and ``figures/qc_overview.png``.

    Parameters
    ----------
    study
        The study (images are read from it).
    table
        ``qc.csv`` as :func:`bodyage.qc.run_qc` built it, in the cohort's row order.
    thresholds
        Drawn as lines in the overview.

    Returns
    -------
    list of Path
        The figures written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bodyage.qc import body_mask
    from bodyage.volumes import load_volume

    out_dir = study.root / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cohort = study.cohort.reset_index(drop=True)
    for flag in _WORST:
        pos = _pick(table.reset_index(drop=True), flag)
        if pos is None:
            continue
        row = table.iloc[pos]
        paths = study.image_paths(cohort.iloc[pos])
        water = load_volume(paths["water"], dtype=np.float32)
        fat = load_volume(paths["fat"], dtype=np.float32)
        w = np.nan_to_num(np.asarray(water.data), nan=0.0)
        f = np.nan_to_num(np.asarray(fat.data), nan=0.0)
        total = w + f
        body = body_mask(w, f, thresholds)
        ff = np.divide(f, total, out=np.full(w.shape, np.nan, dtype=np.float32), where=body & (total > 0))
        body_y = np.flatnonzero(total.sum(axis=(0, 2)) > 0)
        y = int(np.average(np.arange(w.shape[1]), weights=total.sum(axis=(0, 2)))) if body_y.size else w.shape[1] // 2
        sp = water.spacing
        aspect = sp[2] / sp[0]
        fig, axes = plt.subplots(1, 3, figsize=(10, 6.5))
        vmax = float(np.percentile(np.concatenate([w.ravel(), f.ravel()]), 99.5)) or 1.0
        panels = (
            ("water", w[::-1, y, :].T, "gray", 0.0, vmax),
            ("fat", f[::-1, y, :].T, "gray", 0.0, vmax),
            ("fat fraction F/(W+F) in the body", ff[::-1, y, :].T, "magma", 0.0, 1.0),
        )
        for ax, (title, img, cmap, lo, hi) in zip(axes, panels, strict=True):
            shown = ax.imshow(img, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{title} · coronal", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(1, img.shape[0] - 2, "R", color="yellow", fontsize=9, va="top")
            if flag == "fat_water_swap" and math.isfinite(float(row["swap_run_z_mm"])):
                k = (float(row["swap_run_z_mm"]) - water.affine[2, 3]) / water.affine[2, 2]
                half = float(row["swap_run_mm"]) / sp[2] / 2
                for edge in (k - half, k + half):
                    ax.axhline(edge, color="cyan", lw=1.2, ls="--")
        fig.colorbar(shown, ax=axes[2], fraction=0.05)
        detail = _detail(flag, row)
        fig.suptitle(f"QC flag {flag}: qc.csv row {pos + 1}\n{detail}", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"qc_{flag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    written.append(_overview(table, thresholds, out_dir / "qc_overview.png"))
    return written


def _detail(flag: str, row: pd.Series) -> str:
    if flag == "fat_water_swap":
        return (
            f"subcutaneous fat water-dominated over {float(row['swap_run_mm']):.0f} mm "
            f"(lowest slice median fat fraction {float(row['shell_ff_min']):.2f}; dashed lines)"
        )
    if flag == "missing_coverage":
        return (
            f"body extent {float(row['body_extent_mm']):.0f} mm = {float(row['coverage_ratio']):.2f} × cohort median; "
            f"largest gap {float(row['body_gap_mm']):.0f} mm"
        )
    if flag == "extreme_intensity":
        return (
            f"99th percentile / cohort median: water {float(row['water_p99_ratio']):.2f}, "
            f"fat {float(row['fat_p99_ratio']):.2f}"
        )
    return f"{int(row['n_nonfinite'])} NaN or infinite voxels (shown as 0)"


def _overview(table: pd.DataFrame, thresholds: QcThresholds, path: Path) -> Path:
    import matplotlib.pyplot as plt

    readable = ~table["unreadable"].astype(bool)
    t = table[readable]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ff = pd.to_numeric(t["shell_ff_min"], errors="coerce").dropna()
    axes[0].hist(ff, bins=30, range=(0, 1), color="0.4")
    axes[0].axvline(thresholds.swap_ff, color="red", ls="--", label=f"swap_ff {thresholds.swap_ff:g}")
    axes[0].set_xlabel("lowest per-slice median fat fraction of subcutaneous fat")
    axes[0].legend(fontsize=8)
    cov = pd.to_numeric(t["coverage_ratio"], errors="coerce").dropna()
    axes[1].hist(cov, bins=30, color="0.4")
    axes[1].axvline(
        thresholds.coverage_fraction, color="red", ls="--", label=f"coverage_fraction {thresholds.coverage_fraction:g}"
    )
    axes[1].set_xlabel("body extent along z / cohort median")
    axes[1].legend(fontsize=8)
    for ch, colour in (("water", "tab:blue"), ("fat", "tab:orange")):
        r = pd.to_numeric(t[f"{ch}_p99_ratio"], errors="coerce")
        r = r[r > 0].dropna()
        axes[2].hist(np.log2(r), bins=30, alpha=0.6, color=colour, label=ch)
    for s in (-1, 1):
        axes[2].axvline(s * math.log2(thresholds.intensity_factor), color="red", ls="--")
    axes[2].set_xlabel("log2(body 99th percentile / cohort median)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_ylabel("scans")
    flagged = int(table[[c for c in table.columns if c in _WORST or c == "unreadable"]].any(axis=1).sum())
    fig.suptitle(f"QC overview: {len(table)} scans, {flagged} flagged (red: thresholds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
