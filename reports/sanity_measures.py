"""The calibrated sanity check, GradCAM's two region measures and joint group ablation, measured.

Usage: python reports/sanity_measures.py [--subjects 80] [--folds 2] [--epochs 4] [--scenario default]
                                         [--sanity-scans 16] [--out docs/results/sanity.json]

Simulates a study, trains a run (the size of the check's small demo by default), runs
``attribute`` with ``gradcam`` and ``ablation``, the calibrated sanity check and
``--groups``, and writes one JSON file for the docs: per method and measure the sanity
verdict and its numbers, precision@k against the planted truth (GradCAM ranked by the
size-weighted total ``|mass|`` and by the intensive ``abs_density``), the fold-to-fold
stability, and for the redundant pairs the summed single ablations beside the joint one.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from provenance import write_json

from bodyage import __version__
from bodyage.attribute import AttributeConfig, attribute_run, group_table, recovery_summary
from bodyage.simulate import simulate_study
from bodyage.train import TrainConfig, train_run

PAIRS = ("gluteus_maximus", "autochthon")
SANITY_KEYS = (
    "cohort_rho_trained_random",
    "cohort_rho_random_random",
    "cohort_rho_random_random_min",
    "between_scan_rho",
    "rho_volume",
    "p_value",
    "passed",
)


def _r(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


def main() -> None:
    """Run the measurement and write the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--subjects", type=int, default=80)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sanity-scans", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/sanity.json")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_study(root / "study", scenario=args.scenario, subjects=args.subjects, seed=args.seed, figures=False)
        train_run(
            root / "study",
            root / "run",
            TrainConfig(folds=args.folds, epochs=args.epochs, seed=args.seed),
            cache_dir=root / "cache",
            figures=False,
        )
        cfg = AttributeConfig(methods=("gradcam", "ablation"), groups=True, figures=False, seed=args.seed)
        t0 = time.perf_counter()
        res = attribute_run(root / "run", cfg, cache_dir=root / "cache", sanity=True, sanity_scans=args.sanity_scans)
        minutes = (time.perf_counter() - t0) / 60
        attr = pd.read_parquet(root / "run" / "attributions.parquet")
        rec = json.loads((root / "run" / "attribution_recovery.json").read_text())
        by_measure = recovery_summary(attr, root / "study", ["gradcam"], measures={"gradcam": "abs_density"})[
            "methods"
        ]["gradcam"]
        groups = pd.read_parquet(root / "run" / "attributions_groups.parquet")
        summed = group_table(attr)
    sanity = res.sanity or {"methods": {}}
    rows = []
    out_methods: dict[str, Any] = {}
    for method, entry in sanity["methods"].items():
        measures = entry.get("by_measure") or {entry["importance_measure"]: entry}
        out_methods[method] = {}
        for measure, v in measures.items():
            if method == "gradcam" and measure == "abs_density":
                prec = by_measure.get("precision_at_k")
            else:
                prec = rec["methods"][method].get("precision_at_k")
            item = {k: _r(v[k]) for k in SANITY_KEYS}
            item["precision_at_k"] = _r(prec)
            out_methods[method][measure] = item
            rows.append([method, measure, *(item[k] for k in SANITY_KEYS), item["precision_at_k"]])
    pairs = {}
    for g in PAIRS:
        joint = groups[(groups["method"] == "ablation") & (groups["region"] == g)]["mass"].abs().mean()
        single = summed[(summed["method"] == "ablation") & (summed["region"] == g)]["mass"].abs().mean()
        pairs[g] = {"summed_single_ablations": _r(float(single)), "joint_ablation": _r(float(joint))}
    result = {
        "version": __version__,
        "command": "python reports/sanity_measures.py "
        + f"--scenario {args.scenario} --subjects {args.subjects} --folds {args.folds} --epochs {args.epochs} "
        + f"--sanity-scans {args.sanity_scans}",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}",
        "minutes_total": round((time.perf_counter() - started) / 60, 2),
        "minutes_attribute_with_sanity": round(minutes, 2),
        "n_random": sanity.get("n_random"),
        "n_scans": sanity.get("n_scans"),
        "methods": out_methods,
        "stability": {m: {k: _r(v) for k, v in e.get("stability", {}).items()} for m, e in rec["methods"].items()},
        "group_ablation": pairs,
        "table": {"columns": ["method", "measure", *SANITY_KEYS, "precision_at_k"], "rows": rows},
        "pairs_table": {
            "columns": ["group", "mean |sum of single ablations| (years)", "mean |joint ablation| (years)"],
            "rows": [[g, p["summed_single_ablations"], p["joint_ablation"]] for g, p in pairs.items()],
        },
    }
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
