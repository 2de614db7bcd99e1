"""FDR families named where they apply, and LaTeX that compiles and fits (issue 15, items 8 and 10)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import REGIONS, make_tables, write_run
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from analysis import tables as tab
from analysis.captions import load_captions
from analysis.fdr import family_q
from analysis.latex import Column, LatexTable, escape, render, width_em
from analysis.notes import summarise_warnings
from analysis.regionmodels import region_gap_correlations, region_models
from analysis.report import write_report
from analysis.run import RunTables, load_run
from analysis.stats import StatsResult, run_stats
from bodyage.errors import InputError
from cli.app import app

runner = CliRunner()

#: long TotalSegmentator names, the kind that pushed region tables past the margin
LONG_REGIONS = (*REGIONS, "portal_vein_and_splenic_vein", "atrial_appendage_left", "inferior_vena_cava")


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with long region names, a Greek phenotype name and effects on the long regions."""
    rng = np.random.default_rng(3)
    frames = make_tables(
        160,
        seed=3,
        repeat_fraction=0.2,
        missing_bmi=4,
        regions=LONG_REGIONS,
        mass_effects={("liver", "diabetes"): 0.8, ("portal_vein_and_splenic_vein", "diabetes"): 0.8},
        share_effects={("liver", "diabetes"): 0.02, ("portal_vein_and_splenic_vein", "diabetes"): 0.02},
        extra_columns={"β-blocker use": list(rng.integers(0, 2, 160))},
    )
    return write_run(tmp_path_factory.mktemp("wide"), frames)


@pytest.fixture(scope="module")
def wide_stats(wide_run: Path) -> StatsResult:
    return run_stats(
        wide_run, phenotypes=["diabetes", "bmi", "β-blocker use"], alpha=0.1, fdr_family="phenotype", figures=False
    )


@pytest.fixture(scope="module")
def tables(wide_run: Path) -> RunTables:
    return load_run(wide_run)


# ----------------------------------------------------------------------------- FDR families


def test_all_family_is_statsmodels_bh_over_every_method_region_and_phenotype(tables: RunTables) -> None:
    res = region_models(tables, phenotypes=["diabetes", "bmi", "smoking"], fdr_family="all")
    assert res["method"].nunique() == 2 and res["phenotype"].nunique() == 3
    ok = res["p"].notna()
    expected = multipletests(res.loc[ok, "p"], method="fdr_bh")[1]
    np.testing.assert_allclose(res.loc[ok, "q"], expected, rtol=1e-12)
    assert (res["fdr_family"] == "all").all()
    assert (res["significant"] == (res["q"] < 0.05)).all()
    per_method = region_models(tables, phenotypes=["diabetes", "bmi", "smoking"])
    np.testing.assert_allclose(res["p"], per_method["p"])  # same fits, another family
    assert not np.allclose(res.loc[ok, "q"], per_method.loc[ok, "q"])


def test_gap_correlations_take_the_family(tables: RunTables) -> None:
    pooled = region_gap_correlations(tables, fdr_family="all")
    ok = pooled["p"].notna()
    np.testing.assert_allclose(pooled.loc[ok, "q"], multipletests(pooled.loc[ok, "p"], method="fdr_bh")[1])
    assert (pooled["fdr_family"] == "all").all()
    split = region_gap_correlations(tables)
    assert (split["fdr_family"] == "method").all()
    for _, block in split[split["p"].notna()].groupby("method"):
        np.testing.assert_allclose(block["q"], multipletests(block["p"], method="fdr_bh")[1])
    with pytest.raises(InputError, match="--fdr-family must be one of method, phenotype, all; 'x' was provided"):
        region_gap_correlations(tables, fdr_family="x")  # type: ignore[arg-type]


def test_family_q_splits_by_the_family_keys() -> None:
    df = pd.DataFrame({"method": list("aabb"), "phenotype": list("xyxy"), "p": [0.01, 0.04, 0.03, np.nan]})
    np.testing.assert_allclose(family_q(df, "all")[:3], multipletests(df["p"][:3], method="fdr_bh")[1])
    np.testing.assert_allclose(family_q(df, "method")[:3], [0.02, 0.04, 0.03])
    np.testing.assert_allclose(family_q(df, "phenotype")[:3], [0.01, 0.04, 0.03])
    assert np.isnan(family_q(df, "all")[3])


def test_table_notes_name_the_real_alpha_and_family(wide_run: Path, wide_stats: StatsResult) -> None:
    stats = wide_run / "stats"
    for method in ("ablation", "gradcam"):
        notes = (stats / f"region_models_{method}.tex").read_text()
        assert "the regions of each method and phenotype (FDR family: phenotype), significant at 0.1" in notes
        corr = (stats / f"region_gap_correlations_{method}.tex").read_text()
        assert "the regions of each method (FDR family: method), significant at 0.1" in corr
    assert "over the phenotypes of each model" in (stats / "phenotype_models.tex").read_text()


def test_summary_md_carries_the_real_alpha_and_family(wide_run: Path, wide_stats: StatsResult, tmp_path: Path) -> None:
    summary = write_report(wide_run, tmp_path / "rep").summary_md.read_text()
    assert "FDR 5% per method" not in summary
    assert (
        "significant at FDR 0.1; Benjamini-Hochberg over the regions of each method and phenotype, FDR family "
        "`phenotype`; the FDR holds within each family, not across families" in summary
    )
    assert "q: Benjamini-Hochberg over the phenotypes, a family of their own" in summary
    assert "\\* q < 0.1." in summary


# ----------------------------------------------------------------------------- (a), (c) escaping


@pytest.mark.parametrize(
    ("text", "latex"),
    [
        ("β-blocker", r"\ensuremath{\beta}-blocker"),
        ("Δ age Ω", r"\ensuremath{\Delta} age \ensuremath{\Omega}"),
        ("Αβ", r"A\ensuremath{\beta}"),  # a capital alpha looks like A
        ("µg", r"\ensuremath{\mu}g"),
        ("café naïve", r"caf\'{e} na\"{\i{}}ve"),
        ("Ærø ß", r"\AE{}r\o{} \ss{}"),
        ("ﬁbre ½", "fibre 1/2"),
        ("中", "{[}U+4E2D{]}"),
        ("`odd name` == 1", r"\textasciigrave{}odd name\textasciigrave{} == 1"),
        ("[a]", "{[}a{]}"),
    ],
)
def test_escape_translates_unicode_and_backquotes(text: str, latex: str) -> None:
    assert escape(text) == latex


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_unicode_names_compile_with_plain_pdflatex(tmp_path: Path) -> None:
    names = ["β-blocker", "Σ score", "café", "ﬁbre ½", "中文", "`odd name` == 1", "[x]", "µg/l", "Ωmega™ ≥ 2°"]
    df = pd.DataFrame({"name": names, "v": np.linspace(-1, 1, len(names))})
    table = LatexTable(columns=(Column("Name", "name", "text"), Column("Value", "v")), caption=names[0], label="t")
    log, _ = _compile(tmp_path, render(df, table))
    assert "Unicode character" not in log


# ----------------------------------------------------------------------------- (b) digits


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_estimate_and_its_ci_print_with_the_same_decimals() -> None:
    df = pd.DataFrame({"est": [0.0123, 0.0456], "lo": [-0.51, -0.42], "hi": [0.54, 0.51], "se": [2.7, 2.4]})
    table = LatexTable(
        columns=(
            Column("Estimate", "est", digits=None),
            Column("95% CI", "lo", "ci", digits=None, high="hi"),
            Column("SE", "se", digits=None, scale="est"),
        ),
        caption="c",
        label="l",
    )
    scaled = LatexTable(
        columns=(
            Column("Estimate", "est", digits=None, scale="est"),
            Column("95% CI", "lo", "ci", digits=None, high="hi"),
            Column("SE", "se", digits=None, scale="est"),
        ),
        caption="c",
        label="l",
    )
    for spec in (table, scaled):
        row = render(df, spec).split(r"\midrule")[1].splitlines()[1]
        est, ci, se = (c.strip() for c in row.rstrip("\\ ").split("&"))
        low, high = re.findall(r"\\num\{([^}]*)\}", ci)
        assert {_decimals(est), _decimals(low), _decimals(high)} == {3}, row
        assert _decimals(se) == (3 if spec is scaled else 2), row


# ----------------------------------------------------------------------------- (d) warnings in notes


def test_warnings_are_summarised_never_copied() -> None:
    raw = [
        "statsmodels: The MLE may be on the boundary of the parameter space.; random-intercept variance of 'site' "
        "is on the boundary (≈ 0): the fixed effects equal an OLS fit without it",
        "",
        None,
        "statsmodels MixedLM did not converge; refitted with the profiled-REML solver",
        "statsmodels: Random effects covariance is singular",
    ]
    text = summarise_warnings(raw, where="the warning column of phenotype_models.csv")
    assert text == (
        "Warnings: 2 models with a random-intercept variance on the boundary (≈ 0), 1 model that did not converge "
        "at first, 1 model refitted by the profiled-REML solver; see the warning column of phenotype_models.csv."
    )
    assert "statsmodels" not in text and "MLE" not in text
    assert summarise_warnings(["", None, float("nan")]) == ""


def test_region_table_counts_models_that_could_not_be_estimated(tables: RunTables) -> None:
    res = region_models(tables, phenotypes=["diabetes"], methods=["ablation"])
    res.loc[res.index[:2], ["p", "q", "estimate"]] = np.nan
    _, spec = tab.region_table(res, "ablation", 0.05)
    assert (
        "Warnings: 2 region models that could not be estimated (too few scans or a collinear predictor); see the "
        "rows without a p-value in region_models.csv." in spec.notes
    )


# ----------------------------------------------------------------------------- (e) width


def test_a_table_too_wide_wraps_its_text_column_then_shrinks_its_font() -> None:
    long = "portal_vein_and_splenic_vein"
    assert abs(width_em(r"portal\_vein\_and\_splenic\_vein") * 8.5 - 103.7) < 6  # pdflatex: 103.7 pt
    df = pd.DataFrame({"r": [long, "liver"], "e": [0.5, 1.5], "lo": [0.1, 1.0], "hi": [0.9, 2.0], "q": [1e-5, 0.2]})
    cols = [
        Column("Region", "r", "text"),
        Column("Estimate", "e", digits=3),
        Column("95% CI", "lo", "ci", digits=3, high="hi"),
        Column("p", "q", "p"),
        Column("q", "q", "p", stars="q"),
    ]
    narrow = render(df, LatexTable(columns=tuple(cols), caption="c", label="l"))
    assert r"\begin{tabular}{l " in narrow and r"\footnotesize" in narrow.split(r"\caption")[0]
    wide = render(df, LatexTable(columns=(*cols, *cols[1:], *cols[1:3]), caption="c", label="l"))
    assert r"\begin{tabular}{>{\raggedright\arraybackslash}p{" in wide
    assert r"portal\_\allowbreak{}vein" in wide
    widest = render(df, LatexTable(columns=(*cols, *cols[1:], *cols[1:]), caption="c", label="l"))
    assert r"\scriptsize" in widest.split(r"\caption")[0]


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_every_stats_table_fits_a_standard_report_page(wide_run: Path, wide_stats: StatsResult, tmp_path: Path) -> None:
    for path in sorted((wide_run / "stats").glob("*.tex")):
        _, overfull = _compile(tmp_path, path.read_text(), name=path.stem)
        assert not overfull, f"{path.name} is wider than a report page by {overfull} pt"


def _compile(folder: Path, table: str, name: str = "doc") -> tuple[str, list[float]]:
    """Compile one table in a plain ``report`` document (10 pt, \\textwidth 345 pt); log and overfull widths."""
    doc = folder / f"{name}.tex"
    doc.write_text(
        "\\documentclass{report}\n\\usepackage{booktabs}\n\\usepackage{siunitx}\n"
        f"\\begin{{document}}\n{table}\n\\end{{document}}\n",
        encoding="utf-8",
    )
    res = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    log = (folder / f"{name}.log").read_text(errors="replace")
    assert res.returncode == 0, log[-3000:]
    return log, [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]


# ----------------------------------------------------------------------------- (f) captions


def test_captions_file_replaces_captions(wide_run: Path, tmp_path: Path) -> None:
    file = tmp_path / "captions.yaml"
    file.write_text(
        "phenotype_models: Effects on the β age gap\n"
        "region_models: 'Regional {method} attribution'\n"
        "region_models_ablation: Occlusion, organ by organ\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    run_stats(wide_run, phenotypes=["diabetes"], captions=file, figures=False, out=out)
    stats = out / "stats"
    assert r"\caption{Effects on the \ensuremath{\beta} age gap}" in (stats / "phenotype_models.tex").read_text()
    assert r"\caption{Occlusion, organ by organ}" in (stats / "region_models_ablation.tex").read_text()
    assert r"\caption{Regional gradcam attribution}" in (stats / "region_models_gradcam.tex").read_text()
    assert r"\caption{Accuracy of the out-of-fold" in (stats / "age_accuracy.tex").read_text()
    assert json.loads((stats / "run.json").read_text())["arguments"]["captions"] == str(file)


def test_captions_json_and_mapping(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"age_accuracy": "Accuracy"}))
    assert load_captions(file) == {"age_accuracy": "Accuracy"}
    assert load_captions({"region_joint_shapley": "x"}, methods=["shapley"]) == {"region_joint_shapley": "x"}


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("region_model: x\n", ".yaml", r"c\.yaml: unknown table 'region_model'; known tables: age_accuracy, "),
        ("region_models_shapley: x\n", ".yml", "unknown table 'region_models_shapley'"),
        ("- a\n- b\n", ".yaml", "expected a mapping of table stem to caption, found list"),
        ("age_accuracy: 3\n", ".yaml", "the caption of 'age_accuracy' must be non-empty text, found 3"),
        ("{", ".json", r"c\.json: not valid JSON"),
        ("age_accuracy: x\n", ".txt", "must be .yaml, .yml or .json"),
    ],
)
def test_captions_are_checked(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    file = tmp_path / f"c{suffix}"
    file.write_text(content)
    with pytest.raises(InputError, match=message):
        load_captions(file, methods=["ablation", "gradcam"])


def test_cli_captions_error_is_one_line_and_fits_nothing(
    wide_run: Path, wide_stats: StatsResult, tmp_path: Path
) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("phenotype_model: x\n")
    record = wide_run / "stats" / "run.json"
    before = record.stat().st_mtime_ns
    res = runner.invoke(app, ["stats", str(wide_run), "--captions", str(file), "--fdr-family", "all"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown table 'phenotype_model'" in lines[0]
    assert record.stat().st_mtime_ns == before  # checked before anything was fitted or written
    res = runner.invoke(app, ["stats", str(wide_run), "--fdr-family", "study"])
    assert res.exit_code == 2


def test_phenotype_table_counts_warnings_instead_of_printing_them() -> None:
    raw = "statsmodels: The MLE may be on the boundary of the parameter space."
    boundary = "random-intercept variance of 'site' is on the boundary (≈ 0): the fixed effects equal an OLS fit"
    res = pd.DataFrame(
        {
            "model": ["separate", "separate", "joint", "joint"],
            "phenotype": ["diabetes", "bmi", "diabetes", "bmi"],
            "per": ["carriers vs non-carriers", "per SD", "carriers vs non-carriers", "per SD"],
            "n": [100, 100, 100, 100],
            "estimate": [1.0, 0.2, 0.9, 0.1],
            "se": [0.3, 0.1, 0.3, 0.1],
            "ci_low": [0.4, 0.0, 0.3, -0.1],
            "ci_high": [1.6, 0.4, 1.5, 0.3],
            "p": [0.001, 0.05, 0.003, 0.3],
            "q": [0.002, 0.05, 0.006, 0.3],
            "boundary": [True, False, True, True],
            "converged": [True, True, True, True],
            "warning": [f"{raw}; {boundary}", "", boundary, boundary],
            "random_effect": ["site"] * 4,
            "fixed_effects": [""] * 4,
            "correction": ["train"] * 4,
            "covariates": ["age, sex"] * 4,
        }
    )
    _, table = tab.phenotype_table(res, 0.05)
    notes = " ".join(table.notes)
    assert "statsmodels:" not in notes and "MLE" not in notes
    # two fitted models on the boundary: one separate, the joint one (its two rows share one fit)
    assert "Warnings: 2 models with a random-intercept variance on the boundary" in notes
    assert "see the warning column of phenotype_models.csv" in notes
