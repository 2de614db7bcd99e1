"""Organ clocks: region-restricted input (crop, mask, invariance), the set file, the tables, resume."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bodyage.clocks import (
    ORGAN_AGE_COLUMNS,
    WHOLE_BODY,
    organ_age_tables,
    out_of_fold_residuals,
    plan_clocks,
    read_clock_set,
    run_clocks,
)
from bodyage.crop import CropSpec, plan_crop, preprocess_cropped, resolve_regions, window
from bodyage.errors import InputError, RunError
from bodyage.folds import assign_folds
from bodyage.study import load_study
from bodyage.train import TrainConfig, train_run
from bodyage.volumes import Volume, load_labels, load_volume, save_volume
from cli.app import app

runner = CliRunner()

TINY = TrainConfig(folds=3, epochs=2, model_kwargs={"widths": [4, 8, 8]}, batch_size=4)
TINY_ARGS = ["--folds", "3", "--epochs", "2"]


def _write_set(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- crop and mask


def _scan(study_dir: Path, i: int = 0) -> tuple[list[Volume], Volume, str]:
    study = load_study(study_dir)
    row = study.cohort.iloc[i]
    vols = [load_volume(study.path(row[c])) for c in ("water", "fat")]
    return vols, load_labels(study.path(row["mask"])), str(row["scan_id"])


def _dilated_keep(labels: Volume, crop: CropSpec, vols: list[Volume]) -> np.ndarray:
    """The dilated region mask on the scan's full native grid (as preprocess_cropped builds it)."""
    from scipy import ndimage

    keep = np.isin(np.asarray(labels.data), crop.label_ids)
    return ndimage.binary_dilation(keep, iterations=crop.dilate)


def test_voxels_outside_the_dilated_mask_do_not_change_a_clock_prediction(tiny_study: Path) -> None:
    import torch

    from bodyage.models import build_model

    study = load_study(tiny_study)
    crop = plan_crop(study, study.cohort, resolve_regions("pancreas", study))
    vols, labels, sid = _scan(tiny_study)
    keep = _dilated_keep(labels, crop, vols)
    rng = np.random.default_rng(7)
    noisy = [
        Volume(np.where(keep, v.data, np.asarray(v.data) * 3 + rng.uniform(0, 5, v.shape)), v.affine) for v in vols
    ]
    base, mask_a, _, _ = preprocess_cropped(sid, vols, labels, crop)
    pert, mask_b, _, _ = preprocess_cropped(sid, noisy, labels, crop)
    assert np.array_equal(base, pert) and np.array_equal(mask_a, mask_b)

    torch.manual_seed(0)
    model = build_model("sfcn", 2, widths=[4, 8, 8]).eval()
    with torch.inference_mode():
        a = model(torch.from_numpy(base[None].astype(np.float32)))
        b = model(torch.from_numpy(pert[None].astype(np.float32)))
    assert torch.equal(a, b)

    # not vacuous: the same change inside the mask does change the input
    inside = [Volume(np.where(keep, np.asarray(v.data) * 1.5 + 1, v.data), v.affine) for v in vols]
    changed, *_ = preprocess_cropped(sid, inside, labels, crop)
    assert not np.array_equal(base, changed)
    # the pancreas is more than a handful of voxels of the clock's grid
    assert study.labels is not None
    assert int(np.count_nonzero(mask_a == study.labels.id_of("pancreas"))) >= 8
    assert base.shape[1:] == crop.grid


def test_a_scan_whose_mask_lacks_the_region_is_refused_with_the_reason(tiny_study: Path) -> None:
    study = load_study(tiny_study)
    assert study.labels is not None
    crop = plan_crop(study, study.cohort, resolve_regions("kidney", study))
    vols, labels, sid = _scan(tiny_study)
    data = np.asarray(labels.data).copy()
    data[data == study.labels.id_of("kidney_left")] = 0
    with pytest.raises(InputError, match=rf"scan {sid}: the mask has no voxel of kidney_left"):
        preprocess_cropped(sid, vols, Volume(data, labels.affine), crop)


def test_window_pads_with_zeros_outside_the_array() -> None:
    arr = np.arange(27).reshape(3, 3, 3)
    out = window(arr, (-1, 1, 2), (3, 3, 2))
    assert out.shape == (3, 3, 2)
    assert out[0].sum() == 0 and out[1, 0, 0] == arr[0, 1, 2] and out[1, 0, 1] == 0


def test_regions_and_groups_resolve_against_the_study_labels(tiny_study: Path) -> None:
    study = load_study(tiny_study)
    assert resolve_regions("kidney, liver", study) == ("kidney_left", "kidney_right", "liver")
    with pytest.raises(InputError, match=r"--region: unknown region or group 'livr'"):
        resolve_regions("livr", study)
    with pytest.raises(InputError, match=r"--region: no region given"):
        resolve_regions(" , ", study)


# ----------------------------------------------------------------------------- training a clock


@pytest.fixture(scope="module")
def gapped_study(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study with the pancreas erased from one scan's mask, and a label no mask has."""
    root = tmp_path_factory.mktemp("gapped") / "study"
    shutil.copytree(tiny_study, root, ignore=shutil.ignore_patterns("cache"))
    study = load_study(root)
    assert study.labels is not None
    row = study.cohort.iloc[3]
    m = load_labels(study.path(row["mask"]))
    data = np.asarray(m.data).copy()
    data[data == study.labels.id_of("pancreas")] = 0
    save_volume(study.path(row["mask"]), data, m.affine, dtype=data.dtype)
    labels = json.loads((root / "labels.json").read_text())
    labels["60"] = "phantom_organ"
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def test_a_clock_run_keeps_the_study_folds_and_lists_a_missing_region(gapped_study: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(folds=3, epochs=2, model_kwargs={"widths": [4, 8, 8]}, batch_size=4, regions=("pancreas",))
    run = tmp_path / "pancreas"
    train_run(gapped_study, run, cfg, cache_dir=tmp_path / "cache", figures=False)
    study = load_study(gapped_study)
    bad = study.cohort.iloc[3]["scan_id"]
    failures = pd.read_csv(run / "failures.csv")
    assert list(failures["scan_id"]) == [bad]
    assert "the mask has no voxel of pancreas" in failures["reason"].iloc[0]
    preds = pd.read_parquet(run / "predictions.parquet")
    assert len(preds) == len(study.cohort) - 1
    folds = study.cohort.assign(fold=assign_folds(study.cohort, 3, 0).to_numpy())
    merged = preds.merge(folds, on=["subject_id", "visit"], suffixes=("", "_study"))
    assert (merged["fold"] == merged["fold_study"]).all()  # the whole cohort's folds, failures or not
    record = json.loads((run / "run.json").read_text())
    assert record["regions"] == ["pancreas"] and record["crop"]["regions"] == ["pancreas"]
    import torch

    hp = torch.load(run / "models" / "fold0.pt", weights_only=True)["hparams"]
    assert hp["regions"] == ["pancreas"] and hp["crop"]["grid"] == hp["grid"]
    with pytest.raises(RunError, match=r"was started with other settings"):
        train_run(gapped_study, run, replace(cfg, regions=("liver",)), figures=False)


def test_train_refuses_a_grid_with_a_region(tiny_study: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(folds=3, epochs=1, grid=(16, 12, 32), regions=("liver",))
    with pytest.raises(InputError, match=r"--grid cannot be combined with --region"):
        train_run(tiny_study, tmp_path / "run", cfg, figures=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the set file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"the clock set is empty"),
        ("{}", r"the clock set is empty"),
        ("liver: [liver]\nliver: [pancreas]\n", r"line 2: clock 'liver' is given twice"),
        ("liver: {regions: [liver], margin: 3}\n", r"clock 'liver': unknown key\(s\) margin; known: regions"),
        ("- liver\n", r"expected a mapping \{clock name: \[regions\]\}, found a list"),
        ("whole_body: [liver]\n", r"'whole_body' is reserved"),
        ("9liver: [liver]\n", r"clock name '9liver' must start with a letter"),
        ("liver: []\n", r"clock 'liver': expected a non-empty list of region names"),
        ("a: &x [liver]\nb: *x\n", r"anchors and aliases"),
    ],
)
def test_a_bad_set_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_clock_set(_write_set(tmp_path / "set.yaml", text))


def test_the_shipped_sets_read_and_name_registry_regions(tiny_study: Path) -> None:
    study = load_study(tiny_study)
    for name in ("default", "quick"):
        entries = read_clock_set(name)
        assert WHOLE_BODY not in entries
        for regions in entries.values():
            resolve_regions(regions, study)  # every name is a region or group of the registry
    assert set(read_clock_set("quick")) == {"liver", "pancreas", "gluteal", "spleen"}
    with pytest.raises(InputError, match=r"--set nosuch: no such file, and not a shipped set"):
        read_clock_set("nosuch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("liver: [livr]\n", r"clock 'liver': unknown region or group 'livr'"),
        ("ghost: [phantom_organ]\n", r"clock 'ghost': regions phantom_organ are absent from every scan's mask"),
        ("liver: [liver]\nliver: [liver]\n", r"clock 'liver' is given twice"),
        ("liver: {regions: [liver], crop: 2}\n", r"unknown key\(s\) crop"),
        ("", r"the clock set is empty"),
    ],
)
def test_bodyage_clocks_refuses_bad_input_before_training(
    gapped_study: Path, tmp_path: Path, text: str, message: str
) -> None:
    out = tmp_path / "clocks"
    res = runner.invoke(
        app, ["clocks", str(gapped_study), "--out", str(out), "--set", str(_write_set(tmp_path / "s.yaml", text))]
    )
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), res.output
    assert not out.exists()  # nothing trained, nothing written


def test_plan_clocks_refuses_an_empty_set(tiny_study: Path) -> None:
    with pytest.raises(InputError, match=r"the clock set is empty"):
        plan_clocks(tiny_study, {}, TINY)


# ----------------------------------------------------------------------------- the tables


def _preds(gaps: dict[str, list[float]], folds: list[int]) -> dict[str, pd.DataFrame]:
    n = len(folds)
    out = {}
    for clock, g in gaps.items():
        out[clock] = pd.DataFrame(
            {
                "subject_id": [f"S{i:02d}" for i in range(n)],
                "visit": 0,
                "fold": folds,
                "age": 60.0,
                "predicted_age": 60.0 + np.asarray(g),
                "age_gap": g,
                "age_gap_corrected": g,
            }
        )
    return out


def test_overall_gap_and_the_out_of_fold_conditioned_gap_by_hand() -> None:
    folds = [0, 0, 0, 1, 1, 1]
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    b = [2.0, 1.0, 0.0, 1.0, 3.0, 2.0]
    c = [9.0, 9.0, 9.0, 9.0, 9.0, 0.0]  # uninformative: not in the overall gap
    preds = _preds({WHOLE_BODY: [0.5] * 6, "a": a, "b": b, "c": c}, folds)
    organ, overall = organ_age_tables(preds, ["a", "b", "c_not_run", WHOLE_BODY])
    assert list(organ.columns) == list(ORGAN_AGE_COLUMNS) and len(organ) == 24
    np.testing.assert_allclose(overall["overall_gap"], (np.array(a) + np.array(b)) / 2)
    # clock a conditioned on the overall gap without a (= b), fitted on the other fold
    got = organ[organ["clock"] == "a"]["age_gap_conditioned"].to_numpy()
    x, y = np.array(b), np.array(a)
    slope1, icpt1 = np.polyfit(x[3:], y[3:], 1)  # fitted on fold 1, applied to fold 0
    slope0, icpt0 = np.polyfit(x[:3], y[:3], 1)
    want = np.r_[y[:3] - (icpt1 + slope1 * x[:3]), y[3:] - (icpt0 + slope0 * x[3:])]
    np.testing.assert_allclose(got, want)
    # whole_body and the uninformative clock are conditioned on the full overall gap
    ov = overall["overall_gap"].to_numpy()
    s1, i1 = np.polyfit(ov[3:], np.array(c)[3:], 1)
    got_c = organ[organ["clock"] == "c"]["age_gap_conditioned"].to_numpy()
    np.testing.assert_allclose(got_c[:3], np.array(c)[:3] - (i1 + s1 * ov[:3]))


def test_a_single_informative_clock_has_no_conditioned_gap() -> None:
    preds = _preds({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 1.0, 0.0, 1.0]}, [0, 0, 1, 1])
    organ, overall = organ_age_tables(preds, ["a"])
    assert organ[organ["clock"] == "a"]["age_gap_conditioned"].isna().all()
    np.testing.assert_allclose(overall["overall_gap"], [1.0, 2.0, 3.0, 4.0])
    organ, overall = organ_age_tables(preds, [])
    assert overall["overall_gap"].isna().all() and organ["age_gap_conditioned"].isna().all()


def test_out_of_fold_residuals_skip_missing_values() -> None:
    res = out_of_fold_residuals([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, np.nan, 4.0], [0, 0, 1, 1])
    assert np.isnan(res[1]) and np.isnan(res[2])
    assert res[0] == pytest.approx(1.0 - 4.0) and res[3] == pytest.approx(4.0 - 1.0)


# ----------------------------------------------------------------------------- end to end


class _Interrupt(Exception):
    pass


class _KillAfter:
    """A progress display that raises after ``n`` epochs, like a job killed mid-fold."""

    def __init__(self, n: int) -> None:
        self.left = n

    def task(self, description: str, total: int | None) -> _KillAfter:
        return self

    def advance(self, n: int = 1, **fields: object) -> None:
        if fields:
            self.left -= 1
            if self.left < 0:
                raise _Interrupt

    def close(self) -> None:
        pass


def test_a_killed_clocks_run_resumes_to_the_same_tables(tiny_study: Path, tmp_path: Path) -> None:
    entries = {"liver": ("liver",), "kidneys": ("kidney",)}
    whole = run_clocks(tiny_study, tmp_path / "whole", entries, TINY, cache_dir=tmp_path / "cache", figures=False)
    doc = json.loads((tmp_path / "whole" / "clocks.json").read_text())
    assert set(doc["clocks"]) == {WHOLE_BODY, "liver", "kidneys"} and doc["set"] == {
        "liver": ["liver"],
        "kidneys": ["kidney"],
    }
    for name, c in doc["clocks"].items():
        assert set(c) >= {
            "regions",
            "crop",
            "grid",
            "n",
            "mae",
            "pearson_r",
            "baseline_mae",
            "informative",
            "informative_reason",
        }
        assert isinstance(c["informative"], bool)
        assert (c["crop"] is None) == (name == WHOLE_BODY)
    assert doc["clocks"]["kidneys"]["regions"] == ["kidney_left", "kidney_right"]
    assert doc["overall_gap"]["clocks"] == [n for n in entries if whole.clocks[n]["informative"]]

    out = tmp_path / "killed"
    with pytest.raises(_Interrupt):  # killed in the second clock's second fold (3 folds × 2 epochs per run)
        run_clocks(tiny_study, out, entries, TINY, cache_dir=tmp_path / "cache", figures=False, progress=_KillAfter(8))
    assert (out / "liver" / "predictions.parquet").is_file() and not (out / "kidneys" / "predictions.parquet").exists()
    assert not (out / "organ_ages.parquet").exists()
    run_clocks(tiny_study, out, entries, TINY, cache_dir=tmp_path / "cache", figures=False)
    for table in ("organ_ages.parquet", "overall_gap.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / table), pd.read_parquet(out / table))
    organ = pd.read_parquet(out / "organ_ages.parquet")
    assert organ.groupby("clock").size().to_dict() == {c: len(load_study(tiny_study).cohort) for c in doc["clocks"]}


@pytest.mark.slow
def test_attribute_on_a_clock_run_reads_only_its_crop(tiny_study: Path, tmp_path: Path) -> None:
    from analysis.run import load_run

    run = tmp_path / "liver"
    train_run(tiny_study, run, replace(TINY, regions=("liver",)), cache_dir=tmp_path / "cache", figures=False)
    res = runner.invoke(app, ["attribute", str(run), "--method", "gradcam", "--method", "ablation", "--threads", "1"])
    assert res.exit_code == 0, res.output
    attr = pd.read_parquet(run / "attributions.parquet")
    n = len(pd.read_parquet(run / "predictions.parquet"))
    labels = json.loads((tiny_study / "labels.json").read_text())
    assert len(attr) == n * 2 * len(labels)
    assert set(load_run(run).methods) == {"gradcam", "ablation"}  # the tables `stats` reads
    # the clock's input is zero outside its dilated mask: a region that never touches the
    # liver's crop has no voxel on the model grid, so no attribution mass
    far = attr[attr["region"] == "urinary_bladder"]
    assert len(far) and (far["mass"].fillna(0.0) == 0.0).all()
    liver = attr[(attr["region"] == "liver") & (attr["method"] == "ablation")]
    assert (liver["n_voxels"] > 0).all() and (liver["mass"].abs() > 0).any()
