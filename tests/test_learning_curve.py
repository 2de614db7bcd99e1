"""reports/learning_curve.py: rows from finished runs, the committed curve's contract (DESIGN §9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_scripts import load_report_script

ROOT = Path(__file__).resolve().parents[1]
#: the row keys DESIGN §9 names for docs/results/learning_curve.json
CONTRACT = {
    "n_subjects",
    "seed",
    "mae",
    "oracle_mae",
    "mae_ratio",
    "yardstick_mae_model_grid",
    "yardstick_mae_native",
    "train_minutes",
    "peak_rss_gb",
}


lc = load_report_script("learning_curve")


def _fake_run(work: Path, n: int, seed: int, mae: float, oracle: float, minutes: list[float]) -> None:
    study, run = work / f"study_{n}", work / f"run_{n}_s{seed}"
    study.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True)
    (study / lc.YARDSTICK).write_text(json.dumps({"factor": 2, "native": 2.0, "model_grid": 2.5}))
    (run / "metrics.json").write_text(
        json.dumps({"overall": {"mae": mae, "n": 10}, "oracle_mae": oracle, "baseline_mae": 9.0, "informative": True})
    )
    record = {"arguments": {"grid": [32, 24, 64], "epochs": 40}, "n_scans": 12, "bodyage_version": "0.1.0"}
    (run / "run.json").write_text(json.dumps(record))
    inv = [
        {"minutes": m, "peak_rss_gb": 1.0 + i, "threads": 1, "load_before": [1, 1, 1], "load_after": [1, 1, 1]}
        for i, m in enumerate(minutes)
    ]
    (run / lc.TIMING).write_text(
        json.dumps({"command": f"python reports/learning_curve.py WORK --n {n}", "invocations": inv})
    )


def test_collect_writes_contract_rows_table_and_figure(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_run(work, 300, 0, mae=3.0, oracle=2.0, minutes=[4.0, 2.0])  # resumed once
    _fake_run(work, 300, 1, mae=3.4, oracle=2.0, minutes=[5.0])
    _fake_run(work, 1000, 0, mae=2.2, oracle=2.0, minutes=[20.0])
    (work / "run_3000_s0").mkdir()  # unfinished: no row

    assert lc.main([str(work), "--collect", "--out", str(out)]) == 0

    rows = json.loads((out / "learning_curve.json").read_text())
    assert [(r["n_subjects"], r["seed"]) for r in rows] == [(300, 0), (300, 1), (1000, 0)]
    assert set(rows[0]) >= CONTRACT
    first = rows[0]
    assert first["mae_ratio"] == pytest.approx(1.5)
    assert first["train_minutes"] == pytest.approx(6.0)  # summed over invocations
    assert first["peak_rss_gb"] == pytest.approx(2.0)  # the largest
    assert first["yardstick_mae_model_grid"] == 2.5 and first["yardstick_mae_native"] == 2.0
    table = json.loads((out / "learning_curve_table.json").read_text())
    assert len(table["table"]["rows"]) == 3
    assert "N = 300: MAE 3.00–3.40 years over 2 seeds" in table["summary"]
    assert "At the largest N measured (1000) the ratio meets the goal" in table["summary"]  # 2.2 / 2.0 = 1.10
    assert (out / "figures" / "learning_curve.png").stat().st_size > 10_000


def test_collect_keeps_rows_of_other_machines(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_run(work, 300, 0, mae=3.0, oracle=2.0, minutes=[4.0])
    out.mkdir()
    other = dict.fromkeys(CONTRACT, 1.0) | {"n_subjects": 3000, "seed": 0, "mae": 2.5, "oracle_mae": 2.0}
    other |= {"mae_ratio": 1.25, "threads": [8], "machine": {"cpu_model": "a GPU host"}}
    (out / "learning_curve.json").write_text(json.dumps([other]))
    lc.main([str(work), "--collect", "--out", str(out)])
    rows = json.loads((out / "learning_curve.json").read_text())
    assert [(r["n_subjects"], r["seed"]) for r in rows] == [(300, 0), (3000, 0)]
    summary = json.loads((out / "learning_curve_table.json").read_text())["summary"]
    assert "(3000) the ratio does not meet the goal" in summary


def test_committed_curve_has_the_contract_keys() -> None:
    path = ROOT / "docs" / "results" / "learning_curve.json"
    rows = json.loads(path.read_text())
    assert rows, "the committed learning curve has no rows"
    for r in rows:
        assert set(r) >= CONTRACT, sorted(CONTRACT - set(r))
        assert r["mae_ratio"] == pytest.approx(r["mae"] / r["oracle_mae"])
        assert r["machine"]["cpu_model"] and r["bodyage_version"]
        assert "/" not in (r["command"] or "").replace("reports/learning_curve.py", "")  # no machine path


def test_training_dynamics_come_from_the_log(tmp_path: Path) -> None:
    # 2 folds x 20 epochs: validation falls 10 -> 5.25 with one BatchNorm jump to 30 at epoch 7 (fold 1)
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_run(work, 300, 0, mae=3.0, oracle=2.0, minutes=[4.0])
    lines = ["fold,epoch,train_loss_years,val_mae,lr,seconds"]
    for fold in (0, 1):
        for epoch in range(20):
            val = 30.0 if (fold, epoch) == (1, 7) else 10.0 - 0.25 * epoch
            lines.append(f"{fold},{epoch},{9.0 - 0.2 * epoch},{val},0.001,{2.0 + fold}")
    (work / "run_300_s0" / "training_log.csv").write_text("\n".join(lines) + "\n")

    got = lc.dynamics(work / "run_300_s0")
    assert got["final_train_loss"] == pytest.approx(9.0 - 0.2 * 19)
    assert got["final_inner_val_mae"] == pytest.approx(10.0 - 0.25 * 19)
    assert got["inner_val_mae_max"] == pytest.approx(30.0)
    # fold means: epochs 5-14 average 10 - 0.25 * 9.5 plus the jump's (30 - 8.25) / 2 / 10; epochs 15-19: 10 - 0.25 * 17
    assert got["late_improvement"] == pytest.approx(0.25 * (17 - 9.5) + (30 - 8.25) / 20)
    assert got["seconds_per_epoch"] == pytest.approx(2.5)
    assert got["longest_epoch_seconds"] == pytest.approx(3.0)
    assert lc.dynamics(tmp_path) == {}  # no log: no keys

    lc.main([str(work), "--collect", "--out", str(out)])
    row = json.loads((out / "learning_curve.json").read_text())[0]
    assert row["final_inner_val_mae"] == pytest.approx(5.25)
    summary = json.loads((out / "learning_curve_table.json").read_text())["summary"]
    assert "training loss is within +0.05 to +0.05 years of the inner-validation MAE" in summary
    assert "jumps to 30.0 years" in summary


def _row(n: int, mae: float, **extra: object) -> dict[str, object]:
    base = {"n_subjects": n, "seed": 0, "mae": mae, "grid": [32, 24, 64]}
    base |= {"yardstick_mae_native": 4.5, "yardstick_mae_model_grid": 5.2}
    return base | extra


def test_recipe_names_a_plateau_underfitting_and_the_grid() -> None:
    rows = [
        _row(1000, 5.03),
        _row(3000, 4.95, final_train_loss=4.85, final_inner_val_mae=4.89),
    ]
    text = lc.recipe(rows)
    assert "fell by 0.08 years (5.03 → 4.95), less than 0.25" in text
    assert "final training loss (4.85 years) is within 0.5 of the inner-validation MAE (4.89)" in text
    assert "underfits" in text
    assert "better at the simulated grid (4.50) than the CNN does at its 32×24×64 model grid (4.95" in text


def test_recipe_says_when_data_still_help_and_the_grid_is_not_indicated() -> None:
    rows = [
        _row(300, 6.4, yardstick_mae_native=5.6),
        _row(1000, 4.4, final_train_loss=2.0, final_inner_val_mae=4.5),
    ]
    text = lc.recipe(rows)
    assert "fell by 2.00 years" in text and "still data-limited" in text
    assert "overfits" in text
    assert "a finer grid is not indicated" in text
    assert lc.recipe(rows[:1]).startswith("Too few study sizes")


def test_collect_keeps_a_rows_numbers_and_adds_its_training_dynamics(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_run(work, 300, 0, mae=3.0, oracle=2.0, minutes=[4.0])
    log = ["fold,epoch,train_loss_years,val_mae,lr,seconds"] + [f"0,{e},5.0,6.0,0.001,1.0" for e in range(20)]
    (work / "run_300_s0" / "training_log.csv").write_text("\n".join(log) + "\n")
    out.mkdir()
    old = dict.fromkeys(CONTRACT, 1.0) | {"n_subjects": 300, "seed": 0, "mae": 3.3, "oracle_mae": 2.0}
    (out / "learning_curve.json").write_text(json.dumps([old | {"mae_ratio": 1.65}]))
    lc.main([str(work), "--collect", "--out", str(out)])
    (got,) = json.loads((out / "learning_curve.json").read_text())
    assert got["mae"] == 3.3  # the committed measurement, not the run folder's 3.0
    assert got["final_train_loss"] == 5.0 and got["final_inner_val_mae"] == 6.0


def test_summary_names_a_paused_run_and_its_minutes_without_the_pause() -> None:
    row = {"n_subjects": 1000, "seed": 1, "mae": 5.0, "mae_ratio": 1.4, "yardstick_mae_model_grid": None}
    paused = row | {"train_minutes": 89.3, "seconds_per_epoch": 6.0, "longest_epoch_seconds": 3600.0}
    text = lc.summarise([paused])
    assert "N = 1000, seed 1 include a pause: one epoch took 60.0 min against a median of 6.0 s" in text
    assert "without it, about 29.4 min" in text
    steady = row | {"train_minutes": 30.0, "seconds_per_epoch": 6.0, "longest_epoch_seconds": 90.0}
    assert "pause" not in lc.summarise([steady])
