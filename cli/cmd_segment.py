"""`bodyage segment`: organ masks with TotalSegmentator, or import existing masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bodyage.device import DEVICE_HELP
from cli.errors import handles_errors
from cli.options import ThreadsOption, compute_options
from cli.progress import progress_display


@handles_errors
def segment(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    task: Annotated[
        Optional[list[str]],
        typer.Option(
            "--task",
            help="TotalSegmentator task, repeatable: total_mr (organs, bones, muscles; default) and "
            "tissue_types_mr (subcutaneous fat, torso fat, skeletal muscle; needs its free academic licence).",
        ),
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help=f"{DEVICE_HELP} [default: auto]")] = None,
    threads: ThreadsOption = None,
    fast: Annotated[bool, typer.Option("--fast", help="TotalSegmentator's 3 mm model for total_mr.")] = False,
    from_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            help="Import masks instead: DIR/<scan id>.nii.gz (multilabel) or DIR/<scan id>/<region>.nii.gz.",
        ),
    ] = None,
    license_key: Annotated[
        Optional[str],
        typer.Option("--license", help="TotalSegmentator licence (aca_...) for tissue_types_mr; kept offline."),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(
            "--weights",
            help="Folder of TotalSegmentator weights, read only [default: TOTALSEG_WEIGHTS_PATH, "
            "else ~/.totalsegmentator/nnunet/results].",
        ),
    ] = None,
    channel: Annotated[
        Optional[list[str]],
        typer.Option(
            "--channel",
            help="Image fed to a task, TASK=CHANNEL, repeatable [default: total_mr=water, tissue_types_mr=fat].",
        ),
    ] = None,
) -> None:
    """Organ masks with TotalSegmentator (or imported) -> STUDY/masks, cohort.csv mask column, masks/qc.csv."""
    from bodyage.segment import segment_study
    from bodyage.segment_config import parse_channel_options

    compute_options(device, threads)
    channels = parse_channel_options(channel)
    with progress_display() as progress:
        summary = segment_study(
            study,
            tasks=task,
            device=device,
            fast=fast,
            source=from_dir,
            license_key=license_key,
            weights=weights,
            channels=channels or None,
            progress=progress,
        )
    typer.echo(summary.line())
