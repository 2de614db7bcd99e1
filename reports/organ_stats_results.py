"""Organ gap statistics and recovery on clocks folders of simulated studies -> ``docs/results/organ_stats.json``.

Run from the repository root on one or more folders made by ``bodyage clocks`` on simulated
studies (one per draw: another ``--seed`` of ``bodyage simulate``)::

    OMP_NUM_THREADS=2 python reports/organ_stats_results.py CLOCKS_SEED0 CLOCKS_SEED1 ...

For each folder it runs ``bodyage stats`` (:func:`analysis.organ_outputs.run_organ_stats`,
the defaults) and reads the recovery it writes (``DIR/clock_recovery.json``). The JSON
names the command, the bodyage version and git revision (and whether the working tree had
uncommitted changes), the machine, and per clock the recovery r of every draw with their
mean, min and max (and the ceiling: the r a clock reading only its regions' planted
quantities reaches on that study); per phenotype the clocks found significant in each draw
and the false positives; the mean correlation between informative clocks; the goals of the
organ clocks (:data:`analysis.clock_recovery.GOALS`) and, per goal, whether every draw met
it; and tables for the docs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, short_revision, uncommitted_changes, write_json

OUT = RESULTS / "organ_stats.json"


def _spread(values: list[float | None]) -> dict[str, Any]:
    values = [v if v is not None and math.isfinite(v) else None for v in values]
    vals = [v for v in values if v is not None]
    if not vals:
        return {"values": values, "mean": None, "min": None, "max": None}
    return {
        "values": [None if v is None else round(v, 3) for v in values],
        "mean": round(sum(vals) / len(vals), 3),
        "min": round(min(vals), 3),
        "max": round(max(vals), 3),
    }


def _cell(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    if s["min"] == s["max"]:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ({s['min']:.2f} to {s['max']:.2f})"


def _goal_cell(met: list[bool | None]) -> str:
    scored = [m for m in met if m is not None]
    if not scored:
        return "n/a"
    return f"{sum(1 for m in scored if m)}/{len(scored)}"


def main(argv: list[str] | None = None) -> int:
    """Run the statistics on every folder; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from analysis.clock_recovery import GOALS
    from analysis.organ_outputs import run_organ_stats
    from analysis.organ_stats import mean_correlation
    from bodyage import __version__

    started = time.perf_counter()
    draws = []
    for folder in args.folders:
        res = run_organ_stats(folder)
        if res.recovery is None:
            raise SystemExit(f"{folder}: not a clocks folder of a simulated study (no clock_recovery.json)")
        draws.append((folder, res))
    minutes = (time.perf_counter() - started) / 60.0

    names = list(dict.fromkeys(c for _, r in draws for c in r.recovery["clocks"]))  # type: ignore[index]
    clocks: dict[str, Any] = {}
    rows = []
    for name in names:
        entries = [r.recovery["clocks"].get(name) for _, r in draws]  # type: ignore[index]
        present = [e for e in entries if e is not None]
        corr = _spread([e["r_planted"] if e else None for e in entries])
        spec = _spread([e["r_planted_specific"] if e else None for e in entries])
        ceiling = _spread([e.get("r_planted_ceiling") if e else None for e in entries])
        clocks[name] = {
            "planted": any(e["planted"] for e in present),
            "informative": [e["informative"] if e else None for e in entries],
            "r_planted": corr,
            "r_planted_specific": spec,
            "r_planted_ceiling": ceiling,
            "goal_met": [e["goal_met"] if e else None for e in entries],
        }
        n_info = sum(1 for e in present if e["informative"])
        rows.append(
            [
                name,
                "yes" if clocks[name]["planted"] else "no",
                f"{n_info}/{len(draws)}",
                _cell(corr),
                _cell(spec),
                _cell(ceiling),
                _goal_cell(clocks[name]["goal_met"]),
            ]
        )
    phenotypes: dict[str, Any] = {}
    prow = []
    for pheno in dict.fromkeys(p for _, r in draws for p in r.recovery["phenotypes"]):  # type: ignore[index]
        per = [r.recovery["phenotypes"].get(pheno) for _, r in draws]  # type: ignore[index]
        phenotypes[pheno] = {
            "planted_clocks": next((v["planted_clocks"] for v in per if v), []),
            "anatomy_clocks": next((v["anatomy_clocks"] for v in per if v), []),
            "significant_clocks": [v["significant_clocks"] if v else None for v in per],
            "significant_clocks_conditioned": [v["significant_clocks_conditioned"] if v else None for v in per],
            "false_positives": [v["false_positives"] if v else None for v in per],
            "false_positives_conditioned": [v.get("false_positives_conditioned") if v else None for v in per],
            "missed": [v.get("missed") if v else None for v in per],
        }
        sig = phenotypes[pheno]["significant_clocks"]
        prow.append(
            [
                pheno,
                ", ".join(phenotypes[pheno]["planted_clocks"]) or "none",
                ", ".join(phenotypes[pheno]["anatomy_clocks"]) or "none",
                "; ".join(", ".join(s) or "none" for s in sig if s is not None),
                "; ".join(", ".join(s) or "none" for s in phenotypes[pheno]["false_positives"] if s is not None),
                "; ".join(", ".join(s) or "none" for s in phenotypes[pheno]["missed"] if s is not None),
                "; ".join(
                    ", ".join(s) or "none" for s in phenotypes[pheno]["significant_clocks_conditioned"] if s is not None
                ),
                "; ".join(
                    ", ".join(s) or "none" for s in phenotypes[pheno]["false_positives_conditioned"] if s is not None
                ),
            ]
        )
    doc = {
        "command": "bodyage stats DIR (defaults) on each clocks folder; recovery from DIR/clock_recovery.json",
        "bodyage": __version__,
        "git_revision": short_revision(),
        "uncommitted_changes": uncommitted_changes(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "draws": [
            {"folder": f.name, "scenario": r.recovery.get("scenario"), "n_clocks": len(r.recovery["clocks"])}  # type: ignore[union-attr,index]
            for f, r in draws
        ],
        "n_draws": len(draws),
        "draw_folders": [f.name for f, _ in draws],
        "stats_minutes": round(minutes, 2),
        "mean_correlation": _spread([mean_correlation(r.correlations) for _, r in draws]),
        "goals": {
            **GOALS,
            "met_in_every_draw": {
                name: (all(g is True for g in c["goal_met"]) if any(g is not None for g in c["goal_met"]) else None)
                for name, c in clocks.items()
            },
        },
        "clocks": clocks,
        "phenotypes": phenotypes,
        "table": {
            "columns": [
                "clock",
                "planted",
                "informative (draws)",
                "r planted",
                "r specific (conditioned)",
                "ceiling r",
                "goal met (draws)",
            ],
            "rows": rows,
        },
        "phenotype_table": {
            "columns": [
                "phenotype",
                "planted clocks",
                "anatomy clocks",
                "significant clocks (each draw)",
                "false positives",
                "missed",
                "significant, conditioned gap",
                "false positives, conditioned gap",
            ],
            "rows": prow,
        },
    }
    write_json(args.json, doc, allow_nan=False, default=str)
    print(f"{len(draws)} draw(s), {minutes:.1f} min; {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
