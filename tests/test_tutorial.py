"""The tutorial (docs/getting-started/tutorial.md) runs as written.

The commands are read from the page itself. The CI-sized test runs them with options that
shrink the work (fewer subjects, 2 folds of 1 epoch, a tiny model); the full test runs them
exactly as written and is skipped unless ``BODYAGE_RUN_TUTORIAL=1`` (minutes of CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from report_scripts import load_report_script
from typer.testing import CliRunner

from cli.app import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

tutorial_run = load_report_script("tutorial_run")

#: options appended to each step in the CI-sized run (the page's commands stay as written)
SHRINK: dict[str, list[str]] = {
    "simulate": ["--subjects", "24", "--workers", "1"],
    "train": [
        *["--folds", "2", "--epochs", "1", "--grid", "16,12,32", "--batch-size", "4"],
        *["--model-options", '{"widths": [4, 8, 8]}'],
    ],
    "attribute": ["--method", "gradcam"],
    "stats": [],
    "report": [],
}


def test_the_tutorial_runs_the_pipeline_in_order() -> None:
    commands = tutorial_run.tutorial_commands()
    assert [c[1] for c in commands] == ["simulate", "train", "attribute", "stats", "report"]
    assert commands[0][2:] == ["tutorial/study", "--scenario", "quick"]


def _run_tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shrink: bool) -> Path:
    monkeypatch.chdir(tmp_path)
    for argv in tutorial_run.tutorial_commands():
        extra = SHRINK[argv[1]] if shrink else []
        res = runner.invoke(app, ["--quiet", *argv[1:], *extra])
        assert res.exit_code == 0, f"{' '.join(argv)}: {res.output}"
    return tmp_path / "tutorial"


def _check_outputs(root: Path) -> None:
    assert (root / "study" / "truth.json").is_file()
    preds = pd.read_parquet(root / "run" / "predictions.parquet")
    assert {"fold", "predicted_age", "age_gap_corrected"} <= set(preds.columns)
    folds = sorted(int(p.stem.removeprefix("fold")) for p in (root / "run" / "models").glob("fold?.pt"))
    assert sorted(set(preds["fold"])) == folds
    assert len(pd.read_parquet(root / "run" / "attributions.parquet")) > 0
    assert len(pd.read_csv(root / "run" / "stats" / "phenotype_models.csv")) > 0
    tex = (root / "report" / "report.tex").read_text()
    assert "\\begin{document}" in tex and "\\end{document}" in tex
    for table in (root / "run" / "stats").glob("region_*.tex"):
        assert "gluteus\\_maximus" not in table.read_text(), f"{table.name}: raw region names"


def test_tutorial_ci_sized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_outputs(_run_tutorial(tmp_path, monkeypatch, shrink=True))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("BODYAGE_RUN_TUTORIAL") != "1",
    reason="the full tutorial takes minutes of CPU; run it with BODYAGE_RUN_TUTORIAL=1",
)
def test_tutorial_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_outputs(_run_tutorial(tmp_path, monkeypatch, shrink=False))
