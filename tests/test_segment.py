"""`bodyage segment --from`: importing masks, the tables, resume, ranks, and the simulated study."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from segment_factories import (
    SHAPE,
    affine,
    export_multilabel,
    export_region_folders,
    make_study,
)
from typer.testing import CliRunner

from bodyage.errors import InputError, SegmentationError
from bodyage.masks import read_stamp
from bodyage.segment import SegmentSummary, segment_study
from bodyage.segment_config import parse_channel_options
from bodyage.segment_tables import FAILURES_FILE, QC_COLUMNS
from cli.app import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A 4-scan study whose masks are exported as region folders to tmp_path/ts, then removed."""
    root = make_study(tmp_path / "study", drop={2: ["kidney_left"]})
    export_region_folders(root, tmp_path / "ts")
    export_multilabel(root, tmp_path / "ml")
    shutil.copytree(root / "masks", tmp_path / "original_masks")
    shutil.rmtree(root / "masks")
    cohort = pd.read_csv(root / "cohort.csv")
    cohort.drop(columns=["mask"]).to_csv(root / "cohort.csv", index=False)
    return root


def _masks_equal(study: Path, originals: Path) -> None:
    for orig in sorted(originals.glob("*.nii.gz")):
        new = nib.load(str(study / "masks" / orig.name))
        old = nib.load(str(orig))
        np.testing.assert_array_equal(np.asarray(new.dataobj), np.asarray(old.dataobj))
        np.testing.assert_allclose(new.affine, old.affine)
        assert new.get_data_dtype() == np.uint8


@pytest.mark.parametrize("layout", ["ts", "ml"])
def test_import_reproduces_the_masks_and_writes_the_tables(study: Path, layout: str) -> None:
    summary = segment_study(study, source=study.parent / layout)
    _masks_equal(study, study.parent / "original_masks")
    assert summary.n_new == 4 and summary.n_failed == 0 and summary.merged
    cohort = pd.read_csv(study / "cohort.csv")
    assert list(cohort.columns[:8]) == ["subject_id", "visit", "age", "sex", "site", "water", "fat", "mask"]
    assert list(cohort["mask"]) == [f"masks/S00{i}_0.nii.gz" for i in range(1, 5)]
    assert json.loads((study / "labels.json").read_text())["51"] == "subcutaneous_fat"
    qc = pd.read_csv(study / "masks" / "qc.csv")
    assert tuple(qc.columns) == QC_COLUMNS
    # volumes: voxel counts of the original masks × 0.064 ml
    for scan, group in qc.groupby("scan_id"):
        orig = np.asarray(nib.load(str(study.parent / "original_masks" / f"{scan}.nii.gz")).dataobj)
        counts = np.bincount(orig.ravel(), minlength=54)
        for _, r in group.iterrows():
            if counts[r["label"]]:
                assert r["present"] and r["n_voxels"] == counts[r["label"]]
                assert r["volume_ml"] == pytest.approx(counts[r["label"]] * 0.064)
            else:
                assert not r["present"] and np.isnan(r["n_voxels"]) and np.isnan(r["volume_ml"])
    # the missing kidney is NaN and counted; prostate is not expected in women
    kid = qc[(qc["scan_id"] == "S003_0") & (qc["region"] == "kidney_left")].iloc[0]
    assert not kid["present"] and np.isnan(kid["volume_ml"]) and kid["expected"]
    prostate = qc[qc["region"] == "prostate"].set_index("scan_id")
    assert list(prostate["expected"]) == [False, True, False, True]
    assert summary.missing == {"kidney": 1}
    assert "torso_fat" in summary.absent
    assert pd.read_csv(study / "masks" / FAILURES_FILE).empty
    run = json.loads((study / "masks" / "run.json").read_text())
    assert run["command"] == "segment" and run["finished"] and run["config"]["source"] == "import"
    assert run["missing_by_group"] == {"kidney": 1}
    for scan in ("S001_0", "S004_0"):
        assert read_stamp(study / "masks" / f"{scan}.nii.gz") == run["fingerprint"]


def test_summary_line_counts_scans_lacking_a_kidney(study: Path) -> None:
    line = segment_study(study, source=study.parent / "ts").line()
    assert line.startswith("segment: 4 scans: 4 new, 0 already done, 0 failed; scans lacking a region: kidney 1;")
    assert "regions in no scan (" in line


def test_resume_skips_finished_scans_and_ignores_half_written_files(study: Path) -> None:
    segment_study(study, source=study.parent / "ts")
    masks = study / "masks"
    mtimes = {p.name: p.stat().st_mtime_ns for p in masks.glob("*.nii.gz")}
    qc_before = pd.read_csv(masks / "qc.csv")
    # a killed run: a half-written temporary file next to one mask, and another mask truncated
    (masks / ".S002_0.nii.gz.abcd1234.tmp.nii.gz").write_bytes(b"\x1f\x8b half")
    truncated = masks / "S004_0.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:50])
    time.sleep(0.01)
    summary = segment_study(study, source=study.parent / "ts")
    assert (summary.n_new, summary.n_skipped) == (1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in masks.glob("*.nii.gz")}
    assert {k for k in after if after[k] != mtimes[k]} == {"S004_0.nii.gz"}
    assert not list(masks.glob(".*.tmp*"))  # stale temporaries of this run's scans removed
    _masks_equal(study, study.parent / "original_masks")
    pd.testing.assert_frame_equal(pd.read_csv(masks / "qc.csv"), qc_before)


def test_a_corrupt_mask_of_the_recorded_size_is_redone(study: Path) -> None:
    segment_study(study, source=study.parent / "ts")
    masks = study / "masks"
    for scan in ("S001_0", "S003_0"):
        mask = masks / f"{scan}.nii.gz"
        data = bytearray(mask.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # same size, damaged voxels
        mask.write_bytes(bytes(data))
    # a record of a version that kept no checksum: the mask must read whole instead
    old = masks / ".segment" / "S003_0.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "mask_sha256"}))
    summary = segment_study(study, source=study.parent / "ts")
    assert (summary.n_new, summary.n_skipped) == (2, 2)
    _masks_equal(study, study.parent / "original_masks")


def test_a_stamped_mask_without_its_record_is_not_redone(study: Path) -> None:
    segment_study(study, source=study.parent / "ts")
    (study / "masks" / ".segment" / "S001_0.json").unlink()  # killed between mask and record
    before = (study / "masks" / "S001_0.nii.gz").stat().st_mtime_ns
    summary = segment_study(study, source=study.parent / "ts")
    assert (summary.n_new, summary.n_skipped) == (0, 4)
    assert (study / "masks" / "S001_0.nii.gz").stat().st_mtime_ns == before


def test_masks_from_another_source_are_replaced(study: Path, tmp_path: Path) -> None:
    segment_study(study, source=study.parent / "ts")
    summary = segment_study(study, source=study.parent / "ml")  # another configuration
    assert (summary.n_new, summary.n_skipped, summary.n_replaced) == (4, 0, 4)
    assert "4 older masks replaced" in summary.line()


def test_a_mask_in_another_place_fails_that_scan_only(study: Path) -> None:
    src = study.parent / "ml"
    bad = src / "S002_0.nii.gz"
    img = nib.load(str(bad))
    moved = affine(origin=(-40.0, -30.0, 60.0))  # 120 mm higher
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), bad)
    with pytest.raises(
        SegmentationError,
        match=r"1 of 4 scans have no mask \(first: scan S002_0: mask .*S002_0.nii.gz does not match its image: "
        r".*fields of view differ by up to 120.0 mm .*\); the other 3 are written",
    ):
        segment_study(study, source=src)
    failures = pd.read_csv(study / "masks" / FAILURES_FILE)
    assert list(failures["scan_id"]) == ["S002_0"] and list(failures["stage"]) == ["import"]
    cohort = pd.read_csv(study / "cohort.csv")
    assert cohort["mask"].isna().tolist() == [False, True, False, False]
    assert sorted(pd.read_csv(study / "masks" / "qc.csv")["scan_id"].unique()) == ["S001_0", "S003_0", "S004_0"]


def test_a_mask_on_a_coarser_grid_is_resampled_and_noted(study: Path) -> None:
    src = study.parent / "ml"
    path = src / "S001_0.nii.gz"
    fine = np.asarray(nib.load(str(path)).dataobj)
    coarse = fine[::2, ::2, ::2]  # 8 mm voxels, first voxel centred on the fine voxels 0-1
    nib.save(nib.Nifti1Image(coarse, affine(8.0, origin=(-38.0, -28.0, -58.0))), path)
    segment_study(study, source=src)
    out = np.asarray(nib.load(str(study / "masks" / "S001_0.nii.gz")).dataobj)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out[::2, ::2, ::2], coarse)
    notes = pd.read_csv(study / "masks" / "notes.csv")
    assert list(notes["scan_id"]) == ["S001_0"]
    assert notes["note"].iloc[0].startswith("resampled (nearest neighbour) from a (10, 8, 15) grid")


def test_unknown_region_file_and_missing_scan_are_listed(study: Path) -> None:
    src = study.parent / "ts"
    shutil.copy(src / "S001_0" / "liver.nii.gz", src / "S001_0" / "liver_tumour.nii.gz")
    shutil.rmtree(src / "S004_0")
    with pytest.raises(SegmentationError, match=r"2 of 4 scans have no mask \(first: scan S001_0: .*liver_tumour"):
        segment_study(study, source=src)
    failures = pd.read_csv(study / "masks" / FAILURES_FILE).set_index("scan_id")
    assert "unknown region(s) liver_tumour" in failures.loc["S001_0", "reason"]
    assert failures.loc["S004_0", "reason"].startswith("no mask in")


def test_image_in_another_orientation_gets_a_mask_in_its_orientation(tmp_path: Path) -> None:
    lps = np.diag([-4.0, -4.0, 4.0, 1.0])
    lps[:3, 3] = (36.0, 30.0, -60.0)
    root = make_study(tmp_path / "study", n_scans=2, image_affine=lps)
    export_region_folders(root, tmp_path / "ts")
    shutil.copytree(root / "masks", tmp_path / "orig")
    segment_study(root, source=tmp_path / "ts")
    _masks_equal(root, tmp_path / "orig")


def test_option_errors() -> None:
    assert parse_channel_options(["total_mr=fat", " tissue_types_mr = water "]) == {
        "total_mr": "fat",
        "tissue_types_mr": "water",
    }
    with pytest.raises(InputError, match="--channel must look like TASK=CHANNEL"):
        parse_channel_options(["total_mr"])
    with pytest.raises(InputError, match="--channel total=water: task must be one of total_mr, tissue_types_mr"):
        parse_channel_options(["total=water"])
    with pytest.raises(InputError, match="--channel given twice for task total_mr"):
        parse_channel_options(["total_mr=water", "total_mr=fat"])


def test_import_refuses_totalsegmentator_options(study: Path) -> None:
    with pytest.raises(InputError, match="--from imports existing masks; --task, --device, --fast only apply"):
        segment_study(study, source=study.parent / "ts", tasks=["total_mr"], fast=True, device="cpu")
    with pytest.raises(InputError, match=r"--from .*nowhere: folder not found"):
        segment_study(study, source=study.parent / "nowhere")


def test_bad_task_channel_and_device_are_errors(study: Path) -> None:
    with pytest.raises(InputError, match="--task must be one of total_mr, tissue_types_mr; 'total' was provided"):
        segment_study(study, tasks=["total"])
    with pytest.raises(InputError, match="--task total_mr given twice"):
        segment_study(study, tasks=["total_mr", "total_mr"])
    with pytest.raises(InputError, match=r"--channel tissue_types_mr=\.\.\.: task tissue_types_mr is not run"):
        segment_study(study, channels={"tissue_types_mr": "fat"})
    with pytest.raises(InputError, match=r"--channel total_mr=inphase: .*cohort.csv has no column 'inphase'"):
        segment_study(study, channels={"total_mr": "inphase"})
    with pytest.raises(InputError, match=r"--device must be auto, cpu or cuda, got 'tpu' \(gpu is accepted for cuda\)"):
        segment_study(study, device="tpu")
    with pytest.raises(InputError, match="--fast: task tissue_types_mr has no fast model"):
        segment_study(study, tasks=["tissue_types_mr"], fast=True)


def test_cli_import_prints_one_summary_line(study: Path) -> None:
    res = runner.invoke(app, ["segment", str(study), "--from", str(study.parent / "ts")])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segment: 4 scans: 4 new")


def test_cli_failed_scans_exit_1_with_one_line(study: Path) -> None:
    shutil.rmtree(study.parent / "ts" / "S003_0")
    res = subprocess.run(
        [sys.executable, "-m", "cli.app", "segment", str(study), "--from", str(study.parent / "ts")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1 of 4 scans have no mask (first: scan S003_0: no mask in")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_ranks_split_the_scans_and_rank_0_merges(study: Path) -> None:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "cli.app", "--quiet", "segment", str(study), "--from", str(study.parent / "ts")]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].startswith("segment: 4 scans: 2 new, 0 already done, 0 failed")
    assert outs[1][0].startswith("segment (rank 1): 2 scans: 2 new")
    _masks_equal(study, study.parent / "original_masks")
    qc = pd.read_csv(study / "masks" / "qc.csv")
    assert sorted(qc["scan_id"].unique()) == ["S001_0", "S002_0", "S003_0", "S004_0"]
    assert pd.read_csv(study / "cohort.csv")["mask"].notna().all()


def test_distributed_without_torchrun_variables_is_an_error(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(
        InputError, match="WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT is not set: start the ranks with torchrun"
    ):
        segment_study(study, source=study.parent / "ts")


def test_rank_group_lives_in_distributed_and_segment_re_exports_it() -> None:
    code = (
        "import sys; from bodyage.distributed import rank_group; "
        "print(sorted(m for m in ('torch', 'bodyage.segment') if m in sys.modules)); "
        "from bodyage.segment import rank_group as again; print(again is rank_group)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    # distributed imports neither torch nor segment (no import circle); segment's name is the same object
    assert res.stdout.split("\n")[:2] == ["[]", "True"]


# ---------------------------------------------------------------- the "done when" on a simulated study


@pytest.mark.slow
def test_simulated_masks_round_trip_through_totalsegmentators_layout(tiny_study: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(tiny_study, study)
    originals = tmp_path / "simulated_masks"
    shutil.copytree(study / "masks", originals)
    export_region_folders(study, tmp_path / "ts", empty_files=False)
    res = runner.invoke(app, ["segment", str(study), "--from", str(tmp_path / "ts")])
    assert res.exit_code == 0, res.output
    _masks_equal(study, originals)
    cohort = pd.read_csv(study / "cohort.csv", dtype={"subject_id": str})
    assert cohort["mask"].notna().all()
    qc = pd.read_csv(study / "masks" / "qc.csv", dtype={"subject_id": str})
    truth = pd.read_parquet(study / "truth.parquet")
    merged = truth.merge(qc, on=["subject_id", "visit", "region"], how="left", suffixes=("_truth", ""))
    assert len(merged) == len(truth)
    planted = merged[merged["present_truth"]]
    np.testing.assert_allclose(planted["volume_ml"], planted["volume_ml_truth"], rtol=1e-12)
    np.testing.assert_array_equal(planted["n_voxels"], planted["n_voxels_truth"])
    absent = merged[~merged["present_truth"]]
    assert absent["volume_ml"].isna().all()  # missing is NaN, as in the truth table
    assert isinstance(SegmentSummary, type)
