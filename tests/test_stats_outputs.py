"""`bodyage stats` and `bodyage compare` end to end: files, LaTeX that compiles, figures, CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import make_tables, write_run
from typer.testing import CliRunner

from analysis.compare import run_compare
from analysis.latex import Column, LatexTable, escape, format_p, render
from analysis.stats import StatsResult, run_stats
from cli.app import app

runner = CliRunner()

STATS_FILES = [
    "age_accuracy.parquet",
    "age_accuracy.csv",
    "age_accuracy.tex",
    "gap_correction.parquet",
    "phenotype_models.parquet",
    "phenotype_models.csv",
    "phenotype_models.tex",
    "region_models.parquet",
    "region_models.csv",
    "region_models_ablation.tex",
    "region_models_gradcam.tex",
    "region_joint.parquet",
    "region_joint_gradcam.tex",
    "region_gap_correlations.csv",
    "region_gap_correlations_ablation.tex",
    "run.json",
]
FIGURES = ["age_scatter", "phenotype_forest", "region_heatmap_ablation", "region_heatmap_gradcam"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("stats"), make_tables(150, seed=21, repeat_fraction=0.2, missing_bmi=4))


@pytest.fixture(scope="module")
def result(run_dir: Path) -> StatsResult:
    return run_stats(run_dir, phenotypes=["diabetes", "bmi", "smoking"])


@pytest.fixture(scope="module")
def comparison_dir(run_dir: Path) -> Path:
    _, out = run_compare(run_dir, "diabetes == 1", "diabetes == 0")
    return out


def test_stats_writes_stable_file_names(run_dir: Path, result: StatsResult) -> None:
    stats = run_dir / "stats"
    for name in STATS_FILES:
        assert (stats / name).is_file(), name
    for stem in FIGURES:
        pdf = (run_dir / "figures" / f"{stem}.pdf").read_bytes()
        png = (run_dir / "figures" / f"{stem}.png").read_bytes()
        assert pdf.startswith(b"%PDF") and png.startswith(b"\x89PNG"), stem
    record = json.loads((stats / "run.json").read_text())
    assert record["command"] == "stats"
    assert record["study"] == str(run_dir.parent / "study")
    assert record["finished"] is not None
    assert "stats/phenotype_models.tex" in record["outputs"]
    assert set(record["inputs"]) == {"predictions", "attributions", "cohort"}


def test_tables_round_trip_and_name_no_participant(run_dir: Path, result: StatsResult) -> None:
    pheno = pd.read_parquet(run_dir / "stats" / "phenotype_models.parquet")
    pd.testing.assert_frame_equal(pheno, result.phenotypes, check_dtype=False)
    ids = set(result.gap.scans["subject_id"])
    for path in [*(run_dir / "stats").glob("*.tex"), *(run_dir / "stats").glob("*.csv")]:
        text = path.read_text()
        assert not any(i in text for i in ids), f"{path.name} names a participant"


def test_missing_phenotype_rows_are_counted_in_the_notes(run_dir: Path, result: StatsResult) -> None:
    tex = (run_dir / "stats" / "phenotype_models.tex").read_text()
    assert "Scans excluded: bmi 4 (missing phenotype); the joint model 4 (missing phenotype); none from" in tex
    sep = result.phenotypes[result.phenotypes["model"] == "separate"].set_index("phenotype")
    assert sep.at["bmi", "n_missing_phenotype"] == 4


def test_recovery_filters_are_simple(result: StatsResult) -> None:
    """What report needs: phenotype effects with CI and q; significant regions per method."""
    assert result.regions is not None
    sep = result.phenotypes[result.phenotypes["model"] == "separate"].set_index("phenotype")
    assert sep.at["diabetes", "ci_low"] < 2.0 < sep.at["diabetes", "ci_high"]
    assert {"estimate", "se", "ci_low", "ci_high", "p", "q"} <= set(sep.columns)
    regions = result.regions
    sig = regions[(regions["method"] == "ablation") & (regions["phenotype"] == "diabetes") & regions["significant"]]
    assert "liver" in set(sig["region"])


def test_latex_is_well_formed(run_dir: Path, result: StatsResult, comparison_dir: Path) -> None:
    for path in [*(run_dir / "stats").glob("*.tex"), *comparison_dir.glob("*.tex")]:
        tex = path.read_text()
        assert r"\cline" not in tex, path.name
        assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 1, path.name
        assert r"\caption{" in tex and r"\label{tab:bodyage:" in tex, path.name
        # region names escaped; no raw underscore outside commands
        body = re.sub(r"\\[a-zA-Z]+(\[[^]]*\])?", "", tex)
        assert not re.search(r"(?<!\\)_", body), path.name
    region = (run_dir / "stats" / "region_models_ablation.tex").read_text()
    assert "S[table-format=" in region
    assert r"\textsuperscript{***}" in region  # the planted liver effect is marked


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_every_table_compiles(tmp_path: Path, run_dir: Path, result: StatsResult, comparison_dir: Path) -> None:
    tables = sorted([*(run_dir / "stats").glob("*.tex"), *comparison_dir.glob("*.tex")])
    body = "\n".join(rf"\input{{{p.as_posix()}}}\clearpage" for p in tables)
    doc = tmp_path / "tables.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{siunitx}\n"
        f"\\begin{{document}}\n{body}\n\\end{{document}}\n"
    )
    res = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    log = (tmp_path / "tables.log").read_text(errors="replace")
    assert res.returncode == 0, log[-3000:]
    overfull = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert not [w for w in overfull if w > 5.0], f"tables wider than the text: {overfull}"
    assert (tmp_path / "tables.pdf").stat().st_size > 1000


def test_comparison_outputs(comparison_dir: Path) -> None:
    for name in (
        "comparison_tests.csv",
        "comparison_tests.parquet",
        "comparison_tests.tex",
        "comparison_balance.csv",
        "comparison_balance.tex",
        "comparison_effects.pdf",
        "comparison_effects.png",
        "run.json",
    ):
        assert (comparison_dir / name).is_file(), name
    assert comparison_dir.parent.name == "compare"
    record = json.loads((comparison_dir / "run.json").read_text())
    assert record["arguments"]["cohort"] == "diabetes == 1"
    assert record["arguments"]["match"] == ["age", "sex"]


def test_stale_per_method_files_are_removed(tmp_path: Path) -> None:
    run = write_run(tmp_path, make_tables(60, seed=5))
    run_stats(run, phenotypes=["diabetes"], figures=False)
    assert (run / "stats" / "region_models_gradcam.tex").is_file()
    run_stats(run, phenotypes=["diabetes"], methods=["ablation"], figures=False)
    assert not (run / "stats" / "region_models_gradcam.tex").exists()
    assert (run / "stats" / "region_models_ablation.tex").is_file()


def test_stats_without_attributions_fits_the_gap_only(tmp_path: Path) -> None:
    run = write_run(tmp_path, make_tables(60, seed=6), attributions=False)
    res = run_stats(run, phenotypes=["diabetes"], figures=False)
    assert res.regions is None
    assert not list((run / "stats").glob("region_*"))


# ----------------------------------------------------------------------------- LaTeX writer


def test_escape_and_numbers() -> None:
    assert (
        escape("kidney_left & 50% #1 {x} ~ a^2")
        == r"kidney\_left \& 50\% \#1 \{x\} \textasciitilde{} a\textasciicircum{}2"
    )
    assert format_p(0.0123) == r"\num[group-digits=integer]{0.0123}"
    assert format_p(3.2e-5) == r"\num{3.2e-05}"
    assert format_p(0.0) == r"$<$\num{1e-300}"
    assert format_p(float("nan")) == "--"


def test_render_integers_raw_and_groups_with_cmidrule() -> None:
    df = pd.DataFrame({"name": ["kidney_left", "liver"], "n": [31245, 870], "est": [-1.234, 2.5], "q": [1e-4, 0.2]})
    table = LatexTable(
        columns=(
            Column("Region", "name", "text"),
            Column("n", "n", "int"),
            Column("Estimate", "est", digits=2, group="Model"),
            Column("q", "q", "p", stars="q", group="Model"),
        ),
        caption="A 50% test",
        label="tab:x",
    )
    tex = render(df, table)
    assert "31245 &" in tex and "31,245" not in tex
    assert "S[table-format=5.0]" in tex and "S[table-format=-1.2]" in tex
    assert r"\cmidrule(lr){3-4}" in tex
    assert r"kidney\_left" in tex and r"A 50\% test" in tex
    assert r"\num{1.0e-04}\textsuperscript{***}" in tex
    assert "-1.23" in tex and np.isfinite(df["est"]).all()


# ----------------------------------------------------------------------------- command line


def test_cli_stats_and_compare(run_dir: Path) -> None:
    res = runner.invoke(app, ["stats", str(run_dir), "--phenotype", "diabetes", "--no-figures", "--method", "ablation"])
    assert res.exit_code == 0, res.output
    assert "phenotype models: 1 phenotype(s), significant at FDR 0.05: diabetes" in res.stdout
    assert "liver/diabetes" in res.stdout
    assert "S00" not in res.stdout
    out = run_dir / "cmp"
    res = runner.invoke(
        app, ["compare", str(run_dir), "--cohort", "diabetes == 1", "--reference", "diabetes == 0", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "matched on age, sex" in res.stdout and "liver (ablation)" in res.stdout
    assert "S00" not in res.stdout
    assert (out / "comparison_tests.tex").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "{run}", "--phenotype", "diabets"], "error: phenotype 'diabets' is not a column"),
        (["stats", "{run}/nope"], "error: {run}/nope: run folder not found"),
        (["compare", "{run}", "--cohort", "diabetes == 1 or x", "--reference", "diabetes == 0"], "only 'and'"),
        (["compare", "{run}", "--cohort", "diabetes == 5", "--reference", "diabetes == 0"], "matches no scans"),
    ],
)
def test_cli_errors_are_one_line(run_dir: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, [a.format(run=run_dir) for a in args])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message.format(run=run_dir) in lines[0]


def test_cli_rejects_unknown_choice(run_dir: Path) -> None:
    res = runner.invoke(app, ["stats", str(run_dir), "--correction", "cubic"])
    assert res.exit_code == 2
