"""Image-quality flags (bodyage.qc, `bodyage qc`) on the fake UK Biobank study."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner
from ukb_factories import (
    EXPECTED_FLAGS,
    KEPT,
    PARTICIPANTS,
    SCANS,
    SHAPE,
    SPACING,
    SWAP_STATION,
    TRUNCATE_AT,
    FakeUKB,
    _affine,
    body_phantom,
    fake_ukb,
    make_scan,
    save_ras,
    save_singular,
)

from bodyage._typing import QC_FLAGS
from bodyage.cohort import build_ukb_study
from bodyage.errors import InputError, StudyError
from bodyage.qc import (
    MEASURE_COLUMNS,
    QcSummary,
    QcThresholds,
    body_mask,
    excluded_scans,
    flag_scans,
    load_qc,
    measure_scan,
    parse_flags,
    run_qc,
)
from bodyage.volumes import load_volume, save_volume
from cli.app import app

EIDS = sorted({p.eid for p in PARTICIPANTS} | {eid for eid, _ in SCANS})
RAS = _affine(SHAPE, "RAS")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeUKB:
    return fake_ukb(tmp_path_factory.mktemp("ukb"))


@pytest.fixture(scope="module")
def qc_study(fake: FakeUKB, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, QcSummary]:
    """A study built with header checks only (the corrupt scan is kept) and its QC."""
    out = tmp_path_factory.mktemp("qc") / "study"
    build_ukb_study(fake.export, fake.images, out, read_data=False)
    return out, run_qc(out)


# ----------------------------------------------------------------------------- one scan


def test_clean_phantom_measures() -> None:
    water, fat = body_phantom(np.random.default_rng(0))
    m = measure_scan(water, fat, RAS)
    assert m["n_nonfinite"] == 0
    assert m["swap_region"] == "shell"
    assert m["shell_ff"] > 0.85 and m["shell_ff_min"] > 0.8  # the shell is subcutaneous fat
    assert m["swap_run_mm"] == 0.0 and np.isnan(m["swap_run_z_mm"])
    assert (m["body_extent_mm"], m["body_gap_mm"], m["fov_z_mm"]) == (400.0, 0.0, 400.0)
    assert m["water_p99"] == pytest.approx(0.8, abs=0.1) and m["fat_p99"] == pytest.approx(0.9, abs=0.1)
    body = body_mask(water, fat)
    assert body.sum() == pytest.approx((water + fat > 0.5).sum(), rel=0.02)


def test_station_swap_is_located() -> None:
    water, fat = make_scan("swap_station", np.random.default_rng(0))
    m = measure_scan(water, fat, RAS)
    lo, hi = SWAP_STATION
    assert m["swap_run_mm"] == (hi - lo) * SPACING
    # world z of the run's centre: voxel (lo + hi - 1) / 2 on a grid centred at 0
    assert m["swap_run_z_mm"] == pytest.approx(((lo + hi - 1) / 2 - (SHAPE[2] - 1) / 2) * SPACING)
    assert m["shell_ff"] > 0.5  # the whole-scan median does not see a one-station swap
    assert m["shell_ff_min"] < 0.2


def test_whole_swap_truncation_nan() -> None:
    rng = np.random.default_rng(0)
    m = measure_scan(*make_scan("swap_all", rng), RAS)
    assert m["swap_run_mm"] == 400.0 and m["shell_ff"] < 0.2
    t = measure_scan(*make_scan("truncated", rng), RAS)
    assert t["body_extent_mm"] == TRUNCATE_AT * SPACING
    n = measure_scan(*make_scan("nan", rng), RAS)
    assert n["n_nonfinite"] == 3 * 3 * 2
    assert np.isfinite(n["water_p99"])  # NaNs do not spoil the other measures


def test_missing_station_filled_with_zeros_is_a_gap() -> None:
    water, fat = body_phantom(np.random.default_rng(0))
    water[:, :, 14:18] = 0
    fat[:, :, 14:18] = 0
    m = measure_scan(water, fat, RAS)
    assert (m["body_extent_mm"], m["body_gap_mm"]) == (400.0, 40.0)


def test_measures_do_not_depend_on_stored_orientation(tmp_path: Path) -> None:
    water, fat = make_scan("swap_station", np.random.default_rng(5))
    vols = {}
    for orient in ("RAS", "LPS"):
        w = load_volume(save_ras(tmp_path / f"w_{orient}.nii.gz", water, orient), dtype=np.float32)
        f = load_volume(save_ras(tmp_path / f"f_{orient}.nii.gz", fat, orient), dtype=np.float32)
        vols[orient] = measure_scan(w.data, f.data, w.affine)
    assert vols["RAS"] == pytest.approx(vols["LPS"], nan_ok=True)


def test_subcutaneous_fat_mask_replaces_the_shell() -> None:
    water, fat = make_scan("swap_station", np.random.default_rng(0))
    sat = np.zeros(SHAPE, dtype=bool)
    sat[:, :, :] = body_mask(water, fat) & ~np.pad(np.ones((22, 18, 40), bool), ((1, 1), (1, 1), (0, 0)))
    m = measure_scan(water, fat, RAS, sat=sat)
    assert m["swap_region"] == "subcutaneous_fat"
    with pytest.raises(InputError, match="does not match the image grid"):
        measure_scan(water, fat, RAS, sat=sat[:, :, :30])


# ----------------------------------------------------------------------------- flags


def test_flag_scans_by_hand() -> None:
    base = {
        "n_nonfinite": 0,
        "swap_run_mm": 0.0,
        "body_extent_mm": 1000.0,
        "body_gap_mm": 0.0,
        "water_p99": 100.0,
        "fat_p99": 200.0,
        "water_max": 300.0,
        "fat_max": 400.0,
        "water_min": 0.0,
        "fat_min": 0.0,
    }
    rows = [
        base,
        base,
        {**base, "swap_run_mm": 40.0},  # exactly the run threshold: flagged
        {**base, "swap_run_mm": 30.0},  # shorter: not flagged
        {**base, "body_extent_mm": 890.0},  # 0.89 x median
        {**base, "body_extent_mm": 910.0},  # 0.91 x median: fine
        {**base, "body_gap_mm": 30.0},
        {**base, "water_p99": 301.0, "water_max": 400.0},  # 3.01 x the median
        {**base, "fat_max": 4001.0},  # a spike > 20 x p99
        {**base, "fat_min": -11.0},  # negative by more than 5 % of p99
        {**base, "n_nonfinite": 2},
        {"error": "cannot read"},
    ]
    flags = flag_scans(pd.DataFrame(rows))
    expected = [
        set(),
        set(),
        {"fat_water_swap"},
        set(),
        {"missing_coverage"},
        set(),
        {"missing_coverage"},
        {"extreme_intensity"},
        {"extreme_intensity"},
        {"extreme_intensity"},
        {"nonfinite"},
        {"unreadable"},
    ]
    got = [{f for f in QC_FLAGS if row[f]} for _, row in flags.iterrows()]
    assert got == expected
    assert flags.loc[4, "coverage_ratio"] == pytest.approx(0.89)
    assert flags.loc[7, "water_p99_ratio"] == pytest.approx(3.01)


def test_thresholds_are_checked() -> None:
    with pytest.raises(InputError, match=r"QC threshold swap_ff=1\.5 is out of range"):
        QcThresholds(swap_ff=1.5)


# ----------------------------------------------------------------------------- the study


def test_qc_flags_the_broken_scans_and_not_the_clean_ones(qc_study: tuple[Path, QcSummary]) -> None:
    out, summary = qc_study
    table = pd.read_csv(out / "qc.csv", dtype={"subject_id": str})
    assert list(table.columns) == ["subject_id", "visit", "scan_id", *QC_FLAGS, *MEASURE_COLUMNS]
    expected = {**EXPECTED_FLAGS, "1000077_2": "unreadable"}  # corrupt data, kept by header-only checks
    assert list(table["scan_id"]) == sorted([*KEPT, "1000077_2"])
    for _, row in table.iterrows():
        raised = {f for f in QC_FLAGS if row[f]}
        assert raised == ({expected[row["scan_id"]]} if row["scan_id"] in expected else set()), row["scan_id"]
    assert dict(summary.flagged) == {
        "unreadable": 1,
        "nonfinite": 1,
        "fat_water_swap": 2,
        "missing_coverage": 1,
        "extreme_intensity": 1,
    }
    assert summary.n_flagged == 6 and summary.n_scans == 12
    unreadable = table.set_index("scan_id").loc["1000077_2"]
    assert "cannot read NIfTI" in unreadable["error"]
    assert np.isnan(unreadable["shell_ff"])
    station = table.set_index("scan_id").loc["1000055_2"]
    assert station["swap_run_mm"] == 160.0


def test_qc_figures_never_show_participant_ids(fake: FakeUKB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    texts: list[str] = []
    save = Figure.savefig

    def spy(self, *args, **kwargs):
        texts.extend(t.get_text() for t in self.findobj(Text))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    out = tmp_path / "study"
    build_ukb_study(fake.export, fake.images, out)
    summary = run_qc(out)
    names = sorted(p.name for p in summary.figures)
    assert names == [
        "qc_extreme_intensity.png",
        "qc_fat_water_swap.png",
        "qc_missing_coverage.png",
        "qc_nonfinite.png",
        "qc_overview.png",
    ]
    assert all(p.stat().st_size > 1000 for p in summary.figures)
    joined = "\n".join(texts)
    assert "QC flag fat_water_swap: qc.csv row 5" in joined  # the whole-body swap, named by its row
    assert not any(eid in joined for eid in EIDS)


def test_qc_uses_masks_when_segment_has_run(qc_study: tuple[Path, QcSummary], tmp_path: Path) -> None:
    src, _ = qc_study
    out = tmp_path / "study"
    shutil.copytree(src, out, symlinks=True)
    cohort = pd.read_csv(out / "cohort.csv", dtype={"subject_id": str})
    cohort = cohort[cohort["subject_id"] != "1000077"]  # drop the unreadable scan
    masks = []
    for _, row in cohort.iterrows():
        w = load_volume(out / row["water"], dtype=np.float32)
        f = load_volume(out / row["fat"], dtype=np.float32)
        body = body_mask(np.nan_to_num(w.data), np.nan_to_num(f.data))
        inner = np.zeros_like(body)
        inner[1:-1, 1:-1, :] = body[:-2, 1:-1, :] & body[2:, 1:-1, :] & body[1:-1, :-2, :] & body[1:-1, 2:, :]
        label = np.where(body & ~inner, 51, np.where(body, 53, 0)).astype(np.uint8)
        rel = f"masks/{row['subject_id']}_{row['visit']}.nii.gz"
        save_volume(out / rel, label, w.affine)
        masks.append(rel)
    cohort["mask"] = masks
    cohort.to_csv(out / "cohort.csv", index=False)
    summary = run_qc(out, figures=False)
    table = pd.read_csv(out / "qc.csv")
    assert (table["swap_region"] == "subcutaneous_fat").all()
    assert set(table.loc[table["fat_water_swap"], "scan_id"]) == {"1000044_2", "1000055_2"}
    assert summary.figures == ()


def test_excluded_scans_for_train(qc_study: tuple[Path, QcSummary]) -> None:
    out, _ = qc_study
    assert excluded_scans(out, "fat_water_swap") == {"1000044_2", "1000055_2"}
    assert excluded_scans(out, ["missing_coverage", "nonfinite"]) == {"1000066_2", "1000123_2"}
    assert excluded_scans(out, "all") == {*EXPECTED_FLAGS, "1000077_2"}
    assert excluded_scans(out, "") == set()
    with pytest.raises(InputError, match=r"unknown QC flag 'swap'; known flags: unreadable, nonfinite, fat_water_swap"):
        excluded_scans(out, "fat_water_swap,swap")
    assert parse_flags(" nonfinite , nonfinite") == ("nonfinite",)


def test_excluded_scans_needs_a_current_qc(qc_study: tuple[Path, QcSummary], tmp_path: Path) -> None:
    src, _ = qc_study
    out = tmp_path / "study"
    shutil.copytree(src, out, symlinks=True)
    assert excluded_scans(out, []) == set()  # nothing asked: qc.csv not needed
    (out / "qc.csv").unlink()
    with pytest.raises(StudyError, match=r"qc.csv: not found; run `bodyage qc .*study` first"):
        excluded_scans(out, "fat_water_swap")
    table = pd.read_csv(src / "qc.csv", dtype={"subject_id": str})
    table.iloc[1:].to_csv(out / "qc.csv", index=False)
    with pytest.raises(StudyError, match=r"has no row for 1 scan\(s\) of cohort.csv"):
        excluded_scans(out, "fat_water_swap")
    table.drop(columns=["nonfinite"]).to_csv(out / "qc.csv", index=False)
    with pytest.raises(StudyError, match="missing column\\(s\\) nonfinite"):
        load_qc(out)


# ----------------------------------------------------------------------------- command line


def test_cli_qc(qc_study: tuple[Path, QcSummary], tmp_path: Path) -> None:
    out = tmp_path / "study"
    shutil.copytree(qc_study[0], out, symlinks=True)
    res = CliRunner().invoke(app, ["qc", str(out), "--workers", "2", "--no-figures", "--swap-run-mm", "500"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == (
        "qc: 12 scans, 4 flagged (unreadable 1, nonfinite 1, fat_water_swap 0, missing_coverage 1, "
        f"extreme_intensity 1); wrote {out / 'qc.csv'}"
    )
    assert not any(eid in res.output for eid in EIDS)


def test_cli_qc_missing_study_is_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "cli.app", "qc", str(tmp_path / "nope")], capture_output=True, text=True, check=False
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: study folder not found"]


def test_a_singular_affine_is_an_unreadable_row_not_a_crash(qc_study: tuple[Path, QcSummary], tmp_path: Path) -> None:
    # nibabel's reorientation used to raise OrientationError before bodyage checked the affine
    src, _ = qc_study
    out = tmp_path / "study"
    shutil.copytree(src, out, symlinks=True)
    (out / "qc.csv").unlink()
    water = out / "images" / "1000011_2_water.nii.gz"
    data = np.asarray(load_volume(water, dtype=np.float32).data)
    water.unlink()
    save_singular(water, data)
    with pytest.raises(InputError, match=r"1000011_2_water.nii.gz: singular affine \(zero voxel size"):
        load_volume(water)
    summary = run_qc(out, figures=False)
    table = pd.read_csv(out / "qc.csv", dtype={"subject_id": str}).set_index("scan_id")
    assert len(table) == 12 and summary.flagged["unreadable"] == 2
    assert table.loc["1000011_2", "unreadable"]
    assert "singular affine" in table.loc["1000011_2", "error"]
    assert not table.loc["1000022_2", "unreadable"]
