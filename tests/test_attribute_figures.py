"""The region-importance figure: trained shares, their interval over fold models or runs, the null bands.

Synthetic tables with hand-computable shares; no model is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from bodyage.attribute_figures import draw_region_importance, region_figure
from bodyage.attribute_stability import STABILITY_COLUMNS, fold_stability
from bodyage.nulls import null_bands

REGIONS = ["liver", "torso_fat", "aorta", "kidney_left"]
#: per fold, the |mass| of each region (two scans per fold with these values, opposite signs)
FOLD_VALUES = {0: [4.0, 3.0, 2.0, 1.0], 1: [6.0, 2.0, 1.0, 1.0]}


def trained() -> pd.DataFrame:
    rows = []
    for fold, vals in FOLD_VALUES.items():
        for scan in range(2):
            for r, v in zip(REGIONS, vals, strict=True):
                rows.append({"subject_id": f"s{fold}{scan}", "visit": 0, "method": "ablation", "region": r,
                             "fold": fold, "mass": -v if scan else v})  # fmt: skip
    return pd.DataFrame(rows)


def null_table() -> pd.DataFrame:
    """Three random copies spreading importance evenly, one permuted-label model with the liver's share at 0.1."""
    frames = []
    for c in range(3):
        frames.append(trained().assign(mass=0.01 * (1 + c), null="random_weights", copy=c))
    perm = trained().assign(null="permuted_labels", copy=0)
    perm["mass"] = perm["region"].map({"liver": 0.1, "torso_fat": 0.5, "aorta": 0.3, "kidney_left": 0.1})
    frames.append(perm)
    return pd.concat(frames, ignore_index=True)


def drawn(**kwargs: Any) -> tuple[Any, Any]:
    fig, ax = plt.subplots()
    draw_region_importance(ax, trained(), "ablation", "abs_mass", baseline="shift", **kwargs)
    return fig, ax


def test_fold_shares_are_each_folds_part_of_its_total() -> None:
    table, _ = fold_stability(trained(), "ablation", "abs_mass")
    assert list(table.columns) == list(STABILITY_COLUMNS)
    t = table.set_index("region")
    # fold 0: liver 4/10, fold 1: 6/10; mean importance 5 of a total 10
    assert t.loc["liver", ["share", "share_min", "share_max"]].tolist() == pytest.approx([0.5, 0.4, 0.6])
    assert t["share"].sum() == pytest.approx(1.0)
    assert ((t["share_min"] <= t["share"] + 1e-12) & (t["share"] <= t["share_max"] + 1e-12)).all()


def test_the_figure_draws_trained_shares_the_fold_interval_and_both_null_bands() -> None:
    att = trained()
    bands = null_bands(att, null_table(), {"ablation": "abs_mass"})
    fig, ax = drawn(bands=bands)
    title = ax.get_title()
    assert "mean-signal ablation" in title and "min–max over 2 fold models" in title
    assert "lines and dots: null models" in title
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "random-weights null: 2.5–97.5 % of 3 copies (line), mean (dot)" in legend
    assert "permuted-label null: one model (dot)" in legend
    # bars in percent of the total, largest on top; the null bands on the same scale
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    widths = [p.get_width() for p in bars.patches]
    assert widths == pytest.approx([10.0, 15.0, 25.0, 50.0])
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["kidney (left)", "aorta", "torso fat", "liver"]
    random_band = next(c for c in ax.collections if c.get_label().startswith("random-weights"))
    xs = [seg[:, 0] for seg in random_band.get_segments()]
    np.testing.assert_allclose([x[0] for x in xs], [25.0] * 4)  # copies spread evenly: 25 % each
    perm_dots = next(line for line in ax.get_lines() if np.allclose(line.get_xdata(), [10.0, 30.0, 50.0, 10.0]))
    assert perm_dots is not None
    # whiskers: liver 40–60 %
    err = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    segs = err.lines[2][0].get_segments()
    np.testing.assert_allclose(segs[-1][:, 0], [40.0, 60.0])
    # the liver (50 %) clears both bands (25 % and 10 %); the aorta (15 %) clears neither: bold only the liver
    bold = {t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"}
    assert bold == {"liver"}
    plt.close(fig)


def test_without_nulls_the_figure_says_none_was_run() -> None:
    fig, ax = drawn(bands=None)
    assert "no null model was run (attribute --no-nulls)" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("null" in t for t in legend)
    assert not [c for c in ax.collections if "null" in str(c.get_label())]  # no band drawn, only the whiskers
    plt.close(fig)


def test_nulls_of_other_methods_are_named_as_missing_for_this_one() -> None:
    bands = null_bands(trained(), null_table(), {"ablation": "abs_mass"}).assign(method="gradcam")
    fig, ax = drawn(bands=bands)
    assert "no null model was run for ablation" in ax.get_title()
    plt.close(fig)


def test_with_runs_the_interval_is_over_training_runs(tmp_path: Path) -> None:
    runs = pd.DataFrame(
        {
            "region": REGIONS,
            "share": [0.5, 0.25, 0.15, 0.1],
            "share_min": [0.45, 0.2, 0.1, 0.05],
            "share_max": [0.55, 0.3, 0.2, 0.15],
            "n_runs": 3,
        }
    )
    fig, ax = drawn(runs=runs)
    assert "mean over 3 training runs; whiskers: min–max over 3 training runs" in ax.get_title()
    plt.close(fig)
    paths = region_figure(trained(), "ablation", "abs_mass", tmp_path, runs=runs)
    assert sorted(p.name for p in paths) == ["attribution_regions_ablation.pdf", "attribution_regions_ablation.png"]


def test_cohort_figures_pass_this_runs_null_bands_and_ignore_a_stale_runs_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bodyage.attribute_figures as figures
    from bodyage.attribute_stability import RUN_STABILITY
    from bodyage.nulls import NULL_BANDS

    seen: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(figures, "region_figure", lambda att, m, meas, folder, **kw: seen.setdefault(m, kw) and [])
    run = tmp_path / "run"
    run.mkdir()
    att = trained()
    null_bands(att, null_table(), {"ablation": "abs_mass"}).to_csv(run / NULL_BANDS, index=False)
    pd.DataFrame({"method": ["ablation"], "region": ["liver"], "share": [1.0], "n_runs": [2]}).to_csv(
        run / RUN_STABILITY, index=False
    )
    empty = pd.DataFrame(columns=["method"])
    recovery: dict[str, Any] = {"importance_measure": {"ablation": "abs_mass"}, "methods": {"ablation": {}}}
    figures.cohort_figures(run, att, empty, None, recovery)  # type: ignore[arg-type]
    assert set(seen["ablation"]["bands"]["null"]) == {"random_weights", "permuted_labels"}
    assert seen["ablation"]["runs"] is None  # an earlier --runs file, not this run's: not drawn
    seen.clear()
    recovery["methods"]["ablation"]["run_stability"] = {"n_runs": 2}
    (run / NULL_BANDS).unlink()  # attribute --no-nulls removes it
    figures.cohort_figures(run, att, empty, None, recovery)  # type: ignore[arg-type]
    assert seen["ablation"]["bands"] is None and list(seen["ablation"]["runs"]["region"]) == ["liver"]
