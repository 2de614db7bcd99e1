"""`bodyage train`: folds, bias correction, checkpoints, resume, torchrun, bad input.

Every training run here is tiny (16×12×32 grid, a 3-stage model with 4–8 channels,
1–3 epochs) so each takes seconds; none asserts a wall-clock time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bodyage.accuracy import baseline_predictions, informative
from bodyage.checkpoints import load_fold_model
from bodyage.errors import CheckpointError, InputError, RunError
from bodyage.folds import BiasCorrection, assign_folds, inner_split, regression_metrics
from bodyage.train import TrainConfig, train_run
from bodyage.train_config import parse_grid
from cli.app import app

runner = CliRunner()

TINY = TrainConfig(folds=3, epochs=3, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4)
TINY_ARGS = ["--folds", "3", "--epochs", "2", "--grid", "16,12,32", "--batch-size", "4"]
TINY_ARGS += ["--model-options", '{"widths": [4, 8, 8]}']


@pytest.fixture(scope="module")
def tiny_run(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("train") / "run"
    train_run(tiny_study, run, TINY, cache_dir=run.parent / "cache")
    return run


# ----------------------------------------------------------------------------- folds


def _cohort(n_subjects: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        age = float(rng.uniform(45, 80))
        for v in range(1 + int(rng.random() < 0.3)):
            rows.append({"subject_id": f"S{s:03d}", "visit": v, "age": age + 2.5 * v})
    return pd.DataFrame(rows)


def test_folds_group_subjects_and_cover_every_scan_once() -> None:
    cohort = _cohort(53)
    folds = assign_folds(cohort, 5, seed=3)
    assert len(folds) == len(cohort) and set(folds) == set(range(5))
    assert cohort.assign(fold=folds).groupby("subject_id")["fold"].nunique().max() == 1
    per_fold = cohort.assign(fold=folds).groupby("fold")["subject_id"].nunique()
    assert per_fold.max() - per_fold.min() <= 1
    # stratified: every fold spans the age range (its mean age is near the cohort's)
    mean_age = cohort.assign(fold=folds).groupby("fold")["age"].mean()
    assert (mean_age - cohort["age"].mean()).abs().max() < 3.0
    assert assign_folds(cohort, 5, seed=3).equals(folds)
    assert not assign_folds(cohort, 5, seed=4).equals(folds)


def test_inner_split_takes_whole_subjects() -> None:
    cohort = _cohort(40)
    val = inner_split(cohort, 0.2, seed=1)
    picked = cohort.assign(val=val).groupby("subject_id")["val"].agg(["min", "max"])
    assert (picked["min"] == picked["max"]).all()
    assert picked["min"].sum() == 8


def test_folds_refuse_too_few_subjects() -> None:
    with pytest.raises(InputError, match="5 folds need at least 5 subjects; the cohort has 3"):
        assign_folds(_cohort(3), 5, seed=0)
    with pytest.raises(InputError, match="--folds must be at least 2, got 1"):
        assign_folds(_cohort(10), 1, seed=0)


# ----------------------------------------------------------------------------- bias correction


def test_bias_correction_matches_a_hand_computed_example() -> None:
    # predictions regress to the mean: predicted = 0.5 · age + 30 exactly
    age = np.array([50.0, 60.0, 70.0])
    predicted = np.array([55.0, 60.0, 65.0])
    bc = BiasCorrection.fit(age, predicted)
    assert bc.slope == pytest.approx(0.5) and bc.intercept == pytest.approx(30.0) and bc.n == 3
    # a new scan: age 80, predicted 72 (fitted line says 70) -> corrected 72 + (80 - 70) = 82
    assert bc.apply([80.0], [72.0]) == pytest.approx([82.0])
    # corrected gap = predicted - fitted line: 72 - 70 = 2
    assert bc.apply([80.0], [72.0])[0] - 80.0 == pytest.approx(2.0)
    # too few scans or no age spread -> identity
    assert BiasCorrection.fit([50.0, 60.0], [55.0, 58.0]).slope == 1.0
    assert BiasCorrection.fit([50.0] * 4, [51.0, 52.0, 53.0, 54.0]).intercept == 0.0


def test_regression_metrics_by_hand() -> None:
    m = regression_metrics([50.0, 60.0, 70.0], [52.0, 59.0, 73.0])
    assert m["mae"] == pytest.approx(2.0)
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 1 + 9) / 3))
    assert m["r2"] == pytest.approx(1 - 14 / 200)
    assert m["n"] == 3


# ----------------------------------------------------------------------------- a full tiny run


def test_run_writes_every_output(tiny_run: Path, tiny_study: Path) -> None:
    cohort = pd.read_csv(tiny_study / "cohort.csv")
    preds = pd.read_parquet(tiny_run / "predictions.parquet")
    assert list(preds.columns) == [
        "subject_id",
        "visit",
        "fold",
        "age",
        "predicted_age",
        "age_gap",
        "age_gap_corrected",
    ]
    keys = set(zip(cohort["subject_id"].astype(str), cohort["visit"], strict=True))
    assert set(zip(preds["subject_id"].astype(str), preds["visit"], strict=True)) == keys
    assert len(preds) == len(cohort)  # every scan exactly once
    assert preds.groupby("subject_id")["fold"].nunique().max() == 1
    np.testing.assert_allclose(preds["age_gap"], preds["predicted_age"] - preds["age"])
    assert np.isfinite(preds["age_gap_corrected"]).all()

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["overall"]["n"] == len(cohort)
    assert set(metrics["folds"]) == {"0", "1", "2"}
    assert metrics["mae_ratio"] == pytest.approx(metrics["overall"]["mae"] / metrics["oracle_mae"])
    log = pd.read_csv(tiny_run / "training_log.csv")
    assert {"fold", "epoch", "train_loss_years", "val_mae", "lr"} <= set(log.columns)
    assert set(log["fold"]) == {0, 1, 2}
    for stem in ("learning_curves", "predicted_vs_age"):
        assert (tiny_run / "figures" / f"{stem}.png").stat().st_size > 1000
    record = json.loads((tiny_run / "run.json").read_text())
    assert record["command"] == "train" and record["config_hash"]


def test_metrics_json_has_the_baseline_and_no_corrected_accuracy(tiny_run: Path) -> None:
    # the corrected predictions use the true age: their MAE is not accuracy (issue 15)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert "overall_corrected" not in metrics
    preds = pd.read_parquet(tiny_run / "predictions.parquet")
    base = baseline_predictions(preds["age"], preds["fold"])
    assert metrics["baseline_mae"] == pytest.approx(float(np.abs(base - preds["age"]).mean()))
    assert isinstance(metrics["informative"], bool)
    assert (metrics["informative"], metrics["informative_reason"]) == informative(metrics)


def test_out_of_fold_predictions_come_from_the_fold_model(tiny_run: Path, tiny_study: Path) -> None:
    """Reloading fold k's checkpoint and predicting its test scans reproduces predictions.parquet."""
    import torch

    from bodyage.preprocess import PreprocessSettings, build_cache
    from bodyage.study import load_study

    study = load_study(tiny_study)
    preds = pd.read_parquet(tiny_run / "predictions.parquet")
    cohort = study.cohort.merge(preds, on=["subject_id", "visit"], suffixes=("", "_pred"))
    model, hp = load_fold_model(tiny_run / "models" / "fold1.pt")
    cache = build_cache(
        study,
        PreprocessSettings(**hp["preprocess"] | {"grid": tuple(hp["grid"])}),
        cache_root=tiny_run.parent / "cache",
    )
    rows = cohort[cohort["fold"] == 1]
    x = torch.from_numpy(np.stack([cache.scans[s].load().astype(np.float32) for s in rows["scan_id"]]))
    with torch.no_grad():
        years = model(x).numpy() * hp["age_sd"] + hp["age_mean"]
    np.testing.assert_allclose(years, rows["predicted_age"], atol=1e-3)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_mismatch(tiny_run: Path, tmp_path: Path) -> None:
    import torch

    path = tiny_run / "models" / "fold0.pt"
    raw = torch.load(path, weights_only=True)  # plain tensors and containers only
    model, hp = load_fold_model(path, grid=(16, 12, 32), channels=("water", "fat"))
    assert not model.training
    assert hp["grid"] == [16, 12, 32] and hp["channels"] == ["water", "fat"]
    assert {"age_mean", "age_sd", "bias", "default_layer", "preprocess", "fold"} <= set(hp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["state_dict"][k])

    with pytest.raises(
        CheckpointError, match=r"model grid \[16, 12, 32\] does not match the expected grid \[32, 24, 64\]"
    ):
        load_fold_model(path, grid=(32, 24, 64))
    with pytest.raises(CheckpointError, match=r"model channels \['water', 'fat'\] do not match .*\['fat', 'water'\]"):
        load_fold_model(path, channels=("fat", "water"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_fold_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded as a bodyage checkpoint"):
        load_fold_model(junk)
    code = tmp_path / "code.pt"
    torch.save({"state_dict": print}, code)  # a pickled function: refused, and never advised to load unsafely
    for bad in (junk, code):
        with pytest.raises(
            CheckpointError, match=r"holds objects other than weights, which are never loaded\)$"
        ) as err:
            load_fold_model(bad)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a bodyage checkpoint of format"):
        load_fold_model(other)


# ----------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


class _KillAfter:
    """A progress display that raises after ``n`` epochs, like a job killed mid-fold."""

    def __init__(self, n: int) -> None:
        self.left = n

    def task(self, description: str, total: int | None) -> _KillAfter:
        return self

    def advance(self, n: int = 1, **fields: object) -> None:
        if fields:  # an epoch finished (the preprocess bar advances without fields)
            self.left -= 1
            if self.left < 0:
                raise _Interrupt

    def close(self) -> None:
        pass


def test_an_interrupted_run_resumes_to_the_same_complete_result(tiny_study: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(folds=3, epochs=3, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4, seed=5)
    whole = train_run(tiny_study, tmp_path / "whole", cfg, cache_dir=tmp_path / "cache", figures=False)

    run = tmp_path / "run"
    with pytest.raises(_Interrupt):  # killed in fold 2, after its first epoch was saved
        train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", progress=_KillAfter(4), figures=False)
    assert (run / "models" / "fold0.pt").is_file() and (run / "models" / "fold1.partial.pt").is_file()
    assert not (run / "predictions.parquet").exists()

    resumed = train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", figures=False)
    assert resumed.folds_skipped == 1 and resumed.folds_trained == 2
    assert not list((run / "models").glob("*.partial.pt"))
    a = pd.read_parquet(whole.run / "predictions.parquet")
    b = pd.read_parquet(run / "predictions.parquet")
    assert len(b) == len(pd.read_csv(tiny_study / "cohort.csv"))
    pd.testing.assert_frame_equal(a, b, atol=1e-4)  # resumed from saved optimiser and random states


def test_a_kill_after_an_early_stop_resumes_to_the_same_model(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # patience 1, 6 epochs: watched from epoch 3, a fold that stops does so at epoch 4 and
    # keeps epoch 3; resumed without the stop recorded it trained epoch 5 and kept that
    cfg = replace(TINY, folds=2, epochs=6, patience=1, seed=0)
    whole = train_run(tiny_study, tmp_path / "whole", cfg, cache_dir=tmp_path / "cache", figures=False)
    log = pd.read_csv(whole.run / "training_log.csv")
    stopped = [k for k, n in log.groupby("fold").size().items() if n < cfg.epochs]
    assert stopped  # at least one fold stopped early (fold 0 at seed 0)
    calls: list[int] = []
    fit = BiasCorrection.fit

    def killed(age: object, predicted: object) -> BiasCorrection:
        calls.append(1)
        if len(calls) > stopped[0]:  # after the fold's last partial checkpoint, before its final files
            raise _Interrupt
        return fit(age, predicted)  # type: ignore[arg-type]

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(BiasCorrection, "fit", killed)
        with pytest.raises(_Interrupt):
            train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", figures=False)
    assert (run / "models" / f"fold{stopped[0]}.partial.pt").is_file()
    assert not (run / "models" / f"fold{stopped[0]}.pt").exists()

    train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", figures=False)
    pd.testing.assert_frame_equal(
        pd.read_parquet(whole.run / "predictions.parquet"),
        pd.read_parquet(run / "predictions.parquet"),
        check_exact=True,
    )
    cols = ["fold", "epoch", "val_mae"]  # no epoch trained after the stop
    pd.testing.assert_frame_equal(log[cols], pd.read_csv(run / "training_log.csv")[cols], check_exact=True)


def test_a_corrupt_partial_checkpoint_is_discarded_with_a_warning(tiny_study: Path, tmp_path: Path) -> None:
    from bodyage.errors import BodyageWarning

    cfg = replace(TINY, folds=2, epochs=2)
    whole = train_run(tiny_study, tmp_path / "whole", cfg, cache_dir=tmp_path / "cache", figures=False)
    run = tmp_path / "run"
    with pytest.raises(_Interrupt):  # killed in fold 1 after its first epoch
        train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", progress=_KillAfter(3), figures=False)
    partial = run / "models" / "fold1.partial.pt"
    partial.write_bytes(partial.read_bytes()[:300])  # a torn write on a file system without atomic rename
    with pytest.warns(
        BodyageWarning, match=r"fold1\.partial\.pt: unreadable partial checkpoint .*trained again"
    ) as rec:
        train_run(tiny_study, run, cfg, cache_dir=tmp_path / "cache", figures=False)
    assert not any("weights_only" in str(w.message) for w in rec)
    pd.testing.assert_frame_equal(
        pd.read_parquet(whole.run / "predictions.parquet"), pd.read_parquet(run / "predictions.parquet"), atol=1e-4
    )


def test_a_full_disk_is_one_error_line_naming_the_file(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import torch

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(tiny_study), "--run", str(run), *TINY_ARGS, "--cache", str(tmp_path / "c")])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {run / 'models' / 'fold0.partial.pt'}: cannot be written (No space left on device)"]
    assert "Traceback" not in res.output and not list((run / "models").glob(".*tmp*"))


def test_temporary_files_of_a_killed_run_are_removed_on_start(tiny_run: Path, tiny_study: Path, tmp_path: Path) -> None:
    from bodyage.atomic import STALE_SECONDS, _host

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    models = run / "models"
    stale = [
        models / f".fold0.pt.{_host()}-{int(dead.stdout)}.a1b2c3d4.tmp.pt",  # this host, process gone
        run / ".metrics.json.otherhost-17.zzzz9999.tmp.json",  # another host, two days old
        models / ".fold1.pt.q7w8e9r0.tmp.pt",  # an older version's name, two days old
    ]
    kept = [
        models / f".fold1.pt.{_host()}-{os.getpid()}.k1k2k3k4.tmp.pt",  # being written now
        run / ".predictions.parquet.otherhost-17.abcd1234.tmp.parquet",  # another host, fresh
        models / ".notes.txt",  # not ours
    ]
    for f in stale + kept:
        f.write_bytes(b"half")
    for f in stale[1:]:
        os.utime(f, (f.stat().st_atime - STALE_SECONDS - 3600,) * 2)
    train_run(tiny_study, run, TINY, cache_dir=tiny_run.parent / "cache", figures=False)
    assert [f.name for f in stale if f.exists()] == []
    assert [f.name for f in kept if f.exists()] == [f.name for f in kept]


def test_a_run_folder_with_other_settings_is_refused(tiny_run: Path, tiny_study: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = TrainConfig(folds=3, epochs=3, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4, lr=1e-3)
    with pytest.raises(RunError, match="was started with other settings"):
        train_run(tiny_study, run, other, cache_dir=tiny_run.parent / "cache")


# ----------------------------------------------------------------------------- torchrun


def test_ddp_with_two_gloo_processes(tiny_study: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # torchrun parses abbreviations of its own options anywhere on the line (--run would be
    # read as its --run-path), hence --run-dir
    cmd += ["-m", "cli.app", "--quiet", "train", str(tiny_study), "--run-dir", str(run), "--device", "cpu"]
    cmd += [*TINY_ARGS, "--cache", str(tmp_path / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_parquet(run / "predictions.parquet")
    assert len(preds) == len(pd.read_csv(tiny_study / "cohort.csv"))
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    summary = [line for line in res.stdout.splitlines() if "folds: out-of-fold MAE" in line]
    assert len(summary) == 1  # only rank 0 reports


# ----------------------------------------------------------------------------- the CLI and bad input


def test_cli_train_summary(tiny_study: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", str(tiny_study), "--run", str(tmp_path / "run"), *TINY_ARGS, "--quiet"])
    assert res.exit_code == 0, res.output
    assert "30 scans, 3 folds: out-of-fold MAE" in res.output and "oracle MAE" in res.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["training_dtype"] in ("bfloat16", "float32")
    assert f"min in {record['training_dtype']};" in res.output


def _corrupt_copy(study: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    cohort = pd.read_csv(copy / "cohort.csv")
    bad = copy / cohort.loc[2, "fat"]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated .nii.gz
    return copy, f"{cohort.loc[2, 'subject_id']}"


def test_a_corrupt_scan_is_listed_not_dropped(tiny_study: Path, tmp_path: Path) -> None:
    study, subject = _corrupt_copy(tiny_study, tmp_path)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(study), "--run", str(run), *TINY_ARGS, "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "1 scan(s) in failures.csv" in res.output
    failures = pd.read_csv(run / "failures.csv")
    assert len(failures) == 1 and subject in failures.loc[0, "scan_id"] and "fat" in failures.loc[0, "reason"]
    assert len(pd.read_parquet(run / "predictions.parquet")) == len(pd.read_csv(study / "cohort.csv")) - 1

    res = runner.invoke(app, ["train", str(study), "--run", str(tmp_path / "r2"), *TINY_ARGS, "--strict"])
    assert res.exit_code == 1
    assert "--strict stops at the first bad scan" in res.output and "channel fat" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vit"], "unknown model 'vit'; choose one of sfcn, resnet3d"),
        (["--grid", "16,12"], "--grid must be three integers X,Y,Z of at least 8 each, got '16,12'"),
        (["--grid", "a,b,c"], "--grid must be three integers X,Y,Z, got 'a,b,c'"),
        (["--folds", "1"], "--folds must be at least 2, got 1"),
        (["--folds", "40"], "40 folds need at least 40 subjects; the cohort has 24"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--model-options", "{widths"], "--model-options is not valid JSON"),
        (["--model-options", '{"depth": 3}'], "--model-options do not fit model 'sfcn'"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda, got 'tpu'"),
        (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        (["--exclude-qc", "blurry"], "blurry"),
        (
            ["--grid", "32,24,64", "--model-options", '{"widths": [8, 16, 32, 64, 128, 256, 512]}'],
            "--model-options widths [8, 16, 32, 64, 128, 256, 512] (7 stages) is too deep for the grid 32x24x64: "
            "at most 5 stages fit it",
        ),
    ],
)
def test_bad_options_say_what_is_wrong(tiny_study: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["train", str(tiny_study), "--run", str(tmp_path / "run"), *TINY_ARGS]
    res = runner.invoke(app, [*base, *args])
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert not (tmp_path / "run").exists()  # nothing started, no folder to refuse other settings later


def test_missing_study_and_missing_ages(tmp_path: Path, tiny_study: Path) -> None:
    res = runner.invoke(app, ["train", str(tmp_path / "none"), "--run", str(tmp_path / "run")])
    assert res.exit_code == 1 and "none: study folder not found" in res.output
    study = tmp_path / "study"
    shutil.copytree(tiny_study, study)
    cohort = pd.read_csv(study / "cohort.csv")
    cohort.loc[4, "age"] = None
    cohort.to_csv(study / "cohort.csv", index=False)
    res = runner.invoke(app, ["train", str(study), "--run", str(tmp_path / "run")])
    assert res.exit_code == 1 and "has a missing or non-numeric age" in res.output


def test_cuda_requested_without_cuda(tiny_study: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = runner.invoke(app, ["train", str(tiny_study), "--run", str(tmp_path / "run"), "--device", "cuda"])
    assert res.exit_code == 1
    assert "--device cuda was requested but torch sees no CUDA device" in res.output


def test_parse_grid() -> None:
    assert parse_grid(None) is None and parse_grid("auto") is None
    assert parse_grid("32x24x64") == (32, 24, 64)


def test_early_stopping_watches_only_the_second_half_of_the_schedule(tiny_study: Path, tmp_path: Path) -> None:
    # patience 1: any epoch that does not improve would stop the fold; before half-way none may
    cfg = TrainConfig(
        folds=2, epochs=6, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4, patience=1
    )
    train_run(tiny_study, tmp_path / "run", cfg, cache_dir=tmp_path / "cache", figures=False)
    log = pd.read_csv(tmp_path / "run" / "training_log.csv")
    for _, fold in log.groupby("fold"):
        assert len(fold) >= 5  # epochs 0-2 are never watched; the earliest stop is epoch 4
        watched = fold[fold["epoch"] >= 3]["val_mae"].to_numpy()
        if len(fold) < 6:  # it stopped: the last watched epoch did not improve on the watched best
            assert watched[-1] >= watched[:-1].min()


@pytest.mark.parametrize("model", ["sfcn", "resnet3d"])
def test_reduced_precision_keeps_the_head_in_float32(model: str) -> None:
    import torch

    from bodyage.models import build_model
    from bodyage.train_config import autocast_dtype

    torch.manual_seed(0)
    net = build_model(model, 2, widths=[4, 8, 8]).eval()
    x = torch.rand(3, 2, 16, 12, 32)
    seen: dict[str, torch.dtype] = {}
    net.head[-1].register_forward_hook(lambda m, i, o: seen.update(linear_in=i[0].dtype))
    with torch.no_grad():
        full = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = net(x)
    # the convolutions ran in bfloat16, global pooling and the linear output in float32
    assert reduced.dtype == torch.float32 and seen["linear_in"] == torch.float32
    assert 0 < (reduced - full).abs().max() < 0.02 * full.abs().max() + 1e-3
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16
    assert autocast_dtype("auto", cpu) is None  # bf16 diverged to NaN on small grids: opt-in


def test_checkpoints_record_the_training_precision(tiny_run: Path) -> None:
    _, hp = load_fold_model(tiny_run / "models" / "fold0.pt")
    assert hp["training_dtype"] in ("bfloat16", "float32")


def test_augmentation_equals_grid_sample_of_the_same_transform() -> None:
    import torch
    import torch.nn.functional as F

    from bodyage.train_data import augment_batch

    cfg = replace(TrainConfig(), max_scale=0.1, max_shift_voxels=3, intensity_jitter=0.0)
    x = torch.rand(5, 2, 9, 7, 12)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    # the same draws, resampled the general way
    gen = torch.Generator().manual_seed(3)
    scale = 1.0 + (torch.rand(5, generator=gen) * 2 - 1) * cfg.max_scale
    shift = torch.randint(-3, 4, (5, 3), generator=gen).float()
    theta = torch.zeros(5, 3, 4)
    for i in range(3):
        theta[:, i, i] = scale
    theta[:, :, 3] = 2.0 * shift / torch.tensor([12.0, 7.0, 9.0])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert (scale - 1).abs().max() > 0.05 and shift.abs().max() == 3  # the draws do move things
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x)


def test_the_automatic_grid_skips_an_unreadable_first_scan(tiny_study: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from ukb_factories import save_singular

    from bodyage.errors import StudyError
    from bodyage.preprocess import auto_grid
    from bodyage.study import load_study
    from bodyage.train import _grid_of_first_readable

    copy = tmp_path / "study"
    shutil.copytree(tiny_study, copy)
    cohort = pd.read_csv(copy / "cohort.csv")
    first = copy / cohort.loc[0, "water"]
    data = np.asarray(nib.load(first).dataobj)
    save_singular(first, data)  # used to stop train with an error before anything was listed
    study = load_study(copy)
    assert _grid_of_first_readable(study, study.cohort, "water") == auto_grid(data.shape)
    for path in cohort["water"][:3]:
        save_singular(copy / path, data)
    with pytest.raises(StudyError, match=r"no readable water image among the first 3 scans: .*singular affine"):
        _grid_of_first_readable(study, study.cohort.iloc[:3], "water")


def test_sfcn_group_norm_is_per_scan_and_unknown_norm_is_refused() -> None:
    # GroupNorm keeps no running statistics: a scan's prediction does not depend on its batch,
    # in train mode too (BatchNorm's does), which is what the norm option is for
    import torch

    from bodyage.errors import InputError
    from bodyage.models import build_model

    torch.manual_seed(0)
    x = torch.rand(4, 2, 16, 12, 32)
    group = build_model("sfcn", 2, widths=[4, 8, 8], norm="group", dropout=0.0).train()
    batch = build_model("sfcn", 2, widths=[4, 8, 8], dropout=0.0).train()
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in group.modules())
    with torch.no_grad():
        assert torch.allclose(group(x)[:2], group(x[:2]), atol=1e-6)
        assert not torch.allclose(batch(x)[:2], batch(x[:2]), atol=1e-6)
    with pytest.raises(InputError, match="sfcn: unknown norm 'layer'; choose one of batch, group"):
        build_model("sfcn", 2, norm="layer")
