"""Statistics on organ age gaps and their recovery on planted truth (issue 17 items 3 and 4).

A clocks folder is constructed here with the columns ``bodyage clocks`` writes
(DESIGN.md §8): a study (cohort.csv, labels.json, truth.json, truth.parquet) with planted
regional biological ages, and per clock an ``organ_ages.parquet`` gap built from them, so
the answers are known:

- ``liver`` reads the liver's planted deviation (+5 years in diabetes), ``gluteal`` the mean
  of the two gluteal muscles' (−1.5 years per SD of activity), ``spleen`` learned nothing
  (flagged uninformative), ``whole_body`` the mean over every region;
- smoking adds 3 years to the *shared* deviation of every region: every informative clock's
  corrected gap carries it, no conditioned gap does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import make_tables
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from analysis.agegap import GapCorrectionResult
from analysis.clock_recovery import (
    ceiling_gap,
    clock_recovery,
    clock_regions,
    planted_deviations,
    planted_quantities,
)
from analysis.organ_outputs import run_organ_stats
from analysis.organ_stats import (
    ClockTables,
    clock_correlations,
    excluded_clocks,
    load_clocks,
    organ_gap_models,
)
from analysis.phenotypes import phenotype_models
from analysis.report_organs import write_organ_report
from analysis.run import RunTables
from bodyage.errors import InputError, RunError
from cli.app import app

REGIONS = ("liver", "pancreas", "gluteus_maximus_left", "gluteus_maximus_right", "spleen", "subcutaneous_fat")
CLOCKS = {
    "whole_body": [],
    "liver": ["liver"],
    "gluteal": ["gluteus_maximus_left", "gluteus_maximus_right"],
    "spleen": ["spleen"],
}
SCENARIO = {
    "phenotypes": {
        "diabetes": {"type": "binary", "accelerates": {"liver": 5.0, "pancreas": 5.0}},
        "activity": {
            "type": "continuous",
            "accelerates": {"gluteus_maximus_left": -1.5, "gluteus_maximus_right": -1.5},
        },
        "bmi": {"type": "continuous", "anatomy": {"subcutaneous_fat": {"volume": 0.03}}},
        "smoking": {"type": "binary"},
    }
}


def _truth(cohort: pd.DataFrame, rng: np.random.Generator, shared_sd: float = 1.5) -> tuple[pd.DataFrame, pd.Series]:
    """truth.parquet rows and each scan's shared deviation (subject-level draws, visits share them)."""
    subjects = cohort["subject_id"].unique()
    b = pd.Series(rng.normal(0.0, shared_sd, len(subjects)), index=subjects)
    d = pd.DataFrame(rng.normal(0.0, 3.0, (len(subjects), len(REGIONS))), index=subjects, columns=REGIONS)
    shared = cohort["subject_id"].map(b).to_numpy() + 3.0 * cohort["smoking"].to_numpy(float)
    act = (cohort["activity"] - cohort["activity"].mean()) / cohort["activity"].std()
    rows = []
    for j, region in enumerate(REGIONS):
        dev = shared + d.loc[cohort["subject_id"], region].to_numpy()
        accel = SCENARIO["phenotypes"]["diabetes"]["accelerates"].get(region, 0.0) * cohort["diabetes"].to_numpy(float)
        accel = accel + SCENARIO["phenotypes"]["activity"]["accelerates"].get(region, 0.0) * act.to_numpy()
        rows.append(
            pd.DataFrame(
                {
                    "subject_id": cohort["subject_id"],
                    "visit": cohort["visit"],
                    "region": region,
                    "age": cohort["age"],
                    "biological_age": cohort["age"].to_numpy() + dev + accel,
                    "region_index": j,
                }
            )
        )
    return pd.concat(rows, ignore_index=True), pd.Series(shared, index=cohort.index)


def _organ_ages(cohort: pd.DataFrame, folds: pd.Series, truth: pd.DataFrame, rng: np.random.Generator, noise: float):
    wide, shared, _ = planted_deviations(truth)
    key = pd.MultiIndex.from_arrays([cohort["subject_id"], cohort["visit"]])
    wide, shared = wide.reindex(key), shared.reindex(key)
    gaps = {
        "whole_body": wide.mean(axis=1).to_numpy(),
        "liver": wide["liver"].to_numpy(),
        "gluteal": wide[["gluteus_maximus_left", "gluteus_maximus_right"]].mean(axis=1).to_numpy(),
        "spleen": rng.normal(0.0, 4.0, len(cohort)),
    }
    gaps = {k: v + rng.normal(0.0, noise, len(v)) for k, v in gaps.items()}
    overall = (gaps["liver"] + gaps["gluteal"]) / 2.0
    frames = []
    for clock, gap in gaps.items():
        if clock in ("liver", "gluteal"):
            slope, icpt = np.polyfit(overall, gap, 1)
            conditioned = gap - (slope * overall + icpt)
        else:
            conditioned = np.full(len(gap), np.nan)
        predicted = cohort["age"].to_numpy() + gap if clock != "spleen" else np.full(len(gap), 63.0) + gap
        frames.append(
            pd.DataFrame(
                {
                    "subject_id": cohort["subject_id"],
                    "visit": cohort["visit"],
                    "fold": folds.to_numpy(),
                    "clock": clock,
                    "age": cohort["age"],
                    "predicted_age": predicted,
                    "age_gap": predicted - cohort["age"].to_numpy(),
                    "age_gap_corrected": gap,
                    "age_gap_conditioned": conditioned,
                }
            )
        )
    return pd.concat(frames, ignore_index=True), overall


def make_clocks_folder(root: Path, *, n: int = 240, seed: int = 3, noise: float = 1.0) -> Path:
    """Write ``root/study`` and ``root/clocks`` (see the module docstring); return the clocks folder."""
    rng = np.random.default_rng(seed)
    frames = make_tables(n, seed=seed, gap_effects={}, repeat_fraction=0.1)
    cohort = frames.cohort
    truth, _ = _truth(cohort, rng)
    folds = frames.predictions.set_index(["subject_id", "visit"])["fold"]
    folds = folds.reindex(pd.MultiIndex.from_arrays([cohort["subject_id"], cohort["visit"]]))
    ages, overall = _organ_ages(cohort, folds, truth, rng, noise)
    study, clocks = root / "study", root / "clocks"
    for d in (study, clocks / "whole_body"):
        d.mkdir(parents=True, exist_ok=True)
    cohort.to_csv(study / "cohort.csv", index=False)
    (study / "labels.json").write_text(json.dumps({str(i + 1): r for i, r in enumerate(REGIONS)}))
    info = {
        r: (1.0 if r in ("liver", "pancreas", "gluteus_maximus_left", "gluteus_maximus_right") else 0.0)
        for r in REGIONS
    }
    (study / "truth.json").write_text(json.dumps({"region_information": info, "scenario": SCENARIO}))
    truth.to_parquet(study / "truth.parquet", index=False)
    (clocks / "whole_body" / "run.json").write_text(json.dumps({"study": str(study)}))
    entries = {
        name: {
            "regions": regions,
            "n": int((ages["clock"] == name).sum()),
            "mae": 3.0,
            "pearson_r": 0.0 if name == "spleen" else 0.9,
            "baseline_mae": 9.0,
            "informative": name != "spleen",
            "informative_reason": "out-of-fold MAE 9.10 y is 1.01 × the mean-age baseline's"
            if name == "spleen"
            else "",
        }
        for name, regions in CLOCKS.items()
    }
    (clocks / "clocks.json").write_text(json.dumps({"clocks": entries}))
    ages.to_parquet(clocks / "organ_ages.parquet", index=False)
    pd.DataFrame({"subject_id": cohort["subject_id"], "visit": cohort["visit"], "overall_gap": overall}).to_parquet(
        clocks / "overall_gap.parquet", index=False
    )
    return clocks


@pytest.fixture(scope="module")
def clocks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clocks_folder(tmp_path_factory.mktemp("organ"))


@pytest.fixture(scope="module")
def models(clocks_dir: Path) -> pd.DataFrame:
    return organ_gap_models(clocks_dir)


def test_bh_spans_clocks_and_phenotypes_of_each_gap_as_statsmodels(models: pd.DataFrame) -> None:
    for gap, sub in models.groupby("gap"):
        assert sub["clock"].nunique() >= 2 and sub["phenotype"].nunique() == 4, gap
        expected = multipletests(sub["p"].to_numpy(), method="fdr_bh")[1]
        np.testing.assert_allclose(sub["q"].to_numpy(), expected, rtol=1e-12)
    assert set(models["gap"]) == {"corrected", "conditioned"}
    # the REML engine with Satterthwaite df (repeat visits: a subject intercept, sites fixed)
    assert (models["engine"] != "statsmodels").all() and np.isfinite(models["df"]).all()
    assert set(models["covariates"]) == {"age, sex"}


def test_planted_effects_come_out_where_planted(models: pd.DataFrame) -> None:
    sig = models[models["significant"]]
    hits = {(g, c, p) for g, c, p in zip(sig["gap"], sig["clock"], sig["phenotype"], strict=True)}
    assert ("corrected", "liver", "diabetes") in hits and ("conditioned", "liver", "diabetes") in hits
    assert ("corrected", "gluteal", "activity") in hits
    assert ("corrected", "gluteal", "diabetes") not in hits
    # smoking ages every region alike: in every corrected gap, in no conditioned gap
    assert {("corrected", c, "smoking") for c in ("liver", "gluteal", "whole_body")} <= hits
    assert not any(g == "conditioned" and p == "smoking" for g, _, p in hits)


def test_uninformative_clock_is_left_out_and_named(clocks_dir: Path, models: pd.DataFrame, tmp_path: Path) -> None:
    assert "spleen" not in set(models["clock"])
    tab = load_clocks(clocks_dir)
    assert list(excluded_clocks(tab)) == ["spleen"]
    both = organ_gap_models(tab, gaps=["corrected"], include_uninformative=True)
    assert set(both.loc[both["clock"] == "spleen", "informative"]) == {False}
    res = run_organ_stats(tab, out=tmp_path, figures=False)
    tex = (tmp_path / "stats" / "organ_gap_models.tex").read_text()
    assert re.search(r"Left out of the tests as uninformative.*spleen \(out-of-fold MAE", tex)
    assert res.excluded == {"spleen": tab.clocks["spleen"]["informative_reason"]}
    record = json.loads((tmp_path / "stats" / "run.json").read_text())
    assert record["excluded_clocks"] == res.excluded
    assert "spleen" in "\n".join(res.summary())


def test_conditioned_gap_model_is_the_phenotype_model_of_the_conditioned_gap(
    clocks_dir: Path, models: pd.DataFrame
) -> None:
    tab = load_clocks(clocks_dir)
    rows = tab.organ_ages[tab.organ_ages["clock"] == "liver"]
    tables = RunTables.from_frames(tab.cohort, rows.assign(age_gap_corrected=rows["age_gap_conditioned"]))
    direct = phenotype_models(tables, phenotypes=["diabetes", "activity"], joint=False)
    got = models[(models["gap"] == "conditioned") & (models["clock"] == "liver")].set_index("phenotype")
    for _, row in direct.iterrows():
        assert got.loc[row["phenotype"], "estimate"] == pytest.approx(row["estimate"], rel=1e-10)
        assert got.loc[row["phenotype"], "p"] == pytest.approx(row["p"], rel=1e-8)
    # the whole body has no conditioned gap: no rows rather than an error
    assert not ((models["gap"] == "conditioned") & (models["clock"] == "whole_body")).any()


def test_a_missing_conditioned_gap_is_counted_as_an_exclusion(clocks_dir: Path) -> None:
    tab = load_clocks(clocks_dir)
    ages = tab.organ_ages.copy()
    liver = ages.index[ages["clock"] == "liver"][:7]
    ages.loc[liver, "age_gap_conditioned"] = np.nan
    tab2 = ClockTables.from_frames(tab.cohort, ages, tab.clocks)
    res = organ_gap_models(tab2, phenotypes=["diabetes"], gaps=["conditioned"])
    row = res[res["clock"] == "liver"].iloc[0]
    assert row["n_missing_other"] == 7 and row["n"] == (tab.organ_ages["clock"] == "liver").sum() - 7


def test_recovery_on_a_constructed_truth_gives_the_known_answers(tmp_path: Path) -> None:
    clocks = make_clocks_folder(tmp_path, n=200, seed=11, noise=0.0)
    tab = load_clocks(clocks)
    models = organ_gap_models(tab)
    rec = clock_recovery(tab, models)
    liver = rec["clocks"]["liver"]
    # noise-free: the corrected gap is the planted liver deviation itself
    assert liver["r_planted"] == pytest.approx(1.0, abs=1e-9)
    assert liver["planted"] and liver["informative"] and liver["goal_met"]
    assert "r_planted_ceiling" in liver and rec["clocks"]["whole_body"]["r_planted_ceiling"] is None
    assert rec["clocks"]["gluteal"]["r_planted"] == pytest.approx(1.0, abs=1e-9)
    # the conditioned gap is the liver deviation minus a fitted multiple of the overall gap: close to, not
    # equal to, the liver deviation minus the shared part (the mean over all six regions here)
    assert 0.5 < liver["r_planted_specific"] < 1.0
    spleen = rec["clocks"]["spleen"]
    assert not spleen["planted"] and not spleen["informative"] and spleen["goal_met"]
    assert abs(spleen["r_planted"]) < 0.25 and spleen["r_planted_specific"] is None
    assert rec["clocks"]["whole_body"]["r_planted"] == pytest.approx(1.0, abs=1e-9)  # scored on the shared part
    assert rec["shared_source"] == "mean over all regions"
    assert rec["phenotypes"]["diabetes"]["planted_clocks"] == ["liver"]
    assert "liver" in rec["phenotypes"]["diabetes"]["significant_clocks"]
    assert rec["phenotypes"]["smoking"]["planted_clocks"] == []
    assert rec["phenotypes"]["activity"]["missed"] == []
    assert rec["phenotypes"]["diabetes"]["false_positives"] == []  # gluteal is not significant for diabetes
    # conditioned on an overall gap of two clocks, gluteal mirrors liver: named, not hidden
    assert rec["phenotypes"]["diabetes"]["false_positives_conditioned"] == ["gluteal"]
    assert rec["phenotypes"]["bmi"]["anatomy_regions"] == ["subcutaneous_fat"]


def test_recovery_uses_the_shared_deviation_column_when_there_is_one(tmp_path: Path) -> None:
    clocks = make_clocks_folder(tmp_path, n=120, seed=5, noise=0.0)
    tab = load_clocks(clocks)
    truth = pd.read_parquet(tab.study_root / "truth.parquet")  # type: ignore[operator]
    wide, shared, _ = planted_deviations(truth)
    specific = (wide["liver"] - shared).rename("s")
    ages = tab.organ_ages.copy()
    liver = ages["clock"] == "liver"
    key = pd.MultiIndex.from_arrays([ages.loc[liver, "subject_id"], ages.loc[liver, "visit"]])
    ages.loc[liver, "age_gap_conditioned"] = -specific.reindex(key).to_numpy()  # exactly, sign flipped
    tab2 = ClockTables.from_frames(tab.cohort, ages, tab.clocks, study_root=tab.study_root)
    rec = clock_recovery(
        tab2,
        truth_table=truth.assign(shared_deviation=truth["subject_id"].map(lambda s: 0.0)),
        truth=json.loads((tab.study_root / "truth.json").read_text()),
    )  # type: ignore[operator]
    assert rec["shared_source"] == "shared_deviation column"
    rec2 = clock_recovery(tab2, truth_table=truth, truth=json.loads((tab.study_root / "truth.json").read_text()))  # type: ignore[operator]
    assert rec2["clocks"]["liver"]["r_planted_specific"] == pytest.approx(-1.0, abs=1e-9)


def test_clock_regions_expand_groups() -> None:
    have = ["kidney_left", "kidney_right", "liver", "spleen"]
    assert clock_regions(["kidney", "liver"], have) == ["kidney_left", "kidney_right", "liver"]
    assert clock_regions(["heart"], have) == []


def test_correlation_matrix(clocks_dir: Path) -> None:
    corr = clock_correlations(clocks_dir)
    names = list(CLOCKS)
    assert len(corr) == len(names) ** 2
    pair = corr[(corr["clock_a"] == "liver") & (corr["clock_b"] == "gluteal")].iloc[0]
    tab = load_clocks(clocks_dir)
    wide = tab.organ_ages.pivot_table(index=["subject_id", "visit"], columns="clock", values="age_gap_corrected")
    assert pair["r"] == pytest.approx(np.corrcoef(wide["liver"], wide["gluteal"])[0, 1])
    assert pair["ci_low"] < pair["r"] < pair["ci_high"]
    assert pair["r"] > 0.15  # the shared deviation (and smoking) ties the organs together


def test_missing_organ_ages_is_one_clear_error(tmp_path: Path) -> None:
    clocks = make_clocks_folder(tmp_path, n=60)
    (clocks / "organ_ages.parquet").unlink()
    with pytest.raises(RunError, match=r"organ_ages\.parquet: not found \(run `bodyage clocks`"):
        load_clocks(clocks)


def test_outputs_and_latex_conventions(clocks_dir: Path, tmp_path: Path) -> None:
    res = run_organ_stats(clocks_dir, out=tmp_path)
    stats = tmp_path / "stats"
    for name in ("clocks", "organ_gap_models", "clock_correlations"):
        for suffix in (".parquet", ".csv", ".tex"):
            assert (stats / f"{name}{suffix}").is_file(), name + suffix
    assert (tmp_path / "figures" / "clock_correlations.pdf").is_file()
    assert (tmp_path / "clock_recovery.json").is_file() and res.recovery is not None
    tex = (stats / "organ_gap_models.tex").read_text()
    assert r"\label{tab:bodyage:organ-gap-models}" in tex and r"\toprule" in tex
    assert "adjusted for age, age" in tex and "Satterthwaite" in tex
    assert "No scan was excluded" in tex or "Scans excluded" in tex
    assert r"\textsuperscript{***}" in tex  # the planted liver effect
    body = re.sub(r"\\[a-zA-Z]+(\[[^]]*\])?", "", tex)
    assert not re.search(r"(?<!\\)_", body)


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_organ_tables_and_report_compile(clocks_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "clocks"
    shutil.copytree(clocks_dir, work)
    # twelve clocks x four phenotypes: 48 rows, more than one float holds
    ages = pd.read_parquet(work / "organ_ages.parquet")
    record = json.loads((work / "clocks.json").read_text())
    liver = ages[ages["clock"] == "liver"]
    rng = np.random.default_rng(0)
    copies = []
    for k in range(8):
        name = f"intervertebral_discs_{k}"
        copies.append(
            liver.assign(clock=name, age_gap_corrected=liver["age_gap_corrected"] + rng.normal(0, 3, len(liver)))
        )
        record["clocks"][name] = {**record["clocks"]["liver"], "regions": ["liver"]}
    pd.concat([ages, *copies]).to_parquet(work / "organ_ages.parquet", index=False)
    (work / "clocks.json").write_text(json.dumps(record))
    run_organ_stats(work)
    assert (work / "stats" / "organ_gap_models.tex").read_text().count(r"\begin{table}") == 2
    tables = sorted((work / "stats").glob("*.tex"))
    doc = tmp_path / "tables.tex"
    body = "\n".join(rf"\input{{{p.as_posix()}}}\clearpage" for p in tables)
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{siunitx}\n\\usepackage{array}\n"
        f"\\begin{{document}}\n{body}\n\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    log = (tmp_path / "tables.log").read_text(errors="replace")
    assert done.returncode == 0, log[-3000:]
    overfull = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert not [w for w in overfull if w > 5.0], overfull
    assert "Float too large" not in log
    rep = write_organ_report(work, tmp_path / "report", pdf=True)
    assert rep.pdf is not None and rep.pdf.stat().st_size > 1000
    assert not rep.missing


def test_stats_and_report_dispatch_on_a_clocks_folder(clocks_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "clocks"
    shutil.copytree(clocks_dir, work)
    runner = CliRunner()
    res = runner.invoke(app, ["stats", str(work), "--no-figures"])
    assert res.exit_code == 0, res.output
    assert "left out of the tests (uninformative): spleen" in res.output
    assert (work / "stats" / "organ_gap_models.tex").is_file() and (work / "clock_recovery.json").is_file()
    bad = runner.invoke(app, ["stats", str(work), "--method", "ablation"])
    assert bad.exit_code == 1 and "--method applies to a run folder only" in bad.output
    bad = runner.invoke(app, ["report", str(work), "--importance", "gradcam=share"])
    assert bad.exit_code == 1 and "--importance applies to a run folder only" in bad.output
    bad = runner.invoke(app, ["stats", str(work.parent / "nowhere"), "--include-uninformative"])
    assert bad.exit_code == 1 and "--include-uninformative applies to a clocks folder" in bad.output
    res = runner.invoke(app, ["report", str(work), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.tex").is_file() and (tmp_path / "rep" / "clock_recovery.tex").is_file()
    assert r"\input{stats/organ_gap_models}" in (tmp_path / "rep" / "report.tex").read_text()
    rec = json.loads((work / "clock_recovery.json").read_text())
    assert rec["source"] == "DIR/stats" and "liver" in rec["phenotypes"]["diabetes"]["significant_clocks"]


def test_gap_result_is_typed(clocks_dir: Path) -> None:
    tables, gap = load_clocks(clocks_dir).run_tables("liver", "conditioned")
    assert isinstance(gap, GapCorrectionResult) and len(gap.scans) == len(tables.predictions)


def test_a_folder_of_uninformative_clocks_writes_tables_but_tests_nothing(tmp_path: Path) -> None:
    clocks = make_clocks_folder(tmp_path, n=80)
    record = json.loads((clocks / "clocks.json").read_text())
    for entry in record["clocks"].values():
        entry["informative"] = False
    (clocks / "clocks.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"every clock is flagged uninformative .*--include-uninformative"):
        organ_gap_models(clocks)
    res = run_organ_stats(clocks, figures=False)
    assert res.models.empty and not (clocks / "stats" / "organ_gap_models.tex").exists()
    assert (clocks / "stats" / "clocks.tex").is_file() and (clocks / "stats" / "clock_correlations.tex").is_file()
    assert "nothing tested" in "\n".join(res.summary())
    rec = json.loads((clocks / "clock_recovery.json").read_text())
    assert rec["clocks"]["spleen"]["goal_met"] and rec["phenotypes"] == {}


def test_report_leaves_out_stale_organ_tables(clocks_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "clocks"
    shutil.copytree(clocks_dir, work)
    run_organ_stats(work, figures=False)
    out = tmp_path / "rep"
    first = write_organ_report(work, out)
    assert not first.missing and (out / "stats" / "organ_gap_models.tex").is_file()
    ages = pd.read_parquet(work / "organ_ages.parquet")
    ages.loc[0, "age_gap_corrected"] += 1.0  # clocks rerun: the stats no longer describe the folder
    ages.to_parquet(work / "organ_ages.parquet", index=False)
    again = write_organ_report(work, out)
    assert any("run `bodyage stats" in m and "again" in m for m in again.missing)
    assert not (out / "stats" / "organ_gap_models.tex").exists()
    assert r"\input{stats/" not in (out / "report.tex").read_text()
    assert json.loads((work / "clock_recovery.json").read_text())["source"].startswith("fitted by report")


def test_mirrored_organ_age_columns_equal_bodyage_clocks() -> None:
    # analysis mirrors the column contract instead of importing bodyage.clocks (the DL stack)
    from analysis.organ_stats import ORGAN_AGE_COLUMNS as mirrored
    from bodyage.clocks import ORGAN_AGE_COLUMNS

    assert tuple(mirrored) == tuple(ORGAN_AGE_COLUMNS)


def test_the_ceiling_is_the_r_a_clock_reading_only_the_planted_quantities_reaches() -> None:
    # logit fat fraction = 0.1 * (biological age) + noise of 4 "years": a clock that reads it
    # perfectly has a corrected gap with r = 3 / sqrt(3^2 + 4^2) = 0.6 against a deviation of SD 3
    rng = np.random.default_rng(3)
    n = 6000
    age = rng.uniform(45, 82, n)
    dev = rng.normal(0, 3.0, n)
    logit = 0.1 * (age + dev + rng.normal(0, 4.0, n)) - 9.0
    idx = pd.MultiIndex.from_arrays([[f"S{i:05d}" for i in range(n)], np.zeros(n, dtype=int)])
    truth = pd.DataFrame(
        {
            "subject_id": idx.get_level_values(0),
            "visit": 0,
            "region": "liver",
            "age": age,
            "biological_age": age + dev,
            "fat_fraction": 1 / (1 + np.exp(-logit)),
            "water_signal": 1.0,  # constant: left out
        }
    )
    qty = planted_quantities(truth, ["liver"])
    assert list(qty.columns) == ["liver:fat_fraction", "liver:logit_fat_fraction"]
    gap = ceiling_gap(qty, pd.Series(age, index=idx), pd.Series(np.arange(n) % 5, index=idx))
    assert np.corrcoef(gap.reindex(idx), dev)[0, 1] == pytest.approx(0.6, abs=0.03)
    assert abs(np.corrcoef(gap.reindex(idx), age)[0, 1]) < 1e-6  # corrected for age
    fold = pd.Series(np.where(np.arange(n) < 3, np.nan, np.arange(n) % 5), index=idx)
    assert ceiling_gap(qty, pd.Series(age, index=idx), fold).isna().sum() == 3
