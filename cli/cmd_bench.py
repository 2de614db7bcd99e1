"""`bodyage bench`."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from cli.errors import handles_errors
from cli.options import DeviceOption, ThreadsOption, compute_options
from cli.progress import progress_display


def _stats_scaling(quick: bool) -> dict[str, Any]:
    """The stats stage, handed to the library (``bodyage`` may not import ``analysis``)."""
    from analysis.bench_scaling import DEFAULT_SIZES, bench_region_scaling

    return bench_region_scaling((200, 400, 800) if quick else DEFAULT_SIZES, repeats=1 if quick else 3)


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


def _table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a file or a pipe: do not fold the table to 80 columns
    m = report["machine"]
    title = (
        f"bodyage bench{' --quick' if report['quick'] else ''} on {m['device']}"
        f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}, {m['cpu_count']} CPUs, torch {m['torch']}"
    )
    t = Table(title=title, title_justify="left")
    t.add_column("comparison", no_wrap=True)
    for col in ("ours s", "reference s", "ratio", "goal", "met"):
        t.add_column(col, no_wrap=True)
    t.add_column("reason", overflow="fold")
    for c in report["comparisons"]:
        kind = "×" if c["ratio_kind"] == "speedup" else "× cost"
        met = "-" if c["met"] is None else ("yes" if c["met"] else "NO")
        t.add_row(
            c["name"],
            _num(c["ours_s"]),
            _num(c["reference_s"]),
            f"{_num(c['ratio'])}{kind}",
            c["goal"] or "",
            met,
            c["reason"] or "",
        )
    console.print(t)

    g = Table(title="goals", title_justify="left")
    for col in ("goal", "value", "target", "met"):
        g.add_column(col, no_wrap=True)
    for goal in report["goals"]:
        g.add_row(goal["name"], _num(goal["value"]), goal["goal"], "yes" if goal["met"] else "NO")
    console.print(g)

    st = report["stages"]
    cam = st["gradcam"]["methods"]
    a = Table(title=f"attribution per scan (model grid {st['gradcam']['model_grid']})", title_justify="left")
    for col in ("method", "s/scan", "forward passes", "note"):
        a.add_column(col)
    for name, v in cam.items():
        a.add_row(name, _num(v["seconds_per_scan"]), _num(v["forward_passes"]), v["note"])
    console.print(a)

    if "stats" in st:
        s = st["stats"]
        points = ", ".join(f"{n}: {_num(sec)} s" for n, sec in zip(s["subjects"], s["seconds"], strict=True))
        console.print(
            f"stats region models ({s['region_fits']} fits): {points}; exponent {s['exponent']:.2f}; "
            f"{s['target_subjects']} subjects ≈ {_num(s['target_seconds'])} s"
        )

    if "export_reader" in st:
        e = st["export_reader"]
        console.print(
            f"UK Biobank export reader, {e['rows']} rows × {e['columns']} columns ({_num(e['file_gb'])} GB): "
            f"all rows {_num(e['read_s'])} s, peak RSS {_num(e['peak_rss_mb'], 4)} MiB; "
            f"a subset {_num(e['subset_read_s'])} s, {_num(e['subset_peak_rss_mb'], 4)} MiB; "
            f"pandas.read_csv of every column, first {e['naive_rows']} rows: {_num(e['naive_peak_rss_mb'], 4)} MiB"
        )

    p = report["projection"]
    h = p["hours"]
    pt = Table(title=f"projection: hours for {p['scans']} scans on this machine", title_justify="left")
    for col in ("stage", "hours"):
        pt.add_column(col)
    pt.add_row("preprocess", _num(h["preprocess"]))
    pt.add_row("train (k-fold)", _num(h["train"]))
    for name, hours in h["attribute"].items():
        pt.add_row(f"attribute {name}", _num(hours))
    pt.add_row("stats (region models)", _num(h["stats"]))
    pt.add_row("total (default methods)", _num(p["total_hours_default_methods"]))
    console.print(pt)
    for line in p["assumptions"]:
        console.print(f"  - {line}")

    mem = ", ".join(
        f"{k} {_num(v['rss_mb'], 4)} MiB" + (f" (GPU {_num(v['gpu_mb'], 4)} MiB)" if v["gpu_mb"] is not None else "")
        for k, v in report["peak_memory"].items()
    )
    console.print(f"peak RSS per stage: {mem}")
    console.print(f"took {report['seconds']:.0f} s; load average at the end {m['load_average']}")


@handles_errors
def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="A reduced run in seconds (small grids): checks, not numbers.")
    ] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Stage throughputs and side-by-side ratios vs naive and peer code."""
    from bodyage.bench import run_bench

    compute_options(device, threads)
    with progress_display() as progress:
        report = run_bench(quick=quick, device=device, stats=_stats_scaling, progress=progress)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _table(report)
