"""reports/readme_figure.py: the README panel's whiskers are the fold models' min-max, not a per-scan interval."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from report_scripts import load_report_script

rf = load_report_script("readme_figure")


def test_panel_draws_the_top_regions_with_the_fold_min_max(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "method": ["ablation"] * 3 + ["gradcam"],
            "measure": ["abs_mass"] * 4,
            "region": ["liver", "spleen", "heart", "liver"],
            "importance": [7.0, 1.0, 2.0, 99.0],
            "fold_min": [6.0, 0.5, 1.5, 0.0],
            "fold_max": [9.0, 1.5, 2.5, 100.0],
            "n_folds": [5, 5, 5, 5],
        }
    ).to_csv(tmp_path / "attribution_stability.csv", index=False)
    fig, ax = plt.subplots()
    assert rf._importance(ax, tmp_path, {"liver"}, top=2) == 5
    assert [t.get_text() for t in ax.get_yticklabels()] == ["heart", "liver"]
    bars = [p.get_width() for p in ax.patches if p.get_height() > 0 and p.get_width() > 0]
    assert sorted(bars)[:2] == [2.0, 7.0]
    segments = ax.collections[0].get_segments()  # the whiskers, bottom bar first
    assert np.allclose([s[:, 0] for s in segments], [[1.5, 2.5], [6.0, 9.0]])
    plt.close(fig)


def test_panel_names_the_missing_stability_table(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    with pytest.raises(SystemExit, match=r"attribution_stability.csv not found; `bodyage attribute` writes it"):
        rf._importance(ax, tmp_path, set())
    plt.close(fig)
