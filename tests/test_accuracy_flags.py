"""A model that learned nothing says so, and no output reports the accuracy of bias-corrected predictions.

The corrected predictions use the true age, so their MAE is small even for a model that
predicts one constant per fold (issue 15, item 4: such a model was summarised as "MAE
10.24 years (bias-corrected 0.11)"). Predictions tables are built directly (no training).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import RunFrames, make_tables, write_run
from typer.testing import CliRunner

from analysis.agegap import age_accuracy, correct_gap, gap_note, model_signal
from analysis.report import write_report
from analysis.run import RunTables
from analysis.stats import run_stats
from analysis.tables import accuracy_table
from bodyage.accuracy import (
    MAX_MAE_RATIO,
    baseline_predictions,
    informative,
    pearson_ci,
    prediction_metrics,
)
from bodyage.errors import InputError
from bodyage.train import TrainResult
from bodyage.train_figures import figure_titles
from cli.app import app

runner = CliRunner()


def _constant(frames: RunFrames) -> RunFrames:
    """The factory's run with a model that learned nothing: one constant prediction per fold.

    Each fold is predicted at the mean age of the other folds plus a fixed offset (what a
    network collapsed onto its bias does); ``age_gap_corrected`` as ``train`` makes it (a
    linear fit of the gap on age over the other folds' scans).
    """
    p = frames.predictions.copy()
    age = p["age"].to_numpy(float)
    fold = p["fold"].to_numpy()
    pred = baseline_predictions(age, fold) + 0.3
    gap = pred - age
    corrected = np.empty(len(p))
    for k in np.unique(fold):
        test = fold == k
        slope, intercept = np.polyfit(age[~test], gap[~test], 1)
        corrected[test] = gap[test] - (slope * age[test] + intercept)
    p["predicted_age"], p["age_gap"], p["age_gap_corrected"] = pred, gap, corrected
    return RunFrames(frames.cohort, p, frames.attributions, frames.regions)


@pytest.fixture(scope="module")
def good() -> RunFrames:
    return make_tables(120, seed=3)


@pytest.fixture(scope="module")
def flat(good: RunFrames) -> RunFrames:
    return _constant(good)


def _no_corrected_accuracy(keys: object) -> None:
    text = json.dumps(keys)
    assert "overall_corrected" not in text and "mae_corrected" not in text


# ----------------------------------------------------------------------------- the rule


def test_baseline_and_ci_by_hand() -> None:
    # fold 0 is predicted at the mean age of fold 1 (75), fold 1 at that of fold 0 (55)
    np.testing.assert_allclose(baseline_predictions([50, 60, 70, 80], [0, 0, 1, 1]), [75, 75, 55, 55])
    # one fold: the mean of all scans
    np.testing.assert_allclose(baseline_predictions([50, 60, 70], [0, 0, 0]), [60, 60, 60])
    # Fisher z: r 0.5, n 28 -> atanh(0.5) ± 1.959964 / 5
    low, high = pearson_ci(0.5, 28)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - 1.959964 / 5), abs=1e-6)
    assert high == pytest.approx(math.tanh(math.atanh(0.5) + 1.959964 / 5), abs=1e-6)
    assert all(math.isnan(v) for v in pearson_ci(0.5, 3))


def test_rule_thresholds() -> None:
    strong = {"overall": {"n": 100, "mae": 3.0, "pearson_r": 0.9}, "baseline_mae": 9.0}
    assert informative(strong)[0]
    # MAE at 0.96 × the baseline's: not clearly better (needs < 0.95×)
    edge = {**strong, "overall": {"n": 100, "mae": 9.0 * 0.96, "pearson_r": 0.9}}
    ok, reason = informative(edge)
    assert not ok and f"not < {MAX_MAE_RATIO:g}×" in reason
    # better MAE but r's CI includes 0 (a few scans)
    weak = {"overall": {"n": 10, "mae": 3.0, "pearson_r": 0.3}, "baseline_mae": 9.0}
    ok, reason = informative(weak)
    assert not ok and "not > 0" in reason
    # constant predictions: r undefined
    assert not informative({"overall": {"n": 50, "mae": 3.0, "pearson_r": float("nan")}, "baseline_mae": 9.0})[0]


def test_prediction_metrics_flags_a_constant_model(flat: RunFrames) -> None:
    m = prediction_metrics(flat.predictions)
    _no_corrected_accuracy(m)
    assert m["informative"] is False
    assert m["baseline_mae"] == pytest.approx(
        np.abs(baseline_predictions(flat.predictions["age"], flat.predictions["fold"]) - flat.predictions["age"]).mean()
    )
    assert m["mae_baseline_ratio"] > MAX_MAE_RATIO
    assert "mean-age baseline" in m["informative_reason"]
    # yet its bias-corrected gap is small: the number that must not be called accuracy
    assert flat.predictions["age_gap_corrected"].abs().mean() < 0.5 * m["overall"]["mae"]


def test_prediction_metrics_passes_an_informative_model(good: RunFrames) -> None:
    m = prediction_metrics(good.predictions)
    assert m["informative"] is True, m["informative_reason"]
    assert m["mae_baseline_ratio"] < MAX_MAE_RATIO and m["pearson_r_ci"][0] > 0
    assert set(m["folds"]) == {"0", "1", "2"}


def test_prediction_metrics_names_a_missing_column(good: RunFrames) -> None:
    with pytest.raises(InputError, match="predictions: missing column"):
        prediction_metrics(good.predictions.drop(columns="fold"))


# ----------------------------------------------------------------------------- train


def test_train_summary_warns_and_has_no_corrected_mae(
    flat: RunFrames, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = prediction_metrics(flat.predictions)

    def fake_train_run(*args: object, **kwargs: object) -> TrainResult:
        return TrainResult(tmp_path, metrics, len(flat.predictions), 0, 3, 0, 0.1)

    monkeypatch.setattr("bodyage.train.train_run", fake_train_run)
    res = runner.invoke(app, ["train", str(tmp_path / "study"), "--run", str(tmp_path / "run"), "--folds", "3"])
    assert res.exit_code == 0, res.output
    assert "WARNING: uninformative model" in res.output
    assert "mean-age baseline" in res.output
    assert "bias-corrected" not in res.output


def test_train_figure_titles(flat: RunFrames, good: RunFrames) -> None:
    left, right, title = figure_titles(flat.predictions, prediction_metrics(flat.predictions))
    assert "baseline" in left and "MAE" not in right and "UNINFORMATIVE" in title
    _, right, title = figure_titles(good.predictions, prediction_metrics(good.predictions))
    assert "MAE" not in right and "UNINFORMATIVE" not in title


# ----------------------------------------------------------------------------- stats and report


def test_age_accuracy_has_the_baseline_and_no_corrected_mae(flat: RunFrames, good: RunFrames) -> None:
    acc = age_accuracy(correct_gap(RunTables.from_frames(flat.cohort, flat.predictions)))
    assert "mae_corrected" not in acc.columns and "baseline_mae" in acc.columns
    overall = acc.iloc[0]
    assert overall["baseline_mae"] == pytest.approx(prediction_metrics(flat.predictions)["baseline_mae"])
    assert not model_signal(acc)[0]
    assert gap_note(acc).startswith("Uninformative age model")
    _, spec = accuracy_table(acc, "train")
    assert spec.notes[0].startswith("Uninformative age model")
    good_acc = age_accuracy(correct_gap(RunTables.from_frames(good.cohort, good.predictions)))
    assert model_signal(good_acc)[0] and gap_note(good_acc) == ""
    _, spec = accuracy_table(good_acc, "train")
    assert not any("Uninformative" in n for n in spec.notes)
    assert any("mean age of the other folds" in n for n in spec.notes)


@pytest.mark.filterwarnings("ignore::bodyage.errors.BodyageWarning")  # mixed-model fit notes
def test_stats_and_report_say_the_gap_rests_on_an_uninformative_model(flat: RunFrames, tmp_path: Path) -> None:
    run = write_run(tmp_path, flat, attributions=False)
    # an older run's metrics.json still carries the corrected MAE: the report must not show it
    legacy = {
        "overall": {"n": len(flat.predictions), "mae": 10.24, "rmse": 11.0, "r2": -0.1, "pearson_r": -0.05},
        "overall_corrected": {"n": len(flat.predictions), "mae": 0.11, "rmse": 0.2, "r2": 0.99, "pearson_r": 0.99},
        "folds": {},
    }
    (run / "metrics.json").write_text(json.dumps(legacy))
    res = run_stats(run, phenotypes=["diabetes"], figures=False)
    summary = "\n".join(res.summary())
    assert "WARNING: Uninformative age model" in summary
    acc = pd.read_csv(res.stats_dir / "age_accuracy.csv")
    assert "mae_corrected" not in acc.columns
    for stem in ("age_accuracy", "phenotype_models"):
        assert "Uninformative age model" in (res.stats_dir / f"{stem}.tex").read_text()

    rep = write_report(run, tmp_path / "rep")
    text = rep.summary_md.read_text()
    assert "Uninformative age model" in text
    assert text.count("Uninformative age model") >= 2  # under the MAE and above the phenotype effects
    assert "after the bias correction" not in text
    assert "UNINFORMATIVE" in rep.report_tex.read_text()


@pytest.mark.filterwarnings("ignore::bodyage.errors.BodyageWarning")  # mixed-model fit notes
def test_stats_summary_of_an_informative_model_has_no_warning(good: RunFrames, tmp_path: Path) -> None:
    run = write_run(tmp_path, good, attributions=False)
    res = run_stats(run, phenotypes=["diabetes"], figures=False)
    summary = "\n".join(res.summary())
    assert "Uninformative" not in summary and "mean-age baseline" in summary
    assert "Uninformative" not in (res.stats_dir / "phenotype_models.tex").read_text()
