"""Null models of attribution: random-weight copies and the permuted-label model.

Tiny settings (2 folds, 2 epochs, a 16×12×32 grid) so each test takes seconds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bodyage.attribute import ATTRIBUTION_COLUMNS, AttributeConfig, attribute_run
from bodyage.errors import InputError
from bodyage.nulls import (
    BAND_COLUMNS,
    NULL_ATTRIBUTIONS,
    NULL_BANDS,
    PERMUTED_RUN,
    NullConfig,
    check_nulls,
    draw_null_bands,
    null_band_on_trained_scale,
    null_bands,
    permute_ages,
    random_copy,
)
from bodyage.train import TrainConfig, load_fold_model, train_run
from cli.app import app

TINY = TrainConfig(folds=2, epochs=2, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4)
CFG = AttributeConfig(methods=("gradcam", "ablation"), figures=False, batch_size=4)
NULLS = NullConfig(copies=3, permuted=True, scans=12)  # a sample of the 30 scans: seconds per test


@pytest.fixture(scope="module")
def null_run(tiny_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run attributed with both nulls (on a sample of 12 scans)."""
    run = tmp_path_factory.mktemp("nulls") / "run"
    cache = run.parent / "cache"
    train_run(tiny_study, run, TINY, cache_dir=cache, figures=False)
    attribute_run(run, CFG, cache_dir=cache, nulls=NULLS)
    return run


def test_null_table_has_the_attribution_columns_plus_null_and_copy(null_run: Path) -> None:
    table = pd.read_parquet(null_run / NULL_ATTRIBUTIONS)
    assert list(table.columns) == [*ATTRIBUTION_COLUMNS, "null", "copy"]
    trained = pd.read_parquet(null_run / "attributions.parquet")
    assert list(trained.columns) == list(ATTRIBUTION_COLUMNS)
    assert set(table["null"]) == {"random_weights", "permuted_labels"}
    assert table["copy"].dtype == np.int64
    rw = table[table["null"] == "random_weights"]
    assert sorted(rw["copy"].unique()) == [0, 1, 2]
    assert set(table.loc[table["null"] == "permuted_labels", "copy"]) == {0}
    # every (null, copy, method) explains the same scans and regions as the trained model
    key = ["subject_id", "visit", "method", "region", "fold"]
    assert table[["subject_id", "visit"]].drop_duplicates().shape[0] == NULLS.scans
    sample = trained.merge(table[["subject_id", "visit"]].drop_duplicates(), on=["subject_id", "visit"])
    want = sample[key].sort_values(key).reset_index(drop=True)
    for _, grp in table.groupby(["null", "copy"]):
        got = grp[key].sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want)
    bands = pd.read_csv(null_run / NULL_BANDS)
    assert list(bands.columns) == list(BAND_COLUMNS)
    assert set(bands["null"]) == {"random_weights", "permuted_labels"}
    rw_bands = bands[bands["null"] == "random_weights"]
    assert rw_bands["n_copies"].max() == 3
    assert rw_bands.loc[rw_bands["n_copies"] == 0, "null_mean"].isna().all()  # absent from the nulls' sample
    bands = bands.dropna(subset=["null_mean"])
    assert (bands["null_low"] <= bands["null_mean"] + 1e-12).all()
    assert (bands["null_mean"] <= bands["null_high"] + 1e-12).all()
    np.testing.assert_allclose(bands["trained_minus_null"], bands["trained"] - bands["null_mean"])


def test_random_copies_are_reinitialised_seeded_and_distinct(null_run: Path) -> None:
    f = null_run / "models" / "fold0.pt"
    trained, _ = load_fold_model(f)
    a0, _ = random_copy(f, 0, 0, seed=0)
    a0_again, _ = random_copy(f, 0, 0, seed=0)
    a1, _ = random_copy(f, 0, 1, seed=0)
    b0, _ = random_copy(f, 1, 0, seed=0)
    for name, w in trained.state_dict().items():
        if not torch.is_floating_point(w) or "running" in name:
            continue
        assert torch.equal(a0.state_dict()[name], a0_again.state_dict()[name]), name  # seeded
        assert not torch.equal(a0.state_dict()[name], w), f"{name} kept the trained weights"
        if w.dim() > 1:  # drawn at random (BatchNorm starts at weight 1, bias 0 in every copy)
            assert not torch.equal(a0.state_dict()[name], a1.state_dict()[name]), name
            assert not torch.equal(a0.state_dict()[name], b0.state_dict()[name]), name


def test_each_scan_is_explained_by_its_own_folds_copies(null_run: Path) -> None:
    table = pd.read_parquet(null_run / NULL_ATTRIBUTIONS)
    preds = pd.read_parquet(null_run / "predictions.parquet")
    fold_of = dict(zip(zip(preds["subject_id"], preds["visit"], strict=True), preds["fold"], strict=True))
    got = table.groupby(["subject_id", "visit"])["fold"].unique()
    for scan, folds in got.items():
        assert list(folds) == [fold_of[scan]], scan
    # and the values are those of that fold's copy: recompute one scan's GradCAM under copy 1
    from bodyage.attribute import load_run_inputs
    from bodyage.attribution import attribute_batch, region_sums
    from bodyage.models import get_layer

    inputs = load_run_inputs(null_run, cache_dir=null_run.parent / "cache")
    first = table.iloc[0]  # a scan of the nulls' sample
    sid, visit, k = str(first["subject_id"]), int(first["visit"]), int(first["fold"])
    model, hp = random_copy(null_run / "models" / f"fold{k}.pt", k, 1, seed=0)
    cs = inputs.cache.scans[f"{sid}_{visit}"]
    x = torch.from_numpy(np.asarray(cs.load(), dtype=np.float32))[None]
    lab = torch.from_numpy(np.asarray(cs.load_mask(), dtype=np.int64))[None]
    n = int(lab.max()) + 1
    layer = json.loads((null_run / "attribute.json").read_text())["arguments"]["layer"]
    res = attribute_batch(
        "gradcam", model, x, lab, n_labels=n, age_sd=float(hp["age_sd"]), layer=get_layer(model, layer)
    )
    mass = region_sums(res.maps, lab, n)[0][0].numpy()
    names = inputs.labels.names
    row = table[
        (table["null"] == "random_weights")
        & (table["copy"] == 1)
        & (table["method"] == "gradcam")
        & (table["subject_id"] == sid)
        & (table["visit"] == visit)
    ].set_index("region")["mass"]
    for i in range(1, n):
        if i in names and mass[i] != 0:
            np.testing.assert_allclose(row[names[i]], mass[i], rtol=1e-4, atol=1e-9)


def test_permuted_run_permutes_ages_within_folds_by_subject(null_run: Path, tiny_study: Path) -> None:
    perm = pd.read_parquet(null_run / PERMUTED_RUN / "predictions.parquet")
    trained = pd.read_parquet(null_run / "predictions.parquet")
    assert {"true_age", "age"} <= set(perm.columns)
    merged = perm.merge(
        trained[["subject_id", "visit", "fold", "age"]], on=["subject_id", "visit"], suffixes=("", "_t")
    )
    assert (merged["fold"] == merged["fold_t"]).all()  # the same folds as the trained run
    np.testing.assert_allclose(merged["true_age"], merged["age_t"])
    first = merged.sort_values("visit").groupby("subject_id").first()
    for _, grp in first.groupby("fold"):  # per fold: the same first-visit ages, reassigned
        np.testing.assert_allclose(np.sort(grp["age"]), np.sort(grp["true_age"]))
    assert not np.allclose(first["age"], first["true_age"])  # the subject-age link is broken
    # repeat visits keep their offsets from the first visit
    offsets = merged.assign(
        d=merged["age"] - merged.groupby("subject_id")["age"].transform("min"),
        d_true=merged["true_age"] - merged.groupby("subject_id")["true_age"].transform("min"),
    )
    np.testing.assert_allclose(offsets["d"], offsets["d_true"])
    rec = json.loads((null_run / PERMUTED_RUN / "run.json").read_text())
    trained_rec = json.loads((null_run / "run.json").read_text())
    assert rec["arguments"]["permute_ages_seed"] == 0
    for key in ("folds", "epochs", "grid", "model_kwargs", "seed", "lr"):  # the trained run's settings
        assert rec["arguments"][key] == trained_rec["arguments"][key], key


def test_permute_ages_is_seeded_and_keeps_fold_multisets() -> None:
    cohort = pd.DataFrame(
        {
            "subject_id": ["a", "a", "b", "c", "d", "e", "f"],
            "visit": [0, 1, 0, 0, 0, 0, 0],
            "age": [50.0, 52.5, 60.0, 70.0, 55.0, 65.0, 75.0],
            "fold": [0, 0, 0, 0, 1, 1, 1],
        }
    )
    a = permute_ages(cohort, 3)
    np.testing.assert_array_equal(a, permute_ages(cohort, 3))
    assert a[1] - a[0] == pytest.approx(2.5)
    assert sorted(a[[0, 2, 3]]) == [50.0, 60.0, 70.0] and sorted(a[4:]) == [55.0, 65.0, 75.0]
    assert any(not np.array_equal(permute_ages(cohort, s), cohort["age"]) for s in range(5))
    with pytest.raises(InputError, match="lacks column"):
        permute_ages(cohort.drop(columns="fold"), 0)


def test_resume_after_a_kill_gives_identical_null_tables(null_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(null_run, run)
    parts = sorted((run / "attribute" / "nulls").rglob("*.parquet"))
    for p in parts[::2]:  # a kill: half the random copies' results lost
        p.unlink()
    for name in ("attributions.parquet", "models/fold1.pt", "predictions.parquet"):
        (run / PERMUTED_RUN / name).unlink()  # and the permuted model's last fold and tables
    for name in (NULL_ATTRIBUTIONS, NULL_BANDS):
        (run / name).unlink()
    attribute_run(run, CFG, cache_dir=null_run.parent / "cache", nulls=NULLS)
    pd.testing.assert_frame_equal(
        pd.read_parquet(run / NULL_ATTRIBUTIONS), pd.read_parquet(null_run / NULL_ATTRIBUTIONS), check_exact=True
    )
    pd.testing.assert_frame_equal(pd.read_csv(run / NULL_BANDS), pd.read_csv(null_run / NULL_BANDS))


def test_another_attribution_seed_reuses_the_permuted_model(null_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(null_run, run)
    model = run / PERMUTED_RUN / "models" / "fold0.pt"
    before = model.stat().st_mtime_ns
    cfg = AttributeConfig(methods=("gradcam",), figures=False, batch_size=4, seed=1)
    attribute_run(run, cfg, cache_dir=null_run.parent / "cache", nulls=NullConfig(copies=1, scans=4))
    assert model.stat().st_mtime_ns == before  # the trained run's permuted-label model, not a new one
    table = pd.read_parquet(run / NULL_ATTRIBUTIONS)
    assert table[["subject_id", "visit"]].drop_duplicates().shape[0] == 4


def test_the_permuted_model_can_have_fewer_folds_than_the_trained_one(tiny_study: Path, tmp_path: Path) -> None:
    # the demo's documented subset: a 2-fold permuted-label model behind a 3-fold trained run
    run, cache = tmp_path / "run", tmp_path / "cache"
    train_run(tiny_study, run, replace(TINY, folds=3), cache_dir=cache, figures=False)
    nulls = ["--null-copies", "0", "--null-scans", "6", "--null-permuted-folds", "2"]
    res = CliRunner().invoke(
        app,
        [
            "attribute",
            str(run),
            "--method",
            "gradcam",
            "--batch-size",
            "4",
            "--no-figures",
            "--cache",
            str(cache),
            *nulls,
        ],
    )
    assert res.exit_code == 0, res.output
    permuted = run / PERMUTED_RUN
    assert sorted(p.name for p in (permuted / "models").glob("fold*.pt")) == ["fold0.pt", "fold1.pt"]
    assert json.loads((permuted / "run.json").read_text())["arguments"]["folds"] == 2
    assert json.loads((run / "run.json").read_text())["arguments"]["folds"] == 3
    assert json.loads((run / "attribute.json").read_text())["arguments"]["nulls"]["permuted_folds"] == 2
    table = pd.read_parquet(run / NULL_ATTRIBUTIONS)
    assert set(table["null"]) == {"permuted_labels"}
    assert table[["subject_id", "visit"]].drop_duplicates().shape[0] == 6
    # every scan is explained by the permuted fold model that did not train on it
    folds = pd.read_parquet(permuted / "predictions.parquet")[["subject_id", "visit", "fold"]]
    got = table[["subject_id", "visit", "fold"]].drop_duplicates().merge(folds, on=["subject_id", "visit"])
    assert (got["fold_x"] == got["fold_y"]).all() and set(got["fold_x"]) <= {0, 1}


def test_a_scan_sample_and_the_cli_options(null_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(null_run, run, ignore=shutil.ignore_patterns("attribute", "attributions*", "nulls"))
    options = ["--cache", str(null_run.parent / "cache"), "--null-copies", "2", "--no-permuted", "--null-scans", "5"]
    res = CliRunner().invoke(
        app,
        ["attribute", str(run), "--method", "gradcam", "--batch-size", "4", "--no-figures", *options],
    )
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(run / NULL_ATTRIBUTIONS)
    assert set(table["null"]) == {"random_weights"} and sorted(table["copy"].unique()) == [0, 1]
    assert table[["subject_id", "visit"]].drop_duplicates().shape[0] == 5
    assert not (run / PERMUTED_RUN).exists()
    assert "nulls" in res.output
    off = tmp_path / "off"
    shutil.copytree(null_run, off, ignore=shutil.ignore_patterns("attribute", "attributions*", "nulls"))
    res = CliRunner().invoke(
        app,
        ["attribute", str(off), "--method", "gradcam", "--no-figures", "--no-nulls", "--cache", str(off.parent / "c")],
    )
    assert res.exit_code == 0, res.output
    assert not (off / NULL_ATTRIBUTIONS).exists()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (NullConfig(copies=-1), "--null-copies must be 0 or more"),
        (NullConfig(scans=0), "--null-scans must be at least 1"),
        (NullConfig(copies=0, permuted=False), "leaves no null; use --no-nulls"),
        (NullConfig(permuted_folds=1), "--null-permuted-folds must be at least 2, got 1"),
    ],
)
def test_bad_null_options_say_what_is_wrong(cfg: NullConfig, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_nulls(cfg)


def test_the_permuted_model_is_refused_under_torchrun_before_any_work() -> None:
    # training it inside attribute would end the ranks' process group and start another: the ranks hung
    with pytest.raises(InputError, match=r"--permuted cannot run under torchrun \(WORLD_SIZE=2\)"):
        check_nulls(NullConfig(), world_size=2)
    check_nulls(NullConfig(permuted=False), world_size=2)


def test_the_share_band_compares_profiles_not_magnitudes() -> None:
    # a null with the trained profile at 1/100 of its scale (a model whose output barely moves):
    # every region is above its band by magnitude, none by share
    regions = ["liver", "spleen", "torso_fat"]
    trained_mass = {"liver": 4.0, "spleen": 1.0, "torso_fat": 3.0}

    def rows(scale: float, **extra: object) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "subject_id": "s1",
                "visit": 0,
                "method": "ablation",
                "region": regions,
                "fold": 0,
                "mass": [trained_mass[r] * scale for r in regions],
                **extra,
            }
        )

    trained = rows(1.0)
    nulls = pd.concat([rows(0.01 * (1 + c / 10), null="random_weights", copy=c) for c in range(3)])
    bands = null_bands(trained, nulls, {"ablation": "abs_mass"}).set_index("region")
    assert list(bands.columns) == list(BAND_COLUMNS[:1] + BAND_COLUMNS[2:])
    assert bands["above_band"].all() and not bands["above_share_band"].any()
    np.testing.assert_allclose(bands["trained_share"].sum(), 1.0)
    np.testing.assert_allclose(bands.loc["liver", "trained_share"], 0.5)
    np.testing.assert_allclose(bands.loc["liver", "null_share_mean"], 0.5)
    want = np.quantile([4.0 * 0.01, 4.0 * 0.011, 4.0 * 0.012], [0.025, 0.975])
    np.testing.assert_allclose(bands.loc["liver", ["null_low", "null_high"]].to_numpy(dtype=float), want)
    assert (bands["n_copies"] == 3).all()


def test_the_null_band_overlay_is_drawn_on_the_trained_scale(null_run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = pd.read_csv(null_run / NULL_BANDS)
    band = null_band_on_trained_scale(bands, "gradcam", "random_weights")
    sub = bands[(bands["method"] == "gradcam") & (bands["null"] == "random_weights")].set_index("region")
    np.testing.assert_allclose(band["mean"], sub["null_share_mean"] * sub["trained"].sum())
    regions = list(sub.sort_values("trained").index)
    fig, ax = plt.subplots()
    ax.barh(np.arange(len(regions)), sub.loc[regions, "trained"])
    labels = draw_null_bands(ax, bands, "gradcam", regions)
    assert len(labels) == 2 and len(ax.collections) == 2  # one band per null kind
    plt.close(fig)


def test_the_region_figure_draws_from_the_written_null_table(null_run: Path, tmp_path: Path) -> None:
    from bodyage.attribute_figures import region_figure

    attributions = pd.read_parquet(null_run / "attributions.parquet")
    bands = pd.read_csv(null_run / NULL_BANDS)
    for method in ("gradcam", "ablation"):
        paths = region_figure(attributions, method, "abs_mass", tmp_path, baseline="shift", bands=bands)
        assert all(p.stat().st_size > 10_000 for p in paths)
