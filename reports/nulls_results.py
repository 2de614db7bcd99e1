"""Measure the cost of attribution's null models and their precision@k; write ``docs/results/nulls.json``.

Usage: python reports/nulls_results.py [--subjects 80] [--folds 2] [--epochs 4] [--copies 3]
                                       [--null-scans 100] [--work DIR] [--out docs/results/nulls.json]
       python reports/nulls_results.py --bands-only --work DIR   (recount the bands of DIR's run)

Simulates the default scenario, trains, and runs ``attribute`` with the nulls the demo runs
(:mod:`bodyage.nulls`: randomised-weight copies of each fold model on a sample of scans, and
the permuted-label model trained with the run's own settings). Records the wall-clock and CPU
seconds of training, of the trained attribution and of each null (``attribute.json``:
``cost``), the machine's load while it ran, and per method the precision@k of the trained
model beside that of each null (``attribution_recovery.json``). Run it with
``OMP_NUM_THREADS=1`` to measure the work of one core; the docs page
``docs/methods/nulls.md`` reads the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import load_average, utc_minute, write_json


def band_counts(run: Path) -> dict[str, Any]:
    """Per method and null kind: regions above the band by magnitude and by share (``attribution_nulls.csv``)."""
    import pandas as pd

    from bodyage.nulls import NULL_ATTRIBUTIONS, null_bands

    recovery = json.loads((run / "attribution_recovery.json").read_text())
    bands = null_bands(
        pd.read_parquet(run / "attributions.parquet"),
        pd.read_parquet(run / NULL_ATTRIBUTIONS),
        recovery["importance_measure"],
    )
    out: dict[str, Any] = {}
    for (m, kind), grp in bands.groupby(["method", "null"]):
        out.setdefault(str(m), {})[str(kind)] = {
            "regions": len(grp),
            "above_band": int(grp["above_band"].sum()),
            "above_share_band": int(grp["above_share_band"].sum()),
        }
    for m, grp in bands.groupby("method"):
        every = grp.groupby("region")["above_share_band"].all()
        out[str(m)]["above_every_share_band"] = sorted(str(r) for r in every.index[every.to_numpy()])
    return out


def main() -> None:
    """Simulate, train, attribute with the nulls; write the JSON file."""
    from bodyage.attribute import AttributeConfig, attribute_run
    from bodyage.nulls import NullConfig
    from bodyage.simulate import simulate_study
    from bodyage.train import TrainConfig, train_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=80)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--null-scans", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/nulls.json"))
    ap.add_argument("--bands-only", action="store_true", help="only recount the bands of --work's finished run")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="nulls-"))
    study, run = work / "study", work / "run"
    if args.bands_only:
        out = json.loads(args.out.read_text(encoding="utf-8"))
        out["bands"] = band_counts(run)
        write_json(args.out, out, indent=1)
        print(json.dumps(out["bands"], indent=1))
        return
    load_start = load_average(1)
    if not (study / "cohort.csv").is_file():
        simulate_study(study, scenario="default", subjects=args.subjects)
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_run(study, run, TrainConfig(folds=args.folds, epochs=args.epochs), figures=False)
    train_cost = {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    nulls = NullConfig(copies=args.copies, permuted=True, scans=args.null_scans)
    result = attribute_run(run, AttributeConfig(figures=False), nulls=nulls)
    load_end = load_average(1)

    recovery = json.loads((run / "attribution_recovery.json").read_text())
    methods: dict[str, Any] = {}
    for m, entry in recovery.get("methods", {}).items():
        methods[m] = {
            "k": entry.get("k"),
            "precision_at_k": entry.get("precision_at_k"),
            "nulls": {
                kind: {key: v.get(key) for key in ("precision_at_k", "ci_low", "ci_high", "n_copies")}
                for kind, v in (entry.get("nulls") or {}).items()
            },
            "clears_nulls": entry.get("clears_nulls"),
        }
    cost = dict(result.cost)
    trained_attr = cost.get("trained_attribute", {})
    ratios = {
        step: round(v["cpu"] / trained_attr["cpu"], 2)
        for step, v in cost.items()
        if step != "trained_attribute" and trained_attr.get("cpu")
    }
    out = {
        "source": {
            "command": "OMP_NUM_THREADS=1 python reports/nulls_results.py",
            "generated": utc_minute(),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "settings": {
            "scenario": "default",
            "subjects": args.subjects,
            "scans": trained.n_scans,
            "folds": args.folds,
            "epochs": args.epochs,
            "methods": list(result.methods),
            "copies": args.copies,
            "null_scans": min(args.null_scans, result.n_scans),
        },
        "mae": trained.metrics["overall"]["mae"],
        "cost_seconds": {"train": train_cost, **cost},
        "cpu_ratio_to_trained_attribution": ratios,
        "cpu_ratio_permuted_train_to_train": (
            round(cost["permuted_train"]["cpu"] / train_cost["cpu"], 2) if train_cost["cpu"] else None
        ),
        "methods": methods,
        "bands": band_counts(run),
    }
    write_json(args.out, out, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
