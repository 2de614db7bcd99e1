"""`bodyage clocks`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.errors import handles_errors
from cli.options import DeviceOption, ThreadsOption
from cli.progress import progress_display
from cli.state import STATE


@handles_errors
def clocks(
    study: Annotated[Path, typer.Argument(help="Study folder (with masks and labels.json).")],
    out: Annotated[Path, typer.Option("--out", help="Clocks folder to write (an interrupted run resumes).")],
    clock_set: Annotated[
        Optional[str],
        typer.Option("--set", help="Clock set: a YAML file {clock: [regions]}, or a shipped set (default, quick)."),
    ] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds, grouped by subject.")] = 5,
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs per fold (early stopping).")] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds, initialisation and augmentation.")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Preprocessed-tensor cache folder [default: STUDY/cache].")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train the whole-body model and one organ age clock per set entry; write organ age gaps."""
    from bodyage.clocks import read_clock_set, run_clocks
    from bodyage.errors import InputError
    from bodyage.train_config import TrainConfig

    if quiet:
        STATE.quiet = True
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    entries = read_clock_set(clock_set)
    cfg = TrainConfig(folds=folds, epochs=epochs, seed=seed)
    with progress_display() as progress:
        result = run_clocks(
            study, out, entries, cfg, device=device, threads=threads, cache_dir=cache, progress=progress
        )
    for name, c in result.clocks.items():
        flag = "" if c["informative"] else "  UNINFORMATIVE"
        mae, base, r = _num(c["mae"]), _num(c["baseline_mae"]), _num(c["pearson_r"])
        typer.echo(f"{name}: {c['n']} scans, MAE {mae} y (baseline {base}), r {r}{flag}")
    members = ", ".join(result.overall_members) or "none (no informative organ clock)"
    typer.echo(f"overall gap from: {members}; {result.minutes:.1f} min; tables in {result.out}")


def _num(x: object) -> str:
    v = float(x) if isinstance(x, (int, float)) else math.nan
    return f"{v:.2f}"
