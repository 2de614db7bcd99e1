"""One consistent set of stats outputs per run; report and recovery use only tables made with their options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from factories import make_tables, write_run

from analysis import stats as stats_mod
from analysis.recovery import recovery
from analysis.report import write_report
from analysis.stats import run_stats
from analysis.stats_record import option_differences, read_stats_record, stats_stale

STATS_FIGURES = ("age_scatter", "phenotype_forest", "region_heatmap_ablation", "region_heatmap_gradcam")


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("record")
    run = write_run(root, make_tables(60, seed=3, noise_sd=1.5), relative_study=True)
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "learning_curves.png").write_bytes(b"not stats")  # train's figure: must stay
    run_stats(run, phenotypes=["diabetes", "bmi"])
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the run and its study (the run records the study relative to its parent)."""
    shutil.copytree(run.parent, tmp_path / "root")
    return tmp_path / "root" / "run"


def test_no_figures_rerun_removes_the_earlier_figures(stats_run: Path, tmp_path: Path) -> None:
    run = _copy(stats_run, tmp_path)
    for stem in STATS_FIGURES:
        assert (run / "figures" / f"{stem}.png").is_file()
    run_stats(run, phenotypes=["diabetes", "bmi"], correction="linear", figures=False)
    left = sorted(p.name for p in (run / "figures").iterdir())
    assert left == ["learning_curves.png"]
    record = read_stats_record(run)
    assert record is not None
    assert set(record["removed"]) >= {f"figures/{s}.pdf" for s in STATS_FIGURES}
    # the report then carries no figure of the earlier options
    rep = write_report(run, tmp_path / "rep")
    assert not any(f.stem in STATS_FIGURES for f in rep.figures)


def test_rerun_without_attributions_removes_region_tables(stats_run: Path, tmp_path: Path) -> None:
    run = _copy(stats_run, tmp_path)
    (run / "attributions.parquet").unlink()
    run_stats(run, phenotypes=["diabetes"], figures=False)
    names = {p.name for p in (run / "stats").iterdir()}
    assert not {n for n in names if n.startswith("region_")}
    assert "phenotype_models.tex" in names


def test_a_killed_run_leaves_no_record(stats_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(stats_run, tmp_path)
    assert not stats_stale(run)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod, "phenotype_models", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stats(run, phenotypes=["diabetes"], correction="linear")
    assert read_stats_record(run) is None
    assert stats_stale(run)  # half-replaced tables are not current
    rep = write_report(run, tmp_path / "rep")
    assert any("older tables" in m for m in rep.missing)


def test_option_differences() -> None:
    record = {"arguments": {"correction": "linear", "alpha": 0.05, "covariates": None}}
    assert option_differences(record, {"correction": "train", "alpha": 0.05}) == ["correction: 'linear' ('train')"]
    assert option_differences(record, {"covariates": None, "default_covariates": True}) == []
    assert option_differences(record, {"fdr_family": "method"}) == ["fdr_family: not recorded ('method')"]
    assert option_differences(None, {"alpha": 0.05}) == ["no stats record"]


def test_recovery_refits_tables_made_with_other_options(stats_run: Path, tmp_path: Path) -> None:
    run = _copy(stats_run, tmp_path)
    (run.parent / "study" / "truth.json").write_text(
        json.dumps(
            {
                "oracle_mae": 2.0,
                "region_information": {"liver": 0.1},
                "scenario": {"phenotypes": {"diabetes": {"type": "binary", "accelerates": {"liver": 5.0}}}},
                "phenotype_regions": {"diabetes": ["liver"]},
            }
        )
    )
    from analysis.recovery import read_truth
    from analysis.run import load_run

    truth = read_truth(run.parent / "study")
    assert truth is not None
    assert recovery(load_run(run), truth)["sources"]["phenotype_models"] == "stats"
    run_stats(run, phenotypes=["diabetes"], correction="linear", figures=False)
    rec = recovery(load_run(run), truth)
    assert rec["sources"] == {"phenotype_models": "computed", "region_models": "computed"}
    # and the report says which options its tables were made with
    tex = write_report(run, tmp_path / "rep").report_tex.read_text(encoding="utf-8")
    assert "statistics made with:" in tex and "correction linear" in tex
