"""`bodyage report`: recovery.json against hand-computed answers, report.tex that compiles, missing steps, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import REGIONS, make_tables, write_run
from scipy.stats import spearmanr
from typer.testing import CliRunner

from analysis.recovery import method_recovery, recovery, region_importance
from analysis.report import write_report
from analysis.stats import run_stats
from bodyage.errors import InputError, RunError
from cli.app import app

runner = CliRunner()

#: planted information of the factory regions: k = 4
INFORMATION: dict[str, float] = {r: 0.0 for r in REGIONS} | {
    "liver": 0.05,
    "pancreas": 0.04,
    "torso_fat": 0.03,
    "intervertebral_discs": 0.02,
}
EFFECTS = {
    "liver": "fat_fraction",
    "pancreas": "fat_fraction",
    "torso_fat": "volume",
    "intervertebral_discs": "water_signal",
}
#: the ablation |mass| we write per region: the top 4 are liver, pancreas, spleen, torso_fat
ABLATION_MASS: dict[str, float] = {
    "liver": 4.0,
    "pancreas": 3.0,
    "spleen": 2.5,
    "torso_fat": 2.0,
    "kidney_left": 1.0,
    "intervertebral_discs": 0.9,
    "kidney_right": 0.8,
    "prostate": 0.7,
    "gluteus_maximus_left": 0.6,
    "gluteus_maximus_right": 0.5,
    "subcutaneous_fat": 0.4,
}
#: the gradcam enrichment we write per region: top 4 are liver, kidney_left, kidney_right, spleen
GRADCAM_ENRICHMENT: dict[str, float] = {r: 1.0 for r in REGIONS} | {
    "liver": 9.0,
    "kidney_left": 8.0,
    "kidney_right": 7.0,
    "spleen": 6.0,
    "pancreas": 5.0,
}


def _truth() -> dict[str, object]:
    return {
        "scenario_name": "test",
        "oracle_mae": 2.0,
        "region_information": INFORMATION,
        "scenario": {
            "ageing": [{"region": r, "effect": e, "per_year": 0.01} for r, e in EFFECTS.items()],
            "phenotypes": {
                "diabetes": {"type": "binary", "accelerates": {"liver": 5.0}},
                "smoking": {"type": "binary"},
            },
        },
        "phenotype_regions": {"diabetes": ["liver"], "smoking": []},
    }


def _planted_run(root: Path, *, attributions: bool = True) -> Path:
    """A factory run whose attributions have known region importances, with truth.json in the study."""
    frames = make_tables(120, seed=5, noise_sd=1.5)
    attr = frames.attributions.copy()
    rng = np.random.default_rng(0)
    abl = attr["method"] == "ablation"
    sign = np.where(rng.random(len(attr)) < 0.5, -1.0, 1.0)  # signed mass cancels; |mass| does not
    attr.loc[abl, "mass"] = attr.loc[abl, "region"].map(ABLATION_MASS).to_numpy() * sign[abl.to_numpy()]
    grad = attr["method"] == "gradcam"
    attr.loc[grad, "enrichment"] = attr.loc[grad, "region"].map(GRADCAM_ENRICHMENT).to_numpy()
    absent = frames.attributions["share"].isna()
    attr.loc[absent, ["mass", "enrichment"]] = np.nan  # prostate stays absent in women's scans
    frames = type(frames)(frames.cohort, frames.predictions, attr, frames.regions)
    run = write_run(root, frames, attributions=attributions)
    (root / "study" / "truth.json").write_text(json.dumps(_truth()))
    (run / "attribute.json").write_text(json.dumps({"importance_measure": {"gradcam": "enrichment"}}))
    return run


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _planted_run(tmp_path_factory.mktemp("report"))
    run_stats(run, phenotypes=["diabetes", "bmi", "smoking"])
    return run


def test_method_recovery_by_hand() -> None:
    imp = pd.Series(ABLATION_MASS)
    got = method_recovery(imp, INFORMATION, EFFECTS)
    assert got["k"] == 4
    assert got["top_regions"] == ["liver", "pancreas", "spleen", "torso_fat"]
    assert got["precision_at_k"] == pytest.approx(3 / 4)
    # fat_fraction: liver, pancreas both found; volume: torso_fat found; water_signal: discs missed
    assert got["by_effect"] == {"fat_fraction": 1.0, "volume": 1.0, "water_signal": 0.0}
    info = pd.Series(INFORMATION)[imp.index]
    assert got["spearman"] == pytest.approx(spearmanr(info, imp).statistic)


def test_method_recovery_perfect_and_missing_region() -> None:
    info = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    perfect = method_recovery(pd.Series({"a": 30.0, "b": 20.0, "c": 10.0, "d": 0.0}), info)
    assert perfect["precision_at_k"] == 1.0
    assert perfect["spearman"] == pytest.approx(1.0)
    # a planted region absent from the attributions counts as not found
    missing = method_recovery(pd.Series({"a": 30.0, "b": 20.0, "d": 10.0}), info)
    assert missing["precision_at_k"] == pytest.approx(2 / 3)
    assert missing["top_regions"] == ["a", "b", "d"]


def test_region_importance_is_mean_abs_mass_with_ci(planted: Path) -> None:
    attr = pd.read_parquet(planted / "attributions.parquet")
    imp = region_importance(attr, "ablation", "abs_mass")
    assert list(imp.index[:4]) == ["liver", "pancreas", "spleen", "torso_fat"]
    assert imp.loc["liver", "mean"] == pytest.approx(4.0)
    assert imp.loc["liver", "ci_low"] == pytest.approx(4.0)  # constant |mass|: zero-width interval
    n_men = int((pd.read_csv(planted.parent / "study" / "cohort.csv")["sex"] == "M").sum())
    assert imp.loc["prostate", "n"] == n_men  # absent is NaN, not 0


def test_recovery_json_contract(planted: Path) -> None:
    rec = recovery(planted)
    assert {"mae", "oracle_mae", "mae_ratio", "methods", "phenotypes", "goals"} <= set(rec)
    pred = pd.read_parquet(planted / "predictions.parquet")
    mae = float((pred["predicted_age"] - pred["age"]).abs().mean())
    assert rec["mae"] == pytest.approx(mae)
    assert rec["mae_ratio"] == pytest.approx(mae / 2.0)
    abl, grad = rec["methods"]["ablation"], rec["methods"]["gradcam"]
    for m in (abl, grad):
        assert {"k", "precision_at_k", "spearman", "top_regions", "importance_measure", "by_effect"} <= set(m)
        assert "agreement_with_ablation" in m
    assert abl["precision_at_k"] == pytest.approx(0.75)
    assert abl["importance_measure"] == "abs_mass"
    # gradcam ranked by enrichment (declared by the run): of the planted regions only liver is in its top 4
    assert grad["importance_measure"] == "enrichment"
    assert grad["top_regions"] == ["liver", "kidney_left", "kidney_right", "spleen"]
    assert grad["precision_at_k"] == pytest.approx(1 / 4)
    common = list(ABLATION_MASS)
    expect = spearmanr([GRADCAM_ENRICHMENT[r] for r in common], [ABLATION_MASS[r] for r in common]).statistic
    assert grad["agreement_with_ablation"] == pytest.approx(expect)
    dia = rec["phenotypes"]["diabetes"]
    assert dia["planted"] is True and dia["planted_regions"] == ["liver"]
    assert {"gap_effect", "ci_low", "ci_high", "q", "significant_regions"} <= set(dia)
    assert dia["gap_effect"] > 0 and dia["q"] < 0.05  # the factory plants +2 years
    assert set(dia["significant_regions"]) == {"ablation", "gradcam"}
    assert rec["phenotypes"]["smoking"]["planted"] is False
    assert rec["sources"] == {"phenotype_models": "stats", "region_models": "stats"}
    assert rec["goals"]["region_method_beats_floors"]["met"] is None  # the factory study has no images


def test_declared_measure_and_override(planted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(planted, run)
    (run / "attribute.json").write_text(json.dumps({"methods": {"gradcam": {"importance_measure": "share"}}}))
    rec = recovery(run, _truth())
    assert rec["methods"]["gradcam"]["importance_measure"] == "share"
    assert rec["methods"]["gradcam"]["measure_source"] == "declared"
    rec = recovery(run, _truth(), measures={"gradcam": "density"})
    assert rec["methods"]["gradcam"]["importance_measure"] == "density"
    with pytest.raises(InputError, match="importance measure of 'gradcam' must be one of"):
        recovery(run, _truth(), measures={"gradcam": "volume"})


def test_report_folder(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = write_report(planted, out)
    assert res.missing == ()
    for name in ("report.tex", "summary.md", "recovery.json", "recovery.tex", "report.json"):
        assert (out / name).is_file(), name
    assert json.loads((planted / "recovery.json").read_text()) == json.loads((out / "recovery.json").read_text())
    tex = (out / "report.tex").read_text()
    for src in sorted((planted / "stats").glob("*.tex")):
        assert f"\\input{{stats/{src.stem}}}" in tex, src.name
        assert (out / "stats" / src.name).is_file()
    for src in sorted((planted / "figures").glob("*.pdf")):
        assert f"{{figures/{src.name}}}" in tex, src.name
        assert (out / "figures" / src.with_suffix(".png").name).is_file()
    assert "\\input{recovery}" in tex
    assert tex.count("\\includegraphics") == len(list((planted / "figures").glob("*.pdf")))
    summary = (out / "summary.md").read_text()
    assert "Mean absolute error" in summary and "precision@k" in summary and "q " in summary
    assert "Failures: 0" in summary
    # participant ids never leave the run folder
    ids = set(pd.read_parquet(planted / "predictions.parquet")["subject_id"])
    for path in out.rglob("*"):
        if path.suffix in (".tex", ".md", ".json", ".csv"):
            text = path.read_text()
            assert not any(re.search(rf"\b{i}\b", text) for i in list(ids)[:50]), path.name


def test_report_again_removes_stale_files(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    write_report(planted, out)
    stale = out / "figures" / "old_figure.pdf"
    stale.write_bytes(b"%PDF")
    record = json.loads((out / "report.json").read_text())
    record["outputs"].append("figures/old_figure.pdf")
    (out / "report.json").write_text(json.dumps(record))
    keep = out / "notes.txt"
    keep.write_text("mine")
    write_report(planted, out)
    assert not stale.exists() and keep.exists()


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_report_compiles(planted: Path, tmp_path: Path) -> None:
    res = write_report(planted, tmp_path / "rep", pdf=True)
    assert res.pdf is not None and res.pdf.stat().st_size > 10_000
    log = res.pdf.with_suffix(".log").read_text(errors="replace")
    assert "Undefined control sequence" not in log
    assert "Overfull \\hbox" not in log.split("recovery.tex")[-1]  # our own tables fit the page


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_report_without_attributions_or_stats(tmp_path: Path) -> None:
    run = _planted_run(tmp_path, attributions=False)
    res = write_report(run, tmp_path / "rep", pdf=True)
    assert any("bodyage attribute" in m for m in res.missing)
    assert any("bodyage stats" in m for m in res.missing)
    summary = res.summary_md.read_text()
    assert "run `bodyage attribute RUN`" in summary and "run `bodyage stats RUN`" in summary
    assert res.recovery is not None and res.recovery["methods"] == {}
    assert res.recovery["sources"]["phenotype_models"] == "computed"
    assert res.pdf is not None and res.pdf.is_file()


def test_stale_stats_are_not_trusted(planted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(planted, run)
    attr = pd.read_parquet(run / "attributions.parquet")
    attr.loc[attr["method"] == "ablation", "mass"] *= 2.0
    attr.to_parquet(run / "attributions.parquet", index=False)
    res = write_report(run, tmp_path / "rep")
    assert any("older tables" in m for m in res.missing)
    assert res.recovery is not None and res.recovery["sources"]["region_models"] == "computed"


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"run\.json: not found"):
        write_report(tmp_path, tmp_path / "rep")
    (tmp_path / "nope").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "run.json: not found" in res.output


def test_run_without_predictions(planted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(planted, run)
    (run / "predictions.parquet").unlink()
    with pytest.raises(RunError, match=r"predictions\.parquet: not found \(run `bodyage train` first\)"):
        write_report(run, tmp_path / "rep")


def test_cli(planted: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", str(planted), "--out", str(tmp_path / "rep"), "--importance", "gradcam=share"])
    assert res.exit_code == 0, res.output
    assert "precision@4" in res.output and "goals:" in res.output
    rec = json.loads((tmp_path / "rep" / "recovery.json").read_text())
    assert rec["methods"]["gradcam"]["importance_measure"] == "share"
    bad = runner.invoke(app, ["report", str(planted), "--importance", "gradcam"])
    assert bad.exit_code == 1 and "METHOD=MEASURE" in bad.output


def test_report_includes_comparisons(planted: Path, tmp_path: Path) -> None:
    from analysis.compare import run_compare

    run = tmp_path / "run"
    shutil.copytree(planted, run)
    _, folder = run_compare(run, "diabetes == 1", "diabetes == 0")
    res = write_report(run, tmp_path / "rep")
    tex = res.report_tex.read_text()
    rel = folder.relative_to(run).as_posix()
    for src in folder.glob("*.tex"):
        assert f"\\input{{{rel}/{src.stem}}}" in tex
    assert "Comparison: diabetes == 1 vs diabetes == 0" in tex
    assert f"fig:bodyage:{folder.name.replace('_', '-')}-comparison-effects" in tex


def test_per_scan_figures_are_left_out(planted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(planted, run)
    sid = str(pd.read_parquet(run / "predictions.parquet")["subject_id"].iloc[0])
    (run / "figures" / f"saliency_{sid}_0.png").write_bytes((run / "figures" / "age_scatter.png").read_bytes())
    res = write_report(run, tmp_path / "rep")
    assert not list((tmp_path / "rep").rglob(f"*{sid}*"))
    assert sid not in res.report_tex.read_text() and sid not in res.summary_md.read_text()
    assert any("1 per-scan figure(s) left out" in m for m in res.missing)


def test_goals_by_hand() -> None:
    from analysis.recovery import evaluate_goals

    rec = {
        "mae_ratio": 1.2,
        "methods": {"ablation": {"precision_at_k": 0.75}, "gradcam": {"precision_at_k": 0.375}},
        "phenotypes": {
            "diabetes": {"gap_effect": 1.5, "q": 0.01, "significant_regions": {"ablation": ["liver", "pancreas"]}},
            "smoking": {"gap_effect": 0.1, "q": 0.8, "significant_regions": {"ablation": [], "gradcam": ["colon"]}},
        },
    }
    goals = evaluate_goals(rec)
    assert {k: g["met"] for k, g in goals.items()} == {
        "mae_ratio": True,
        "region_method_beats_floors": None,  # no floors in rec
        "region_method_beats_permuted_null": None,
        "diabetes_gap": True,
        "diabetes_liver_ablation": True,
        "smoking_null": False,
    }
    assert (
        evaluate_goals({"mae_ratio": 1.6, "methods": {}, "phenotypes": {}})["region_method_beats_floors"]["met"] is None
    )


def test_summary_regions_read_display_names_beside_fold_interval_and_null_bands(tmp_path: Path) -> None:
    from analysis.region_summary import NULL_BANDS_FILE
    from bodyage.attribute_stability import STABILITY, stability_tables
    from bodyage.nulls import NULL_BANDS, null_bands

    assert NULL_BANDS_FILE == NULL_BANDS  # analysis mirrors the name (it cannot import bodyage.nulls)
    run = _planted_run(tmp_path)
    bare = write_report(run, tmp_path / "bare").summary_md.read_text()
    assert "no null model was run (no attribution_nulls.csv): not compared with a null" in bare
    assert "no interval over fold models" in bare
    attr = pd.read_parquet(run / "attributions.parquet")
    stability_tables(attr, {"ablation": "abs_mass"})[0].to_csv(run / STABILITY, index=False)
    abl = attr[attr["method"] == "ablation"]
    # random copies spread importance evenly (1/11 each); the permuted-label model puts 40 % on the spleen
    copies = [abl.assign(mass=0.01, null="random_weights", copy=c) for c in range(3)]
    perm = abl.assign(mass=np.where(abl["region"] == "spleen", 0.4, 0.06), null="permuted_labels", copy=0)
    nulls = pd.concat([*copies, perm], ignore_index=True)
    null_bands(attr, nulls, {"ablation": "abs_mass"}).to_csv(run / NULL_BANDS, index=False)
    summary = write_report(run, tmp_path / "rep").summary_md.read_text()
    section = summary.split("## Regions the model uses")[1].split("## ")[0]
    ablation = section.split("**ablation**")[1].split("**gradcam**")[0]
    assert "min–max over the 3 fold models" in ablation
    lines = {ln.split(":")[0]: ln for ln in ablation.splitlines() if ln[:1].isdigit()}
    liver = lines["1. liver"]  # 4 of a total 16.4: above both nulls
    assert "; fold models " in liver
    assert "share 24.4 % (random-weight null ≤ 9.1 %, permuted-label null 6.0 %): above every null" in liver
    spleen = lines["3. spleen"]  # 15 % of the total, below the permuted-label model's 40 %
    assert "permuted-label null 40.0 %): not above every null" in spleen
    # people read names as in the figures, never with underscores
    assert "4. torso fat" in lines
    numbered = [ln.split(":")[0] for ln in section.splitlines() if ln[:1].isdigit()]
    assert len(numbered) == 16 and not any("_" in name for name in numbered)
    assert "attribution_nulls.csv has no gradcam rows for this measure" in section


def test_abs_density_is_a_measure_the_report_and_the_region_models_can_use(tmp_path: Path) -> None:
    # bodyage attribute writes abs_density (GradCAM's intensive measure); load_run dropped it, so
    # `bodyage report --importance gradcam=abs_density` raised KeyError and `stats --metric` refused it
    from analysis.regionmodels import importance_matrix, region_models
    from analysis.run import load_run
    from bodyage.regions import group_of

    run = _planted_run(tmp_path)
    attr = pd.read_parquet(run / "attributions.parquet")
    grad = attr[attr["method"] == "gradcam"]
    want = (grad["abs_mass"] / grad["n_voxels"]).groupby(grad["region"]).mean().sort_values(ascending=False)
    rec = write_report(run, tmp_path / "rep", measures={"gradcam": "abs_density"}).recovery
    assert rec is not None and rec["methods"]["gradcam"]["importance_measure"] == "abs_density"
    assert rec["methods"]["gradcam"]["top_regions"] == list(want.index[:4])
    tables = load_run(run)
    kidneys = importance_matrix(tables, "gradcam", "abs_density", level="group", grouping=group_of)["kidney"]
    both = grad[grad["region"].isin(["kidney_left", "kidney_right"])].groupby(["subject_id", "visit"])
    np.testing.assert_allclose(
        np.sort(kidneys.dropna().to_numpy()), np.sort((both["abs_mass"].sum() / both["n_voxels"].sum()).to_numpy())
    )
    res = region_models(run, phenotypes=["diabetes"], metric="abs_density", methods=["gradcam"])
    assert set(res["metric"]) == {"abs_density"} and res["estimate"].notna().any()


def test_recovery_tex_marks_top_regions_above_every_null_and_names_them_as_figures_do() -> None:
    from analysis.recovery_tex import recovery_latex

    entry = {"k": 2, "precision_at_k": 0.5, "top_regions": ["liver", "gluteus_maximus_left"], "clears_nulls": ["liver"]}
    tex = recovery_latex({"methods": {"ablation": entry}, "planted_regions": ["liver", "gluteus_maximus_left"]})
    assert r"& liver$^\dagger$, gluteus maximus (left) \\" in tex
    assert r"Top-k regions marked $^\dagger$ take a larger share" in tex and "gluteus\\_maximus" not in tex
    del entry["clears_nulls"]  # nulls not run: nothing marked, no note
    assert "dagger" not in recovery_latex({"methods": {"ablation": entry}, "planted_regions": ["liver"]})


def test_summary_counts_the_regions_above_every_null_it_does_not_list(tmp_path: Path) -> None:
    run = _planted_run(tmp_path)
    attr = pd.read_parquet(run / "attributions.parquet")
    abl = attr[attr["method"] == "ablation"]
    # null models that put nearly all their importance on subcutaneous fat: the 10 other regions clear them
    mass = np.where(abl["region"] == "subcutaneous_fat", 9.0, 0.01)
    copies = [abl.assign(mass=mass * (1 + c / 10), null="random_weights", copy=c) for c in range(3)]
    nulls = pd.concat([*copies, abl.assign(mass=mass, null="permuted_labels", copy=0)], ignore_index=True)
    nulls.to_parquet(run / "attributions_null.parquet", index=False)
    summary = write_report(run, tmp_path / "rep").summary_md.read_text()
    line = next(ln for ln in summary.splitlines() if "10 region(s) above the null band of every null model" in ln)
    assert line.endswith(", kidney (right), prostate and 2 more.") and "..." not in line
