"""`bodyage train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from bodyage._typing import QC_FLAGS
from cli.errors import handles_errors
from cli.options import DeviceOption, ThreadsOption, compute_options
from cli.progress import progress_display
from cli.state import STATE


@handles_errors
def train(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    run: Annotated[
        Path,
        typer.Option(
            "--run",
            "--run-dir",
            help="Run folder to write (an interrupted run resumes). Under torchrun write --run-dir: "
            "torchrun reads --run as an abbreviation of its own --run-path.",
        ),
    ],
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds, grouped by subject.")] = 5,
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs per fold (early stopping).")] = 40,
    model: Annotated[str, typer.Option("--model", help="Architecture: sfcn or resnet3d.")] = "sfcn",
    model_options: Annotated[
        Optional[str],
        typer.Option("--model-options", help="Model keyword arguments as JSON, e.g. '{\"widths\": [16,32,64,128]}'."),
    ] = None,
    grid: Annotated[
        Optional[str], typer.Option("--grid", help="Model grid X,Y,Z in voxels, or auto [default: auto].")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Scans per optimiser step (per process).")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of the one-cycle schedule.")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds, initialisation and augmentation.")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Convolutions in auto (fp16 on CUDA, fp32 on a CPU), fp32, bf16 (opt-in: NaN on small grids) or fp16.",
        ),
    ] = "auto",
    exclude_qc: Annotated[
        Optional[str],
        typer.Option(
            "--exclude-qc",
            help=f"Leave out scans with these qc.csv flags, comma-separated, or all: {', '.join(QC_FLAGS)}.",
        ),
    ] = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Preprocessed-tensor cache folder [default: STUDY/cache].")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first unreadable scan instead of listing it.")
    ] = False,
    region: Annotated[
        Optional[str],
        typer.Option(
            "--region",
            help="Organ clock: restrict the input to these regions or groups (comma list, e.g. liver or kidney).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train a k-fold 3D CNN age regressor with out-of-fold predictions."""
    from bodyage.accuracy import accuracy_text
    from bodyage.errors import InputError
    from bodyage.train import train_run
    from bodyage.train_config import TrainConfig, parse_grid

    if quiet:
        STATE.quiet = True
    compute_options(device, threads)
    kwargs = TrainConfig().model_kwargs
    if model_options:
        try:
            kwargs = json.loads(model_options)
        except json.JSONDecodeError as err:
            raise InputError(f"--model-options is not valid JSON: {err.msg}") from err
        if not isinstance(kwargs, dict):
            raise InputError("--model-options must be a JSON object")
    flags: tuple[str, ...] = ()
    if exclude_qc:
        from bodyage.qc import parse_flags

        flags = tuple(parse_flags(exclude_qc))
    cfg = TrainConfig(
        folds=folds,
        epochs=epochs,
        model=model,
        model_kwargs=kwargs,
        grid=parse_grid(grid),
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        exclude_qc=flags,
        precision=precision,
        regions=tuple(r.strip() for r in region.split(",")) if region is not None else (),
    )
    with progress_display() as progress:
        result = train_run(study, run, cfg, device=device, cache_dir=cache, strict=strict, progress=progress)
    if not result.metrics:  # a non-zero torchrun rank
        return
    m = result.metrics
    line = f"{result.n_scans} scans, {folds} folds: {accuracy_text(m)}"
    if "mae_ratio" in m:
        line += f"; oracle MAE {m['oracle_mae']:.2f}, ratio {m['mae_ratio']:.2f}"
    typer.echo(line)
    if not m["informative"]:
        typer.echo(f"WARNING: uninformative model, the age gap is not biological ageing: {m['informative_reason']}")
    extra = f"{result.folds_skipped} fold(s) reused from an earlier run; " if result.folds_skipped else ""
    typer.echo(
        f"{extra}{result.n_failed} scan(s) in failures.csv; {result.minutes:.1f} min in {result.training_dtype}; "
        f"predictions, metrics and figures in {result.run}"
    )
