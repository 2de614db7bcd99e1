"""reports/dev_selection.py and reports/attribution_seeds.py: the choice rule, the step log, the goal per seed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from report_scripts import load_report_script

ROOT = Path(__file__).resolve().parents[1]


dev = load_report_script("dev_selection")
seeds = load_report_script("attribution_seeds")


def test_pick_precision_then_spearman_then_the_default() -> None:
    cands = [
        {"baseline": "mean", "precision_at_k": 0.6, "spearman": 0.9},
        {"baseline": "erase", "precision_at_k": 0.7, "spearman": 0.1},
        {"baseline": "shift", "precision_at_k": 0.7, "spearman": 0.1},
        {"baseline": "blur", "precision_at_k": 0.7, "spearman": float("nan")},
    ]
    # a tie on precision and Spearman keeps today's default; a NaN Spearman ranks last
    assert dev.pick(cands, {"baseline": "shift"})["baseline"] == "shift"
    assert dev.pick(cands, {"baseline": "blur"})["baseline"] == "erase"
    cands[1]["spearman"] = 0.2
    assert dev.pick(cands, {"baseline": "shift"})["baseline"] == "erase"


def test_earlier_steps_keeps_named_steps_without_machine_paths(tmp_path: Path) -> None:
    log = tmp_path / "steps.jsonl"
    rec = {"wall_min": 2.5, "load_start": [3.0, 2.0, 1.0], "load_end": [4.0, 3.0, 2.0], "started": "t"}
    argv = ["/opt/venv/bin/bodyage", "train", "/scratch/x/study", "--run", "/scratch/x/run_s1"]
    lines = [{"name": "train_s1", "command": argv, **rec}, {"name": "other", "command": "bodyage qc", **rec}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    names = {"/scratch/x/study": "study", "/scratch/x/run_s1": "run_s1"}
    steps = dev.earlier_steps(log, names, {"train_s1"})
    assert steps == [
        {
            "step": "train_s1",
            "command": "bodyage train study --run run_s1",
            "minutes": 2.5,
            "load_start": [3.0, 2.0, 1.0],
            "load_end": [4.0, 3.0, 2.0],
            "started": "t",
        }
    ]
    dev.append_steps(log, steps)  # read back as it was written
    assert dev.earlier_steps(log, {}, {"train_s1"})[1] == steps[0]


def _fake_run(run: Path, precision: float, floor_max: float, permuted: float) -> None:
    run.mkdir(parents=True)
    nulls = {
        "random_weights": {"precision_at_k": 0.5, "ci_low": 0.375, "ci_high": 0.625, "n_copies": 3, "per_copy": []},
        "permuted_labels": {"precision_at_k": permuted, "ci_low": permuted, "ci_high": permuted, "n_copies": 1},
    }
    entry = {
        "importance_measure": "abs_mass",
        "k": 8,
        "precision_at_k": precision,
        "floors": {"volume": 0.25, "univariate_screen": floor_max},
        "floor_max": floor_max,
        "floor_max_by": "univariate_screen",
        "nulls": nulls,
        "clears_nulls": ["liver"],
        "beats_floors_by": precision - floor_max,
    }
    rec = {"methods": {"ablation": entry, "gradcam": {**entry, "precision_at_k": 1.0}}, "layer": "block1"}
    (run / "attribution_recovery.json").write_text(json.dumps(rec))
    (run / "metrics.json").write_text(json.dumps({"overall": {"mae": 4.0}, "mae_ratio": 1.2, "oracle_mae": 3.3}))
    (run / "run.json").write_text(json.dumps({"arguments": {"folds": 2, "epochs": 12, "seed": 1}}))
    (run / "attribute.json").write_text(json.dumps({"n_scans": 100, "null_scans": 100, "cost": {}}))
    (run / "sanity.json").write_text(json.dumps({"methods": {"ablation": {"passed": False}}}))


@pytest.mark.parametrize(
    ("precision", "floor_max", "permuted", "passed"),
    [(0.875, 0.625, 0.625, True), (0.875, 0.75, 0.5, False), (0.75, 0.5, 0.625, False)],
)
def test_seed_goal_takes_the_region_method_and_both_margins(
    tmp_path: Path, precision: float, floor_max: float, permuted: float, passed: bool
) -> None:
    run = tmp_path / "run"
    _fake_run(run, precision, floor_max, permuted)
    entry = seeds.seed_entry(1, run, tmp_path, n_boot=0)
    # GradCAM's 1.0 does not count: the goal is the region-level method's (report's rule)
    assert entry["best_region_method"] == "ablation"
    goals = entry["goals"]
    assert goals["region_method_beats_floors"]["value"] == pytest.approx(precision - floor_max)
    assert goals["region_method_beats_permuted_null"]["value"] == pytest.approx(precision - permuted)
    assert entry["passed"] is passed
    assert entry["sanity_passed_best"] is False
    assert entry["methods"]["ablation"]["precision_above_every_null_band"] is (precision > max(0.625, permuted))
    row = seeds.tables([entry], [])["goal"]["rows"][0]
    assert row[:2] == ["1", "2 × 12, 100 scans"] and row[-2] == ("yes" if passed else "no") and row[-1] == "failed"


def test_collect_only_refuses_a_run_without_nulls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    argv = ["attribution_seeds.py", "--study", str(tmp_path), "--run", f"0={run}", "--collect-only"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"seed 0: no attribution_recovery\.json with null models"):
        seeds.main()
    assert list(run.iterdir()) == []


def test_a_run_stopped_before_its_record_counts_its_scans_and_times_its_files(tmp_path: Path) -> None:
    import pandas as pd

    run = tmp_path / "run"
    _fake_run(run, 0.5, 0.75, 0.5)
    (run / "attribute.json").unlink()  # written last: a run stopped while drawing its figures has none
    scans = pd.DataFrame({"subject_id": ["a", "a", "b", "c"], "visit": [0, 0, 0, 1], "region": ["x", "y", "x", "x"]})
    scans.to_parquet(run / "attributions.parquet")
    scans.iloc[:2].to_parquet(run / "attributions_null.parquet")
    perm = run / "nulls" / "permuted_labels"
    perm.mkdir(parents=True)
    (perm / "metrics.json").write_text("{}")
    (perm / "attribute.json").write_text("{}")
    for i, f in enumerate(
        [run / "metrics.json", perm / "metrics.json", perm / "attribute.json", run / "attributions_null.parquet"]
    ):
        os.utime(f, (1000.0 + 600 * i, 1000.0 + 600 * i))
    os.utime(run / "sanity.json", (2830.0, 2830.0))
    entry = seeds.seed_entry(0, run, tmp_path, n_boot=0)
    assert (entry["settings"]["n_scans"], entry["settings"]["null_scans"]) == (3, 1)
    assert entry["attribute_record"] is False
    assert entry["attribute_stage_minutes_from_file_times"] == {
        "permuted_train": 10.0,
        "permuted_attribute": 10.0,
        "trained_and_random_copies": 10.0,
        "recovery_and_sanity": 0.5,
        "total": 30.5,
    }
    cost = seeds.tables([entry], [])["cost"]["rows"]
    assert cost[-1] == ["attribute_s0: total", "(file times of the run)", "30.5", "–"]


def test_load_samples_summarises_uptime_lines(tmp_path: Path) -> None:
    lines = tmp_path / "uptime.txt"
    lines.write_text(
        " 11:21:13 up  3:53,  0 user,  load average: 24.19, 23.85, 21.64\n"
        "not an uptime line\n"
        " 11:41:43 up  4:14,  0 user,  load average: 21.18, 22.10, 22.60\n"
    )
    assert seeds.load_samples(lines) == {"n": 2, "min": 21.2, "mean": 22.7, "max": 24.2}
    assert seeds.load_samples(None) is None


def test_dev_selection_refuses_an_uninformative_dev_model(tmp_path: Path) -> None:
    # choosing attribution defaults on a model that learned no age would select on noise
    study, run = tmp_path / "study", tmp_path / "run"
    study.mkdir()
    (study / "cohort.csv").write_text("scan_id\n")
    run.mkdir()
    metrics = {"overall": {"mae": 9.0}, "baseline_mae": 8.94, "informative": False}
    (run / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "dev_selection.json"
    argv = ["--work", str(tmp_path), "--study", str(study), "--run", str(run), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"dev model is uninformative \(out-of-fold MAE 9.00 y vs .* 8.94 y\)"):
        dev.main(argv)
    assert not out.exists()


def test_dev_selection_settings_only_adds_the_study_size_and_keeps_the_rest(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"n_subjects": 1000, "n_scans": 1135, "seed": 1}))
    out = tmp_path / "dev_selection.json"
    out.write_text(json.dumps({"settings": {"folds": 5, "scans": 120}, "k": 7}))
    dev.main(["--work", str(tmp_path), "--study", str(study), "--out", str(out), "--settings-only"])
    res = json.loads(out.read_text())
    assert res["k"] == 7
    assert res["settings"] == {
        "folds": 5,
        "scans": 120,
        "subjects": 1000,
        "study_scans": 1135,
        "scenario_seed": 1,
        "simulate_command": "bodyage simulate dev/study --scenario dev",
    }


def test_dev_selection_margins_say_how_far_the_choice_is_from_the_old_default_and_the_floor() -> None:
    res = {
        "k": 10,
        "floors": {"floor_max": 0.7},
        "gradcam": {
            "candidates": [
                {"layer": "block1", "measure": "abs_mass", "precision_at_k": 0.2},
                {"layer": "block4", "measure": "abs_density", "precision_at_k": 0.4},
            ],
            "chosen": {"layer": "block4", "measure": "abs_density"},
            "default_before": {"layer": "block1", "measure": "abs_mass"},
        },
        "ablation": {
            "candidates": [{"baseline": "shift", "precision_at_k": 0.6}, {"baseline": "blur", "precision_at_k": 0.7}],
            "chosen": {"baseline": "blur"},
            "default_before": {"baseline": "shift"},
        },
    }
    out = dev.with_margins(res)
    assert out["ablation"]["margin_regions"] == 1 and out["ablation"]["reaches_floor"] is True
    assert out["gradcam"]["margin_regions"] == 2 and out["gradcam"]["reaches_floor"] is False
    assert out["gradcam"]["best_precision"] == 0.4 and out["gradcam"]["default_precision"] == 0.2
