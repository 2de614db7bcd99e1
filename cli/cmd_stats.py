"""`bodyage stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from analysis._typing import FdrFamily, GapCorrection, MixedEngine, RegionLevel, RegionMetric
from bodyage.errors import InputError
from cli.errors import handles_errors
from cli.progress import progress_display


@handles_errors
def stats(
    run: Annotated[
        Path, typer.Argument(help="Run folder (after train; region models need attribute), or a clocks folder.")
    ],
    phenotype: Annotated[
        Optional[list[str]],
        typer.Option("--phenotype", help="Phenotype column (repeatable). Default: every non-reserved cohort column."),
    ] = None,
    covariate: Annotated[
        Optional[list[str]],
        typer.Option(
            "--covariate",
            help="Covariate column added to age (with age²) and sex (repeatable); see --no-default-covariates.",
        ),
    ] = None,
    default_covariates: Annotated[
        bool,
        typer.Option(
            "--default-covariates/--no-default-covariates",
            help="Adjust every model for age, age² and sex; --no-default-covariates leaves only the --covariate "
            "columns.",
        ),
    ] = True,
    group: Annotated[
        str, typer.Option("--group", help="Site-like grouping column (random intercept or fixed effects); 'none'.")
    ] = "site",
    metric: Annotated[
        Optional[RegionMetric],
        typer.Option("--metric", help="Region importance. Default: mass for ablation/shapley, share otherwise."),
    ] = None,
    correction: Annotated[
        GapCorrection,
        typer.Option(
            "--correction", help="Age-gap bias correction: train (from predictions), linear, quadratic, none."
        ),
    ] = "train",
    method: Annotated[
        Optional[list[str]], typer.Option("--method", help="Attribution method (repeatable). Default: all in the run.")
    ] = None,
    level: Annotated[
        RegionLevel, typer.Option("--level", help="Regions one by one, or named groups (kidney = left + right).")
    ] = "region",
    engine: Annotated[
        MixedEngine,
        typer.Option(
            "--engine",
            help="Mixed-model solver: auto = reml (exact REML as lme4, t-tests with Satterthwaite df); "
            "statsmodels (MixedLM, z-tests).",
        ),
    ] = "auto",
    alpha: Annotated[float, typer.Option("--alpha", help="False discovery rate level.", min=0.0, max=1.0)] = 0.05,
    fdr_family: Annotated[
        FdrFamily,
        typer.Option(
            "--fdr-family",
            help="Tests one Benjamini-Hochberg correction of the region analyses spans: method (every region x "
            "phenotype of a method), phenotype (the regions of each method x phenotype; FDR then holds "
            "per phenotype only) or all (every method x region x phenotype together; fewer discoveries).",
        ),
    ] = "method",
    captions: Annotated[
        Optional[Path],
        typer.Option(
            "--captions",
            help="YAML or JSON file of LaTeX captions, table stem -> caption (e.g. region_models_ablation, or "
            "region_models with {method} for every method).",
        ),
    ] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Draw the figures.")] = True,
    include_uninformative: Annotated[
        bool,
        typer.Option(
            "--include-uninformative",
            help="Clocks folder only: also test the clocks flagged uninformative (left out by default).",
        ),
    ] = False,
) -> None:
    """Age-gap correction, mixed models, FDR, LaTeX tables and figures (RUN/stats, RUN/figures).

    On a clocks folder (DIR of `bodyage clocks`, with clocks.json): the organ age gaps of every clock against the
    phenotypes, BH-FDR over clocks x phenotypes, the clock x clock correlations (DIR/stats, DIR/figures).
    """
    from analysis.organ_stats import is_clocks_folder

    if is_clocks_folder(run):
        from analysis.organ_outputs import run_organ_stats

        given = {
            "--metric": metric is not None,
            "--correction": correction != "train",
            "--method": bool(method),
            "--level": level != "region",
            "--fdr-family": fdr_family != "method",
            "--captions": captions is not None,
        }
        if wrong := [k for k, v in given.items() if v]:
            verb = "applies" if len(wrong) == 1 else "apply"
            raise InputError(f"{run} is a clocks folder: {', '.join(wrong)} {verb} to a run folder only")
        with progress_display() as progress:
            organ = run_organ_stats(
                run,
                phenotypes=phenotype,
                covariates=covariate,
                default_covariates=default_covariates,
                group=None if group.lower() == "none" else group,
                engine=engine,
                include_uninformative=include_uninformative,
                alpha=alpha,
                figures=figures,
                progress=progress,
            )
        for line in organ.summary():
            typer.echo(line)
        return
    if include_uninformative:
        raise InputError("--include-uninformative applies to a clocks folder (with clocks.json) only")
    from analysis.stats import run_stats
    from bodyage.regions import group_of

    with progress_display() as progress:
        result = run_stats(
            run,
            phenotypes=phenotype,
            covariates=covariate,
            default_covariates=default_covariates,
            group=None if group.lower() == "none" else group,
            metric=metric,
            correction=correction,
            methods=method,
            level=level,
            grouping=group_of if level == "group" else None,
            engine=engine,
            alpha=alpha,
            fdr_family=fdr_family,
            captions=captions,
            figures=figures,
            progress=progress,
        )
    for line in result.summary():
        typer.echo(line)
