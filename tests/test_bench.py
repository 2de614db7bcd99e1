"""`bodyage bench`: the JSON's shape (not the speed), the table, the goal bookkeeping."""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()

COMPARISONS = {
    "region_aggregation_vs_naive",
    "region_aggregation_vs_totalsegmentator",
    "region_aggregation_vs_plain_sum",
    "gradcam_vs_grad_cam",
    "gradcam_vs_forward",
    "loader_cached_vs_nibabel",
    "train_step_loader_vs_memory",
    "stats_region_models_vs_statsmodels",
}
GOALS = {
    "region_aggregation_vs_naive",
    "region_aggregation_vs_plain_sum",
    "gradcam_vs_grad_cam",
    "train_step_loader_vs_memory",
    "stats_region_models_40k",
}
METHODS = {"gradcam", "integrated_gradients", "ablation", "shapley"}


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("pytorch_grad_cam", reason="the bench compares against the grad-cam package")
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("bench"))  # the synthetic scans go here
    try:
        res = runner.invoke(app, ["bench", "--quick", "--json", "--device", "cpu"])
    finally:
        tempfile.tempdir = old
    assert res.exit_code == 0, res.output
    report: dict[str, Any] = json.loads(res.stdout)
    return report


@pytest.mark.slow
def test_quick_json_schema(quick_report: dict[str, Any]) -> None:
    r = quick_report
    assert set(r) == {
        "schema",
        "quick",
        "machine",
        "sizes",
        "comparisons",
        "goals",
        "stages",
        "peak_memory",
        "stage_seconds",
        "projection",
        "seconds",
    }
    assert r["schema"] == 1 and r["quick"] is True
    assert r["machine"]["device"] == "cpu"
    assert {c["name"] for c in r["comparisons"]} == COMPARISONS
    for c in r["comparisons"]:
        for key in ("ours_s", "reference_s", "ratio"):
            assert _positive(c[key]), (c["name"], key, c[key])
        assert c["ratio_kind"] in ("speedup", "cost")
        expected = c["reference_s"] / c["ours_s"] if c["ratio_kind"] == "speedup" else c["ours_s"] / c["reference_s"]
        assert c["ratio"] == pytest.approx(expected)
        assert (c["goal"] is None) == (c["met"] is None)
        assert (c["reason"] is not None) == (c["met"] is False)
        assert c["ours"] and c["reference"]
    assert {g["name"] for g in r["goals"]} == GOALS
    for g in r["goals"]:
        assert isinstance(g["met"], bool)
        assert _positive(g["value"])
        assert (g["reason"] is None) == g["met"]


@pytest.mark.slow
def test_quick_stages_memory_projection(quick_report: dict[str, Any]) -> None:
    r = quick_report
    stages = {"region_aggregation", "gradcam", "loader", "export_reader", "stats"}
    assert set(r["peak_memory"]) == set(r["stage_seconds"]) == stages
    assert all(_positive(s) for s in r["stage_seconds"].values())
    for stage in r["peak_memory"].values():
        assert _positive(stage["rss_mb"])
        assert stage["gpu_mb"] is None  # CPU run
    methods = r["stages"]["gradcam"]["methods"]
    assert set(methods) == METHODS
    for m in methods.values():
        assert _positive(m["seconds_per_scan"]) and _positive(m["forward_passes"])
    stats = r["stages"]["stats"]
    assert len(stats["subjects"]) == len(stats["seconds"]) >= 2
    assert math.isfinite(stats["exponent"]) and _positive(stats["target_seconds"])
    export = r["stages"]["export_reader"]
    assert export["rows"] == 2_000 and export["rows_out"] > 0 and _positive(export["read_s"])
    p = r["projection"]
    assert p["scans"] == 40_000
    hours = p["hours"]
    for key in ("preprocess", "train", "stats"):
        assert _positive(hours[key]), key
    assert set(hours["attribute"]) == METHODS and all(_positive(h) for h in hours["attribute"].values())
    assert _positive(p["total_hours_default_methods"])
    assert p["assumptions"] and p["assumptions"][0].startswith("--quick")


@pytest.mark.slow
def test_table_names_every_comparison_and_miss(quick_report: dict[str, Any], monkeypatch) -> None:
    import bodyage.bench

    monkeypatch.setattr(bodyage.bench, "run_bench", lambda **_: quick_report)
    res = runner.invoke(app, ["bench", "--quick"])
    assert res.exit_code == 0, res.output
    for name in COMPARISONS:
        assert name in res.output
    assert "projection" in res.output and "peak RSS" in res.output


def test_unknown_device_is_one_line_error() -> None:
    res = runner.invoke(app, ["bench", "--quick", "--device", "tpu"])
    assert res.exit_code == 1
    assert "--device must be auto, cpu or cuda" in res.stderr


def test_goal_bookkeeping() -> None:
    from bodyage.bench_timing import comparison

    c = comparison("x", "s", "ours", "ref", 1.0, 60.0, "speedup", (">=", 50.0), "why")
    assert c.ratio == 60.0 and c.met is True and c.reason is None
    c = comparison("x", "s", "ours", "ref", 6.0, 1.0, "cost", ("<=", 4.0), "why")
    assert c.ratio == 6.0 and c.met is False and c.reason == "measured 6, goal <= 4: why"
    c = comparison("x", "s", "ours", "ref", 2.0, 1.0, "cost")
    assert c.goal is None and c.met is None and c.reason is None


def test_projection_arithmetic() -> None:
    from bodyage.bench import project

    methods = {"gradcam": {"seconds_per_scan": 0.36, "default": True}, "shapley": {"seconds_per_scan": 36.0}}
    p = project(
        100,
        preprocess_s_per_scan=36.0,
        train_step_s=1.0,
        batch=10,
        forward_s_per_scan=0.0,
        methods=methods,
        stats_s=3600.0,
        folds=2,
        epochs=3,
        val_fraction=0.0,
    )
    # per fold: 3 epochs × 5 steps × 1 s; 2 folds -> 30 s
    assert p["hours"]["train"] == pytest.approx(30 / 3600)
    assert p["hours"]["preprocess"] == pytest.approx(1.0)
    assert p["hours"]["attribute"] == {"gradcam": pytest.approx(0.01), "shapley": pytest.approx(1.0)}
    assert p["total_hours_default_methods"] == pytest.approx(1.0 + 30 / 3600 + 0.01 + 1.0)


def test_stats_scaling_needs_two_sizes() -> None:
    from analysis.bench_scaling import bench_region_scaling

    with pytest.raises(ValueError, match="at least two distinct cohort sizes"):
        bench_region_scaling([1000, 1000])
