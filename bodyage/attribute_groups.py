"""Region groups of ``bodyage attribute --groups``: joint ablation of each group's members.

``attributions_groups.parquet`` aggregates the region table to the groups of
:data:`bodyage.regions.REGION_GROUPS` (kidney = left + right, ...). For voxel methods a
group's mass is the sum of its members' (a map sums over any set of voxels). For
``ablation`` a sum of single-region ablations under-counts redundant members: when the
model can read the same ageing from either side (left and right gluteus, autochthon),
removing one side leaves the other, and both single ablations are near 0. So the ablation
value of a multi-member group is a **joint** ablation: every member replaced by the
baseline at once (:func:`bodyage.attribution.group_ablation`). ``shapley`` keeps the sum
of its members' values, which already shares the joint effect between them.

Per-scan results are written to ``RUN/attribute/parts/ablation_groups-<fingerprint>/``
(the ablation's fingerprint), so a resumed run does only the scans not yet done.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bodyage.atomic import write_with

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bodyage.attribute_inputs import AttributeConfig, RunInputs

#: the method whose group values are joint ablations
JOINT_METHOD = "ablation"
JOINT_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "region", "mass")


def multi_member_groups(names: dict[int, str]) -> dict[str, list[int]]:
    """Groups of :func:`~bodyage.regions.group_of` with two or more members in the label table."""
    from bodyage.regions import group_of

    groups: dict[str, list[int]] = {}
    for i, name in sorted(names.items()):
        g = group_of(name)
        if g != name:
            groups.setdefault(g, []).append(int(i))
    return {g: ids for g, ids in groups.items() if len(ids) >= 2}


def joint_ablation(
    inputs: RunInputs,
    todo: pd.DataFrame,
    cfg: AttributeConfig,
    *,
    fingerprint: str,
    n_labels: int,
    device: torch.device,
    means: torch.Tensor | None,
) -> pd.DataFrame:
    """Joint ablation value (years) of every multi-member group in every scan of ``todo``.

    Returns
    -------
    pandas.DataFrame
        ``subject_id``, ``visit``, ``region`` (the group), ``mass``; NaN where no member is
        in the scan.
    """
    import torch

    from bodyage.attribute_tables import part_dir
    from bodyage.attribution import group_ablation
    from bodyage.train import load_fold_model

    groups = multi_member_groups(dict(inputs.labels.names) if inputs.labels is not None else {})
    folder = part_dir(inputs.run, f"{JOINT_METHOD}_groups", fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    frames: list[pd.DataFrame] = []
    if not groups:
        return pd.DataFrame(columns=list(JOINT_COLUMNS))
    for k, fold_rows in todo.groupby("fold", sort=True):
        pending = [s for s in fold_rows["scan_id"] if not (folder / f"{s}.parquet").is_file()]
        if pending:
            model, hp = load_fold_model(inputs.model_files[int(str(k))], device=device)
            model.eval()
            rows = fold_rows.set_index("scan_id")
            for start in range(0, len(pending), cfg.batch_size):
                sids = pending[start : start + cfg.batch_size]
                scans = [inputs.cache.scans[s] for s in sids]
                x = torch.from_numpy(np.stack([np.asarray(c.load(), dtype=np.float32) for c in scans])).to(device)
                lab = torch.from_numpy(np.stack([np.asarray(c.load_mask(), dtype=np.int64) for c in scans])).to(device)
                vals = group_ablation(
                    model, x, lab, list(groups.values()), age_sd=float(hp["age_sd"]), baseline=cfg.baseline,
                    cohort_means=means,
                )  # fmt: skip
                for i, sid in enumerate(sids):
                    df = pd.DataFrame(
                        {
                            "subject_id": str(rows.loc[sid, "subject_id"]),
                            "visit": int(rows.loc[sid, "visit"]),
                            "region": list(groups),
                            "mass": vals[i],
                        }
                    )
                    write_with(folder / f"{sid}.parquet", partial(df.to_parquet, index=False))
        frames += [pd.read_parquet(folder / f"{s}.parquet") for s in fold_rows["scan_id"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(JOINT_COLUMNS))


def with_joint(grouped: pd.DataFrame, joint: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Replace the summed ablation values of multi-member groups by their joint ablation.

    ``mass`` becomes the joint value, ``abs_mass`` its magnitude; ``share``, ``density``,
    ``enrichment`` and ``abs_density`` are recomputed per scan.
    """
    if joint.empty or JOINT_METHOD not in set(grouped["method"]):
        return grouped
    out = grouped.copy()
    j = joint.assign(method=JOINT_METHOD)
    key = ["subject_id", "visit", "method", "region"]
    merged = out[key].merge(j, on=key, how="left")
    hit = ((out["method"] == JOINT_METHOD) & out["region"].isin(set(joint["region"]))).to_numpy()
    out.loc[hit, "mass"] = merged.loc[hit, "mass"].to_numpy()
    out.loc[hit, "abs_mass"] = np.abs(merged.loc[hit, "mass"].to_numpy())
    abl = out["method"] == JOINT_METHOD
    sub = out[abl]
    scan = [sub["subject_id"], sub["visit"]]
    body_abs = sub["abs_mass"].groupby(scan).transform("sum")
    body_vox = sub["n_voxels"].groupby(scan).transform("sum")
    out.loc[abl, "share"] = sub["abs_mass"] / body_abs
    out.loc[abl, "density"] = sub["mass"] / sub["n_voxels"]
    out.loc[abl, "enrichment"] = out.loc[abl, "share"] / (sub["n_voxels"] / body_vox)
    if "abs_density" in out.columns:
        out.loc[abl, "abs_density"] = sub["abs_mass"] / sub["n_voxels"]
    return out[list(columns)]
