"""`bodyage demo` shrunken: every stage through the CLI, every output file exists and parses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_scenario
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def test_shrunken_demo_end_to_end(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(tiny_scenario()))
    out = tmp_path / "demo"
    args = ["--quiet", "demo", str(out), "--scenario", str(scenario), "--folds", "2", "--epochs", "1"]
    args += ["--grid", "16,12,32", "--pdf" if shutil.which("pdflatex") else "--no-pdf"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "demo finished in" in res.output and "out-of-fold MAE" in res.output
    assert "gradcam: precision@" in res.output and "ablation: precision@" in res.output
    assert "diabetes (planted)" in res.output and "smoking (null)" in res.output

    study, run, report = out / "study", out / "run", out / "report"
    cohort = pd.read_csv(study / "cohort.csv")
    for table in ("predictions", "attributions", "slice_profiles"):
        df = pd.read_parquet(run / f"{table}.parquet")
        assert len(df) > 0, table
    preds = pd.read_parquet(run / "predictions.parquet")
    assert len(preds) == len(cohort)
    attributions = pd.read_parquet(run / "attributions.parquet")
    assert set(attributions["method"]) == {"gradcam", "ablation"}
    assert (
        attributions.groupby("method")[["subject_id", "visit"]]
        .apply(lambda g: len(g.drop_duplicates()))
        .eq(len(cohort))
        .all()
    )
    nulls = pd.read_parquet(run / "attributions_null.parquet")  # the demo attributes under its null models
    assert set(nulls["null"]) == {"random_weights", "permuted_labels"} and "null models:" in res.output
    for name in ("metrics.json", "run.json", "recovery.json", "attribution_recovery.json"):
        assert isinstance(json.loads((run / name).read_text()), dict), name
    recovery = json.loads((run / "recovery.json").read_text())
    assert {"mae", "oracle_mae", "mae_ratio", "methods", "phenotypes"} <= set(recovery)
    assert {"gradcam", "ablation"} <= set(recovery["methods"])
    assert {"diabetes", "smoking"} <= set(recovery["phenotypes"])
    for stem in ("phenotype_models", "region_models", "age_accuracy", "region_joint", "region_gap_correlations"):
        assert len(pd.read_csv(run / "stats" / f"{stem}.csv")) > 0, stem
    for stem in ("phenotype_models", "age_accuracy", "region_models_ablation", "region_models_gradcam"):
        assert "\\begin{tabular" in (run / "stats" / f"{stem}.tex").read_text(), stem
    figures = list((run / "figures").glob("*.png"))
    assert len(figures) >= 5 and all(f.stat().st_size > 1000 for f in figures)
    maps = run / "attribute" / "maps"
    assert len(list(maps.glob("*_gradcam.nii.gz"))) == 2 and len(list(maps.glob("*.png"))) == 2
    assert f"maps of two scans (NIfTI for ITK-SNAP/3D Slicer, PNG): {maps}" in res.output
    tex = (report / "report.tex").read_text()
    assert "\\begin{document}" in tex and "\\end{document}" in tex
    assert (report / "summary.md").read_text().strip()
    if shutil.which("pdflatex"):
        assert (report / "report.pdf").read_bytes()[:4] == b"%PDF"
    else:
        pytest.skip("pdflatex is not installed: the report was written but not compiled")
