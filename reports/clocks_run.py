"""Time ``bodyage clocks`` on a study and record each clock's accuracy -> ``docs/results/clocks_run.json``.

Run from the repository root on a study made by ``bodyage simulate`` (the default scenario)::

    bodyage simulate STUDY
    OMP_NUM_THREADS=2 python reports/clocks_run.py STUDY --out CLOCKS --set quick --threads 2

The JSON names the command, the bodyage version and git revision (and whether the working
tree had uncommitted changes), the machine (CPUs, load average before and after, threads)
and, per clock, its grid, wall minutes (from its run.json), n, MAE, the mean-age baseline's
MAE, Pearson r and the informative flag. A resumed folder's minutes are those of the last
invocation, so measure into a new ``--out``.

``--collect`` trains nothing: it records the runs of ``--out`` that have finished (the organ
clocks are trained before the whole body), for a measurement cut short; the JSON then says
``"complete": false`` and which runs are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, load_average, short_revision, uncommitted_changes, uptime_loads, write_json

OUT = RESULTS / "clocks_run.json"


def _load_samples(path: Path) -> dict[str, Any]:
    """Summarise the one-minute load averages of ``uptime`` lines: n, min, mean, max."""
    loads = uptime_loads(path.read_text(), digits=2)
    if loads is None:
        raise SystemExit(f"{path}: no `load average:` line")
    return loads


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", default="quick")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--full-epochs", type=int, default=40, help="the epochs the extrapolation is for")
    parser.add_argument("--collect", action="store_true", help="record the finished runs of --out; train nothing")
    parser.add_argument(
        "--load-samples",
        type=Path,
        default=None,
        help="a file of `uptime` lines taken during the measurement (e.g. one a minute); "
        "their 1-minute load averages are summarised in the JSON",
    )
    args = parser.parse_args(argv)
    load_during = _load_samples(args.load_samples) if args.load_samples else None

    import pandas as pd
    import torch

    from bodyage import __version__
    from bodyage.clocks import WHOLE_BODY, clock_summary, read_clock_set, run_clocks
    from bodyage.train import TrainConfig

    load_before = load_average(2)
    revision = short_revision()  # the code that runs: read before it runs
    dirty = uncommitted_changes()
    started = time.perf_counter()
    entries = read_clock_set(args.set)
    if args.collect:
        names = [*entries, WHOLE_BODY]
        done = [n for n in names if (args.out / n / "metrics.json").is_file()]
        summaries = {n: clock_summary(args.out / n, entries.get(n, ())) for n in done}
        missing = [n for n in names if n not in done]
        clocks_json = args.out / "clocks.json"
        members = json.loads(clocks_json.read_text())["overall_gap"]["clocks"] if clocks_json.is_file() else None
        minutes = None
    else:
        result = run_clocks(
            args.study,
            args.out,
            entries,
            TrainConfig(folds=args.folds, epochs=args.epochs),
            threads=args.threads,
            figures=False,
        )
        summaries, missing, members = result.clocks, [], result.overall_members
        minutes = round((time.perf_counter() - started) / 60.0, 2)
    rows: list[list[Any]] = []
    clocks: dict[str, Any] = {}
    for name, c in summaries.items():
        record = json.loads((args.out / name / "run.json").read_text())
        run_minutes = float(record.get("minutes") or 0.0)
        log = pd.read_csv(args.out / name / "training_log.csv")
        train_minutes = float(log["seconds"].sum()) / 60.0
        # the training part scales with the epochs asked (early stopping would end a longer run
        # as early); preprocessing and prediction do not scale
        full = run_minutes - train_minutes + train_minutes * max(1.0, args.full_epochs / args.epochs)
        entry = {
            "grid": c["grid"],
            "minutes": round(run_minutes, 2),
            "train_minutes": round(train_minutes, 2),
            "minutes_at_full_epochs": round(full, 1),
            "n": c["n"],
            "mae": round(c["mae"], 2),
            "baseline_mae": round(c["baseline_mae"], 2),
            "pearson_r": round(c["pearson_r"], 3),
            "informative": c["informative"],
        }
        clocks[name] = entry
        grid = "×".join(str(g) for g in c["grid"]) if c["grid"] else ""
        rows.append(
            [
                name,
                grid,
                entry["minutes"],
                entry["minutes_at_full_epochs"],
                entry["n"],
                entry["mae"],
                entry["baseline_mae"],
                entry["pearson_r"],
                "yes" if c["informative"] else "no",
            ]
        )
    doc = {
        "command": f"bodyage clocks STUDY --out DIR --set {args.set} --folds {args.folds} --epochs {args.epochs}"
        + (f" --threads {args.threads}" if args.threads else ""),
        "bodyage": __version__,
        "git_revision": revision,
        "uncommitted_changes": dirty,
        "torch": torch.__version__,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "threads": args.threads,
            # --collect measures nothing: the load of the runs themselves is unknown then
            "load_before": None if args.collect else load_before,
            "load_after": None if args.collect else load_average(2),
            # one-minute load averages sampled while it ran (--load-samples)
            "load_during": load_during,
        },
        "set": args.set,
        "complete": not missing,
        "missing_runs": missing,
        "minutes": minutes,
        "minutes_of_finished_runs": round(sum(c["minutes"] for c in clocks.values()), 2),
        "epochs": args.epochs,
        "full_epochs": args.full_epochs,
        "minutes_at_full_epochs": round(sum(c["minutes_at_full_epochs"] for c in clocks.values()), 1),
        "overall_gap_clocks": members,
        "clocks": clocks,
        "table": {
            "columns": [
                "clock",
                "grid",
                "minutes",
                f"minutes at {args.full_epochs} epochs (extrapolated)",
                "n",
                "MAE (y)",
                "baseline MAE (y)",
                "Pearson r",
                "informative",
            ],
            "rows": rows,
        },
    }
    if args.collect and args.json.is_file():
        # re-recording a measured run (e.g. after a change to this script's arithmetic): keep
        # what only the measuring invocation knew (load, revision, wall time)
        old = json.loads(args.json.read_text())
        if old.get("command") == doc["command"]:
            for key in ("git_revision", "uncommitted_changes", "machine", "minutes", "overall_gap_clocks"):
                doc[key] = old.get(key, doc[key])
            if load_during is not None:
                doc["machine"]["load_during"] = load_during
    write_json(args.json, doc)
    print(f"{doc['minutes_of_finished_runs']} min in finished runs; missing {missing}; {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
