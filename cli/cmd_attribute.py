"""`bodyage attribute`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bodyage.region_ops import DEFAULT_BASELINE
from cli.errors import handles_errors
from cli.options import DeviceOption, ThreadsOption, compute_options
from cli.progress import progress_display
from cli.state import STATE


@handles_errors
def attribute(
    run: Annotated[Path, typer.Argument(help="Run folder (after train).")],
    method: Annotated[
        Optional[list[str]],
        typer.Option(
            "--method",
            help="Attribution method, repeatable: gradcam, integrated_gradients, ablation, shapley "
            "[default: gradcam and ablation].",
        ),
    ] = None,
    layer: Annotated[
        Optional[str],
        typer.Option("--layer", help="GradCAM layer, block1 (full resolution) ... blockN [default: block1]."),
    ] = None,
    baseline: Annotated[
        str,
        typer.Option(
            "--baseline",
            help="What replaces a region in ablation/shapley: blur (a Gaussian-blurred copy: texture, small "
            "structures and edges go, coarse intensity stays; the default, chosen on the development scenario), "
            "shift (the mean-signal ablation: its mean moved to the cohort's region mean, texture and shape kept), "
            "mean (the cohort-mean tissue value per channel and region) or erase (the surrounding tissue).",
        ),
    ] = DEFAULT_BASELINE,
    samples: Annotated[int, typer.Option("--samples", help="Shapley value sampling: permutations per scan.")] = 25,
    save_maps: Annotated[
        int, typer.Option("--save-maps", help="Write NIfTI and PNG attribution maps of this many scans.")
    ] = 0,
    sanity: Annotated[
        bool,
        typer.Option("--sanity", help="Calibrated randomisation check (cohort level, 3 random models) -> sanity.json."),
    ] = False,
    sanity_scans: Annotated[int, typer.Option("--sanity-scans", help="Scans in the sanity check's sample.")] = 16,
    runs: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--runs",
            help="Other training runs (seeds) of the same study, already attributed, repeatable: importance with "
            "intervals over runs -> attribution_stability_runs.csv.",
        ),
    ] = None,
    groups: Annotated[
        bool, typer.Option("--groups", help="Also write attributions_groups.parquet (kidney = left + right, ...).")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Scans per forward/backward pass.")] = 8,
    nulls: Annotated[
        bool,
        typer.Option(
            "--nulls/--no-nulls",
            help="Also explain the scans under null models (randomised-weight copies of each fold model and a "
            "model trained on ages permuted within folds) -> attributions_null.parquet, attribution_nulls.csv.",
        ),
    ] = True,
    null_copies: Annotated[
        int, typer.Option("--null-copies", help="Randomised-weight copies of each fold model (0: none).")
    ] = 3,
    permuted: Annotated[
        Optional[bool],
        typer.Option(
            "--permuted/--no-permuted",
            help="Train (resumable, into RUN/nulls/permuted_labels) and explain the permuted-label model; "
            "costs as much as train [default: on, off under torchrun].",
            show_default=False,
        ),
    ] = None,
    null_scans: Annotated[
        Optional[int],
        typer.Option("--null-scans", help="Explain a seeded sample of this many scans under the nulls [default: all]."),
    ] = None,
    null_permuted_folds: Annotated[
        Optional[int],
        typer.Option(
            "--null-permuted-folds",
            help="Folds of the permuted-label model: 2 costs a quarter of 5, each model seeing half the study "
            "[default: the trained run's].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of Shapley sampling, the sanity check and the nulls.")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Preprocessed-tensor cache folder [default: as train].")
    ] = None,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip the cohort figures.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Organ-level attribution (GradCAM, ablation, ...) -> attributions.parquet, slice_profiles.parquet."""
    import warnings

    from bodyage.attribute import AttributeConfig, attribute_run
    from bodyage.attribution import DEFAULT_METHODS
    from bodyage.distributed import world_info
    from bodyage.errors import BodyageWarning
    from bodyage.nulls import NullConfig

    if quiet:
        STATE.quiet = True
    compute_options(device, threads)
    cfg = AttributeConfig(
        methods=tuple(method or DEFAULT_METHODS),
        layer=layer,
        baseline=baseline,
        samples=samples,
        batch_size=batch_size,
        seed=seed,
        groups=groups,
        save_maps=save_maps,
        figures=not no_figures,
    )
    distributed = world_info().distributed
    use_permuted = (not distributed) if permuted is None else permuted
    if nulls and permuted is None and distributed and world_info().is_main:
        typer.echo("nulls: random-weight copies only under torchrun (the permuted-label model needs one process)")
    with progress_display() as progress:
        result = attribute_run(
            run,
            cfg,
            device=device,
            cache_dir=cache,
            sanity=sanity,
            sanity_scans=sanity_scans,
            runs=tuple(runs or ()),
            nulls=(
                NullConfig(
                    copies=null_copies, permuted=use_permuted, scans=null_scans, permuted_folds=null_permuted_folds
                )
                if nulls
                else None
            ),
            progress=progress,
        )
    if not result.merged:
        return
    typer.echo(result.line())
    if result.sanity is not None:
        for m, entry in result.sanity["methods"].items():
            if entry.get("warning"):
                warnings.warn(entry["warning"], BodyageWarning, stacklevel=1)
            else:
                typer.echo(
                    f"sanity {m}: cohort rho(trained, random) {entry['cohort_rho_trained_random']:.2f} below "
                    f"rho(random, random) min {entry['cohort_rho_random_random_min']:.2f} (passed)"
                )
