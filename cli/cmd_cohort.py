"""`bodyage cohort ukb`: build a study from a UK Biobank export and a folder of NIfTIs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from bodyage.errors import InputError
from cli.errors import handles_errors
from cli.progress import progress_display

app = typer.Typer(help="Build a study folder from real data.", no_args_is_help=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _spacing(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise InputError(f"--spacing-range {text!r}: expected MIN,MAX in mm, e.g. 0.5,15") from err
    return lo, hi


@app.command("ukb")
@handles_errors
def ukb(
    phenotypes: Annotated[
        Path,
        typer.Option(
            "--phenotypes", help="UK Biobank export (CSV/TSV, may be .gz): eid and <field>-<instance>.<array> columns."
        ),
    ],
    images: Annotated[Path, typer.Option("--images", help="Folder of NIfTI volumes, one file per channel per scan.")],
    out: Annotated[Path, typer.Option("--out", help="Study folder to write (new or empty).")],
    pattern: Annotated[
        Optional[str],
        typer.Option(
            "--pattern",
            help="File path under --images with {eid}, {instance}, {channel}; * matches any characters "
            "[default: {eid}_{instance}_{channel}.nii.gz].",
        ),
    ] = None,
    field: Annotated[
        Optional[list[str]],
        typer.Option(
            "--field",
            help="Add a phenotype column: FIELD[.ARRAY]=NAME[:first|mean|min|max|any=CODE,...][:signed], "
            "e.g. 2443=diabetes, 4080=sbp:mean. Repeat for more.",
        ),
    ] = None,
    instances: Annotated[
        Optional[str], typer.Option("--instances", help="UK Biobank instances to take scans from [default: 2,3].")
    ] = None,
    channels: Annotated[
        Optional[str],
        typer.Option(
            "--channels", help="File-name tokens of the channels: water,fat or water=W,fat=F [default: water,fat]."
        ),
    ] = None,
    images_as: Annotated[
        str,
        typer.Option(
            "--images-as",
            help="link: symlinks in STUDY/images; path: absolute paths in cohort.csv; copy: copy the files.",
        ),
    ] = "link",
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Check headers only (do not decompress the data); bodyage qc still reads it."),
    ] = False,
    spacing_range: Annotated[
        Optional[str], typer.Option("--spacing-range", help="Plausible voxel sizes MIN,MAX in mm [default: 0.5,15].")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", help="Processes checking images [default: up to 4].")
    ] = None,
) -> None:
    """From a UK Biobank export and NIfTIs to a checked study folder."""
    from bodyage.cohort import build_ukb_study

    kwargs: dict[str, object] = {}
    if pattern is not None:
        kwargs["pattern"] = pattern
    if instances is not None:
        kwargs["instances"] = instances
    if spacing_range is not None:
        kwargs["spacing_range_mm"] = _spacing(spacing_range)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with progress_display() as progress:
        s = build_ukb_study(
            phenotypes,
            images,
            out,
            fields=field or (),
            channels=channels,
            images_as=images_as,  # type: ignore[arg-type]  # checked by the library
            read_data=not quick,
            workers=n_workers,
            progress=progress,
            **kwargs,  # type: ignore[arg-type]
        )
    parts = [
        f"found {_plural(s.n_found, 'scan')}",
        f"kept {s.n_kept} ({_plural(s.n_subjects, 'participant')}, {s.n_repeat_subjects} with repeat imaging)",
    ]
    if s.n_rejected:
        reasons = ", ".join(f"{r} {n}" for r, n in s.rejected.items())
        parts.append(f"rejected {s.n_rejected} ({reasons}; see {s.study / 'failures.csv'})")
    else:
        parts.append("rejected 0")
    ignored = []
    if s.n_other_instance:
        ignored.append(f"{_plural(s.n_other_instance, 'file')} of other instances")
    if s.n_unmatched:
        ignored.append(f"{_plural(s.n_unmatched, 'file')} not matching the pattern")
    if ignored:
        parts.append("ignored " + " and ".join(ignored))
    approx = s.age_sources.get("whole_years", 0) + s.age_sources.get("conflict", 0)
    if approx:
        parts.append(f"age from field 21003 + 0.5 for {_plural(approx, 'scan')} without birth/visit dates")
    if s.n_unknown_site:
        parts.append(f"{_plural(s.n_unknown_site, 'scan')} without assessment centre (site 'unknown')")
    typer.echo("; ".join(parts) + f"; wrote {s.study}")
