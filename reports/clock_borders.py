"""What an organ clock's input shows of age besides its organ -> ``docs/results/clock_borders.json``.

Run from the repository root on a study made by ``bodyage simulate`` (the default scenario)::

    bodyage simulate STUDY
    python reports/clock_borders.py STUDY --set quick --clocks CLOCKS

For each clock of the set it cuts every scan as the clock does (:func:`bodyage.crop.plan_crop`,
the clock's crop and mask dilation) and measures, per scan, the mean fat fraction
(fat / (water + fat)) in three layers: the **rim** (the dilated mask minus the mask: what
touches the organ), the **border** (mask voxels with a neighbour outside the mask: partial
volume mixes in the neighbours) and the **interior** (the rest of the mask); and the mask's
size and centre in the crop. Each is correlated with age, with the clock's planted
deviation (mean ``biological_age − age`` of its regions in ``truth.parquet``) and with a
neighbour's planted deviation (``--neighbour``, default ``torso_fat``, the tissue that
surrounds the abdominal organs and grows with age in the default scenario), and the mask's
size with a phenotype (``--phenotype``, default ``bmi``: the simulated body's width and depth
scale with it, and so do its organs). An organ with no
planted ageing whose layers correlate with age shows what its clock can read without
reading the organ. With ``--clocks DIR`` (a folder of ``bodyage clocks`` on the same study)
each clock's corrected gap is correlated with its own and with the neighbour's planted
deviation too (``gap_r``): which of the two its gap follows. The JSON names the command,
the bodyage version and git revision.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from provenance import RESULTS, short_revision, uncommitted_changes, write_json

OUT = RESULTS / "clock_borders.json"


def _layers(study: Any, crop: Any, row: Any) -> dict[str, float]:
    import numpy as np
    from scipy import ndimage

    from bodyage.crop import window
    from bodyage.volumes import load_labels, load_volume

    water, fat = (load_volume(study.path(row[c])) for c in ("water", "fat"))
    labels = load_labels(study.path(row["mask"]))
    affine = np.asarray(water.affine, dtype=float)
    start_f = np.linalg.solve(affine[:3, :3], np.asarray(crop.origin_mm) - affine[:3, 3])
    start = [math.floor(x + 0.5) for x in start_f]
    m = np.isin(window(np.asarray(labels.data), start, crop.window), crop.label_ids)
    dilated = ndimage.binary_dilation(m, iterations=crop.dilate) if crop.dilate > 0 else m
    interior = ndimage.binary_erosion(m)
    w = window(np.asarray(water.data, dtype=np.float32), start, crop.window)
    f = window(np.asarray(fat.data, dtype=np.float32), start, crop.window)
    ff = f / np.maximum(w + f, 1e-6)
    out: dict[str, float] = {"mask_voxels": float(m.sum())}
    centre = np.argwhere(m).mean(axis=0) if m.any() else np.full(3, np.nan)
    for axis, c in zip("xyz", centre, strict=True):
        out[f"centre_{axis}"] = float(c)
    for name, sel in (("rim", dilated & ~m), ("border", m & ~interior), ("interior", interior)):
        out[f"ff_{name}"] = float(ff[sel].mean()) if sel.any() else float("nan")
        out[f"voxels_{name}"] = float(sel.sum())
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every clock of the set; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--set", default="quick")
    parser.add_argument("--neighbour", default="torso_fat")
    parser.add_argument("--phenotype", default="bmi", help="a cohort column the mask's size is correlated with")
    parser.add_argument("--clocks", type=Path, default=None, help="a clocks folder of the same study")
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd

    from bodyage import __version__
    from bodyage.clocks import read_clock_set
    from bodyage.crop import plan_crop, resolve_regions
    from bodyage.study import load_study

    revision = short_revision()
    dirty = uncommitted_changes()
    study = load_study(args.study)
    truth = pd.read_parquet(args.study / "truth.parquet")
    truth = truth.assign(subject_id=truth["subject_id"].astype(str), deviation=truth["biological_age"] - truth["age"])
    dev = truth.pivot_table(index=["subject_id", "visit"], columns="region", values="deviation")
    cohort = study.cohort.assign(subject_id=study.cohort["subject_id"].astype(str))
    key = pd.MultiIndex.from_arrays([cohort["subject_id"], cohort["visit"].astype(int)])
    clocks: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for name, entry in read_clock_set(args.set).items():
        regions = resolve_regions(entry, study, what=f"clock {name}")
        crop = plan_crop(study, cohort, regions)
        per = pd.DataFrame([_layers(study, crop, row) for _, row in cohort.iterrows()], index=key)
        targets = {
            "age": pd.Series(cohort["age"].to_numpy(dtype=float), index=key),
            "own_deviation": dev.reindex(key)[list(regions)].mean(axis=1),
        }
        if args.neighbour in dev.columns and args.neighbour not in regions:
            targets["neighbour_deviation"] = dev.reindex(key)[args.neighbour]
        result: dict[str, Any] = {"regions": list(regions), "grid": list(crop.grid), "dilate": crop.dilate}
        for feature in ("ff_rim", "ff_border", "ff_interior", "mask_voxels", "centre_x", "centre_y", "centre_z"):
            x = per[feature]
            r = {}
            for t, y in targets.items():
                ok = x.notna() & y.notna()
                r[t] = round(float(np.corrcoef(x[ok], y[ok])[0, 1]), 3) if ok.sum() > 2 and x[ok].std() > 0 else None
            layer = feature.removeprefix("ff_")
            result[feature] = {
                "r": r,
                "median_voxels": float(per[f"voxels_{layer}"].median()) if feature.startswith("ff_") else None,
            }
            if feature.startswith("ff_"):
                rows.append(
                    [
                        name,
                        layer,
                        int(result[feature]["median_voxels"]),
                        r["age"],
                        r["own_deviation"],
                        r.get("neighbour_deviation"),
                    ]
                )
        if args.phenotype in cohort.columns:
            ph = pd.Series(cohort[args.phenotype].to_numpy(dtype=float), index=key)
            ok = ph.notna() & per["mask_voxels"].notna()
            result["size_r_phenotype"] = round(float(np.corrcoef(per["mask_voxels"][ok], ph[ok])[0, 1]), 3)
        result["size_and_position_r_age"] = {
            f: result[f]["r"]["age"] for f in ("mask_voxels", "centre_x", "centre_y", "centre_z")
        }
        if args.clocks is not None and (args.clocks / name / "predictions.parquet").is_file():
            preds = pd.read_parquet(args.clocks / name / "predictions.parquet")
            gap = pd.Series(
                preds["age_gap_corrected"].to_numpy(dtype=float),
                index=pd.MultiIndex.from_arrays([preds["subject_id"].astype(str), preds["visit"].astype(int)]),
            )
            result["gap_r"] = {}
            for t in ("own_deviation", "neighbour_deviation"):
                if t in targets:
                    y = targets[t].reindex(gap.index)
                    ok = gap.notna() & y.notna()
                    result["gap_r"][t] = round(float(np.corrcoef(gap[ok], y[ok])[0, 1]), 3)
        clocks[name] = result
    doc = {
        "command": f"python reports/clock_borders.py STUDY --set {args.set} --neighbour {args.neighbour}"
        + f" --phenotype {args.phenotype}"
        + (" --clocks DIR" if args.clocks is not None else ""),
        "bodyage": __version__,
        "git_revision": revision,
        "uncommitted_changes": dirty,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "study_scans": len(cohort),
        "neighbour": args.neighbour,
        "phenotype": args.phenotype,
        "clocks": clocks,
        "table": {
            "columns": [
                "clock",
                "layer",
                "voxels (median)",
                "r with age",
                "r with own planted deviation",
                f"r with {args.neighbour} planted deviation",
            ],
            "rows": rows,
        },
    }
    write_json(args.json, doc, allow_nan=False)
    print(f"{len(clocks)} clocks; {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
