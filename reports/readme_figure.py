"""Compose the README's demo figure from the outputs of one ``bodyage demo`` run.

    bodyage demo DEMO_DIR          # saves two scans' maps in DEMO_DIR/run/attribute/maps
    python reports/readme_figure.py DEMO_DIR reports/demo_overview.png

The left panel is the PNG that ``--save-maps`` wrote (a scan's GradCAM map with the region
contours); the right one redraws the 15 most important regions of ``attributions.parquet``
(ablation, mean |mass| with the min-max over the fold models from ``attribution_stability.csv``,
the regions with planted ageing in colour), since
the run's own figure lists all 53 regions and is too tall to read at this size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def _importance(ax: plt.Axes, run: Path, planted: set[str], method: str = "ablation", top: int = 15) -> int:
    """Draw the ``top`` regions of ``method`` with the min-max over fold models; return the number of folds.

    From ``attribution_stability.csv``: the bar is a region's importance (mean |mass| over
    scans), the whisker the smallest and largest importance over the fold models - how far a
    re-trained model moves it, the larger variance than the per-scan standard error.
    """
    path = run / "attribution_stability.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; `bodyage attribute` writes it")
    table = pd.read_csv(path)
    stats = table[table["method"] == method].set_index("region").nlargest(top, "importance")[::-1]
    y = np.arange(len(stats))
    colours = ["#d95f02" if r in planted else "#999999" for r in stats.index]
    whiskers = np.vstack([stats["importance"] - stats["fold_min"], stats["fold_max"] - stats["importance"]])
    ax.barh(y, stats["importance"], xerr=whiskers, color=colours, ecolor="#333333")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#d95f02", "#999999")]
    ax.legend(handles, ["planted ageing", "not planted"], loc="lower right", fontsize=9)
    ax.set_yticks(y, [str(r).replace("_", " ") for r in stats.index], fontsize=9)
    ax.set_xlabel("mean |change in predicted age| when ablated (years)")
    ax.grid(axis="x", alpha=0.3)
    return int(stats["n_folds"].max())


def main(demo: Path, out: Path) -> None:
    """Write the README figure of the demo folder ``demo`` to ``out``."""
    run = demo / "run"
    maps = sorted((run / "attribute" / "maps").glob("*.png"))
    if not maps:
        where = run / "attribute" / "maps"
        raise SystemExit(f"error: no saved map in {where}; run `bodyage attribute RUN --save-maps 1`")
    image = plt.imread(maps[0])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.25, 1.0]})
    axes[0].imshow(image)
    axes[0].set_axis_off()
    axes[0].set_title("one scan: signed GradCAM (years) with the region contours", fontsize=11)
    truth = json.loads((demo / "study" / "truth.json").read_text())
    planted = {r for r, v in truth["region_information"].items() if v > 0}
    folds = _importance(axes[1], run, planted)
    baseline = json.loads((run / "attribute.json").read_text())["arguments"]["baseline"]
    axes[1].set_title(
        f"ablation ({baseline} baseline): the 15 most important regions\n(whiskers: min-max over {folds} fold models)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
