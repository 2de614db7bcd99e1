"""reports/cpu_kinds.py: the AVX2 emulation's environment, the side-by-side ratio and the demo's stage minutes."""

from __future__ import annotations

import json

import pytest
from report_scripts import load_report_script

ck = load_report_script("cpu_kinds")


def test_env_for_sets_the_avx2_kernels_and_drops_inherited_ones(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    native, avx2 = ck.env_for("native"), ck.env_for("avx2")
    assert "ATEN_CPU_CAPABILITY" not in native and "ONEDNN_MAX_CPU_ISA" not in native
    assert avx2["ATEN_CPU_CAPABILITY"] == "avx2" and avx2["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_ratio_is_the_median_of_each_kind():
    rows = [
        {"kind": "native", "seconds_per_epoch": 2.0},
        {"kind": "native", "seconds_per_epoch": 4.0},
        {"kind": "avx2", "seconds_per_epoch": 4.5},
        {"kind": "avx2", "seconds_per_epoch": 4.5},
        {"kind": "avx2", "seconds_per_epoch": None},
    ]
    assert ck.ratio(rows) == pytest.approx(1.5)
    assert ck.ratio([r for r in rows if r["kind"] == "native"]) is None


def _record(path, started, finished):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": started, "finished": finished}), encoding="utf-8")


def test_demo_minutes_reads_each_stage_and_totals_only_a_finished_demo(tmp_path):
    t = "2026-12-02T10:{:02d}:00+00:00"
    for i, rel in enumerate(ck.STAGE_RECORDS.values()):
        _record(tmp_path / rel, t.format(2 * i), t.format(2 * i + 1))
    minutes = ck.demo_minutes(tmp_path)
    assert minutes["train"] == pytest.approx(1.0)
    assert minutes["total"] == pytest.approx(len(ck.STAGE_RECORDS))
    (tmp_path / ck.STAGE_RECORDS["report"]).unlink()
    unfinished = ck.demo_minutes(tmp_path)
    assert unfinished["report"] is None and unfinished["total"] is None


def test_summary_judges_the_goal_and_says_what_the_emulation_is_not():
    over = ck.summary(1.8, {"minutes": {"total": 12.3}}, 8.7)
    assert "1.80x" in over and "12.3 min" in over and "over the 10-minute goal" in over and "8.7 min" in over
    within = ck.summary(None, {"minutes": {"total": 9.9}}, None)
    assert "within the 10-minute goal" in within and "instruction set only" in within


def test_seconds_per_epoch_needs_a_finished_run(tmp_path):
    (tmp_path / "training_log.csv").write_text("fold,epoch,seconds\n0,0,3.0\n0,1,5.0\n1,0,4.0\n", encoding="utf-8")
    assert ck.seconds_per_epoch(tmp_path) is None
    (tmp_path / "metrics.json").write_text("{}", encoding="utf-8")
    assert ck.seconds_per_epoch(tmp_path) == pytest.approx(4.0)


def test_tables_show_missing_numbers_as_a_dash():
    rows = [
        {"kind": "avx2", "repeat": 0, "capability": "AVX2", "seconds_per_epoch": None, "load_start": [0.5, 0.4, 0.3]}
    ]
    out = ck.tables(rows, None, {"train": 4.9})
    assert out["probe"]["rows"][0][3] == "–"
    train = next(r for r in out["demo"]["rows"] if r[0] == "train")
    assert train == ["train", "4.9", "–"]


def test_main_writes_the_probe_and_the_demo_minutes_without_running_torch(tmp_path, monkeypatch):
    # the demo's stage minutes stay a dict beside the command's wall time (a run once crashed here)
    monkeypatch.setattr(ck, "capability", lambda kind: {"native": "AVX512", "avx2": "AVX2"}[kind])
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text("{}", encoding="utf-8")

    def fake_bodyage(args, kind):
        if args[0] == "train":
            run = tmp_path / args[args.index("--run") + 1]
            run.mkdir(parents=True)
            seconds = 3.0 if kind == "avx2" else 2.0
            (run / "training_log.csv").write_text(f"fold,epoch,seconds\n0,0,{seconds}\n", encoding="utf-8")
            (run / "metrics.json").write_text("{}", encoding="utf-8")
        else:  # the demo
            demo = tmp_path / args[1]
            t = "2026-12-02T10:{:02d}:00+00:00"
            for i, rel in enumerate(ck.STAGE_RECORDS.values()):
                _record(demo / rel, t.format(3 * i), t.format(3 * i + 3))
            (demo / "run" / "metrics.json").write_text(json.dumps({"overall": {"mae": 6.5}}), encoding="utf-8")
        return {"minutes": 1.0, "load_start": [0.1], "load_end": [0.2]}

    monkeypatch.setattr(ck, "run_bodyage", fake_bodyage)
    out = tmp_path / "cpu_kinds.json"
    ck.main(["--work", str(tmp_path), "--study", str(study), "--repeats", "1", "--demo", "--out", str(out)])
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["ratio_avx2_over_native"] == pytest.approx(1.5)
    assert res["demo_avx2"]["minutes"]["total"] == pytest.approx(15.0) and res["demo_avx2"]["mae"] == 6.5
    assert "15.0 min with AVX2 kernels (over the 10-minute goal)" in res["summary"]
    assert str(tmp_path) not in json.dumps(res)
