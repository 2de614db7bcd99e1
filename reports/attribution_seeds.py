"""The attribution goals on ``default`` in several training seeds; write ``docs/results/attribution_seeds.json``.

Usage: python reports/attribution_seeds.py --study DIR --run SEED=RUN [--run SEED=RUN ...]
                                           [--folds 2] [--epochs 12] [--null-scans 100]
                                           [--null-copies 3] [--scans N] [--boot 200]
                                           [--collect-only] [--steps-log FILE]
                                           [--out docs/results/attribution_seeds.json]

The goal of docs/design.md §6: the best region-level method's precision@k beats every
model-free floor by >= 0.25 and its permuted-label null by >= 0.25, **in each** of >= 3
training seeds. For each ``--run SEED=RUN`` on the default study ``--study``:

1. ``bodyage train STUDY --run RUN --seed SEED --folds F --epochs E --threads 1`` unless
   ``RUN/metrics.json`` exists (a run trained elsewhere is used as it is; its own settings
   are recorded);
2. ``bodyage attribute RUN --null-scans N --null-copies C --sanity --no-figures --threads 1``
   unless ``RUN/attribution_recovery.json`` already carries null models: the default
   methods (GradCAM, ablation) with the nulls ``bodyage demo`` runs (randomised-weight
   copies of each fold model and the permuted-label model, on a seeded sample of scans)
   and the calibrated sanity check. Maps and figures are skipped: they change no number.
   With ``--scans N`` the trained model explains only the nulls' sample as well (the
   library call, :func:`attribute_sample`): a third of the cost on the default study, and
   the trained and null rankings then come from the same scans;
3. reads ``attribution_recovery.json`` (precision@k, floors, nulls, margins),
   ``sanity.json`` and ``attribute.json`` (cost), and evaluates the two precision goals with
   :func:`analysis.recovery.evaluate_goals`, the rule ``report`` applies. The
   permuted-label null is one model, so its interval over copies is a point; ``boot``
   resamples scans (``--boot`` draws) for an interval of the trained and the permuted-label
   precision@k that at least shows the scan-sampling noise.

Several invocations may run in parallel on different seeds (each writes its own ``--out``);
an invocation whose runs are all done only collects, and ``--collect-only`` never writes to a
run folder (e.g. a finished ``bodyage demo``'s run, already attributed with its nulls). The
JSON carries no machine path. Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from dev_selection import append_steps, earlier_steps, machine, recorded, timed
from provenance import load_average, neutral_command, revision, uptime_loads, utc_minute, write_json

from bodyage.floors import FLOOR_NAMES

#: the two precision goals of analysis.recovery.GOALS this script reports (docs/design.md §6)
GOAL_NAMES: tuple[str, ...] = ("region_method_beats_floors", "region_method_beats_permuted_null")


def attribute_sample(run: Path, n_scans: int, copies: int, steps: list[dict[str, Any]], name: str) -> None:
    """``bodyage attribute`` with the demo's nulls and the sanity check, the trained model on the nulls' sample too.

    The library call of the command (:func:`bodyage.attribute.attribute_run`; the command
    line has no scan-subset option): the trained model, its random copies and the
    permuted-label model explain the same seeded sample of ``n_scans`` scans
    (:func:`bodyage.nulls.sample_scans`, the demo's null sample).
    """
    import torch

    from bodyage.attribute import AttributeConfig, attribute_run, load_run_inputs
    from bodyage.nulls import NullConfig, sample_scans

    torch.set_num_threads(1)
    command = (
        f"attribute_run(RUN, AttributeConfig(figures=False), nulls=NullConfig(copies={copies}, "
        f"scans={n_scans}), sanity=True, scan_ids=<the {n_scans}-scan null sample>)"
    )
    with recorded(steps, name, command):
        cfg = AttributeConfig(figures=False)
        ids = sample_scans(list(load_run_inputs(run).predictions["scan_id"]), n_scans, cfg.seed)
        attribute_run(run, cfg, nulls=NullConfig(copies=copies, scans=n_scans), sanity=True, scan_ids=ids)


def has_nulls(run: Path) -> bool:
    """Whether ``RUN/attribution_recovery.json`` exists with null models in every method entry."""
    path = run / "attribution_recovery.json"
    if not path.is_file():
        return False
    methods = json.loads(path.read_text(encoding="utf-8")).get("methods", {})
    return bool(methods) and all(e.get("nulls") for e in methods.values())


def boot_interval(run: Path, study: Path, method: str, measure: str, n_boot: int, seed: int) -> dict[str, Any]:
    """2.5-97.5 % interval of precision@k over scans resampled with replacement, trained and permuted-label.

    Each draw ranks regions by the mean over the drawn scans of the value
    :func:`analysis.recovery.region_importance` averages (``|mass|`` for ``abs_mass``,
    ``|density|`` for ``density``), regions absent from a scan left out of its mean.
    """
    import numpy as np
    import pandas as pd

    from analysis.recovery import ABSOLUTE_MEASURES, method_recovery, read_truth
    from analysis.recovery_tex import ABS_MASS

    truth = read_truth(study) or {}
    info = {str(k): float(v) for k, v in truth.get("region_information", {}).items()}
    tables = {"trained": pd.read_parquet(run / "attributions.parquet")}
    nulls = pd.read_parquet(run / "attributions_null.parquet")
    tables["permuted_labels"] = nulls[nulls["null"].astype(str) == "permuted_labels"]
    rng = np.random.default_rng([seed, 16])
    out: dict[str, Any] = {}
    for name, table in tables.items():
        sub = table[table["method"].astype(str) == method]
        values = sub["mass"].abs() if measure == ABS_MASS else sub[measure]
        if measure in ABSOLUTE_MEASURES:
            values = values.abs()
        frame = pd.DataFrame(
            {
                "scan": sub["subject_id"].astype(str) + "/" + sub["visit"].astype(str),
                "region": sub["region"].astype(str),
                "value": values.to_numpy(float),
            }
        )
        wide = frame.pivot_table(index="scan", columns="region", values="value", aggfunc="first")
        mat = wide.to_numpy(float)
        draws = []
        for _ in range(n_boot):
            rows = mat[rng.integers(0, len(mat), len(mat))]
            present = ~np.isnan(rows)
            with np.errstate(invalid="ignore"):
                mean = np.where(present.any(axis=0), np.nansum(rows, axis=0) / present.sum(axis=0), np.nan)
            draws.append(method_recovery(pd.Series(mean, index=wide.columns), info)["precision_at_k"])
        out[name] = {
            "ci_low": float(np.percentile(draws, 2.5)),
            "ci_high": float(np.percentile(draws, 97.5)),
            "n_scans": len(mat),
            "n_boot": n_boot,
        }
    return out


def load_samples(path: Path | None) -> dict[str, Any] | None:
    """Summarise ``uptime`` lines taken while a run's attribution ran: the 1-minute load averages' n, min, mean, max."""
    return None if path is None else uptime_loads(path.read_text(encoding="utf-8"), digits=1)


def stage_minutes(run: Path) -> dict[str, float] | None:
    """The attribute stage's parts, in wall minutes, from the times its files were written.

    For a run without ``attribute.json`` (whose ``cost`` records them): from the trained
    run's ``metrics.json`` (the end of training) to the permuted-label model's
    ``metrics.json`` (its training), its ``attribute.json`` (its attribution), the null
    table (the trained attribution and the random copies) and ``sanity.json`` (the end).
    """
    perm = run / "nulls" / "permuted_labels"
    files = [
        run / "metrics.json",
        perm / "metrics.json",
        perm / "attribute.json",
        run / "attributions_null.parquet",
        run / "sanity.json",
    ]
    if not all(f.is_file() for f in files):
        return None
    t = [f.stat().st_mtime for f in files]
    return {
        "permuted_train": round((t[1] - t[0]) / 60.0, 1),
        "permuted_attribute": round((t[2] - t[1]) / 60.0, 1),
        "trained_and_random_copies": round((t[3] - t[2]) / 60.0, 1),
        "recovery_and_sanity": round((t[4] - t[3]) / 60.0, 1),
        "total": round((t[4] - t[0]) / 60.0, 1),
    }


def seed_entry(seed: int, run: Path, study: Path, n_boot: int) -> dict[str, Any]:
    """Everything measured for one seed's run."""
    from analysis.recovery import GOAL_MARGIN, evaluate_goals

    rec = json.loads((run / "attribution_recovery.json").read_text(encoding="utf-8"))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    args = json.loads((run / "run.json").read_text(encoding="utf-8"))["arguments"]
    # attribute.json is written last (after the figures): a run stopped while drawing them has the numbers
    # but not the record; the scans are then counted in the tables
    attr_path = run / "attribute.json"
    attr = json.loads(attr_path.read_text(encoding="utf-8")) if attr_path.is_file() else {}
    if not attr:
        import pandas as pd

        for key, name in (("n_scans", "attributions.parquet"), ("null_scans", "attributions_null.parquet")):
            table = pd.read_parquet(run / name, columns=["subject_id", "visit"])
            attr[key] = int(table.drop_duplicates().shape[0])
    sanity_path = run / "sanity.json"
    sanity = json.loads(sanity_path.read_text(encoding="utf-8")) if sanity_path.is_file() else {}
    methods: dict[str, Any] = {}
    for m, e in rec["methods"].items():
        nulls = {
            kind: {key: v.get(key) for key in ("precision_at_k", "ci_low", "ci_high", "n_copies", "per_copy")}
            for kind, v in (e.get("nulls") or {}).items()
        }
        perm = (nulls.get("permuted_labels") or {}).get("precision_at_k")
        p = e.get("precision_at_k")
        san = (sanity.get("methods") or {}).get(m) or {}
        highs = [v["ci_high"] for v in nulls.values() if isinstance(v.get("ci_high"), float)]
        methods[m] = {
            "importance_measure": e.get("importance_measure"),
            "k": e.get("k"),
            "precision_at_k": p,
            "spearman": e.get("spearman"),
            "top_regions": e.get("top_regions"),
            "floors": e.get("floors"),
            "floor_max": e.get("floor_max"),
            "floor_max_by": e.get("floor_max_by"),
            "nulls": nulls,
            "clears_nulls": len(e.get("clears_nulls") or []),
            "margin_vs_floors": e.get("beats_floors_by"),
            "margin_vs_permuted_null": (p - perm) if isinstance(perm, float) and isinstance(p, float) else None,
            "precision_above_every_null_band": bool(highs) and all(p > h for h in highs),
            "sanity_passed": san.get("passed"),
            "boot": boot_interval(run, study, m, e["importance_measure"], n_boot, seed) if n_boot else None,
        }
    goals = evaluate_goals({"mae_ratio": metrics.get("mae_ratio"), "methods": rec["methods"]})
    goal = {name: goals[name] for name in GOAL_NAMES}
    best = goal["region_method_beats_floors"].get("method")
    return {
        "seed": seed,
        "settings": {
            "folds": args.get("folds"),
            "epochs": args.get("epochs"),
            "train_seed": args.get("seed"),
            "grid": args.get("grid"),
            "n_scans": attr.get("n_scans"),
            "null_scans": attr.get("null_scans"),
            "layer": rec.get("layer") or attr.get("layer"),
        },
        "model": {
            "mae": metrics["overall"]["mae"],
            "oracle_mae": metrics.get("oracle_mae"),
            "mae_ratio": metrics.get("mae_ratio"),
            "baseline_mae": metrics.get("baseline_mae"),
            "informative": metrics.get("informative"),
        },
        "methods": methods,
        "goals": goal,
        "goal_margin": GOAL_MARGIN,
        "best_region_method": best,
        "passed": all(g["met"] is True for g in goal.values()),
        "sanity_passed_best": methods.get(best, {}).get("sanity_passed") if best else None,
        "attribute_cost_seconds": attr.get("cost"),
        "attribute_minutes": attr.get("minutes"),
        "attribute_record": attr_path.is_file(),
        "attribute_stage_minutes_from_file_times": None if attr_path.is_file() else stage_minutes(run),
    }


def fmt(v: Any, spec: str = ".2f") -> str:
    """A number for a table cell ('–' when missing)."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def tables(seeds: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The docs' tables ({"columns", "rows"})."""
    rows = []
    method_rows = []
    for s in seeds:
        best = s["best_region_method"]
        e = s["methods"].get(best, {}) if best else {}
        perm = (e.get("nulls") or {}).get("permuted_labels") or {}
        rnd = (e.get("nulls") or {}).get("random_weights") or {}
        g = s["goals"]
        st = s["settings"]
        rows.append(
            [
                str(s["seed"]),
                f"{st.get('folds')} × {st.get('epochs')}, {st.get('n_scans')} scans",
                f"{fmt(s['model']['mae'])} ({fmt(s['model']['mae_ratio'])}×)",
                f"`{best}` {fmt(e.get('precision_at_k'))}",
                f"{fmt(e.get('floor_max'))} ({FLOOR_NAMES.get(str(e.get('floor_max_by')), '–')})",
                f"{fmt(perm.get('precision_at_k'))}",
                f"{fmt(rnd.get('precision_at_k'))} [{fmt(rnd.get('ci_low'))}, {fmt(rnd.get('ci_high'))}]",
                fmt(g["region_method_beats_floors"]["value"], "+.2f"),
                fmt(g["region_method_beats_permuted_null"]["value"], "+.2f"),
                "yes" if s["passed"] else "no",
                {True: "passed", False: "failed"}.get(s["sanity_passed_best"], "–"),
            ]
        )
        for m, e in s["methods"].items():
            b = (e.get("boot") or {}).get("trained") or {}
            method_rows.append(
                [
                    str(s["seed"]),
                    f"`{m}` ({e.get('importance_measure')})",
                    f"{fmt(e.get('precision_at_k'))} [{fmt(b.get('ci_low'))}, {fmt(b.get('ci_high'))}]",
                    ", ".join(f"{FLOOR_NAMES.get(k, k)} {fmt(v)}" for k, v in (e.get("floors") or {}).items()),
                    fmt(((e.get("nulls") or {}).get("permuted_labels") or {}).get("precision_at_k")),
                    fmt(((e.get("nulls") or {}).get("random_weights") or {}).get("precision_at_k")),
                    "yes" if e.get("precision_above_every_null_band") else "no",
                    {True: "passed", False: "failed"}.get(e.get("sanity_passed"), "–"),
                ]
            )
    cost_rows = [
        [
            s["step"],
            f"`{s['command']}`",
            fmt(s["minutes"], ".1f"),
            f"{fmt(s['load_start'][0], '.1f')}–{fmt(s['load_end'][0], '.1f')}",
        ]
        for s in steps
    ]
    for s in seeds:
        for part, minutes in (s.get("attribute_stage_minutes_from_file_times") or {}).items():
            cost_rows.append([f"attribute_s{s['seed']}: {part}", "(file times of the run)", fmt(minutes, ".1f"), "–"])
    return {
        "goal": {
            "columns": [
                "seed",
                "run: folds × epochs, scans explained",
                "MAE (× oracle)",
                "best region method, precision@k",
                "largest floor",
                "permuted-label null",
                "random-weight null [2.5–97.5 %]",
                "margin vs floors",
                "margin vs permuted null",
                "goal met (both ≥ 0.25)",
                "sanity check",
            ],
            "rows": rows,
        },
        "methods": {
            "columns": [
                "seed",
                "method (measure)",
                "precision@k [scan bootstrap]",
                "floors",
                "permuted-label null",
                "random-weight null",
                "above every null band",
                "sanity check",
            ],
            "rows": method_rows,
        },
        "cost": {"columns": ["step", "command", "minutes", "load (1-min, start–end)"], "rows": cost_rows},
    }


def main() -> None:
    """Train and attribute what is missing, then collect every seed into the JSON file."""
    from bodyage import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="the default-scenario study")
    ap.add_argument("--run", action="append", required=True, help="SEED=RUN folder (repeatable)")
    ap.add_argument("--folds", type=int, default=2, help="folds of a run this script trains")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of a run this script trains")
    ap.add_argument("--null-scans", type=int, default=100)
    ap.add_argument("--null-copies", type=int, default=3)
    ap.add_argument(
        "--scans",
        type=int,
        default=None,
        help="explain only the nulls' sample of this many scans with the trained model too [default: all, as the demo]",
    )
    ap.add_argument(
        "--load-samples",
        type=Path,
        default=None,
        help="uptime lines taken while the runs were attributed (e.g. a finished demo's): summarised into the record",
    )
    ap.add_argument("--collect-only", action="store_true", help="train and attribute nothing; only read the runs")
    ap.add_argument("--boot", type=int, default=200, help="scan-bootstrap draws of precision@k (0: none)")
    ap.add_argument(
        "--steps-log",
        type=Path,
        default=None,
        help="JSON lines of steps run before this script ({name: train_sN | permuted_sN | attribute_sN, command "
        "(list), wall_min, load_start, load_end, started}), recorded with the others",
    )
    ap.add_argument("--out", type=Path, default=Path("docs/results/attribution_seeds.json"))
    args = ap.parse_args()

    runs = {int(k): Path(v) for k, v in (item.split("=", 1) for item in args.run)}
    names = {str(args.study): "study"} | {str(r): f"run_s{s}" for s, r in runs.items()}
    keep = {f"{step}_s{s}" for s in runs for step in ("train", "permuted", "attribute")}
    steps = earlier_steps(args.steps_log, names, keep)
    started = utc_minute()
    load_start = load_average(1)
    t0 = time.perf_counter()
    n_earlier = len(steps)
    for s, run in sorted(runs.items()):
        if args.collect_only:  # read only: a run folder of someone else's is never written to
            if not has_nulls(run):
                raise SystemExit(f"seed {s}: no attribution_recovery.json with null models in the run (--collect-only)")
            continue
        if not (run / "metrics.json").is_file():
            cmd = ["train", str(args.study), "--run", str(run), "--seed", str(s)]
            cmd += ["--folds", str(args.folds), "--epochs", str(args.epochs), "--threads", "1", "--quiet"]
            timed(cmd, steps, f"train_s{s}")
        if not has_nulls(run) and args.scans:
            attribute_sample(run, args.scans, args.null_copies, steps, f"attribute_s{s}")
        elif not has_nulls(run):
            cmd = ["attribute", str(run), "--null-scans", str(args.null_scans), "--null-copies", str(args.null_copies)]
            cmd += ["--sanity", "--no-figures", "--threads", "1", "--quiet"]
            timed(cmd, steps, f"attribute_s{s}")
    append_steps(args.steps_log, steps[n_earlier:])
    for step in steps:
        step["command"] = neutral_command(step["command"], names)
    seeds = [seed_entry(s, run, args.study, args.boot) for s, run in sorted(runs.items())]
    out = {
        "goal": "best region-level method: precision@k >= largest model-free floor + 0.25 and >= its "
        "permuted-label null + 0.25, in each training seed",
        "n_seeds": len(seeds),
        "passed_in_every_seed": all(s["passed"] for s in seeds) and len(seeds) >= 3,
        "seeds_passed": sum(s["passed"] for s in seeds),
        "seeds": seeds,
        "tables": tables(seeds, steps),
        "source": {
            "script": "reports/attribution_seeds.py",
            "command": "OMP_NUM_THREADS=1 python reports/attribution_seeds.py --study STUDY "
            + " ".join(f"--run {s}=RUN_S{s}" for s in sorted(runs))
            + (f" --scans {args.scans}" if args.scans else "")
            + (" --collect-only" if args.collect_only else "")
            + (" --load-samples UPTIME_LINES" if args.load_samples else "")
            + f" --folds {args.folds} --epochs {args.epochs} --null-scans {args.null_scans} "
            f"--null-copies {args.null_copies} --boot {args.boot}",
            "bodyage_version": __version__,
            "git_revision": revision(),
            "started": started,
            "generated": utc_minute(),
            "machine": {**machine(), "load_average_start": load_start, "load_during": load_samples(args.load_samples)},
            "steps": steps,
            "minutes_this_invocation": round((time.perf_counter() - t0) / 60.0, 2),
        },
    }
    write_json(args.out, out, indent=1, ensure_ascii=False)
    print(json.dumps(out["tables"]["goal"], indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
