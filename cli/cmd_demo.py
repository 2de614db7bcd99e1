"""`bodyage demo`: simulate -> train -> attribute -> stats -> report on the default synthetic cohort.

The demo is the one command that chains library functions from both `bodyage` (imaging,
learning) and `analysis` (statistics, report); only `cli/` may import both, so the chain
lives here. Every stage is the same library call its own command makes, with the same
defaults, so the demo proves the commands a user runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.errors import handles_errors
from cli.options import DeviceOption, ThreadsOption, compute_options
from cli.progress import progress_display

#: what the demo runs, in order (the first line of the stage bar names the stage)
STAGES: tuple[str, ...] = ("simulate", "train", "attribute", "stats", "report")
#: the demo's null models (docs/methods/nulls.md): a seeded sample of DEMO_NULL_SCANS scans explained by
#: DEMO_NULL_COPIES random copies of each fold model and by the permuted-label model, trained like the demo's model
#: but in DEMO_NULL_PERMUTED_FOLDS folds (a quarter of the cost of 5: the demo's documented subset)
DEMO_NULL_COPIES = 3
DEMO_NULL_SCANS = 100
DEMO_NULL_PERMUTED_FOLDS = 2


@handles_errors
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo study, run and report.")] = Path("demo"),
    scenario: Annotated[str, typer.Option("--scenario", help="Built-in scenario name or a scenario YAML.")] = "default",
    subjects: Annotated[Optional[int], typer.Option("--subjects", help="Override the scenario's subjects.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 5,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per fold.")] = 40,
    grid: Annotated[Optional[str], typer.Option("--grid", help="Model grid X,Y,Z [default: auto].")] = None,
    method: Annotated[
        Optional[list[str]],
        typer.Option("--method", help="Attribution method (repeatable) [default: gradcam, ablation]."),
    ] = None,
    pdf: Annotated[
        bool, typer.Option("--pdf/--no-pdf", help="Compile report.tex with pdflatex when available.")
    ] = True,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    nulls: Annotated[
        bool,
        typer.Option(
            "--nulls/--no-nulls",
            help=f"Attribute under null models too: {DEMO_NULL_COPIES} randomised-weight copies per fold and the "
            f"permuted-label model (trained in {DEMO_NULL_PERMUTED_FOLDS} folds), on {DEMO_NULL_SCANS} scans.",
        ),
    ] = True,
) -> None:
    """The whole pipeline on the synthetic cohort, on CPU, in minutes; ends with what it recovered."""
    from analysis.report import write_report
    from analysis.stats import run_stats
    from bodyage.attribute import AttributeConfig, attribute_run
    from bodyage.nulls import NullConfig
    from bodyage.simulate import simulate_study
    from bodyage.train import TrainConfig, parse_grid, train_run

    compute_options(device, threads)
    study, run = directory / "study", directory / "run"
    started = time.perf_counter()
    minutes: dict[str, float] = {}
    with progress_display() as progress:
        stages = progress.task("demo", len(STAGES))

        def done(stage: str, t0: float) -> None:
            minutes[stage] = (time.perf_counter() - t0) / 60.0
            stages.advance(1, stage=stage)

        t0 = time.perf_counter()
        if (study / "cohort.csv").is_file():  # a rerun reuses the study (simulate is deterministic)
            sim_line = f"reused the study in {study}"
        else:
            sim = simulate_study(study, scenario=scenario, subjects=subjects, progress=progress)
            sim_line = f"simulated {sim.n_scans} scans of {sim.n_subjects} subjects"
        done("simulate", t0)

        t0 = time.perf_counter()
        cfg = TrainConfig(folds=folds, epochs=epochs, grid=parse_grid(grid))
        trained = train_run(study, run, cfg, device=device, progress=progress)
        done("train", t0)

        t0 = time.perf_counter()
        methods = tuple(method) if method else AttributeConfig().methods
        # two scans' maps (NIfTI + PNG with the organ contours): what a body-level explanation looks like
        attributed = attribute_run(
            run,
            AttributeConfig(methods=methods, save_maps=2),
            device=device,
            nulls=(
                NullConfig(copies=DEMO_NULL_COPIES, scans=DEMO_NULL_SCANS, permuted_folds=DEMO_NULL_PERMUTED_FOLDS)
                if nulls
                else None
            ),
            sanity=True,  # calibrated check -> sanity.json; reuses the null models' random copies
            progress=progress,
        )
        done("attribute", t0)

        t0 = time.perf_counter()
        stats = run_stats(run, progress=progress)
        done("stats", t0)

        t0 = time.perf_counter()
        report = write_report(run, directory / "report", pdf=pdf)
        done("report", t0)
        stages.close()

    total = (time.perf_counter() - started) / 60.0
    maps = run / "attribute" / "maps"
    for line in _summary(sim_line, trained, attributed, stats, report, minutes, total, maps):
        typer.echo(line)


def _null_line(entry: dict[str, Any]) -> str | None:
    """``precision@k`` of a method's null models and the regions clearing them (recovery keys)."""
    nulls = entry.get("nulls") or {}
    if not nulls:
        return None
    parts = []
    for kind, v in nulls.items():
        p, lo, hi = v.get("precision_at_k"), v.get("ci_low"), v.get("ci_high")
        band = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and lo != hi else ""
        parts.append(f"{kind.replace('_', ' ')} {p:.2f}{band}" if p is not None else f"{kind.replace('_', ' ')} n/a")
    clears = entry.get("clears_nulls")
    tail = f"; above every null band: {', '.join(clears) if clears else 'no region'}" if clears is not None else ""
    return f"    null models' precision@{entry.get('k')}: {', '.join(parts)}{tail}"


def _summary(
    sim_line: str,
    trained: Any,
    attributed: Any,
    stats: Any,
    report: Any,
    minutes: dict[str, float],
    total: float,
    maps: Path,
) -> list[str]:
    from analysis.recovery import GOAL_MAE_RATIO

    m = trained.metrics
    rec: dict[str, Any] = report.recovery or {}
    lines = [f"demo finished in {total:.1f} min ({', '.join(f'{k} {v:.1f}' for k, v in minutes.items())})"]
    lines.append(f"  {sim_line}; {trained.n_scans} scans in {len(m['folds'])} folds")
    ratio = f", ratio {m['mae_ratio']:.2f} (goal <= {GOAL_MAE_RATIO})" if "mae_ratio" in m else ""
    oracle = f" vs oracle {m['oracle_mae']:.2f}" if "oracle_mae" in m else ""
    lines.append(f"  out-of-fold MAE {m['overall']['mae']:.2f} years{oracle}{ratio}")
    if m.get("informative") is False:
        lines.append(f"  WARNING: uninformative model: {m['informative_reason']}")
    cost = getattr(attributed, "cost", None) or {}
    null_steps = {k.replace("_", " "): v["wall"] / 60.0 for k, v in cost.items() if k != "trained_attribute"}
    if null_steps:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in null_steps.items())
        lines.append(f"  null models: {sum(null_steps.values()):.1f} min of the attribute stage ({steps})")
    for name, r in rec.get("methods", {}).items():
        top = ", ".join(r.get("top_regions", [])[: r.get("k", 0)])
        lines.append(
            f"  {name}: precision@{r.get('k')} {r.get('precision_at_k', float('nan')):.2f} of the planted regions "
            f"in its top {r.get('k')}: {top}"
        )
        null_line = _null_line(r)
        if null_line:
            lines.append(null_line)
    for name, p in rec.get("phenotypes", {}).items():
        sig = {k: v for k, v in (p.get("significant_regions") or {}).items() if v}
        where = "; ".join(f"{k}: {', '.join(v)}" for k, v in sig.items()) or "no region at FDR 5%"
        lines.append(
            f"  {name} ({'planted' if p.get('planted') else 'null'}): corrected gap {p.get('gap_effect', 0):+.2f} y "
            f"[{p.get('ci_low', 0):.2f}, {p.get('ci_high', 0):.2f}], q {p.get('q', 1):.3g}; {where}"
        )
    goals = rec.get("goals", {})
    if goals:
        met = [k for k, g in goals.items() if isinstance(g, dict) and g.get("met") is True]
        missed = [k for k, g in goals.items() if isinstance(g, dict) and g.get("met") is False]
        lines.append(
            f"  goals met: {len(met)}/{len(met) + len(missed)}" + (f" (missed: {', '.join(missed)})" if missed else "")
        )
    lines.append(f"  report: {report.report_tex}" + (f" and {report.pdf}" if report.pdf else ""))
    if maps.is_dir():
        lines.append(f"  maps of two scans (NIfTI for ITK-SNAP/3D Slicer, PNG): {maps}")
    lines.append(
        "  on real data, `bodyage segment` (TotalSegmentator) makes the organ masks the simulation provides here; "
        "see docs/guide/ukbiobank.md"
    )
    return lines
