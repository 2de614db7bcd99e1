"""Floors and nulls of recovery.json (DESIGN.md §6): by hand on constructed tables and a tiny study."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from factories import REGIONS, make_tables, write_run
from scipy.stats import spearmanr

from analysis._typing import METHOD_IMPORTANCE_MEASURES
from analysis.floors import baseline_text, precision_text, read_nulls, read_stability
from analysis.recovery import importance_measure, method_recovery, recovery, region_importance
from bodyage.errors import InputError
from bodyage.floors import FLOORS, floor_scores, floors_entry, margins, null_entry
from bodyage.region_signals import REGION_SIGNALS_FILE, cached_region_signals, scan_signals

# ---------------------------------------------------------------- region signals and floors by hand


def test_scan_signals_by_hand() -> None:
    mask = np.array([[[0, 1], [1, 2]], [[2, 2], [0, 0]]], dtype=np.uint8)
    water = np.arange(8, dtype=float).reshape(2, 2, 2)
    fat = np.ones((2, 2, 2))
    got = scan_signals(water, fat, mask, voxel_ml=0.5)
    assert list(got.index) == [1, 2]
    # label 1: voxels (0,0,1)=1 and (0,1,0)=2; label 2: (0,1,1)=3, (1,0,0)=4, (1,0,1)=5
    assert got.loc[1, "n_voxels"] == 2 and got.loc[2, "n_voxels"] == 3
    assert got.loc[1, "water_mean"] == pytest.approx(1.5)
    assert got.loc[2, "water_mean"] == pytest.approx(4.0)
    assert got.loc[2, "fat_fraction"] == pytest.approx(1.0 / 5.0)
    assert got.loc[2, "volume_ml"] == pytest.approx(1.5)
    assert got.loc[2, "signal_sum"] == pytest.approx(5.0 * 1.5)
    with pytest.raises(InputError, match="differ from the mask's"):
        scan_signals(water[:1], fat, mask, 0.5)


#: four regions, six scans; planted (k = 2): b and c
SIGNAL_INFO = {"a": 0.0, "b": 0.2, "c": 0.1, "d": 0.0}


def _signals() -> pd.DataFrame:
    """A constructed region-signals table whose floor rankings are known.

    volume: a > b > d > c (hits 1 of 2); summed signal: b > d > a > c (1 of 2);
    spread: b (water SD / total signal) > c (ff SD) > others (2 of 2);
    screen: b (water ~ age) and c (ff ~ age) (2 of 2).
    """
    ages = np.array([50.0, 55, 60, 65, 70, 75])
    rows = []
    for i, age in enumerate(ages):
        j = i - 2.5
        for region, vol, water, ff in (
            ("a", 100.0, 10.0, 0.1 + 0.001 * (i % 2)),
            ("d", 15.0, 60.0, 0.2),
            ("b", 20.0 + 0.01 * (i % 3), 100.0 + 10 * j, 0.3),
            ("c", 5.0, 20.0, 0.1 + 0.05 * j),
        ):
            fat = ff / (1 - ff) * water
            rows.append(
                {
                    "subject_id": f"s{i}",
                    "visit": 0,
                    "age": age,
                    "region": region,
                    "n_voxels": int(vol),
                    "volume_ml": vol,
                    "water_mean": water,
                    "fat_mean": fat,
                    "fat_fraction": ff,
                    "signal_sum": (water + fat) * vol,
                }
            )
    return pd.DataFrame(rows)


def test_floor_scores_and_precision_by_hand() -> None:
    sig = _signals()
    scores = floor_scores(sig)
    assert set(scores) == set(FLOORS)
    assert list(scores["volume"].sort_values(ascending=False).index) == ["a", "b", "d", "c"]
    # spread: the larger of SD(ff) and SD(water) / mean(water + fat)
    c_ff = sig[sig.region == "c"]["fat_fraction"].std(ddof=1)
    b_sig = sig[sig.region == "b"]
    assert scores["signal_spread"]["c"] == pytest.approx(c_ff)
    b_total = b_sig["water_mean"].mean() + b_sig["fat_mean"].mean()
    assert scores["signal_spread"]["b"] == pytest.approx(b_sig["water_mean"].std(ddof=1) / b_total)
    b = sig[sig.region == "b"]
    # b's fat fraction is constant (no correlation); its water rises with age, its volume cycles
    expect_b = max(abs(spearmanr(b[c], b["age"]).statistic) for c in ("water_mean", "volume_ml"))
    assert scores["univariate_screen"]["b"] == pytest.approx(expect_b) and expect_b == pytest.approx(1.0)

    def score(imp: pd.Series) -> float:
        return float(method_recovery(imp, SIGNAL_INFO)["precision_at_k"])

    got = floors_entry(scores, score)
    assert got["floors"] == {
        "volume": 0.5,
        "volume_intensity": 0.5,
        "signal_spread": 1.0,
        "univariate_screen": 1.0,
    }
    assert got["floor_max"] == 1.0 and got["floor_max_by"] == "signal_spread"  # first in FLOORS order on ties
    entry = margins({"precision_at_k": 0.5, **got, "nulls": None})
    assert entry["beats_floors_by"] == pytest.approx(-0.5)
    assert entry["beats_nulls_by"] is None


# ---------------------------------------------------------------- nulls by hand

INFO = {r: 0.0 for r in REGIONS} | {"liver": 0.05, "pancreas": 0.04, "torso_fat": 0.03, "intervertebral_discs": 0.02}
#: trained ablation |mass|: top 4 liver, pancreas, spleen, torso_fat (precision 3/4)
TRAINED = {r: 0.1 for r in REGIONS} | {"liver": 4.0, "pancreas": 3.0, "spleen": 2.5, "torso_fat": 2.0}
#: null copies' |mass| per region (others 0.1); random copy 2 puts pancreas above its trained value
RANDOM = [
    {"spleen": 5.0, "kidney_left": 4.0, "kidney_right": 3.0, "liver": 2.0},  # 1 of 4 planted
    {"spleen": 5.0, "liver": 4.5, "pancreas": 1.0, "prostate": 0.9},  # 2 of 4
    {"pancreas": 9.0, "kidney_left": 4.0, "kidney_right": 3.0, "prostate": 2.0},  # 1 of 4
]
PERMUTED = {"liver": 3.0, "torso_fat": 2.9, "intervertebral_discs": 2.8, "spleen": 0.5}  # 3 of 4 in its top 4


def _rows(mass: dict[str, float], scans: list[tuple[str, int]], **extra: object) -> pd.DataFrame:
    rows = [
        {"subject_id": s, "visit": v, "method": "ablation", "region": r, "fold": 0, "mass": m * (-1) ** k, **extra}
        for k, (s, v) in enumerate(scans)
        for r, m in ({r: 0.1 for r in REGIONS} | mass).items()
    ]
    return pd.DataFrame(rows)


def _null_table(scans: list[tuple[str, int]]) -> pd.DataFrame:
    parts = [_rows(m, scans, null="random_weights", copy=c) for c, m in enumerate(RANDOM)]
    parts.append(_rows(PERMUTED, scans, null="permuted_labels", copy=0))
    return pd.concat(parts, ignore_index=True)


def test_null_entry_by_hand() -> None:
    scans = [("s1", 0), ("s2", 0)]
    nulls = _null_table(scans)
    trained = pd.Series(TRAINED)

    def score(imp: pd.Series) -> float:
        return float(method_recovery(imp, INFO)["precision_at_k"])

    def importance(t: pd.DataFrame) -> pd.Series:
        return region_importance(t, "ablation", "abs_mass")["mean"]

    got = null_entry(nulls, "ablation", trained, importance, score)
    rw, pl = got["nulls"]["random_weights"], got["nulls"]["permuted_labels"]
    assert rw["per_copy"] == [0.25, 0.5, 0.25]
    assert rw["precision_at_k"] == pytest.approx(1 / 3)
    assert rw["ci_low"] == pytest.approx(np.percentile([0.25, 0.5, 0.25], 2.5))
    assert rw["ci_high"] == pytest.approx(np.percentile([0.25, 0.5, 0.25], 97.5))
    assert rw["n_copies"] == 3
    # one copy: the interval is that copy's value
    assert pl["n_copies"] == 1 and pl["precision_at_k"] == pl["ci_low"] == pl["ci_high"] == 0.75
    # random band (97.5th percentile over 3 copies): liver ~4.47 > 4.0 (no), pancreas ~8.6 (no), spleen 5 (no),
    # torso_fat 0.1 (yes); permuted band = its value: liver 3 (yes), torso_fat 2.9 > 2.0 (no)
    band_liver = np.percentile([2.0, 4.5, 0.1], 97.5)
    assert band_liver > TRAINED["liver"]
    assert "liver" not in rw["clears"] and "liver" in pl["clears"]
    assert "torso_fat" in rw["clears"] and "torso_fat" not in pl["clears"]
    assert got["clears_nulls"] == []  # nothing clears both kinds
    entry = margins({"precision_at_k": 0.75, "floor_max": 0.5, **got})
    assert entry["beats_nulls_by"] == pytest.approx(0.0)  # the permuted-label null reaches 0.75 too
    assert entry["beats_floors_by"] == pytest.approx(0.25)
    assert null_entry(None, "ablation", trained, importance, score) == {
        "nulls": None,
        "clears_nulls": None,
        "beats_nulls_by": None,
    }


def _truth() -> dict[str, object]:
    return {"scenario_name": "test", "oracle_mae": 2.0, "region_information": INFO, "scenario": {"ageing": []}}


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = make_tables(40, seed=5, noise_sd=1.5)
    attr = frames.attributions.copy()
    abl = attr["method"] == "ablation"
    attr.loc[abl, "mass"] = attr.loc[abl, "region"].map(TRAINED).to_numpy()
    attr.loc[frames.attributions["share"].isna(), "mass"] = np.nan
    frames = type(frames)(frames.cohort, frames.predictions, attr, frames.regions)
    return write_run(tmp_path_factory.mktemp("floors"), frames)


def test_recovery_carries_nulls_and_says_floors_are_missing(factory_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(factory_run, run)
    rec = recovery(run, _truth())
    abl = rec["methods"]["ablation"]
    assert abl["nulls"] is None and abl["clears_nulls"] is None and abl["beats_nulls_by"] is None
    # the factory study has no images: floors are absent, and the entry says why
    assert abl["floors"] is None and "no scan's images and mask could be read" in abl["floors_note"]
    assert baseline_text(abl) == "floors: not computed; nulls: not run"

    scans = list(
        pd.read_parquet(run / "attributions.parquet")[["subject_id", "visit"]].drop_duplicates().itertuples(index=False)
    )
    _null_table([(str(s), int(v)) for s, v in scans]).to_parquet(run / "attributions_null.parquet", index=False)
    rec = recovery(run, _truth())
    abl = rec["methods"]["ablation"]
    assert abl["precision_at_k"] == pytest.approx(0.75)
    assert abl["nulls"]["random_weights"]["precision_at_k"] == pytest.approx(1 / 3)
    assert abl["nulls"]["permuted_labels"]["precision_at_k"] == pytest.approx(0.75)
    assert abl["beats_nulls_by"] == pytest.approx(0.0)
    assert abl["clears_nulls"] == []
    assert rec["methods"]["gradcam"]["nulls"] is None  # no null rows for gradcam
    assert precision_text("ablation", abl) == (
        "ablation 0.75 (floors: not computed; permuted-label null 0.75 [0.75, 0.75] (1 copy); "
        "random-weight null 0.33 [0.25, 0.49])"
    )


def test_recovery_carries_the_rankings_run_to_run_stability(factory_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(factory_run, run)
    assert recovery(run, _truth())["methods"]["ablation"]["stability"] is None  # attribute recorded none
    stab = {"n_folds": 5, "k": 4, "kendall_w": 0.93, "top_k_jaccard_mean": 0.66, "top_k_jaccard_min": 0.6}
    runs = {"n_runs": 3, "kendall_w": 0.8}
    record = {"methods": {"ablation": {"stability": stab, "run_stability": runs}}}
    (run / "attribution_recovery.json").write_text(json.dumps(record))
    rec = recovery(run, _truth())
    assert rec["methods"]["ablation"]["stability"] == stab
    assert rec["methods"]["ablation"]["run_stability"] == runs
    assert rec["methods"]["gradcam"]["stability"] is None and "run_stability" not in rec["methods"]["gradcam"]
    (run / "attribution_recovery.json").write_text("{not json")
    with pytest.raises(InputError, match=r"attribution_recovery.json: not a readable attribution_recovery.json"):
        read_stability(run)


def test_read_nulls_checks_columns(tmp_path: Path) -> None:
    pd.DataFrame({"null": ["random_weights"], "method": ["ablation"]}).to_parquet(
        tmp_path / "attributions_null.parquet"
    )
    with pytest.raises(InputError, match=r"attributions_null.parquet: missing column\(s\) copy, region"):
        read_nulls(tmp_path)
    _rows({}, [("s", 0)], null="shuffled", copy=0).to_parquet(tmp_path / "attributions_null.parquet")
    with pytest.raises(InputError, match="column 'null' must hold random_weights or permuted_labels; found 'shuffled'"):
        read_nulls(tmp_path)
    assert read_nulls(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- floors on a tiny simulated study


def _tiny_run(study: Path, root: Path) -> Path:
    """A run over the tiny study whose ablation ranks regions by label id (no model)."""
    cohort = pd.read_csv(study / "cohort.csv", dtype={"subject_id": str})
    labels = json.loads((study / "labels.json").read_text())
    run = root / "run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"study": str(study)}))
    pred = cohort[["subject_id", "visit", "age"]].copy()
    pred["fold"] = pred["subject_id"].rank(method="dense").astype(int) % 2
    noise = np.random.default_rng(3).normal(0.0, 3.0, len(pred))
    pred["predicted_age"] = pred["age"] + noise
    pred["age_gap"] = noise
    pred["age_gap_corrected"] = noise - noise.mean()
    pred.to_parquet(run / "predictions.parquet", index=False)
    rows = [
        {
            "subject_id": s,
            "visit": int(v),
            "method": "ablation",
            "region": name,
            "fold": int(f),
            "n_voxels": 10,
            "volume_ml": 1.0,
            "mass": float(int(i)),
            "abs_mass": float(int(i)),
            "share": 0.01,
            "density": 0.1,
            "enrichment": 1.0,
        }
        for s, v, f in zip(pred["subject_id"], pred["visit"], pred["fold"], strict=True)
        for i, name in labels.items()
    ]
    pd.DataFrame(rows).to_parquet(run / "attributions.parquet", index=False)
    return run


def test_floors_on_tiny_study_by_hand(tiny_study: Path, tmp_path: Path) -> None:
    truth = json.loads((tiny_study / "truth.json").read_text())
    truth["scenario"]["phenotypes"] = {}
    truth["phenotype_regions"] = {}
    run = _tiny_run(tiny_study, tmp_path)
    rec = recovery(run, truth)
    abl = rec["methods"]["ablation"]
    assert set(abl["floors"]) == set(FLOORS)
    assert (run / REGION_SIGNALS_FILE).is_file()

    # the volume floor by hand: mean voxel count × voxel volume from the masks, ranked
    cohort = pd.read_csv(tiny_study / "cohort.csv", dtype={"subject_id": str})
    names = {int(k): v for k, v in json.loads((tiny_study / "labels.json").read_text()).items()}
    vols: dict[str, list[float]] = {}
    for path in cohort["mask"]:
        img = nib.load(str(tiny_study / path))
        ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
        counts = np.bincount(np.asarray(img.dataobj).astype(int).ravel())
        for i in np.flatnonzero(counts):
            if i in names:
                vols.setdefault(names[i], []).append(counts[i] * ml)
    volume = pd.Series({r: float(np.mean(v)) for r, v in vols.items()})
    info = truth["region_information"]
    assert abl["floors"]["volume"] == pytest.approx(method_recovery(volume, info)["precision_at_k"])
    finite = {k: v for k, v in abl["floors"].items() if math.isfinite(v)}
    assert abl["floor_max"] == max(finite.values())
    assert abl["beats_floors_by"] == pytest.approx(abl["precision_at_k"] - abl["floor_max"])
    assert abl["floors_n_scans"] == len(cohort)

    # cached: a second call reads the file (a changed cohort would change the key)
    stamp = (run / REGION_SIGNALS_FILE).stat().st_mtime_ns
    assert cached_region_signals(tiny_study, run).shape[0] > 0
    assert (run / REGION_SIGNALS_FILE).stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- item 8: density by |density|, no fallback


def test_density_ranks_by_its_absolute_value() -> None:
    attr = pd.DataFrame(
        {
            "subject_id": ["a", "b", "a", "b", "a", "b"],
            "visit": 0,
            "method": "gradcam",
            "region": ["liver", "liver", "spleen", "spleen", "kidney_left", "kidney_left"],
            "mass": 0.0,
            "density": [-5.0, -4.0, 1.0, 2.0, 0.1, -0.1],
        }
    )
    imp = region_importance(attr, "gradcam", "density")
    assert list(imp.index) == ["liver", "spleen", "kidney_left"]
    assert imp.loc["liver", "mean"] == pytest.approx(4.5)
    from bodyage.attribute_recovery import region_importance as attribute_importance

    assert list(attribute_importance(attr, "gradcam", "density").index) == ["liver", "spleen", "kidney_left"]


def test_no_silent_enrichment_fallback() -> None:
    # nothing declared by the run: the method registry's measure, not enrichment
    assert importance_measure("gradcam", {}) == METHOD_IMPORTANCE_MEASURES["gradcam"]
    assert importance_measure("gradcam", {"gradcam": "share"}) == "share"
    with pytest.raises(InputError, match="importance measure of 'saliency' is declared nowhere"):
        importance_measure("saliency", {})


def test_declared_measures_mirror_the_method_registry() -> None:
    from bodyage.attribution import METHODS

    assert {m: s.importance_measure for m, s in METHODS.items()} == METHOD_IMPORTANCE_MEASURES


def test_baseline_names_mirror_and_shift_is_mean_signal_ablation() -> None:
    from analysis._typing import ABLATION_BASELINE_NAMES, baseline_label
    from bodyage.attribute_figures import BASELINE_NAMES
    from bodyage.attribute_figures import baseline_label as figure_label
    from bodyage.attribution import BASELINES

    assert ABLATION_BASELINE_NAMES == BASELINE_NAMES
    assert set(BASELINE_NAMES) == set(BASELINES)
    assert baseline_label("ablation", "shift") == figure_label("ablation", "shift") == "mean-signal ablation"
    assert baseline_label("shapley", "shift") == "shapley (mean-signal baseline)"


def test_recovery_tex_shows_floors_and_nulls_beside_precision() -> None:
    from analysis.recovery_tex import recovery_latex

    entry = {"k": 2, "precision_at_k": 0.75, "spearman": 0.5, "agreement_with_ablation": 1.0, "top_regions": ["liver"]}
    entry |= {"floors": {"univariate_screen": 0.625}, "floor_max": 0.625, "floor_max_by": "univariate_screen"}
    entry |= {"nulls": {"permuted_labels": {"precision_at_k": 0.5, "ci_low": 0.375, "ci_high": 0.625, "n_copies": 3}}}
    tex = recovery_latex({"methods": {"ablation": entry}, "planted_regions": ["liver", "pancreas"]})
    assert "0.75 & floors: max 0.62 univariate screen; permuted-label null 0.50 [0.38, 0.62] &" in tex.replace(
        "{[}", "["
    ).replace("{]}", "]")


def test_attribution_recovery_carries_the_same_floors_and_nulls(tiny_study: Path, tmp_path: Path) -> None:
    from bodyage.attribute_recovery import recovery_summary

    truth = json.loads((tiny_study / "truth.json").read_text())
    truth["scenario"]["phenotypes"] = {}
    truth["phenotype_regions"] = {}
    run = _tiny_run(tiny_study, tmp_path)
    attr = pd.read_parquet(run / "attributions.parquet")
    scans = attr[["subject_id", "visit"]].drop_duplicates()
    # a null whose |mass| reverses the trained ranking: every region with a positive id clears it
    null = attr.assign(mass=lambda d: d["mass"].max() - d["mass"] - 1.0, null="permuted_labels", copy=0)
    null.to_parquet(run / "attributions_null.parquet", index=False)
    got = recovery_summary(attr, tiny_study, ["ablation"], run=run)["methods"]["ablation"]
    want = recovery(run, truth)["methods"]["ablation"]
    for key in ("precision_at_k", "floors", "floor_max", "floor_max_by", "beats_floors_by", "clears_nulls"):
        assert got[key] == want[key], key
    assert got["nulls"]["permuted_labels"]["n_copies"] == 1 and len(scans) == want["floors_n_scans"]
    top = attr.groupby("region")["mass"].mean()
    null_imp = null.groupby("region")["mass"].apply(lambda s: s.abs().mean())
    assert set(got["clears_nulls"]) == {r for r in top.index if top[r] > null_imp[r]}


def test_precision_goals_are_margins_over_floors_and_the_permuted_null() -> None:
    from analysis.recovery import evaluate_goals

    def methods(abl: float, floor: float, null: float) -> dict[str, object]:
        nulls = {"permuted_labels": {"precision_at_k": null, "ci_low": null, "ci_high": null, "n_copies": 1}}
        return {
            "ablation": {"precision_at_k": abl, "floor_max": floor, "nulls": nulls},
            "gradcam": {"precision_at_k": 1.0, "floor_max": floor, "nulls": nulls},  # no goal for gradcam
        }

    goals = evaluate_goals({"mae_ratio": 1.5, "methods": methods(0.875, 0.625, 0.5), "phenotypes": {}})
    assert goals["mae_ratio"]["met"] is True
    assert goals["region_method_beats_floors"] == {
        "goal": "best region-level method: precision@k >= largest model-free floor + 0.25",
        "value": pytest.approx(0.25),
        "met": True,
        "method": "ablation",
    }
    assert goals["region_method_beats_permuted_null"]["met"] is True
    goals = evaluate_goals({"mae_ratio": 1.6, "methods": methods(0.75, 0.625, 0.625), "phenotypes": {}})
    assert goals["mae_ratio"]["met"] is False
    assert goals["region_method_beats_floors"]["met"] is False
    assert goals["region_method_beats_permuted_null"]["value"] == pytest.approx(0.125)


def test_summary_shows_each_precision_beside_floors_and_nulls(tiny_study: Path, tmp_path: Path) -> None:
    from analysis.report import write_report

    run = _tiny_run(tiny_study, tmp_path)
    attr = pd.read_parquet(run / "attributions.parquet")
    null = attr.assign(null="permuted_labels", copy=0, mass=attr["mass"].to_numpy()[::-1])
    null.to_parquet(run / "attributions_null.parquet", index=False)
    res = write_report(run, tmp_path / "rep")
    rec = json.loads((run / "recovery.json").read_text())["methods"]["ablation"]
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert f"(precision@k {rec['precision_at_k']:.2f}; {baseline_text(rec)})" in summary
    assert "floors: max" in summary and "permuted-label null" in summary and "(1 copy)" in summary
    assert f"{len(rec['clears_nulls'])} region(s) above the null band of every null model" in summary
    assert any(baseline_text(rec) in line for line in res.summary())
    tex = (tmp_path / "rep" / "recovery.tex").read_text()
    assert "Beside: floors and nulls" in tex and "univariate screen" in tex


def test_clears_nulls_compares_shares_not_raw_importance() -> None:
    from bodyage.floors import null_entry

    regions = ["a", "b", "c"]
    trained = pd.Series([10.0, 1.0, 1.0], index=regions)
    null_values = [0.01, 0.001, 0.0001]  # a null model barely moves: raw values tiny everywhere
    rows = pd.DataFrame(
        [
            {"method": "ablation", "null": "random_weights", "copy": c, "region": r, "v": v * (1 + 0.01 * c)}
            for c in range(3)
            for r, v in zip(regions, null_values, strict=True)
        ]
    )

    def importance(g: pd.DataFrame) -> pd.Series:
        return g.set_index("region")["v"]

    out = null_entry(rows, "ablation", trained, importance, lambda imp: 0.0)
    # raw: every region is above the null; as shares only c (0.083 of the trained total vs 0.009)
    assert out["clears_nulls"] == ["c"]
