"""Measure the model-free floors of the validation harness; write ``docs/results/floors.json``.

Usage: python reports/floors_results.py [--scenario default --scenario dev] [--subjects 80]
                                        [--study DIR] [--workers 1] [--out docs/results/floors.json]

For each scenario, simulates a study (or reads ``--study``) and scores the floor rankings of
:mod:`bodyage.floors` exactly as ``recovery.json`` does (precision@k with
:func:`analysis.recovery.method_recovery`, k = regions with planted information). No model is
trained, so the numbers are what any attribution method must beat on that scenario. The
docs page ``docs/methods/floors.md`` reads the file.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import utc_minute, write_json

from analysis.recovery import method_recovery, read_truth
from bodyage.floors import FLOORS, floor_scores
from bodyage.region_signals import region_signals


def measure(study: Path) -> dict[str, Any]:
    """Floors of one simulated study: precision@k and top-k regions of each floor ranking."""
    truth = read_truth(study)
    if truth is None:
        raise SystemExit(f"{study}: no truth.json (not a simulated study)")
    info = {str(k): float(v) for k, v in truth["region_information"].items()}
    started = time.perf_counter()
    signals, skipped = region_signals(study)
    seconds = time.perf_counter() - started
    scores = floor_scores(signals)
    floors: dict[str, Any] = {}
    for name in FLOORS:
        rec = method_recovery(scores[name].dropna(), info)
        floors[name] = {"precision_at_k": rec["precision_at_k"], "top_regions": rec["top_regions"]}
    best = max(FLOORS, key=lambda n: floors[n]["precision_at_k"])
    return {
        "scenario": truth.get("scenario_name"),
        "n_scans": int(signals[["subject_id", "visit"]].drop_duplicates().shape[0]),
        "n_skipped": len(skipped),
        "k": sum(1 for v in info.values() if v > 0),
        "planted_regions": sorted(r for r, v in info.items() if v > 0),
        "floors": floors,
        "floor_max": floors[best]["precision_at_k"],
        "floor_max_by": best,
        "signals_seconds": round(seconds, 1),
    }


def main() -> None:
    """Simulate (or read) the studies and write the JSON file."""
    from bodyage.simulate import simulate_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", help="built-in scenario name or YAML (repeatable)")
    parser.add_argument("--subjects", type=int, default=80)
    parser.add_argument("--study", type=Path, help="an existing simulated study instead of simulating")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="simulate into DIR/<scenario> and reuse what is there")
    parser.add_argument("--out", type=Path, default=Path("docs/results/floors.json"))
    args = parser.parse_args()
    out: dict[str, Any] = {
        "source": {
            "command": "python reports/floors_results.py",
            "generated": utc_minute(),
            "machine": platform.platform(),
            "subjects": args.subjects,
        },
        "scenarios": {},
    }
    if args.study is not None:
        res = measure(args.study)
        out["scenarios"][str(res["scenario"])] = res
    else:
        for name in args.scenario or ["default", "dev"]:
            with tempfile.TemporaryDirectory() as tmp:
                root = (args.keep if args.keep else Path(tmp)) / name
                if not (root / "truth.json").is_file():
                    simulate_study(root, scenario=name, subjects=args.subjects, workers=args.workers, figures=False)
                out["scenarios"][name] = measure(root)
    write_json(args.out, out, indent=1)
    print(json.dumps({k: (v["floors"], v["floor_max"]) for k, v in out["scenarios"].items()}, indent=1))


if __name__ == "__main__":
    main()
