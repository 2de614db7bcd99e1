"""Model-randomisation sanity check of attribution methods (Adebayo et al. 2018).

An explanation that survives randomising the model's weights explains the architecture
(or the image: edges, region sizes), not what the model learned about ageing.
:func:`sanity_check` recomputes a sample of scans' region profiles with the weights
randomised in cascade from the top (the head first, then ``blockN`` … ``block1``) and
reports, per method and cascade step, the Spearman correlation between the original and
the randomised region profile of each scan (median over the sample). A method *fails*
when the profile of the fully randomised model still correlates at
:data:`FAIL_SPEARMAN` or more. The profile is the method's importance per region
(``|mass|``), which grows with the region's size under any weights; the same correlation
per voxel (``|mass| / n_voxels``, ``spearman_per_voxel``) takes size out.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from bodyage.attribution import METHODS, label_lookup, scan_values

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from bodyage.attribute import AttributeConfig, RunInputs

#: Spearman at or above which a method's profile "survives" full randomisation
FAIL_SPEARMAN = 0.5


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


def _profiles(
    model: nn.Module,
    x: torch.Tensor,
    lab: torch.Tensor,
    method: str,
    cfg: AttributeConfig,
    layer: str,
    n_labels: int,
    age_sd: float,
    means: torch.Tensor | None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per scan and region: the importance (|mass|) and the same per voxel (|mass| / n_voxels)."""
    from bodyage.attribute import explain_batch

    res = explain_batch(model, x, lab, [method], cfg=cfg, layer=layer, n_labels=n_labels, age_sd=age_sd, means=means)
    vals = scan_values(res[method], lab, n_labels)
    # region importance per scan: |mass| (the registry measure of every method but share)
    prof = np.abs(vals["mass"])
    if METHODS[method].importance_measure == "share":
        prof = vals["abs_mass"]
    prof = np.asarray(prof, dtype=float)
    prof[vals["count"] <= 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        per_voxel = prof / vals["count"]
    return prof, per_voxel


def _spearman_rows(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Spearman per row over the columns both have (NaN where undefined)."""
    import pandas as pd

    out = np.full(len(a), np.nan)
    for i in range(len(a)):  # scans of a small sample
        ok = np.isfinite(a[i]) & np.isfinite(b[i])
        if ok.sum() < 3:
            continue
        ra = pd.Series(a[i][ok]).rank().to_numpy()
        rb = pd.Series(b[i][ok]).rank().to_numpy()
        if ra.std() > 0 and rb.std() > 0:
            out[i] = float(np.corrcoef(ra, rb)[0, 1])
    return out


def _median(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmedian(arr)) if np.isfinite(arr).any() else float("nan")


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
) -> dict[str, Any]:
    """Cascading randomisation of each fold model on a seeded sample of scans.

    Returns
    -------
    dict
        ``n_scans``, ``steps`` (cascade order), ``threshold`` and per method
        ``spearman`` (``{step: median over scans}``), ``final`` (fully randomised),
        ``passed`` and a ``warning`` when it fails.
    """
    import torch

    from bodyage.train import load_fold_model

    rng = np.random.default_rng(cfg.seed)
    ids = list(scan_ids)
    pick = sorted(rng.choice(len(ids), min(n_scans, len(ids)), replace=False)) if ids else []
    sample = [ids[i] for i in pick]
    fold_of = dict(zip(inputs.predictions["scan_id"], inputs.predictions["fold"], strict=True))
    per_method: dict[str, dict[str, list[float]]] = {m: {} for m in cfg.methods}
    per_voxel: dict[str, dict[str, list[float]]] = {m: {} for m in cfg.methods}
    steps: list[str] = []
    for k in sorted({int(fold_of[s]) for s in sample}):
        sids = [s for s in sample if int(fold_of[s]) == k]
        model, hp = load_fold_model(inputs.model_files[k], device=device)
        scans = [inputs.cache.scans[s] for s in sids]
        x = torch.from_numpy(np.stack([np.asarray(c.load(), dtype=np.float32) for c in scans])).to(device)
        lab = torch.from_numpy(np.stack([np.asarray(c.load_mask(), dtype=np.int64) for c in scans])).to(device)
        age_sd = float(hp["age_sd"])
        original = {m: _profiles(model, x, lab, m, cfg, layer, n_labels, age_sd, means) for m in cfg.methods}
        rand = copy.deepcopy(model).eval()
        steps = []
        for j, (name, _) in enumerate(cascade(model)):
            target = dict(cascade(rand))[name]
            randomise(target, cfg.seed + 1000 * k + j)
            rand.eval()
            steps.append(name)
            for m in cfg.methods:
                prof, pv = _profiles(rand, x, lab, m, cfg, layer, n_labels, age_sd, means)
                per_method[m].setdefault(name, []).extend(_spearman_rows(original[m][0], prof).tolist())
                per_voxel[m].setdefault(name, []).extend(_spearman_rows(original[m][1], pv).tolist())
    _, names, _ = label_lookup(dict(inputs.labels.names) if inputs.labels else {})
    out: dict[str, Any] = {
        "n_scans": len(sample),
        "steps": steps,
        "threshold": FAIL_SPEARMAN,
        "layer": layer,
        "regions": len(names),
        "methods": {},
    }
    for m, by_step in per_method.items():
        med = {
            s: float(np.nanmedian(v)) if np.isfinite(np.asarray(v)).any() else float("nan") for s, v in by_step.items()
        }
        final = med[steps[-1]] if steps else float("nan")
        passed = bool(final < FAIL_SPEARMAN)
        entry: dict[str, Any] = {
            "spearman": med,
            "final": final,
            "passed": passed,
            "spearman_per_voxel": {s: _median(v) for s, v in per_voxel[m].items()},
        }
        if not passed:
            entry["warning"] = (
                f"{m}: region profile still correlates {final:.2f} with the original after every layer is "
                "randomised; it reflects the architecture or the image more than what the model learned"
            )
        out["methods"][m] = entry
    return out
