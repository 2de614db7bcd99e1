"""The TotalSegmentator backend: weights and licence checks offline, the private session, real runs.

Runs of the real TotalSegmentator need its weights and are marked ``weights`` (skipped
visibly without them). Everything else replaces ``python_api.totalsegmentator`` by a fake
that checks what it is given (private home, config, raw RAS+ intensities) and returns
known label maps.
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from segment_factories import fake_weights, make_study
from typer.testing import CliRunner

from bodyage.errors import InputError, SegmentationError, WeightsMissingError
from bodyage.segment import segment_study
from bodyage.segment_scan import check_raw_intensities, orientation_note
from bodyage.totalseg import (
    TotalSegmentatorSession,
    check_license,
    check_weights,
    default_weights_dir,
    patched_environ,
    private_config,
    required_weights,
    resolve_device,
    resolve_license,
    weights_available,
)
from cli.app import app

# the wrapper reads TotalSegmentator's own tables (tasks, weights, licences): the `segment` extra
pytest.importorskip("totalsegmentator", reason="TotalSegmentator is not installed (pip install 'bodyage[segment]')")

runner = CliRunner()
LICENSE = "aca_ABCDEFGHIJKLMN"  # 18 characters


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Block every socket connection; return the list of attempted addresses."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def ts_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A user TotalSegmentator home and weights folder of our own (empty)."""
    home = tmp_path / "user_home"
    weights = tmp_path / "weights"
    home.mkdir()
    weights.mkdir()
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return {"home": home, "weights": weights}


# ---------------------------------------------------------------- weights and licence, no torch


def test_weights_layout_follows_totalsegmentators_config() -> None:
    default = required_weights("total_mr", fast=False)
    assert [w.task_id for w in default] == [850, 851]
    assert default[0].folder == "Dataset850_TotalSegMRI_part1_organs_1088subj"
    assert default[0].model == "nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    assert default[0].folds == (0,)
    assert [w.task_id for w in required_weights("total_mr", fast=True)] == [852]
    tissue = required_weights("tissue_types_mr", fast=False)
    assert [(w.task_id, w.model) for w in tissue] == [
        (925, "nnUNetTrainer_DASegOrd0_NoMirroring__nnUNetPlans__3d_fullres")
    ]


def test_weights_dir_defaults(tmp_path: Path) -> None:
    assert default_weights_dir({"TOTALSEG_WEIGHTS_PATH": "/w"}) == Path("/w")
    assert default_weights_dir({"TOTALSEG_HOME_DIR": "/h"}) == Path("/h/nnunet/results")


def test_missing_weights_name_the_task_and_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        WeightsMissingError,
        match=r"TotalSegmentator weights for task total_mr are missing: Dataset850_TotalSegMRI_part1_organs_1088subj "
        r"in .*; on a machine with internet run `totalseg_download_weights -t total_mr`, then copy",
    ):
        check_weights(["total_mr"], fast=False, weights_dir=tmp_path)
    with pytest.raises(WeightsMissingError, match=r"task total_mr --fast are missing: Dataset852_.*-t total_fast_mr`"):
        check_weights(["total_mr"], fast=True, weights_dir=tmp_path)
    fake_weights(tmp_path, ["total_mr"])
    with pytest.raises(
        WeightsMissingError,
        match=r"task tissue_types_mr are missing: .* run `totalseg_set_license -l YOUR_KEY`, then "
        r"`totalseg_download_weights -t tissue_types_mr`",
    ):
        check_weights(["total_mr", "tissue_types_mr"], fast=False, weights_dir=tmp_path)
    assert [w.task_id for w in check_weights(["total_mr"], fast=False, weights_dir=tmp_path)] == [850, 851]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", r"incomplete \(nnUNetTrainer.*/fold_0/checkpoint_final.pth is truncated: a half-copied file\?\)"),
        ("drop_dataset", r"incomplete \(nnUNetTrainer.*/dataset.json is missing\)"),
        ("bad_plans", r"incomplete \(nnUNetTrainer.*/plans.json is not valid JSON: a half-copied file\?\)"),
        ("drop_fold", r"incomplete \(nnUNetTrainer.*/fold_0/checkpoint_final.pth is missing\)"),
    ],
)
def test_half_copied_weights_are_detected(tmp_path: Path, damage: str, message: str) -> None:
    fake_weights(tmp_path, ["total_mr"])
    model = required_weights("total_mr", fast=False)[1].model_dir(tmp_path)
    ckpt = model / "fold_0" / "checkpoint_final.pth"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:-30])
    elif damage == "drop_dataset":
        (model / "dataset.json").unlink()
    elif damage == "bad_plans":
        (model / "plans.json").write_text('{"plans_name": "nnU')
    else:
        ckpt.unlink()
    with pytest.raises(WeightsMissingError, match=r"weights for task total_mr are " + message + ": Dataset851_"):
        check_weights(["total_mr"], fast=False, weights_dir=tmp_path)


def test_licence_is_checked_offline(tmp_path: Path) -> None:
    check_license(["total_mr"], None)  # no licence needed
    with pytest.raises(
        InputError,
        match=r"task tissue_types_mr needs TotalSegmentator's licence \(free for academic use: "
        r"https://backend.totalsegmentator.com/license-academic/\); pass it with --license",
    ):
        check_license(["total_mr", "tissue_types_mr"], None)
    with pytest.raises(InputError, match="licence numbers must start with 'aca_'"):
        check_license(["tissue_types_mr"], "xyz_ABCDEFGHIJKLMN")
    check_license(["tissue_types_mr"], LICENSE)
    (tmp_path / "config.json").write_text(json.dumps({"license_number": LICENSE}))
    assert resolve_license(None, {"TOTALSEG_HOME_DIR": str(tmp_path)}) == LICENSE
    assert resolve_license(" aca_X ", {"TOTALSEG_HOME_DIR": str(tmp_path)}) == "aca_X"
    assert resolve_license(None, {"TOTALSEG_HOME_DIR": str(tmp_path / "none")}) is None


def test_private_config_turns_usage_statistics_off() -> None:
    assert private_config(None) == {
        "totalseg_id": "totalseg_bodyage",
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    assert private_config(LICENSE)["license_number"] == LICENSE


def test_patched_environ_restores_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A_SET", "old")
    monkeypatch.delenv("B_UNSET", raising=False)
    monkeypatch.delenv("C_BY_OTHERS", raising=False)
    with pytest.raises(RuntimeError), patched_environ({"A_SET": "new", "B_UNSET": "x"}, also_restore=["C_BY_OTHERS"]):
        os.environ["C_BY_OTHERS"] = "set inside"
        raise RuntimeError
    assert os.environ["A_SET"] == "old"
    assert "B_UNSET" not in os.environ and "C_BY_OTHERS" not in os.environ


def test_raw_intensity_and_orientation_checks(rng: np.random.Generator) -> None:
    check_raw_intensities(rng.integers(0, 900, size=(4, 4, 4)).astype(np.int16), what="w")
    normalised = rng.random((4, 4, 4))
    normalised[0, 0, 0] = 1.0
    with pytest.raises(InputError, match=r"the water image x has intensities within ±1: it looks normalised .*#455"):
        check_raw_intensities(normalised, what="the water image x")
    with pytest.raises(InputError, match="holds NaN or infinite values"):
        check_raw_intensities(np.array([[[np.nan, 300.0]]]), what="w")
    assert orientation_note((50, 40, 120), (4.0, 4.0, 4.0)) is None
    note = orientation_note((120, 40, 50), (4.0, 4.0, 4.0))
    assert note is not None and note.startswith("orientation: the longest axis is left-right (480 mm)")


def test_gpu_without_cuda_is_an_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match=r"--device gpu: no CUDA device is visible \(CUDA_VISIBLE_DEVICES="):
        resolve_device("gpu")


# ---------------------------------------------------------------- the "done when": offline, no weights


def test_without_weights_segment_exits_1_with_one_line_and_no_network(
    tmp_path: Path, ts_env: dict[str, Path], no_network: list[Any]
) -> None:
    study = make_study(tmp_path / "study", n_scans=2)
    before = {p: p.stat().st_mtime_ns for p in (study / "masks").glob("*.nii.gz")}
    res = runner.invoke(app, ["segment", str(study)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: TotalSegmentator weights for task total_mr are missing: Dataset850_")
    assert "`totalseg_download_weights -t total_mr`" in lines[0]
    assert no_network == []  # not even an attempt
    assert list(ts_env["home"].iterdir()) == []  # the user's TotalSegmentator home is untouched
    assert {p: p.stat().st_mtime_ns for p in (study / "masks").glob("*.nii.gz")} == before


def test_without_weights_fast_names_the_fast_download(
    tmp_path: Path, ts_env: dict[str, Path], no_network: list[Any]
) -> None:
    study = make_study(tmp_path / "study", n_scans=1)
    res = runner.invoke(app, ["segment", str(study), "--fast", "--weights", str(ts_env["weights"])])
    assert res.exit_code == 1
    assert "`totalseg_download_weights -t total_fast_mr`" in res.stderr and no_network == []


def test_tissue_task_without_licence_is_a_clear_error(tmp_path: Path, ts_env: dict[str, Path]) -> None:
    study = make_study(tmp_path / "study", n_scans=1)
    res = runner.invoke(app, ["segment", str(study), "--task", "total_mr", "--task", "tissue_types_mr"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: task tissue_types_mr needs TotalSegmentator's licence")


# ---------------------------------------------------------------- the session, with a fake TotalSegmentator


class FakeTotalSegmentator:
    """Stands in for ``python_api.totalsegmentator``: checks its inputs, returns known maps."""

    def __init__(self, user_home: Path, weights: Path, *, fail: Exception | None = None) -> None:
        self.user_home = user_home
        self.weights = weights
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.homes: set[str] = set()

    def __call__(self, img: nib.Nifti1Image, output: Any = None, **kw: Any) -> nib.Nifti1Image:
        from totalsegmentator import python_api

        home = Path(os.environ["TOTALSEG_HOME_DIR"])
        assert home != self.user_home and home.name.startswith("bodyage-totalseg-")
        cfg = json.loads((home / "config.json").read_text())
        assert cfg["send_usage_stats"] is False
        assert os.environ["TOTALSEG_WEIGHTS_PATH"] == str(self.weights)
        assert output is None and kw["ml"] is True and kw["quiet"] is True and kw["license_number"] is None
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = np.asarray(img.dataobj)
        assert data.max() > 100  # raw intensities, not normalised
        python_api.download_pretrained_weights(required_weights(kw["task"], fast=kw["fast"])[0].task_id)
        print("TotalSegmentator chatter that must not reach the terminal")
        self.calls.append({"task": kw["task"], "fast": kw["fast"], "device": kw["device"], "config": cfg})
        self.homes.add(str(home))
        if self.fail is not None:
            raise self.fail
        out = np.zeros(data.shape, dtype=np.uint8)
        body = data > 500
        if kw["task"] == "total_mr":
            out[body & (np.indices(data.shape)[2] >= data.shape[2] // 2)] = 5  # "liver": the upper half
        else:
            out[body] = 3  # skeletal_muscle everywhere in the body
        return nib.Nifti1Image(out, img.affine)


@pytest.fixture
def fake_ts(ts_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> FakeTotalSegmentator:
    python_api = pytest.importorskip("totalsegmentator.python_api")
    fake_weights(ts_env["weights"], ["total_mr", "tissue_types_mr"])
    fake_weights(ts_env["weights"], ["total_mr"], fast=True)
    fake = FakeTotalSegmentator(ts_env["home"], ts_env["weights"])
    monkeypatch.setattr(python_api, "totalsegmentator", fake)
    return fake


@pytest.mark.slow
def test_session_runs_privately_and_restores_every_global(
    tmp_path: Path,
    fake_ts: FakeTotalSegmentator,
    no_network: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch
    from totalsegmentator import python_api

    study = make_study(tmp_path / "study", n_scans=2)
    env_before = {k: os.environ.get(k) for k in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_results")}
    downloader = python_api.download_pretrained_weights
    threads = torch.get_num_threads()
    summary = segment_study(study, tasks=["total_mr", "tissue_types_mr"], license_key=LICENSE, device="cpu")
    assert summary.n_new == 2 and summary.n_replaced == 2
    assert [c["task"] for c in fake_ts.calls] == ["total_mr", "tissue_types_mr"] * 2
    assert all(c["device"] == "cpu" for c in fake_ts.calls)
    assert fake_ts.calls[1]["config"]["license_number"] == LICENSE
    # globals restored, private home removed, nothing printed, no network
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert python_api.download_pretrained_weights is downloader
    assert torch.get_num_threads() == threads
    assert all(not Path(h).exists() for h in fake_ts.homes)
    assert capsys.readouterr().out == ""
    assert no_network == []
    # organs win over tissue; the mask follows the image grid; labels.json has the tissue classes
    mask = np.asarray(nib.load(str(study / "masks" / "S001_0.nii.gz")).dataobj)
    water = np.asarray(nib.load(str(study / "images" / "S001_0_water.nii.gz")).dataobj)
    fat = np.asarray(nib.load(str(study / "images" / "S001_0_fat.nii.gz")).dataobj)  # tissue_types_mr's channel
    organ = (water > 500) & (np.indices(mask.shape)[2] >= mask.shape[2] // 2)
    tissue = fat > 500
    assert (organ & tissue).any()  # both claim some voxels: the organ wins there
    assert (mask[organ] == 5).all() and (mask[tissue & ~organ] == 53).all() and (mask[~organ & ~tissue] == 0).all()
    run = json.loads((study / "masks" / "run.json").read_text())
    assert run["config"] == {
        "source": "totalsegmentator",
        "tasks": ["total_mr", "tissue_types_mr"],
        "fast": False,
        "channels": {"tissue_types_mr": "fat", "total_mr": "water"},
    }
    assert [m["task_id"] for m in run["models"]] == [850, 851, 925]
    assert run["license"] == "set" and LICENSE not in json.dumps(run)
    qc = pd.read_csv(study / "masks" / "qc.csv")
    assert set(qc["region"]) == set(json.loads((study / "labels.json").read_text()).values())
    # the same arguments again: nothing to do
    fake_ts.calls.clear()
    again = segment_study(study, tasks=["total_mr", "tissue_types_mr"], license_key=LICENSE, device="cpu")
    assert (again.n_new, again.n_skipped, fake_ts.calls) == (0, 2, [])


@pytest.mark.slow
def test_fast_is_passed_through_and_fed_the_chosen_channel(tmp_path: Path, fake_ts: FakeTotalSegmentator) -> None:
    study = make_study(tmp_path / "study", n_scans=1)
    res = runner.invoke(app, ["segment", str(study), "--fast", "--device", "cpu", "--channel", "total_mr=fat"])
    assert res.exit_code == 0, res.output
    assert fake_ts.calls[0]["fast"] is True
    run = json.loads((study / "masks" / "run.json").read_text())
    assert run["config"]["channels"] == {"total_mr": "fat"} and [m["task_id"] for m in run["models"]] == [852]


@pytest.mark.slow
def test_normalised_images_fail_their_scan(tmp_path: Path, fake_ts: FakeTotalSegmentator) -> None:
    study = make_study(tmp_path / "study", n_scans=3)
    path = study / "images" / "S002_0_water.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) / 1000.0, img.affine), path)
    with pytest.raises(SegmentationError, match=r"1 of 3 scans have no mask \(first: scan S002_0: the water image"):
        segment_study(study, device="cpu")
    failures = pd.read_csv(study / "masks" / "failures.csv")
    assert failures["stage"].tolist() == ["image"] and "looks normalised" in failures["reason"].iloc[0]
    assert len(fake_ts.calls) == 2


@pytest.mark.slow
def test_repeated_totalsegmentator_failures_stop_the_step(
    tmp_path: Path, fake_ts: FakeTotalSegmentator, ts_env: dict[str, Path]
) -> None:
    study = make_study(tmp_path / "study", n_scans=5)
    fake_ts.fail = RuntimeError("CUDA out of memory")
    with pytest.raises(
        SegmentationError,
        match=r"TotalSegmentator failed on the first 3 scans; stopping \(last: scan S003_0: task total_mr: "
        r"RuntimeError: CUDA out of memory\)",
    ):
        segment_study(study, device="cpu")
    assert len(fake_ts.calls) == 3


@pytest.mark.slow
def test_a_download_attempt_becomes_weights_missing(tmp_path: Path, fake_ts: FakeTotalSegmentator) -> None:
    import requests

    study = make_study(tmp_path / "study", n_scans=1)
    fake_ts.fail = requests.ConnectionError("no route to host")
    res = runner.invoke(app, ["segment", str(study), "--device", "cpu"])
    assert res.exit_code == 1
    assert res.stderr.startswith(
        "error: TotalSegmentator tried to reach the network for task total_mr (ConnectionError); on a machine with"
    )


@pytest.mark.slow
def test_an_unchecked_model_is_never_downloaded(tmp_path: Path, ts_env: dict[str, Path]) -> None:
    from totalsegmentator import python_api

    fake_weights(ts_env["weights"], ["total_mr"])
    with TotalSegmentatorSession(
        ["total_mr"], fast=False, device="cpu", weights_dir=ts_env["weights"], license_key=None
    ) as session:
        assert (
            session.home is not None
            and json.loads((session.home / "config.json").read_text())["send_usage_stats"] is False
        )
        python_api.download_pretrained_weights(850)  # checked: a no-op
        with pytest.raises(WeightsMissingError, match="asked for model 852, which bodyage did not check"):
            python_api.download_pretrained_weights(852)
    assert python_api.download_pretrained_weights.__module__ == "totalsegmentator.libs"


# ---------------------------------------------------------------- real weights


def _zip_ok(path: Path) -> bool:
    return zipfile.is_zipfile(path)


@pytest.mark.weights
@pytest.mark.skipif(
    not weights_available(("total_mr",), fast=True),
    reason="TotalSegmentator total_mr --fast weights not found in TOTALSEG_WEIGHTS_PATH / TOTALSEG_HOME_DIR "
    "(see docs/guide/segment.md, the test that needs real weights)",
)
def test_real_totalsegmentator_on_a_small_simulated_scan(tmp_path: Path, no_network: list[Any]) -> None:
    from conftest import tiny_scenario

    from bodyage.simulate import simulate_study

    study = tmp_path / "study"
    scenario = tiny_scenario(
        subjects=1,
        grid={"shape": [48, 36, 96], "spacing_mm": [10.0, 10.0, 10.0]},
        repeat_visits={"fraction": 0.0, "interval_years": 2.5},
    )
    simulate_study(study, scenario=scenario, workers=1, figures=False)
    summary = segment_study(study, fast=True, device="auto")
    assert summary.n_new == 1 and summary.n_failed == 0
    cohort = pd.read_csv(study / "cohort.csv", dtype={"subject_id": str})
    mask = nib.load(str(study / cohort["mask"].iloc[0]))
    image = nib.load(str(study / cohort["water"].iloc[0]))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    ids = set(np.unique(np.asarray(mask.dataobj)).tolist())
    assert ids <= set(range(0, 51)) and len(ids) > 1  # something was segmented, organ ids only
    assert no_network == []
    run = json.loads((study / "masks" / "run.json").read_text())
    assert [m["task_id"] for m in run["models"]] == [852]
