"""`bodyage compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from analysis._typing import GapCorrection, GroupTest, RegionLevel, RegionMetric
from cli.errors import handles_errors
from cli.progress import progress_display


@handles_errors
def compare(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    cohort: Annotated[str, typer.Option("--cohort", help='Filter for the cohort, e.g. "diabetes == 1 and age >= 60".')],
    reference: Annotated[str, typer.Option("--reference", help='Filter for the reference, e.g. "diabetes == 0".')],
    match: Annotated[
        str, typer.Option("--match", help="Match the reference on these columns (comma-separated); '' for none.")
    ] = "age,sex",
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder. Default: RUN/compare/<filters>.")] = None,
    method: Annotated[
        Optional[list[str]], typer.Option("--method", help="Attribution method (repeatable). Default: all in the run.")
    ] = None,
    metric: Annotated[
        Optional[RegionMetric],
        typer.Option("--metric", help="Region importance. Default: mass for ablation/shapley, share otherwise."),
    ] = None,
    test: Annotated[GroupTest, typer.Option("--test", help="Welch's t-test or Mann-Whitney U.")] = "welch",
    correction: Annotated[GapCorrection, typer.Option("--correction", help="Age-gap bias correction.")] = "train",
    level: Annotated[RegionLevel, typer.Option("--level", help="Regions one by one, or named groups.")] = "region",
    ratio: Annotated[int, typer.Option("--ratio", help="Reference subjects matched per cohort subject.", min=1)] = 1,
    caliper: Annotated[
        Optional[float], typer.Option("--caliper", help="Largest matching distance (standard deviations).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the matching order.")] = 0,
    alpha: Annotated[float, typer.Option("--alpha", help="False discovery rate level.", min=0.0, max=1.0)] = 0.05,
) -> None:
    """Compare a cohort with a (matched) reference group: gaps and regions, Hedges' g, FDR."""
    from analysis.compare import run_compare
    from bodyage.regions import group_of

    with progress_display() as progress:
        result, out_dir = run_compare(
            run,
            cohort,
            reference,
            out=out,
            match=match,
            methods=method,
            metric=metric,
            test=test,
            correction=correction,
            level=level,
            grouping=group_of if level == "group" else None,
            ratio=ratio,
            caliper=caliper,
            seed=seed,
            alpha=alpha,
            progress=progress,
        )
    typer.echo(
        f"compared {result.n_cohort} cohort subject(s) ({result.cohort}) with {result.n_reference} reference "
        f"subject(s) ({result.reference}{', matched on ' + ', '.join(result.match) if result.match else ''})"
    )
    gaps = result.tests[result.tests["region"] == ""]
    for _, row in gaps.iterrows():
        rbc = f", rank-biserial r {row['rank_biserial']:.2f}" if result.test == "mannwhitney" else ""
        typer.echo(
            f"{row['outcome']}: difference {row['difference']:+.2f} y, "
            f"Hedges' g {row['hedges_g']:.2f}{rbc}, q {row['q']:.3g}"
        )
    regions = result.significant(alpha)
    regions = regions[regions["region"] != ""]
    typer.echo(
        f"regions significant at FDR {alpha:g}: {len(regions)}"
        + (
            ": " + ", ".join(f"{r} ({m})" for r, m in zip(regions["region"][:8], regions["method"][:8], strict=True))
            if len(regions)
            else ""
        )
    )
    if result.balance["smd_after"].abs().max() > 0.1 if result.match else False:
        typer.echo("warning: some |SMD| after matching exceed 0.1 (see comparison_balance.csv)", err=True)
    typer.echo(f"tables and figure in {out_dir}")
