"""Building a study from a fake UK Biobank (bodyage.cohort, bodyage.scanfiles, `bodyage cohort ukb`)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner
from ukb_factories import (
    KEPT,
    PARTICIPANTS,
    REJECTED,
    SCANS,
    FakeUKB,
    body_phantom,
    expected_age,
    fake_ukb,
    save_ras,
)

from bodyage.cohort import CohortSummary, build_ukb_study
from bodyage.errors import BodyageWarning, InputError, StudyError
from bodyage.scanfiles import check_scan_images, compile_pattern, find_images, parse_channels, parse_instances
from bodyage.study import load_study
from bodyage.volumes import load_volume
from cli.app import app

FIELDS = ["2443=diabetes", "4080=sbp:mean", "20002=diabetes_sr:any=1220,1223", "22009.1=pc1:signed"]
EIDS = sorted({p.eid for p in PARTICIPANTS} | {eid for eid, _ in SCANS})


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeUKB:
    return fake_ukb(tmp_path_factory.mktemp("ukb"))


def _build(fake: FakeUKB, out: Path, **kw) -> CohortSummary:
    with pytest.warns(BodyageWarning, match="22009"):
        return build_ukb_study(fake.export, fake.images, out, fields=FIELDS, **kw)


@pytest.fixture(scope="module")
def built(fake: FakeUKB, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortSummary]:
    out = tmp_path_factory.mktemp("built") / "study"
    return out, _build(fake, out)


def test_cohort_rows_are_exact(built: tuple[Path, CohortSummary], fake: FakeUKB) -> None:
    out, _ = built
    cohort = pd.read_csv(out / "cohort.csv", dtype={"subject_id": str})
    assert list(cohort.columns) == [
        "subject_id",
        "visit",
        "age",
        "sex",
        "site",
        "water",
        "fat",
        "bmi",
        "diabetes",
        "sbp",
        "diabetes_sr",
        "pc1",
    ]
    assert [f"{s}_{v}" for s, v in zip(cohort["subject_id"], cohort["visit"], strict=True)] == list(KEPT)
    people = {p.eid: p for p in PARTICIPANTS}
    sites = {11025: "Cheadle", 11026: "Reading", 11027: "Newcastle", 11028: "Bristol"}
    rows = []
    for scan in KEPT:
        eid, inst = scan.split("_")
        p, v = people[eid], people[eid].visits[int(inst)]
        assert v.centre is not None and v.bmi is not None
        sbp = [x for x in v.sbp if x is not None and x >= 0]
        rows.append(
            {
                "subject_id": eid,
                "visit": int(inst),
                "age": expected_age(p, int(inst)),
                "sex": "FM"[p.sex or 0],
                "site": sites.get(v.centre, f"centre_{v.centre}"),
                "water": f"images/{scan}_water.nii.gz",
                "fat": f"images/{scan}_fat.nii.gz",
                "bmi": v.bmi if v.bmi >= 0 else np.nan,
                "diabetes": float(v.diabetes) if v.diabetes is not None and v.diabetes >= 0 else np.nan,
                "sbp": float(np.mean(sbp)),
                "diabetes_sr": float(bool({1220, 1223} & set(v.illness))),
                "pc1": p.pc1,
            }
        )
    expected = pd.DataFrame(rows)
    pd.testing.assert_frame_equal(cohort, expected, check_exact=False, atol=0.02, check_dtype=False)
    # the one without a birth month: age is 21003 + 0.5 exactly
    assert cohort.loc[cohort["subject_id"] == "1000134", "age"].item() == 60.5


def test_failures_list_every_rejected_scan_with_its_reason(built: tuple[Path, CohortSummary]) -> None:
    out, summary = built
    failures = pd.read_csv(out / "failures.csv", dtype={"subject_id": str})
    assert list(failures.columns) == ["scan_id", "subject_id", "visit", "reason", "detail"]
    assert dict(zip(failures["scan_id"], failures["reason"], strict=True)) == REJECTED
    detail = dict(zip(failures["scan_id"], failures["detail"], strict=True))
    assert "1000077_2_water.nii.gz: cannot read the voxel data" in detail["1000077_2"]
    assert detail["1000088_2"] == (
        "1000088_2_water.nii.gz and 1000088_2_fat.nii.gz are on different grids (shape 24x20x40 vs 24x20x36)"
    )
    assert detail["1000099_2"] == "no fat file (found 1000099_2_water.nii.gz)"
    assert "no age at instance 3" in detail["1000112_3"]
    # nothing found is lost: kept + rejected = found
    assert summary.n_found == len(SCANS) == len(KEPT) + len(REJECTED)


def test_summary_counts(built: tuple[Path, CohortSummary]) -> None:
    _, s = built
    assert (s.n_found, s.n_kept, s.n_rejected) == (17, 11, 6)
    assert dict(s.rejected) == {
        "missing_channel": 1,
        "not_in_export": 1,
        "missing_age": 1,
        "missing_sex": 1,
        "unreadable": 1,
        "grid_mismatch": 1,
    }
    assert (s.n_subjects, s.n_repeat_subjects) == (10, 1)
    assert (s.n_other_instance, s.n_unmatched) == (1, 1)
    assert dict(s.age_sources) == {"fractional": 10, "whole_years": 1}
    assert s.n_unknown_site == 0


def test_study_folder_contract(built: tuple[Path, CohortSummary], fake: FakeUKB) -> None:
    out, _ = built
    study = load_study(out)
    assert len(study.cohort) == len(KEPT)
    assert "mask" not in study.cohort.columns  # until segment runs
    assert study.phenotype_columns() == ["bmi", "diabetes", "sbp", "diabetes_sr", "pc1"]
    # images are symlinks to the source files, named by scan id
    link = out / "images" / "1000022_2_water.nii.gz"
    assert link.is_symlink()
    assert link.resolve() == (fake.images / "1000022_2_water.nii.gz").resolve()
    # an LPS file is read back in RAS+, identical to its phantom (written from RAS data)
    vol = load_volume(study.path(study.cohort.loc[study.cohort["scan_id"] == "1000022_2", "water"].item()))
    assert vol.orientation == ("L", "P", "S")
    assert np.allclose(np.diag(vol.affine)[:3], [10.0, 10.0, 10.0])
    info = pd.read_csv(out / "images.csv", dtype={"subject_id": str})
    lps = set(info.loc[info["water_orientation"] == "LPS", "scan_id"])
    assert lps == {scan for scan, kind in ((f"{e}_{i}", k) for (e, i), k in SCANS.items()) if kind == "lps"}
    assert (info["shape"] == "24x20x40").all()
    assert (info[["spacing_x_mm", "spacing_y_mm", "spacing_z_mm"]] == 10.0).all().all()
    labels = json.loads((out / "labels.json").read_text())
    assert labels["51"] == "subcutaneous_fat" and labels["1"] == "spleen"
    record = json.loads((out / "study.json").read_text())
    assert record["command"] == "cohort ukb"
    assert (record["n_found"], record["n_kept"], record["n_repeat_subjects"]) == (17, 11, 1)
    assert record["inputs"]["phenotypes"]["sha256"]
    assert "21003-2.0" in record["export_columns_read"]
    assert "3007-0.0" not in record["export_columns_read"]  # only the columns needed


def test_images_as_path_and_copy(fake: FakeUKB, tmp_path: Path) -> None:
    _build(fake, tmp_path / "p", images_as="path")
    cohort = pd.read_csv(tmp_path / "p" / "cohort.csv")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in cohort["water"])
    assert not (tmp_path / "p" / "images").exists()
    _build(fake, tmp_path / "c", images_as="copy")
    copied = tmp_path / "c" / "images" / "1000011_2_fat.nii.gz"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (fake.images / "1000011_2_fat.nii.gz").read_bytes()


def test_header_only_check_keeps_the_truncated_file(fake: FakeUKB, tmp_path: Path) -> None:
    s = _build(fake, tmp_path / "q", read_data=False)
    assert s.n_kept == 12 and "unreadable" not in s.rejected  # its header is intact; qc flags it


def test_workers_give_the_same_study(fake: FakeUKB, built: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    s = _build(fake, tmp_path / "w", workers=2)
    assert s == CohortSummary(**{**built[1].__dict__, "study": tmp_path / "w"})
    assert (tmp_path / "w" / "cohort.csv").read_text() == (built[0] / "cohort.csv").read_text()


def test_pattern_with_folders_wildcard_and_channel_tokens(tmp_path: Path, fake: FakeUKB) -> None:
    rng = np.random.default_rng(3)
    images = tmp_path / "nested"
    for eid, inst in (("1000011", 2), ("1000022", 3)):
        folder = images / eid / f"visit{inst}"
        folder.mkdir(parents=True)
        water, fat = body_phantom(rng)
        save_ras(folder / f"dixon_W_{eid}_20201_{inst}_0.nii.gz", water * 1000, dtype=np.int16)
        save_ras(folder / f"dixon_F_{eid}_20201_{inst}_0.nii.gz", fat * 1000, dtype=np.int16)
    (images / "1000011" / "notes.txt").write_text("x")
    s = build_ukb_study(
        fake.export,
        images,
        tmp_path / "s",
        pattern="{eid}/visit{instance}/dixon_{channel}_{eid}_*.nii.gz",
        channels="water=W,fat=F",
    )
    assert (s.n_found, s.n_kept, s.n_repeat_subjects) == (2, 2, 0)
    cohort = pd.read_csv(tmp_path / "s" / "cohort.csv", dtype={"subject_id": str})
    assert list(cohort["water"]) == ["images/1000011_2_water.nii.gz", "images/1000022_3_water.nii.gz"]


def test_compile_pattern() -> None:
    p = compile_pattern("{eid}/{eid}_{instance}_{channel}.nii.gz", ["water", "fat"])
    assert p.match("1000011/1000011_2_fat.nii.gz") == ("1000011", 2, "fat")
    assert p.match("1000011/1000022_2_fat.nii.gz") is None  # the eid must repeat
    assert p.match("1000011/1000011_2_in.nii.gz") is None
    assert p.depth == 1
    with pytest.raises(InputError, match=r"unknown placeholder\(s\) \{visit\}"):
        compile_pattern("{eid}_{visit}_{channel}.nii.gz", ["water", "fat"])
    with pytest.raises(InputError, match=r"needs a \{channel\} placeholder"):
        compile_pattern("{eid}_{instance}.nii.gz", ["water", "fat"])


def test_option_parsers() -> None:
    assert parse_channels(None) == {"water": "water", "fat": "fat"}
    assert parse_channels("fat=F, water=W") == {"water": "W", "fat": "F"}
    with pytest.raises(InputError, match="expected the channels water, fat"):
        parse_channels("water,fat,in")
    with pytest.raises(InputError, match="share the file-name token"):
        parse_channels("water=x,fat=x")
    assert parse_instances("2, 3,2") == (2, 3)
    with pytest.raises(InputError, match="'two' is not an instance number"):
        parse_instances("two")


def test_pattern_without_instance_needs_one_instance(fake: FakeUKB, tmp_path: Path) -> None:
    p = compile_pattern("{eid}_2_{channel}.nii.gz", ["water", "fat"])
    with pytest.raises(InputError, match="has no \\{instance\\}: pass the one instance"):
        find_images(fake.images, p, parse_channels(None), (2, 3))
    inv = find_images(fake.images, p, parse_channels(None), (2,))
    assert ("1000011", 2) in inv.scans and all(i == 2 for _, i in inv.scans)


def test_check_scan_images_reports_bad_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    water, fat = body_phantom(rng)
    w = save_ras(tmp_path / "w.nii.gz", water)
    f = save_ras(tmp_path / "f.nii.gz", fat)
    assert check_scan_images({"water": w, "fat": f}).ok
    import nibabel as nib

    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([0.01, 0.01, 0.01, 1.0])), str(tmp_path / "tiny.nii.gz"))
    bad = check_scan_images({"water": w, "fat": tmp_path / "tiny.nii.gz"})
    assert (bad.ok, bad.reason) == (False, "spacing_out_of_range")
    assert "voxel size 0.01 x 0.01 x 0.01 mm is outside 0.5–15 mm" in bad.detail
    nib.save(
        nib.Nifti1Image(np.asarray(img.dataobj), np.diag([10.0, 10.0, 10.0, 1.0]) + 0.5), str(tmp_path / "sh.nii.gz")
    )
    moved = check_scan_images({"water": w, "fat": tmp_path / "sh.nii.gz"})
    assert (moved.reason, "different affine" in moved.detail) == ("grid_mismatch", True)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    junk = check_scan_images({"water": tmp_path / "junk.nii.gz", "fat": f})
    assert (junk.reason, junk.detail.startswith(str(tmp_path / "junk.nii.gz"))) == ("unreadable", True)


def test_output_folder_rules(fake: FakeUKB, built: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="is already a study"):
        build_ukb_study(fake.export, fake.images, built[0])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(StudyError, match=r"holds files bodyage did not write \(thesis.tex\)"):
        build_ukb_study(fake.export, fake.images, foreign)
    # an unfinished build of ours (killed before study.json) is started again
    unfinished = tmp_path / "unfinished"
    (unfinished / "images").mkdir(parents=True)
    (unfinished / "images" / "1000011_2_water.nii.gz").symlink_to(fake.images / "1000011_2_water.nii.gz")
    (unfinished / "failures.csv").write_text("old\n")
    assert _build(fake, unfinished).n_kept == 11


def test_nothing_passing_writes_failures_then_fails(fake: FakeUKB, tmp_path: Path) -> None:
    images = tmp_path / "few"
    images.mkdir()
    shutil.copy(fake.images / "1000099_2_water.nii.gz", images)
    with pytest.raises(
        InputError, match=r"none of the 1 scans found passed the checks; the reasons are in .*failures.csv"
    ):
        build_ukb_study(fake.export, images, tmp_path / "s")
    assert pd.read_csv(tmp_path / "s" / "failures.csv")["reason"].tolist() == ["missing_channel"]


def test_bad_inputs(fake: FakeUKB, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="images folder not found"):
        build_ukb_study(fake.export, tmp_path / "nope", tmp_path / "s")
    with pytest.raises(InputError, match=r"no file matches --pattern '\{eid\}_\{instance\}_\{channel\}.nii'"):
        build_ukb_study(fake.export, fake.images, tmp_path / "s", pattern="{eid}_{instance}_{channel}.nii")
    with pytest.raises(InputError, match="images_as must be one of link, path, copy; got 'move'"):
        build_ukb_study(fake.export, fake.images, tmp_path / "s", images_as="move")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="field 4080 has 2 entries per instance"):
        build_ukb_study(fake.export, fake.images, tmp_path / "s", fields=["4080=sbp"])
    assert not (tmp_path / "s").exists()  # options are checked before anything is written


# ----------------------------------------------------------------------------- command line


def test_cli_prints_counts_never_ids(fake: FakeUKB, tmp_path: Path) -> None:
    out = tmp_path / "study"
    res = CliRunner().invoke(
        app,
        [
            *("cohort", "ukb", "--phenotypes", str(fake.export), "--images", str(fake.images), "--out", str(out)),
            *(a for f in FIELDS for a in ("--field", f)),
            *("--workers", "1"),
        ],
    )
    assert res.exit_code == 0, res.output
    line = res.stdout.strip()
    assert line.startswith(
        "found 17 scans; kept 11 (10 participants, 1 with repeat imaging); rejected 6 (missing_channel 1,"
    )
    assert "ignored 1 file of other instances and 1 file not matching the pattern" in line
    assert "age from field 21003 + 0.5 for 1 scan" in line
    assert not any(eid in res.output for eid in EIDS)
    assert "warning: field 22009 (pc1)" in res.stderr


def test_cli_bad_field_is_one_line_exit_1(fake: FakeUKB, tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *(sys.executable, "-m", "cli.app", "cohort", "ukb", "--phenotypes", str(fake.export)),
            *("--images", str(fake.images), "--out", str(tmp_path / "s"), "--field", "2443"),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: --field '2443': expected FIELD[.ARRAY]=NAME[:OPTION], e.g. 2443=diabetes or 4080=sbp:mean"
    ]


# ----------------------------------------------------------------------------- malformed inputs (issue 20)


def test_ragged_export_row_and_unsafe_ids_are_failures(fake: FakeUKB, tmp_path: Path) -> None:
    lines = fake.export.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[3].split(",")  # line 4: participant 1000033, one extra field after its sex
    assert fields[0] == "1000033"
    lines[3] = ",".join([*fields[:2], "1", *fields[2:]])
    export = tmp_path / "export.csv"
    export.write_text("".join(lines), encoding="utf-8")
    images = tmp_path / "images"
    images.mkdir()
    for f in fake.images.iterdir():
        (images / f.name).symlink_to(f)
    for channel in ("water", "fat"):  # ids that are no safe file-name parts
        (images / f"a b_2_{channel}.nii.gz").symlink_to(fake.images / f"1000011_2_{channel}.nii.gz")
        (images / f"-x_2_{channel}.nii.gz").symlink_to(fake.images / f"1000011_2_{channel}.nii.gz")
    with pytest.warns(BodyageWarning, match=r"export.csv: 1 row\(s\) do not have the header's 306 fields: line 4"):
        summary = build_ukb_study(export, images, tmp_path / "study")
    failures = pd.read_csv(tmp_path / "study" / "failures.csv", dtype={"subject_id": str}).set_index("scan_id")
    assert failures.loc["1000033_2", "reason"] == "bad_export_row"
    assert failures.loc["1000033_2", "detail"] == "line 4 of export.csv has 307 fields, the header 306"
    assert failures.loc["a b_2", "reason"] == "bad_id"
    assert failures.loc["a b_2", "detail"].startswith("participant id 'a b' holds ' ', which ids may not hold")
    assert failures.loc["-x_2", "detail"] == "participant id '-x' starts with '-' (ids may not start with '.' or '-')"
    assert summary.rejected["bad_export_row"] == 1 and summary.rejected["bad_id"] == 2
    cohort = load_study(tmp_path / "study").cohort
    assert "1000033" not in set(cohort["subject_id"])
    assert summary.n_kept == len(KEPT) - 1


def test_cli_truncated_gzip_export_is_one_error_line(fake: FakeUKB, tmp_path: Path) -> None:
    data = gzip.compress(fake.export.read_bytes())
    export = tmp_path / "export.csv.gz"
    export.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(
        app,
        ["cohort", "ukb", "--phenotypes", str(export), "--images", str(fake.images), "--out", str(tmp_path / "s")],
    )
    assert res.exit_code == 1
    assert "Aborted!" not in res.output
    assert re.fullmatch(
        r"error: .*export.csv.gz: cannot be read to the end after line \d+ \(truncated .*\)\n", res.stderr
    )
