"""Loading a run folder: joined tables and one clear error per inconsistency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import RunFrames, make_tables, write_run

import bodyage.study as study
from analysis import run as run_mod
from analysis.run import RunTables, load_run
from bodyage.errors import RunError, StudyError


@pytest.fixture(scope="module")
def frames() -> RunFrames:
    return make_tables(30, seed=4, repeat_fraction=0.3)


def test_mirrored_constants_equal_bodyage_study() -> None:
    assert run_mod.DEFAULT_CHANNELS == study.DEFAULT_CHANNELS
    assert run_mod.REQUIRED_COLUMNS == study.REQUIRED_COLUMNS
    assert run_mod.RESERVED_COLUMNS == study.RESERVED_COLUMNS


@pytest.mark.parametrize(("key", "relative"), [("study", False), ("arguments", True)])
def test_load_run_joins_the_tables(tmp_path: Path, frames: RunFrames, key: str, relative: bool) -> None:
    run = write_run(tmp_path, frames, study_key=key, relative_study=relative)
    tables = load_run(run)
    assert tables.study_root is not None and (tables.study_root / "cohort.csv").is_file()
    scans = tables.scans
    assert len(scans) == len(frames.predictions)
    assert {"scan_id", "fold", "age", "predicted_age", "age_gap_corrected", "sex", "site", "diabetes"} <= set(scans)
    assert not {"water", "fat", "mask"} & set(scans)
    assert tables.phenotype_columns() == ["diabetes", "bmi", "activity", "smoking"]
    assert tables.methods == ("ablation", "gradcam")
    assert tables.regions == frames.regions  # label order from labels.json
    assert tables.has_repeats


def test_load_run_without_attributions(tmp_path: Path, frames: RunFrames) -> None:
    run = write_run(tmp_path, frames, attributions=False)
    tables = load_run(run)
    assert tables.attributions is None
    assert tables.methods == ()


def _broken(tmp_path: Path, frames: RunFrames, **changes: object) -> Path:
    return write_run(
        tmp_path,
        RunFrames(
            cohort=changes.get("cohort", frames.cohort),  # type: ignore[arg-type]
            predictions=changes.get("predictions", frames.predictions),  # type: ignore[arg-type]
            attributions=changes.get("attributions", frames.attributions),  # type: ignore[arg-type]
            regions=frames.regions,
        ),
    )


def test_missing_run_folder(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="nope: run folder not found"):
        load_run(tmp_path / "nope")


def test_missing_run_json(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"run.json: not found \(is .* a run folder\?\)"):
        load_run(tmp_path)


def test_run_json_without_study(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"command": "train"}))
    with pytest.raises(RunError, match=r"records no study path \(key 'study'\)"):
        load_run(tmp_path)


def test_study_not_found(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"study": str(tmp_path / "gone")}))
    with pytest.raises(StudyError, match=r"gone: study folder of run .* not found or has no cohort.csv"):
        load_run(tmp_path)


def test_missing_predictions(tmp_path: Path, frames: RunFrames) -> None:
    run = write_run(tmp_path, frames)
    (run / "predictions.parquet").unlink()
    with pytest.raises(RunError, match=r"predictions.parquet: not found \(run `bodyage train` first\)"):
        load_run(run)


def test_attributions_for_scans_missing_from_predictions(tmp_path: Path, frames: RunFrames) -> None:
    preds = frames.predictions[frames.predictions["subject_id"] != "S00002"]
    run = _broken(tmp_path, frames, predictions=preds)
    with pytest.raises(
        RunError, match=r"attributions for \d scan\(s\) missing from .*predictions.parquet, e.g. S00002_0"
    ):
        load_run(run)


def test_predictions_for_scans_missing_from_cohort(tmp_path: Path, frames: RunFrames) -> None:
    cohort = frames.cohort[frames.cohort["subject_id"] != "S00005"]
    run = _broken(tmp_path, frames, cohort=cohort)
    with pytest.raises(RunError, match=r"predictions.parquet: \d scan\(s\) are not in .*cohort.csv, e.g. S00005_0"):
        load_run(run)


def test_ages_must_agree(tmp_path: Path, frames: RunFrames) -> None:
    preds = frames.predictions.copy()
    preds.loc[0, "age"] += 3.0
    run = _broken(tmp_path, frames, predictions=preds)
    with pytest.raises(RunError, match=r"column 'age' disagrees with .*cohort.csv for 1 scan"):
        load_run(run)


def test_folds_must_agree(tmp_path: Path, frames: RunFrames) -> None:
    attr = frames.attributions.copy()
    attr.loc[0, "fold"] = attr.loc[0, "fold"] + 1
    run = _broken(tmp_path, frames, attributions=attr)
    with pytest.raises(RunError, match=r"column 'fold' disagrees with .*every attribution must come from the model"):
        load_run(run)


def test_missing_columns(tmp_path: Path, frames: RunFrames) -> None:
    run = _broken(tmp_path, frames, attributions=frames.attributions.drop(columns=["share"]))
    with pytest.raises(RunError, match=r"attributions.parquet: missing column\(s\) share"):
        load_run(run)
    with pytest.raises(StudyError, match=r"missing column\(s\) site"):
        RunTables.from_frames(frames.cohort.drop(columns=["site"]), frames.predictions)


def test_duplicate_attribution_rows(frames: RunFrames) -> None:
    attr = frames.attributions
    doubled = pd.concat([attr, attr.iloc[[0]]], ignore_index=True)
    with pytest.raises(RunError, match=r"1 duplicate row\(s\) \(scan, method, region\)"):
        RunTables.from_frames(frames.cohort, frames.predictions, doubled)


def test_missing_regions_stay_missing(frames: RunFrames) -> None:
    from analysis.regionmodels import importance_matrix

    tables = RunTables.from_frames(frames.cohort, frames.predictions, frames.attributions, region_order=frames.regions)
    matrix = importance_matrix(tables, "ablation", "mass")
    women = (tables.scans["sex"] == "F").to_numpy()
    assert np.isnan(matrix["prostate"].to_numpy()[women]).all()
    assert np.isfinite(matrix["liver"].to_numpy()).all()
