"""Explaining scans for ``bodyage attribute``: one batch through the methods, one table per scan.

:func:`explain_batch` runs each method on a batch of scans (Shapley permutations seeded
the same for a scan alone or in a batch); :func:`region_frames` and :func:`slice_frames` turn
its results into one region table and one slice profile per scan. :func:`voxel_ml` and
:func:`z_positions` give a scan's geometry; :func:`cohort_means` the cohort-mean intensity
per region and channel that the ``shift`` and ``mean`` baselines of ``ablation`` and
``shapley`` need (:data:`bodyage.attribution.COHORT_MEAN_BASELINES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.attribute_tables import ATTRIBUTION_COLUMNS
from bodyage.attribution import attribute_batch, region_means, region_measures, slice_mass
from bodyage.errors import RunError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from bodyage.attribute_inputs import AttributeConfig, RunInputs

#: scans whose region means make the cohort means of the shift and mean baselines (a seeded sample on big cohorts)
BASELINE_SCANS = 500


def voxel_ml(affine: npt.NDArray[np.float64]) -> float:
    """Volume of one voxel of ``affine`` in ml."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def z_positions(affine: npt.NDArray[np.float64], nz: int) -> npt.NDArray[np.float64]:
    """Distance (mm) of each axial slice centre below the top slice of the field of view (RAS+ grid)."""
    step = float(np.linalg.norm(np.asarray(affine)[:3, 2]))
    sup = float(np.asarray(affine)[2, 2]) >= 0  # z index grows towards the head in RAS+
    k = np.arange(nz, dtype=float)
    return ((nz - 1 - k) if sup else k) * step


def cohort_means(inputs: RunInputs, scan_ids: Sequence[str], n_labels: int, seed: int) -> torch.Tensor:
    """``(n_labels, C)`` mean intensity per region and channel over (a seeded sample of) the cohort."""
    import torch

    ids = list(scan_ids)
    if len(ids) > BASELINE_SCANS:
        rng = np.random.default_rng(seed)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), BASELINE_SCANS, replace=False))]
    acc: torch.Tensor | None = None
    for sid in ids:
        cs = inputs.cache.scans[sid]
        x = torch.from_numpy(np.asarray(cs.load(), dtype=np.float32))[None]
        lab = torch.from_numpy(np.asarray(cs.load_mask(), dtype=np.int64))[None].clamp(max=n_labels - 1)
        part = region_means(x, lab, n_labels)
        acc = part if acc is None else acc + part
    if acc is None:
        raise RunError("no scan to compute the cohort means of the ablation baseline from")
    counts = acc[:, -1:].clamp(min=1)
    return (acc[:, :-1] / counts).float()


def region_frames(
    method: str,
    sub: pd.DataFrame,
    values: dict[str, npt.NDArray[np.float64]],
    ids: npt.NDArray[np.int64],
    names: list[str],
    vml: npt.NDArray[np.float64],
) -> list[pd.DataFrame]:
    """One long region table per scan of a batch.

    Parameters
    ----------
    method : str
        The attribution method the values come from.
    sub : pandas.DataFrame
        The batch's scans, one row each, with ``subject_id``, ``visit`` and ``fold``.
    values : dict[str, numpy.ndarray]
        Per-label sums ``mass``, ``abs_mass`` and ``count``, each ``(n_scans, n_labels)``.
    ids : numpy.ndarray
        The label ids of ``names``, in the same order (columns of ``values``).
    names : list[str]
        The region names.
    vml : numpy.ndarray
        Voxel volume per scan (ml), shape ``(n_scans,)``.

    Returns
    -------
    list[pandas.DataFrame]
        One table per scan, one row per region, columns :data:`ATTRIBUTION_COLUMNS`.
    """
    m = region_measures(values["mass"][:, ids], values["abs_mass"][:, ids], values["count"][:, ids], vml)
    out = []
    for i in range(len(sub)):
        row = sub.iloc[i]
        df = pd.DataFrame(
            {
                "subject_id": str(row["subject_id"]),
                "visit": int(row["visit"]),
                "method": method,
                "region": names,
                "fold": int(row["fold"]),
                **{c: m[c][i] for c in ATTRIBUTION_COLUMNS[5:]},
            }
        )
        out.append(df)
    return out


def slice_frames(
    method: str, sub: pd.DataFrame, maps: torch.Tensor, z_mm: list[npt.NDArray[np.float64]]
) -> list[pd.DataFrame]:
    """One slice profile (attribution mass per axial slice) per scan of a batch.

    Parameters
    ----------
    method : str
        The attribution method that made the maps.
    sub : pandas.DataFrame
        The batch's scans, one row each, with ``subject_id``, ``visit`` and ``fold``.
    maps : torch.Tensor
        The attribution maps of the batch, ``(n_scans, X, Y, Z)`` (axial axis last).
    z_mm : list[numpy.ndarray]
        Per scan, the position of each axial slice (mm; :func:`z_positions`).

    Returns
    -------
    list[pandas.DataFrame]
        One table per scan, one row per slice: ``z_index``, ``z_mm``, ``mass`` and
        ``abs_mass`` beside the scan's ids and ``method``.
    """
    prof = slice_mass(maps)
    absprof = slice_mass(maps.abs())
    out = []
    for i in range(len(sub)):
        row = sub.iloc[i]
        nz = prof.shape[1]
        out.append(
            pd.DataFrame(
                {
                    "subject_id": str(row["subject_id"]),
                    "visit": int(row["visit"]),
                    "fold": int(row["fold"]),
                    "method": method,
                    "z_index": np.arange(nz),
                    "z_mm": z_mm[i],
                    "mass": prof[i],
                    "abs_mass": absprof[i],
                }
            )
        )
    return out


def explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    methods: Sequence[str],
    *,
    cfg: AttributeConfig,
    layer: str,
    n_labels: int,
    age_sd: float,
    means: torch.Tensor | None,
) -> dict[str, Any]:
    """Run each method on one batch; returns ``{method: BatchAttribution}``."""
    import torch

    from bodyage.models import get_layer

    out: dict[str, Any] = {}
    for method in methods:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # Shapley permutations: the same for a scan alone or in a batch
        try:
            out[method] = attribute_batch(
                method,
                model,
                x,
                labels,
                n_labels=n_labels,
                age_sd=age_sd,
                layer=get_layer(model, layer),
                baseline=cfg.baseline,
                cohort_means=means,
                samples=cfg.samples,
                ig_steps=cfg.ig_steps,
            )
        finally:
            torch.random.set_rng_state(gen_state)
    return out
