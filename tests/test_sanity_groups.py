"""Calibrated sanity check, intensive GradCAM measure, joint group ablation, fold stability.

The rule of the sanity check is tested on vectors (no torch): it fails for importance
that is region size under every model and passes for importance that follows planted
regions beyond size. Torch tests use tiny hand-built models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bodyage.attribute import AttributeConfig, attribute_run
from bodyage.attribute_groups import multi_member_groups, with_joint
from bodyage.attribute_sanity import calibrated_verdict, randomised_copy
from bodyage.attribute_stability import fold_stability, kendall_w
from bodyage.attribute_tables import ATTRIBUTION_COLUMNS, group_table
from bodyage.attribution import attribute_batch, gradcam_maps, group_ablation, ranking_values, region_measures
from bodyage.errors import InputError
from bodyage.models import build_model, get_layer
from bodyage.train import TrainConfig, train_run

N_REGIONS = 40


def _volumes(rng: np.random.Generator) -> np.ndarray:
    return np.exp(rng.normal(5.0, 1.2, N_REGIONS))  # region sizes spanning ~2 orders of magnitude


# ----------------------------------------------------------------------------- the rule (vectors)


def test_sanity_rule_fails_for_an_importance_that_is_region_size(rng: np.random.Generator) -> None:
    vol = _volumes(rng)
    randoms = [vol * np.exp(rng.normal(0, 0.4, N_REGIONS)) for _ in range(4)]
    for trained in (vol.copy(), vol * np.exp(rng.normal(0, 0.4, N_REGIONS))):
        halves = (trained * np.exp(rng.normal(0, 0.2, N_REGIONS)), trained * np.exp(rng.normal(0, 0.2, N_REGIONS)))
        v = calibrated_verdict(trained, randoms, vol, halves=halves, seed=1)
        assert not v["passed"] and not v["below_random_band"]
        # what the old per-scan rule saw: a high agreement with random models, like theirs with each other
        assert v["cohort_rho_trained_random"] > 0.8 and v["cohort_rho_random_random_min"] > 0.8
        assert v["rho_volume"] > 0.8


def test_sanity_rule_passes_for_planted_regions_beyond_size(rng: np.random.Generator) -> None:
    vol = _volumes(rng)
    randoms = [vol * np.exp(rng.normal(0, 0.4, N_REGIONS)) for _ in range(3)]
    planted = np.zeros(N_REGIONS)
    planted[rng.choice(N_REGIONS, 8, replace=False)] = 5.0
    trained = planted + rng.uniform(0, 1, N_REGIONS)  # planted regions, whatever their size
    halves = (trained + rng.normal(0, 0.2, N_REGIONS), trained + rng.normal(0, 0.2, N_REGIONS))
    v = calibrated_verdict(trained, randoms, vol, halves=halves, seed=1)
    assert v["passed"], v
    assert v["p_value"] < 0.05 and v["between_scan_rho"] > max(v["cohort_rho_trained_random_values"])
    assert len(v["cohort_rho_random_random_values"]) == 3 and len(v["cohort_rho_trained_random_values"]) == 3


def test_sanity_rule_fails_when_the_trained_ranking_tracks_volume_more_than_random_models(
    rng: np.random.Generator,
) -> None:
    vol = _volumes(rng)
    noise = [rng.uniform(0, 1, N_REGIONS) for _ in range(3)]  # random models: unrelated to size
    v = calibrated_verdict(vol, noise, vol, seed=0)
    assert not v["not_size_driven"] and not v["passed"]


def test_sanity_rule_needs_three_random_models() -> None:
    with pytest.raises(InputError, match="at least 3 random models, got 2"):
        calibrated_verdict(np.arange(5.0), [np.arange(5.0)] * 2, np.arange(5.0))
    with pytest.raises(InputError, match="one value per region"):
        calibrated_verdict(np.arange(5.0), [np.arange(4.0)] * 3, np.arange(5.0))


def test_per_scan_normalisation_leaves_the_old_within_scan_statistic_unchanged(rng: np.random.Generator) -> None:
    """Ranks within a scan ignore a positive per-scan scale: normalising cannot rescue the old check."""
    from scipy.stats import spearmanr

    a, b = rng.uniform(0, 1, (2, 30))
    assert spearmanr(a, b)[0] == pytest.approx(spearmanr(a / a.sum(), b / b.max())[0])


def _tables(rng: np.random.Generator, trained_fn, n_scans: int = 8, copies: int = 3):
    """Long tables of a trained run and of its random-weight null copies (ablation, 20 regions)."""
    vol = _volumes(rng)[:20]
    rows, nrows = [], []
    for s in range(n_scans):
        size = vol * np.exp(rng.normal(0, 0.1, 20))
        base = {"subject_id": f"s{s}", "visit": 0, "method": "ablation", "fold": s % 2}
        for r in range(20):
            rows.append({**base, "region": f"r{r:02d}", "n_voxels": size[r], "mass": trained_fn(size, r)})
        for c in range(copies):
            noisy = size * np.exp(rng.normal(0, 0.4, 20))
            for r in range(20):
                nrows.append({**base, "region": f"r{r:02d}", "n_voxels": size[r], "mass": -noisy[r],
                              "null": "random_weights", "copy": c})  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(nrows)


def test_sanity_reuses_the_null_models_random_copies(rng: np.random.Generator) -> None:
    from bodyage.attribute_sanity import sanity_from_nulls, usable_nulls

    planted = {3, 7, 11, 15}
    attr, nulls = _tables(rng, lambda size, r: (5.0 if r in planted else 0.0) + rng.uniform(0, 1))
    assert usable_nulls(nulls) and not usable_nulls(nulls[nulls["copy"] < 2]) and not usable_nulls(None)
    good = sanity_from_nulls(attr, nulls, {"ablation": "abs_mass"}, seed=0)
    assert good["n_scans"] == 8 and good["n_random"] == 3 and "random_weights" in good["source"]
    assert good["methods"]["ablation"]["passed"], good
    attr, nulls = _tables(rng, lambda size, r: size[r])  # importance = region size
    bad = sanity_from_nulls(attr, nulls, {"ablation": "abs_mass"}, seed=0)["methods"]["ablation"]
    assert not bad["passed"] and bad["rho_volume"] > 0.9 and "fails the calibrated sanity check" in bad["warning"]


# ----------------------------------------------------------------------------- GradCAM: size vs intensive


def _size_study(rng: np.random.Generator, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Scans of 8 slab regions of very different thickness on a 12x12x40 grid, random intensities."""
    edges = np.cumsum([0, 1, 2, 3, 4, 5, 7, 8, 9])  # slab thickness 1..9 voxels along z
    lab = np.zeros((12, 12, 40), dtype=np.int64)
    for k in range(8):
        lab[1:11, 1:11, edges[k] : edges[k + 1]] = k + 1
    x = rng.uniform(0.2, 1.0, (n, 2, 12, 12, 40)).astype(np.float32)
    labels = torch.from_numpy(np.broadcast_to(lab, (n, *lab.shape)).copy())
    return torch.from_numpy(x), labels, np.bincount(lab.ravel(), minlength=9)[1:].astype(float)


def test_gradcam_size_weighted_total_fails_the_calibrated_check_on_a_random_like_model(
    rng: np.random.Generator,
) -> None:
    x, labels, vol = _size_study(rng)
    torch.manual_seed(3)
    base = build_model("sfcn", 2, widths=[4, 8], dropout=0.0).eval()
    models = [randomised_copy(base, 100 + i) for i in range(5)]  # "trained" = another random model
    ids = np.arange(1, 9)
    cohort = []
    for mod in models:
        maps = gradcam_maps(mod, x, get_layer(mod, "block1"))
        s = torch.stack([torch.bincount(labels[i].reshape(-1), weights=maps[i].reshape(-1).double(), minlength=9)
                         for i in range(len(x))])  # fmt: skip
        a = torch.stack([torch.bincount(labels[i].reshape(-1), weights=maps[i].reshape(-1).abs().double(),
                                        minlength=9) for i in range(len(x))])  # fmt: skip
        c = torch.stack([torch.bincount(labels[i].reshape(-1), minlength=9) for i in range(len(x))]).double()
        vals = {"mass": s.numpy(), "abs_mass": a.numpy(), "count": c.numpy()}
        cohort.append(np.nanmean(ranking_values(vals, ids, "abs_mass"), axis=0))
    v = calibrated_verdict(cohort[0], cohort[1:], vol, seed=0)
    assert not v["passed"]
    assert v["rho_volume"] > 0.5  # the size-weighted total follows region size


def test_abs_density_is_mean_abs_map_per_voxel_and_a_column_of_the_table() -> None:
    count = np.array([[2.0, 8.0, 0.0]])
    m = region_measures(np.array([[-2.0, 8.0, 0.0]]), np.array([[2.0, 8.0, 0.0]]), count, 1.0)
    np.testing.assert_allclose(m["abs_density"][0, :2], [1.0, 1.0])  # same per voxel, 4x the size
    assert np.isnan(m["abs_density"][0, 2])
    assert "abs_density" in ATTRIBUTION_COLUMNS and ATTRIBUTION_COLUMNS[5] == "n_voxels"
    vals = {"mass": np.array([[0.0, -2.0, 8.0]]), "abs_mass": np.array([[0.0, 2.0, 8.0]]), "count": count[:, [2, 0, 1]]}
    np.testing.assert_allclose(ranking_values(vals, np.array([1, 2]), "density"), [[1.0, 1.0]])
    with pytest.raises(InputError, match="unknown importance measure 'nope'"):
        ranking_values(vals, np.array([1, 2]), "nope")


# ----------------------------------------------------------------------------- group ablation


class _MaxOfTwo(nn.Module):
    """f = max(mean of region 1, mean of region 2): either side alone carries everything."""

    def __init__(self, lab: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", (lab == 1).float())
        self.register_buffer("b", (lab == 2).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ma = (x[:, 0] * self.a).sum(dim=(1, 2, 3)) / self.a.sum()
        mb = (x[:, 0] * self.b).sum(dim=(1, 2, 3)) / self.b.sum()
        return torch.maximum(ma, mb)


def test_joint_group_ablation_finds_a_redundant_pair_that_single_ablations_miss() -> None:
    lab = torch.zeros(4, 4, 6, dtype=torch.int64)
    lab[:, :, 0:2], lab[:, :, 3:5] = 1, 2
    x = torch.zeros(2, 1, 4, 4, 6)
    x[:, 0][:, lab == 1] = torch.tensor([[1.0], [2.0]])
    x[:, 0][:, lab == 2] = torch.tensor([[1.0], [2.0]])
    labels = lab.expand(2, -1, -1, -1).clone()
    model = _MaxOfTwo(lab).eval()
    means = torch.zeros(3, 1)  # the `mean` baseline sets a region to 0
    single = attribute_batch("ablation", model, x, labels, n_labels=3, age_sd=2.0, baseline="mean", cohort_means=means)
    np.testing.assert_allclose(np.asarray(single.region_values)[:, 1:], 0.0)  # each side alone: no effect
    joint = group_ablation(model, x, labels, [[1, 2], [1], [7]], age_sd=2.0, baseline="mean", cohort_means=means)
    np.testing.assert_allclose(joint[:, 0], [2.0, 4.0])  # the whole effect, in years (x age_sd)
    np.testing.assert_allclose(joint[:, 1], 0.0)
    assert np.isnan(joint[:, 2]).all()  # no member in the scan


def test_group_table_takes_the_joint_ablation_of_multi_member_groups() -> None:
    regions = ["gluteus_maximus_left", "gluteus_maximus_right", "liver"]
    df = pd.DataFrame(
        {
            "subject_id": "a",
            "visit": 0,
            "method": "ablation",
            "region": regions,
            "fold": 0,
            "n_voxels": [2.0, 2.0, 4.0],
            "volume_ml": [1.0, 1.0, 2.0],
            "mass": [0.0, 0.0, 1.0],
            "abs_mass": [0.0, 0.0, 1.0],
            "share": 0.0,
            "density": 0.0,
            "enrichment": 0.0,
            "abs_density": 0.0,
        }
    )
    assert multi_member_groups(dict(enumerate(regions, start=1))) == {"gluteus_maximus": [1, 2]}
    summed = group_table(df).set_index("region")
    assert summed.loc["gluteus_maximus", "mass"] == 0.0  # the old, under-counted value
    joint = pd.DataFrame({"subject_id": ["a"], "visit": [0], "region": ["gluteus_maximus"], "mass": [-3.0]})
    joined = with_joint(group_table(df), joint, ATTRIBUTION_COLUMNS)
    assert list(joined.columns) == list(ATTRIBUTION_COLUMNS)
    g = joined.set_index("region")
    assert g.loc["gluteus_maximus", "mass"] == -3.0 and g.loc["gluteus_maximus", "abs_mass"] == 3.0
    assert g.loc["gluteus_maximus", "share"] == pytest.approx(0.75)
    assert g.loc["gluteus_maximus", "abs_density"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- fold stability


def test_kendall_w_is_one_for_identical_rankings_and_zero_for_reversed() -> None:
    same = pd.DataFrame({0: [1.0, 2.0, 3.0, 4.0], 1: [10.0, 20.0, 30.0, 40.0]})
    assert kendall_w(same) == pytest.approx(1.0)
    assert kendall_w(pd.DataFrame({0: [1.0, 2.0, 3.0, 4.0], 1: [4.0, 3.0, 2.0, 1.0]})) == pytest.approx(0.0)


def test_fold_stability_gives_intervals_over_fold_models() -> None:
    rows = []
    fold_values = {0: [3.0, 2.0, 1.0, 0.5], 1: [5.0, 1.0, 2.0, 0.4], 2: [4.0, 3.0, 0.0, 0.3]}
    for fold, vals in fold_values.items():
        for scan in range(2):  # two scans per fold with the same values: the fold mean is the value
            for r, v in zip("abcd", vals, strict=True):
                rows.append({"subject_id": f"s{fold}{scan}", "visit": 0, "method": "ablation", "region": r,
                             "fold": fold, "mass": -v if scan else v})  # fmt: skip
    table, summary = fold_stability(pd.DataFrame(rows), "ablation", "abs_mass", k=2)
    a = table.set_index("region").loc["a"]
    assert a["importance"] == pytest.approx(4.0) and a["fold_min"] == 3.0 and a["fold_max"] == 5.0
    assert a["ci_low"] < 3.0 < 5.0 < a["ci_high"] and a["n_folds"] == 3
    assert list(table["region"][:1]) == ["a"]
    assert summary["n_folds"] == 3 and summary["k"] == 2
    # top-2 sets: {a,b}, {a,c}, {a,b}: Jaccard 1/3, 1, 1/3
    assert sorted(summary["top_k_jaccard_values"]) == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert 0.0 < summary["kendall_w"] < 1.0


# ----------------------------------------------------------------------------- the step


@pytest.mark.slow
def test_attribute_writes_calibrated_sanity_joint_groups_and_stability(
    tiny_study: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = tmp_path_factory.mktemp("sanity") / "run"
    tiny = TrainConfig(folds=2, epochs=1, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4)
    train_run(tiny_study, run, tiny, cache_dir=run.parent / "cache", figures=False)
    cfg = AttributeConfig(methods=("gradcam", "ablation"), batch_size=8, groups=True, figures=True)
    attribute_run(run, cfg, cache_dir=run.parent / "cache", sanity=True, sanity_scans=8)
    sanity = json.loads((run / "sanity.json").read_text())
    assert sanity["n_random"] == 3 and sanity["n_scans"] == 8 and "rule" in sanity
    for m in ("gradcam", "ablation"):
        e = sanity["methods"][m]
        for key in ("cohort_rho_trained_random", "cohort_rho_random_random", "between_scan_rho", "rho_volume"):
            assert isinstance(e[key], float), (m, key)
        assert isinstance(e["passed"], bool) and len(e["cohort_rho_random_random_values"]) == 3
    assert set(sanity["methods"]["gradcam"]["by_measure"]) == {"abs_mass", "abs_density"}
    attr = pd.read_parquet(run / "attributions.parquet")
    assert list(attr.columns) == list(ATTRIBUTION_COLUMNS)
    ok = attr["n_voxels"] > 0
    np.testing.assert_allclose(attr.loc[ok, "abs_density"], attr.loc[ok, "abs_mass"] / attr.loc[ok, "n_voxels"])
    groups = pd.read_parquet(run / "attributions_groups.parquet")
    glut = groups[(groups["method"] == "ablation") & (groups["region"] == "gluteus_maximus")]
    assert len(glut) == len(attr[["subject_id", "visit"]].drop_duplicates()) and glut["mass"].notna().all()
    stab = pd.read_csv(run / "attribution_stability.csv")
    assert set(stab["method"]) == {"gradcam", "ablation"} and stab["n_folds"].max() == 2  # a rare region: 1
    rec = json.loads((run / "attribution_recovery.json").read_text())
    assert rec["methods"]["ablation"]["stability"]["n_folds"] == 2
    assert 0.0 <= rec["methods"]["ablation"]["stability"]["kendall_w"] <= 1.0
    assert (run / "figures" / "attribution_regions_gradcam.png").is_file()


def test_runs_stability_gives_intervals_over_training_runs(tmp_path: Path) -> None:
    from bodyage.attribute_stability import runs_stability

    def table(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame(
            {"subject_id": "s", "visit": 0, "method": "ablation", "region": list("abc"), "fold": 0, "mass": values}
        )

    others = []
    for i, vals in enumerate(([2.0, 1.0, 0.5], [4.0, 0.5, 1.0])):
        (tmp_path / f"seed{i}").mkdir()
        table(vals).to_parquet(tmp_path / f"seed{i}" / "attributions.parquet")
        others.append(tmp_path / f"seed{i}")
    out, summary = runs_stability(table([3.0, 2.0, 1.0]), others, {"ablation": "abs_mass"}, {"ablation": 1})
    a = out.set_index("region").loc["a"]
    assert a["importance"] == pytest.approx(3.0) and (a["run_min"], a["run_max"], a["n_runs"]) == (2.0, 4.0, 3)
    s = summary["ablation"]
    assert s["n_runs"] == 3 and s["runs"] == ["seed0", "seed1"] and s["top_k_jaccard_values"] == [1.0, 1.0, 1.0]
    with pytest.raises(InputError, match=r"--runs: .*attributions\.parquet not found"):
        runs_stability(table([1.0, 2.0, 3.0]), [tmp_path / "nope"], {"ablation": "abs_mass"})
    with pytest.raises(InputError, match="has no gradcam rows"):
        runs_stability(table([1.0, 2.0, 3.0]), others, {"ablation": "abs_mass", "gradcam": "abs_mass"})
