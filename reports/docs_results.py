"""Write the documentation's measured numbers from a demo folder and a ``bodyage bench --json`` output.

Usage::

    bodyage demo demo/                              # or make demo
    bodyage bench --json > bench.json
    python reports/docs_results.py demo/ --bench bench.json

Writes ``docs/results/demo.json`` (accuracy, recovery per method beside floors and nulls,
phenotypes, goals, sanity checks, stage times), ``docs/results/bench.json`` (comparisons,
goals, the 40,000-scan projection, memory) and copies the demo's figures to
``docs/results/figures/``; the pages of ``docs/results/`` show them when the site is built
(``reports/docs_hooks.py``). Each file names what it measured: the run folder, the bodyage
version and git revision the run recorded, the command, and the machine (CPU model from
``lscpu``). Then it rebuilds the README's picture (``reports/readme_figure.py``, when the
demo saved maps) and refreshes the README's summary line (``reports/readme_summary.py``).

Nothing here is typed by hand: a value the run did not record is ``null`` and the page
says "not measured yet".
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from provenance import RESULTS, ROOT, machine, now_iso, write_json

#: the demo figures the validation page shows: run-relative source -> name in docs/results/figures
FIGURES = {
    "figures/predicted_vs_age.png": "predicted_vs_age.png",
    "figures/attribution_regions_ablation.png": "attribution_regions_ablation.png",
    "figures/attribution_regions_gradcam.png": "attribution_regions_gradcam.png",
    "figures/phenotype_forest.png": "phenotype_forest.png",
}
#: the stage records of a demo folder: stage -> path relative to the demo folder
STAGE_RECORDS = {
    "simulate": "study/study.json",
    "train": "run/run.json",
    "attribute": "run/attribute.json",
    "stats": "run/stats/run.json",
    "report": "report/report.json",
}


# ------------------------------------------------------------------ small helpers
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, or ``None`` if it does not exist."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else None


def num(value: Any) -> float | None:
    """A finite float, or ``None`` (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, digits: int = 2) -> str | None:
    """A number as text for a table: fixed decimals, scientific below 1e-3; ``None`` stays ``None``."""
    v = num(value)
    if v is None:  # missing or NaN: not measured (text such as "n/a" is kept)
        return None if value is None or isinstance(value, (int, float)) else str(value)
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def yes_no(value: Any) -> str | None:
    """``True``/``False`` as yes/no; ``None`` stays ``None``."""
    return None if value is None else ("yes" if value else "no")


def table(columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """The ``{"columns", "rows"}`` value the docs hook renders as a Markdown table."""
    return {"columns": columns, "rows": rows}


def minutes_between(record: dict[str, Any] | None) -> float | None:
    """Minutes from a provenance record's ``started`` to ``finished``."""
    if not record or not record.get("started") or not record.get("finished"):
        return None
    try:
        start = datetime.fromisoformat(str(record["started"]))
        end = datetime.fromisoformat(str(record["finished"]))
    except ValueError:
        return None
    return (end - start).total_seconds() / 60.0


# ------------------------------------------------------------------ the demo
def method_rows(methods: dict[str, Any]) -> list[list[Any]]:
    """One row per method: precision@k beside the floors and the nulls."""
    rows = []
    for name, m in methods.items():
        floors = m.get("floors") or {}
        floor_max = max((v for v in (num(x) for x in floors.values()) if v is not None), default=None)
        nulls = m.get("nulls") or {}
        perm = nulls.get("permuted_labels") or {}
        rand = nulls.get("random_weights") or {}
        rows.append(
            [
                f"`{name}`",
                m.get("k"),
                fmt(m.get("precision_at_k")),
                fmt(floor_max),
                fmt(rand.get("precision_at_k")),
                fmt(perm.get("precision_at_k")),
                fmt(m.get("spearman")),
                fmt(m.get("agreement_with_ablation")),
                ", ".join((m.get("top_regions") or [])[: int(m.get("k") or 0)]) or None,
            ]
        )
    return rows


#: the columns of :func:`floor_null_rows`, in order
FLOOR_NULL_COLUMNS = [
    "method",
    "k",
    "precision@k",
    "floor: volume",
    "floor: volume × intensity",
    "floor: signal spread",
    "floor: univariate screen",
    "random-weights null [2.5–97.5 %]",
    "permuted-label null",
    "beats floors by",
    "beats nulls by",
    "regions above every null",
    "Kendall's W over folds",
]


def floor_null_rows(methods: dict[str, Any], attribution: dict[str, Any] | None = None) -> list[list[Any]]:
    """One row per method: precision@k beside each floor, each null (with its band) and the margins.

    ``attribution`` is ``attribution_recovery.json``'s ``methods`` (for the rank stability over
    fold models, which ``recovery.json`` does not repeat).
    """
    rows = []
    for name, m in methods.items():
        floors = m.get("floors") or {}
        nulls = m.get("nulls") or {}
        rand = nulls.get("random_weights") or {}
        perm = nulls.get("permuted_labels") or {}
        band = (
            f"{fmt(rand.get('precision_at_k'))} [{fmt(rand.get('ci_low'))}, {fmt(rand.get('ci_high'))}]"
            if num(rand.get("precision_at_k")) is not None
            else None
        )
        clears = m.get("clears_nulls")
        stability = m.get("stability") or ((attribution or {}).get(name) or {}).get("stability") or {}
        rows.append(
            [
                f"`{name}`",
                m.get("k"),
                fmt(m.get("precision_at_k")),
                fmt(floors.get("volume")),
                fmt(floors.get("volume_intensity")),
                fmt(floors.get("signal_spread")),
                fmt(floors.get("univariate_screen")),
                band,
                fmt(perm.get("precision_at_k")),
                fmt(m.get("beats_floors_by")),
                fmt(m.get("beats_nulls_by")),
                len(clears) if isinstance(clears, list) else None,
                fmt(stability.get("kendall_w")),
            ]
        )
    return rows


def phenotype_rows(phenotypes: dict[str, Any]) -> list[list[Any]]:
    """One row per phenotype: gap effect with its CI and q, significant regions per method."""
    rows = []
    for name, p in phenotypes.items():
        ci = (
            f"[{fmt(p.get('ci_low'))}, {fmt(p.get('ci_high'))}]"
            if num(p.get("ci_low")) is not None and num(p.get("ci_high")) is not None
            else None
        )
        sig = p.get("significant_regions") or {}
        where = "; ".join(f"{m}: {', '.join(r)}" for m, r in sig.items() if r) or "none"
        rows.append(
            [
                f"`{name}`",
                "planted" if p.get("planted") else "none (control)",
                fmt(p.get("gap_effect")),
                ci,
                fmt(p.get("q"), 3),
                ", ".join(p.get("planted_regions") or []) or "—",
                where,
            ]
        )
    return rows


def goal_rows(goals: dict[str, Any]) -> list[list[Any]]:
    """One row per goal of ``recovery.json``."""
    rows = []
    for name, g in goals.items():
        value = g.get("value")
        shown = fmt(value, 3) if num(value) is not None else (json.dumps(value) if value is not None else None)
        rows.append([f"`{name}`", g.get("goal"), shown, yes_no(g.get("met")) or "not evaluated"])
    return rows


def sanity_rows(sanity: dict[str, Any] | None) -> list[list[Any]]:
    """One row per method of ``sanity.json``: the calibrated check on its ranking measure."""
    rows: list[list[Any]] = []
    for name, entry in ((sanity or {}).get("methods") or {}).items():
        verdict = entry
        by_measure = entry.get("by_measure") or {}
        if "passed" not in entry and entry.get("importance_measure") in by_measure:
            verdict = by_measure[entry["importance_measure"]]
        rows.append(
            [
                f"`{name}`",
                entry.get("importance_measure"),
                fmt(verdict.get("cohort_rho_trained_random")),
                fmt(verdict.get("cohort_rho_random_random")),
                fmt(verdict.get("between_scan_rho")),
                fmt(verdict.get("rho_volume")),
                yes_no(verdict.get("passed")),
            ]
        )
    return rows


#: the steps ``attribute.json`` times under ``cost``, as the validation page names them
NULL_STEPS = {
    "trained_attribute": "the trained model's attribution",
    "random_weights": "randomised-weight copies",
    "permuted_train": "permuted-label model: training",
    "permuted_attribute": "permuted-label model: attribution",
}


def null_cost(attribute_record: dict[str, Any]) -> dict[str, Any]:
    """The demo's null-model settings (``attribute.json`` arguments) and each step's wall minutes (``cost``)."""
    cost = attribute_record.get("cost") or {}
    minutes = {k: round(float(v["wall"]) / 60.0, 3) for k, v in cost.items() if isinstance(v, dict) and "wall" in v}
    return {"settings": (attribute_record.get("arguments") or {}).get("nulls"), "minutes": minutes}


def demo_results(demo: Path) -> dict[str, Any]:
    """The numbers of one demo folder (``DIR/study``, ``DIR/run``, ``DIR/report``).

    Raises
    ------
    SystemExit
        If ``demo`` has no ``run/metrics.json`` (not a demo folder, or train has not run).
    """
    run = demo / "run"
    metrics = read_json(run / "metrics.json")
    if metrics is None:
        raise SystemExit(f"error: {demo}: no run/metrics.json; give the folder `bodyage demo DIR` wrote")
    recovery = read_json(run / "recovery.json") or {}
    attribution = read_json(run / "attribution_recovery.json") or {}
    record = read_json(run / "run.json") or {}
    methods = recovery.get("methods") or attribution.get("methods") or {}
    overall = metrics.get("overall") or {}
    stages = {stage: minutes_between(read_json(demo / path)) for stage, path in STAGE_RECORDS.items()}
    known = [v for v in stages.values() if v is not None]
    goals = recovery.get("goals") or {}
    evaluated = [g.get("met") for g in goals.values() if g.get("met") is not None]
    folds = metrics.get("folds") or {}
    null_models = null_cost(read_json(run / "attribute.json") or {})
    return {
        "schema": 1,
        "source": {
            "script": "reports/docs_results.py",
            "command": f"python reports/docs_results.py {demo.name}",
            "demo_dir": demo.name,
            "bodyage_version": record.get("bodyage_version"),
            "git_revision": record.get("git_revision"),
            "torch": (record.get("packages") or {}).get("torch"),
            "run_started": record.get("started"),
            "generated": now_iso(),
            "machine": machine(),  # the machine this script runs on: run it where the demo and the bench ran
        },
        "scenario": recovery.get("scenario"),
        "n_scans": recovery.get("n_scans") or overall.get("n"),
        "mae": num(overall.get("mae")),
        "oracle_mae": num(metrics.get("oracle_mae")),
        "mae_ratio": num(metrics.get("mae_ratio")),
        "baseline_mae": num(metrics.get("baseline_mae")),
        "r2": num(overall.get("r2")),
        "pearson_r": num(overall.get("pearson_r")),
        "informative": metrics.get("informative"),
        "goals_met": f"{sum(bool(m) for m in evaluated)} of {len(evaluated)}" if evaluated else None,
        "minutes": {**{k: v for k, v in stages.items()}, "total": sum(known) if known else None},
        "null_models": null_models,
        "tables": {
            "null_cost": table(
                ["step of the attribute stage", "minutes"],
                [[NULL_STEPS.get(k, k), fmt(v, 1)] for k, v in null_models["minutes"].items()],
            )
            if null_models["minutes"]
            else None,
            "stages": table(
                ["stage", "minutes"], [[k, fmt(v, 1)] for k, v in stages.items()] + [["total", fmt(sum(known), 1)]]
            )
            if known
            else None,
            "folds": table(
                ["fold", "n", "MAE", "R²", "Pearson r"],
                [
                    [k, f.get("n"), fmt(f.get("mae")), fmt(f.get("r2")), fmt(f.get("pearson_r"))]
                    for k, f in sorted(folds.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
                ],
            )
            if folds
            else None,
            "methods": table(
                [
                    "method",
                    "k",
                    "precision@k",
                    "best floor",
                    "random-weights null",
                    "permuted-label null",
                    "Spearman",
                    "agreement with ablation",
                    "top k regions",
                ],
                method_rows(methods),
            )
            if methods
            else None,
            "floors_nulls": table(FLOOR_NULL_COLUMNS, floor_null_rows(methods, attribution.get("methods") or {}))
            if methods
            else None,
            "phenotypes": table(
                ["phenotype", "planted", "gap effect (y)", "95% CI", "q", "planted regions", "significant regions"],
                phenotype_rows(recovery.get("phenotypes") or {}),
            )
            if recovery.get("phenotypes")
            else None,
            "goals": table(["goal", "target", "value", "met"], goal_rows(goals)) if goals else None,
            "sanity": table(
                [
                    "method",
                    "measure",
                    "ρ trained–random",
                    "ρ random–random",
                    "ρ between halves",
                    "ρ with volume",
                    "passed",
                ],
                sanity_rows(read_json(run / "sanity.json")),
            )
            if read_json(run / "sanity.json")
            else None,
        },
    }


def copy_figures(demo: Path, out: Path) -> list[str]:
    """Copy the demo's figures of :data:`FIGURES` to ``out``; stale ones are removed."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for src, name in FIGURES.items():
        path = demo / "run" / src
        if path.is_file():
            shutil.copyfile(path, out / name)
            copied.append(name)
        elif (out / name).exists():
            (out / name).unlink()
    return copied


# ------------------------------------------------------------------ the bench
def bench_results(bench: dict[str, Any], path: Path) -> dict[str, Any]:
    """The numbers of one ``bodyage bench --json`` output."""
    comparisons = bench.get("comparisons") or []
    goals = bench.get("goals") or []
    projection = bench.get("projection") or {}
    hours = projection.get("hours") or {}
    flat_hours: list[list[Any]] = []
    for stage, value in hours.items():
        if isinstance(value, dict):
            flat_hours += [[f"{stage} `{k}`", fmt(v, 1)] for k, v in value.items()]
        else:
            flat_hours.append([stage, fmt(value, 1)])
    if projection.get("total_hours_default_methods") is not None:
        flat_hours.append(["**total** (default methods)", fmt(projection["total_hours_default_methods"], 1)])
    memory = bench.get("peak_memory") or {}
    bench_machine = bench.get("machine") or {}
    return {
        "schema": 1,
        "source": {
            "script": "reports/docs_results.py",
            "command": f"bodyage bench --json > {path.name}; python reports/docs_results.py DEMO --bench {path.name}",
            "quick": bench.get("quick"),
            "seconds": num(bench.get("seconds")),
            "generated": now_iso(),
            "machine": {**machine(), **{k: bench_machine.get(k) for k in ("torch", "torch_threads", "device", "gpu")}},
            "load_average": bench_machine.get("load_average"),
        },
        "tables": {
            "comparisons": table(
                ["comparison", "ours", "reference", "ours (s)", "reference (s)", "ratio", "kind", "goal", "met"],
                [
                    [
                        f"`{c.get('name')}`",
                        c.get("ours"),
                        c.get("reference"),
                        fmt(c.get("ours_s"), 4),
                        fmt(c.get("reference_s"), 4),
                        fmt(c.get("ratio"), 2),
                        c.get("ratio_kind"),
                        c.get("goal") or "–",
                        yes_no(c.get("met")) or "–",
                    ]
                    for c in comparisons
                ],
            )
            if comparisons
            else None,
            "goals": table(
                ["goal", "target", "value", "met", "why not"],
                [
                    [
                        f"`{g.get('name')}`",
                        g.get("goal"),
                        fmt(g.get("value"), 2),
                        yes_no(g.get("met")),
                        g.get("reason") or "",
                    ]
                    for g in goals
                ],
            )
            if goals
            else None,
            "projection": table(["stage", "hours for 40,000 scans"], flat_hours) if flat_hours else None,
            "memory": table(
                ["stage", "peak RSS (MiB)", "peak GPU (MiB)"],
                [[k, fmt(v.get("rss_mb"), 0), fmt(v.get("gpu_mb"), 0) or "–"] for k, v in memory.items()],
            )
            if memory
            else None,
        },
        "assumptions": projection.get("assumptions"),
    }


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Command line: ``python reports/docs_results.py DEMO_DIR [--bench BENCH_JSON] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="the folder `bodyage demo DIR` wrote (study/, run/, report/)")
    parser.add_argument("--bench", type=Path, help="the output of `bodyage bench --json`")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON files go [docs/results]")
    parser.add_argument("--no-readme", action="store_true", help="do not refresh the README's summary line")
    parser.add_argument(
        "--no-figure", action="store_true", help="do not rebuild reports/demo_overview.png (reports/readme_figure.py)"
    )
    parser.add_argument(
        "--no-times",
        action="store_true",
        help="record no stage minutes (the demo was resumed, or shared the machine): the pages say not measured",
    )
    args = parser.parse_args(argv)

    demo = demo_results(args.demo)
    if args.no_times:  # a resumed demo's records time the resumption, not the pipeline
        demo["minutes"] = {"total": None}
        demo["tables"]["stages"] = None
    demo["figures"] = copy_figures(args.demo, args.out / "figures")
    write_json(args.out / "demo.json", demo, ensure_ascii=False)
    written = [args.out / "demo.json"]
    if args.bench is not None:
        try:
            bench = json.loads(args.bench.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"error: {args.bench}: not a `bodyage bench --json` output ({err})") from err
        write_json(args.out / "bench.json", bench_results(bench, args.bench), ensure_ascii=False)
        written.append(args.out / "bench.json")
    if not args.no_figure and any((args.demo / "run" / "attribute" / "maps").glob("*.png")):
        import readme_figure

        readme_figure.main(args.demo, ROOT / "reports" / "demo_overview.png")
        written.append(ROOT / "reports" / "demo_overview.png")
    if not args.no_readme:
        from readme_summary import update_readme

        update_readme(ROOT / "README.md", args.out / "demo.json")
        written.append(ROOT / "README.md")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
