"""Calibrated model-randomisation check of attribution methods, at the cohort level.

An explanation that survives randomising the model's weights explains the architecture
or the image (edges, region sizes), not what the model learned about ageing (Adebayo et
al. 2018). What is published is the **cohort** region ranking, so that is what is
checked: the cohort importance vector (mean over a seeded sample of scans of the
method's ranking measure, one value per region) of the trained fold models against the
same vector of :data:`RANDOM_MODELS` or more fully randomised copies (every weight
re-initialised, BatchNorm statistics reset, each copy seeded).

Why not a fixed threshold on a per-scan correlation. Region size is shared by every scan
and every model, so any measure that grows with size correlates across scans and models
whatever the weights: on the default study two scans under the trained model correlated
0.81, two random models 0.88, trained against random 0.82–0.87. A fixed 0.5 cannot tell
these apart. Dividing each scan's values by a per-scan constant (a total, a maximum)
cannot change a rank statistic computed *within* that scan either: ranks are invariant
to a positive scale. The check therefore compares the trained-vs-random agreement with
what random models share among themselves (:func:`calibrated_verdict`, a pure function
of vectors):

``passed`` iff all of

1. **below the random band**: every ρ(trained, random_i) is below the smallest
   ρ(random_i, random_j), and a bootstrap over regions gives p < :data:`ALPHA` for
   mean ρ(trained, random) − mean ρ(random, random) ≥ 0;
2. **not size-driven**: ρ(trained importance, mean region volume) is below the mean of
   the random models' ρ with volume;
3. **reproducible** (when the sample has two halves): the trained model's ranking on one
   half of the scans agrees with the other half (``between_scan_rho``) more than with any
   random model.

When random models agree with nothing (their band near 0) condition 1 cannot hold and
the check fails as uninformative rather than passing by default.

:func:`sanity_check` runs the trained and randomised models on a sample of scans;
:func:`sanity_from_nulls` reuses the random-weight copies the null models
(:mod:`bodyage.nulls`) already explained, at no extra cost.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.attribution import METHODS, label_lookup, ranking_values, scan_values
from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from bodyage.attribute_inputs import AttributeConfig, RunInputs

#: fully randomised copies of each fold model (at least 3: three random-random pairs)
RANDOM_MODELS = 3
#: significance level of the bootstrap over regions
ALPHA = 0.05
#: bootstrap resamples of the regions
N_BOOT = 2000
#: the rule, as written into ``sanity.json``
RULE = (
    "passed iff (1) every rho(trained, random_i) < min rho(random_i, random_j) and a bootstrap over regions "
    f"gives p < {ALPHA} for mean rho(trained, random) - mean rho(random, random) >= 0; (2) rho(trained, volume) "
    "< mean rho(random_i, volume); (3) between_scan_rho > max rho(trained, random_i) when the sample has two halves"
)


# ----------------------------------------------------------------------------- the rule (no torch)


def _ranks(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    from scipy.stats import rankdata

    return np.asarray(rankdata(a, axis=-1), dtype=float)


def _corr_rows(ra: npt.NDArray[np.float64], rb: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Pearson correlation of matching rows (of ranks: Spearman); NaN where a row is constant."""
    ca = ra - ra.mean(axis=-1, keepdims=True)
    cb = rb - rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ca**2).sum(axis=-1) * (cb**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(den > 0, (ca * cb).sum(axis=-1) / den, np.nan), dtype=float)


def spearman_vec(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman correlation of two vectors over the entries finite in both (NaN below 3)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(_corr_rows(_ranks(x[ok]), _ranks(y[ok])))


def calibrated_verdict(
    trained: npt.ArrayLike,
    randoms: Sequence[npt.ArrayLike],
    volume: npt.ArrayLike,
    *,
    halves: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    alpha: float = ALPHA,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """The calibrated sanity rule on cohort importance vectors (module docstring).

    Parameters
    ----------
    trained
        ``(R,)`` cohort importance of the trained model(s), one value per region.
    randoms
        ``M >= 3`` vectors ``(R,)``: the same from independently randomised models.
    volume
        ``(R,)`` mean region volume (voxels or ml: only ranks matter).
    halves
        The trained cohort importance on two disjoint halves of the scans, ``(R,)`` each.
    alpha
        Level of the bootstrap test of condition 1.
    n_boot
        Bootstrap resamples of the regions.
    seed
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``cohort_rho_trained_random`` (mean) and ``..._values``,
        ``cohort_rho_random_random`` (mean), ``..._values`` and ``..._min``,
        ``between_scan_rho``, ``rho_volume``, ``rho_volume_random_values``, ``p_value``,
        the three conditions, ``passed`` and ``n_regions`` (regions finite in every vector).

    Raises
    ------
    InputError
        Fewer than 3 random models, or vectors of different lengths.
    """
    t = np.asarray(trained, dtype=float)
    rs = [np.asarray(r, dtype=float) for r in randoms]
    vol = np.asarray(volume, dtype=float)
    if len(rs) < 3:
        raise InputError(f"the calibrated sanity check needs at least 3 random models, got {len(rs)}")
    if any(v.shape != t.shape for v in (*rs, vol)):
        raise InputError("trained, random and volume vectors must have one value per region each")
    stack = np.vstack([t, *rs, vol])
    ok = np.isfinite(stack).all(axis=0)
    stack = stack[:, ok]
    m = len(rs)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    ranks = _ranks(stack)
    tr = np.array([float(_corr_rows(ranks[0], ranks[1 + i])) for i in range(m)])
    rr = np.array([float(_corr_rows(ranks[1 + i], ranks[1 + j])) for i, j in pairs])
    rho_vol = float(_corr_rows(ranks[0], ranks[-1]))
    rvol = np.array([float(_corr_rows(ranks[1 + i], ranks[-1])) for i in range(m)])

    # bootstrap over regions: is mean rho(T, R) below mean rho(R, R)?
    n = stack.shape[1]
    p_value = float("nan")
    if n >= 3 and np.isfinite(tr).all() and np.isfinite(rr).all():
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        boot = _ranks(stack[: m + 1][:, idx])  # (M + 1, B, n)
        d = np.mean([_corr_rows(boot[0], boot[1 + i]) for i in range(m)], axis=0) - np.mean(
            [_corr_rows(boot[1 + i], boot[1 + j]) for i, j in pairs], axis=0
        )
        d = d[np.isfinite(d)]
        p_value = float((1 + np.sum(d >= 0)) / (len(d) + 1))
    between = spearman_vec(halves[0], halves[1]) if halves is not None else float("nan")

    below_band = bool(np.isfinite(p_value) and tr.max() < rr.min() and p_value < alpha)
    not_size = bool(np.isfinite(rho_vol) and rho_vol < float(np.mean(rvol)))
    reproducible = bool(halves is None or (np.isfinite(between) and between > tr.max()))
    return {
        "cohort_rho_trained_random": float(tr.mean()),
        "cohort_rho_trained_random_values": [float(v) for v in tr],
        "cohort_rho_random_random": float(rr.mean()),
        "cohort_rho_random_random_values": [float(v) for v in rr],
        "cohort_rho_random_random_min": float(rr.min()),
        "between_scan_rho": between,
        "rho_volume": rho_vol,
        "rho_volume_random_values": [float(v) for v in rvol],
        "p_value": p_value,
        "below_random_band": below_band,
        "not_size_driven": not_size,
        "reproducible": reproducible,
        "passed": below_band and not_size and reproducible,
        "n_regions": int(n),
    }


def _warning(method: str, measure: str, v: dict[str, Any]) -> str:
    why = []
    if not v["below_random_band"]:
        why.append(
            f"its cohort ranking agrees with randomised models (rho {v['cohort_rho_trained_random']:.2f}) as much "
            f"as they agree with each other (min {v['cohort_rho_random_random_min']:.2f}, p {v['p_value']:.2f})"
        )
    if not v["not_size_driven"]:
        why.append(f"it follows region volume (rho {v['rho_volume']:.2f}) at least as much as random models do")
    if not v["reproducible"]:
        why.append(f"it is less reproducible between halves of the scans (rho {v['between_scan_rho']:.2f})")
    return f"{method} ({measure}): fails the calibrated sanity check: " + "; ".join(why)


# ----------------------------------------------------------------------------- the models (torch)


def cascade(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules randomised in turn, top first: ``head``, ``blockN`` … ``block1``."""
    from bodyage.models import get_layer, layer_names

    steps: list[tuple[str, nn.Module]] = []
    head = getattr(model, "head", None)
    if head is not None:
        steps.append(("head", head))
    for name in reversed(layer_names(model)):
        steps.append((name, get_layer(model, name)))
    return steps


def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and reset BatchNorm statistics), seeded."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            reset_stats = getattr(sub, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A fully randomised copy of ``model`` (every layer re-initialised), in eval mode."""
    rand = copy.deepcopy(model)
    randomise(rand, seed)
    return rand.eval()


def sanity_measures(method: str) -> list[str]:
    """Measures checked for a method: its ranking measure, and for voxel methods the total and the intensive one."""
    own = METHODS[method].importance_measure
    extra = ["abs_mass", "abs_density"] if METHODS[method].level == "voxel" else []
    return list(dict.fromkeys([own, *extra]))


def sanity_check(
    inputs: RunInputs,
    cfg: AttributeConfig,
    scan_ids: Sequence[str],
    *,
    layer: str,
    n_scans: int,
    device: torch.device,
    means: torch.Tensor | None,
    n_labels: int,
    n_random: int = RANDOM_MODELS,
) -> dict[str, Any]:
    """The calibrated cohort-level check on a seeded sample of scans (module docstring).

    Each sampled scan is explained by its own fold model and by ``n_random`` fully
    randomised copies of it (seeded by ``cfg.seed``, the fold and the copy). Per method
    and measure the cohort vectors go to :func:`calibrated_verdict`; the sample's two
    seeded halves give ``between_scan_rho``.

    Returns
    -------
    dict
        ``n_scans``, ``n_random``, ``rule``, ``layer``, ``regions`` and per method the
        verdict of its ranking measure (``importance_measure``, the keys of
        :func:`calibrated_verdict`, a ``warning`` when it fails) and ``by_measure``
        (voxel methods: the verdict of ``abs_mass`` and ``abs_density`` too).
    """
    import torch

    from bodyage.attribute_explain import explain_batch
    from bodyage.train import load_fold_model

    rng = np.random.default_rng(cfg.seed)
    ids = list(scan_ids)
    pick = sorted(rng.choice(len(ids), min(n_scans, len(ids)), replace=False)) if ids else []
    sample = [ids[i] for i in pick]
    fold_of = dict(zip(inputs.predictions["scan_id"], inputs.predictions["fold"], strict=True))
    label_ids, names, _ = label_lookup(dict(inputs.labels.names) if inputs.labels else {})
    measures = {m: sanity_measures(m) for m in cfg.methods}
    # per method and measure: one (scans, regions) block per batch, model 0 trained, 1.. random
    vals: dict[tuple[str, str], list[list[npt.NDArray[np.float64]]]] = {
        (m, s): [[] for _ in range(n_random + 1)] for m in cfg.methods for s in measures[m]
    }
    counts: list[npt.NDArray[np.float64]] = []
    order: list[str] = []
    for k in sorted({int(fold_of[s]) for s in sample}):
        sids_k = [s for s in sample if int(fold_of[s]) == k]
        model, hp = load_fold_model(inputs.model_files[k], device=device)
        model.eval()
        models = [model, *(randomised_copy(model, cfg.seed + 1000 * (k + 1) + i) for i in range(n_random))]
        for start in range(0, len(sids_k), cfg.batch_size):
            sids = sids_k[start : start + cfg.batch_size]
            scans = [inputs.cache.scans[s] for s in sids]
            x = torch.from_numpy(np.stack([np.asarray(c.load(), dtype=np.float32) for c in scans])).to(device)
            lab = torch.from_numpy(np.stack([np.asarray(c.load_mask(), dtype=np.int64) for c in scans])).to(device)
            order += sids
            for j, mod in enumerate(models):
                res = explain_batch(
                    mod, x, lab, list(cfg.methods), cfg=cfg, layer=layer, n_labels=n_labels,
                    age_sd=float(hp["age_sd"]), means=means,
                )  # fmt: skip
                for m, r in res.items():
                    sv = scan_values(r, lab, n_labels)
                    if j == 0 and m == cfg.methods[0]:
                        counts.append(np.asarray(sv["count"], dtype=float)[:, label_ids])
                    for s in measures[m]:
                        vals[(m, s)][j].append(ranking_values(sv, label_ids, s))
    out: dict[str, Any] = {
        "n_scans": len(order),
        "n_random": n_random,
        "source": "fully randomised copies of the fold models",
        "rule": RULE,
        "layer": layer,
        "regions": len(names),
        "methods": {},
    }
    if not order:
        return out
    count = np.vstack(counts)
    count[count <= 0] = np.nan
    volume = _nanmean(count)
    half = np.random.default_rng(cfg.seed + 1).permutation(len(order))
    a_idx, b_idx = half[: len(order) // 2], half[len(order) // 2 :]
    for m in cfg.methods:
        entry: dict[str, Any] = {"importance_measure": METHODS[m].importance_measure, "by_measure": {}}
        for s in measures[m]:
            per_model = [np.vstack(blocks) for blocks in vals[(m, s)]]
            cohort = [_nanmean(v) for v in per_model]
            halves = (_nanmean(per_model[0][a_idx]), _nanmean(per_model[0][b_idx])) if len(order) >= 4 else None
            verdict = calibrated_verdict(cohort[0], cohort[1:], volume, halves=halves, seed=cfg.seed)
            if not verdict["passed"]:
                verdict["warning"] = _warning(m, s, verdict)
            entry["by_measure"][s] = verdict
        entry.update(entry["by_measure"][entry["importance_measure"]])
        if METHODS[m].level != "voxel":
            del entry["by_measure"]
        out["methods"][m] = entry
    return out


def usable_nulls(nulls: pd.DataFrame | None, n_random: int = RANDOM_MODELS) -> bool:
    """Whether a null table holds at least ``n_random`` random-weight copies to reuse."""
    if nulls is None or nulls.empty or "null" not in nulls.columns:
        return False
    rand = nulls[nulls["null"] == "random_weights"]
    return bool(rand["copy"].nunique() >= n_random)


def sanity_from_nulls(
    attributions: pd.DataFrame,
    nulls: pd.DataFrame,
    measures: Mapping[str, str],
    *,
    seed: int = 0,
    layer: str | None = None,
) -> dict[str, Any]:
    """The calibrated check from the null models' random-weight copies: no model is run again.

    ``attributions_null.parquet`` already holds the sample's region tables under fully
    randomised copies of each fold model (:mod:`bodyage.nulls`); the trained vectors are
    taken on the same scans. Same output as :func:`sanity_check`, with ``source`` saying
    where the random models came from.

    Parameters
    ----------
    attributions
        ``attributions.parquet`` of the trained models.
    nulls
        ``attributions_null.parquet`` (columns of ``attributions.parquet`` + ``null``, ``copy``).
    measures
        Method -> its ranking measure.
    seed
        Seed of the halves and of the bootstrap.
    layer
        The GradCAM layer, recorded.
    """
    from bodyage.attribute_stability import ranking_column

    rand = nulls[nulls["null"] == "random_weights"].copy()
    rand["scan"] = rand["subject_id"].astype(str) + "_" + rand["visit"].astype(str)
    trained = attributions.assign(scan=attributions["subject_id"].astype(str) + "_" + attributions["visit"].astype(str))
    scans = sorted(set(rand["scan"]))
    trained = trained[trained["scan"].isin(scans)]
    copies = sorted(int(c) for c in rand["copy"].unique())
    regions = sorted(set(trained["region"]))
    out: dict[str, Any] = {
        "n_scans": len(scans),
        "n_random": len(copies),
        "source": "attributions_null.parquet (random_weights copies)",
        "rule": RULE,
        "layer": layer,
        "regions": len(regions),
        "methods": {},
    }
    half = np.random.default_rng(seed + 1).permutation(len(scans))
    halves_ids = ([scans[i] for i in half[: len(scans) // 2]], [scans[i] for i in half[len(scans) // 2 :]])

    def wide(df: pd.DataFrame, measure: str) -> pd.DataFrame:
        if measure == "abs_density" and "abs_density" not in df.columns:
            df = df.assign(abs_density=df["abs_mass"] / df["n_voxels"])
        vals = ranking_column(df, measure)
        return pd.DataFrame({"scan": df["scan"], "region": df["region"], "v": vals.to_numpy()}).pivot_table(
            index="scan", columns="region", values="v", aggfunc="mean", dropna=False
        )

    for m, own in measures.items():
        t_m = trained[trained["method"] == m]
        r_m = rand[rand["method"] == m]
        if t_m.empty or r_m.empty:
            continue
        vol = wide(t_m, "n_voxels").reindex(columns=regions)
        volume = _nanmean(vol.to_numpy(dtype=float))
        entry: dict[str, Any] = {"importance_measure": own, "by_measure": {}}
        for s in dict.fromkeys([own, *(sanity_measures(m) if m in METHODS else [])]):
            tw = wide(t_m, s).reindex(columns=regions)
            t_vec = _nanmean(tw.to_numpy(dtype=float))
            r_vecs = [
                _nanmean(wide(r_m[r_m["copy"] == c], s).reindex(columns=regions).to_numpy(dtype=float)) for c in copies
            ]
            halves = None
            if len(scans) >= 4:
                halves = tuple(_nanmean(tw.reindex(index=h).to_numpy(dtype=float)) for h in halves_ids)
            verdict = calibrated_verdict(t_vec, r_vecs, volume, halves=halves, seed=seed)  # type: ignore[arg-type]
            if not verdict["passed"]:
                verdict["warning"] = _warning(m, s, verdict)
            entry["by_measure"][s] = verdict
        entry.update(entry["by_measure"][own])
        if m in METHODS and METHODS[m].level != "voxel":
            del entry["by_measure"]
        out["methods"][m] = entry
    return out


def _nanmean(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Mean over scans (rows), NaN where a region is absent from every scan."""
    with np.errstate(invalid="ignore"):
        n = np.isfinite(a).sum(axis=0)
        s = np.nansum(a, axis=0)
        return np.asarray(np.where(n > 0, s / np.maximum(n, 1), np.nan), dtype=float)
