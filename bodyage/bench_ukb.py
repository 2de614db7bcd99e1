"""Benchmark of the UK Biobank export reader: time and peak memory on a full-size export.

A real export has ~500,000 rows and thousands of columns; :func:`bench_export_reader`
writes such a file (to a temporary folder, deleted afterwards), then reads it with
:func:`bodyage.ukb.read_visits` in a fresh process and reports that process's peak
resident memory, so the number is the reader's and nothing else's. ``bodyage bench``
calls it; it is not a test (it writes gigabytes).

The generated file: an ``eid`` column, the standard fields bodyage reads (31, 34, 52,
53, 54, 21001, 21003 at instances 0–3) in field order, and filler fields between and
after them — 45 % empty cells, small integers, floats with several decimals, dates and
negative codes, about 3.5 bytes per cell like a real export. Filler rows are drawn from a
pool of 256 random rows (the parser's work depends on bytes and cells, not on values);
the standard fields are random per row, with ~10 % of participants imaged (instance 2)
and ~1 % imaged twice (instance 3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bodyage.progress import NO_PROGRESS, Progress

#: the standard columns, in the order a field-sorted export has them
_LOW = ["31-0.0", "34-0.0", "52-0.0", *(f"53-{i}.0" for i in range(4)), *(f"54-{i}.0" for i in range(4))]
_HIGH = [*(f"21001-{i}.0" for i in range(4)), *(f"21003-{i}.0" for i in range(4))]


@dataclass(frozen=True)
class ExportBench:
    """Result of :func:`bench_export_reader`.

    Attributes
    ----------
    rows, columns
        Shape of the generated export (columns include ``eid``).
    file_gb
        Its size on disk (10^9 bytes).
    generate_s
        Seconds spent writing it.
    read_s
        Seconds :func:`~bodyage.ukb.read_visits` took (all participants, instances 2 and 3).
    peak_rss_mb
        Peak resident memory of the reading process (MiB), imports included.
    baseline_rss_mb
        Resident memory of that process after its imports, before reading (MiB).
    rows_out
        Rows of the table returned (participants × 2 instances).
    subset_read_s, subset_peak_rss_mb
        The same for reading only 40,000 participants (``eids=``), as ``cohort ukb`` does.
    chunksize
        Rows read at a time.
    naive_rows, naive_peak_rss_mb
        Peak memory of ``pandas.read_csv`` reading *every* column of the first
        ``naive_rows`` rows (0: not measured): the cost of not selecting columns.
    """

    rows: int
    columns: int
    file_gb: float
    generate_s: float
    read_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    rows_out: int
    subset_read_s: float
    subset_peak_rss_mb: float
    chunksize: int
    naive_rows: int = 0
    naive_peak_rss_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _filler_cell(rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.45:
        return ""
    if u < 0.75:
        return str(int(rng.integers(0, 10_000)))
    if u < 0.90:
        return f"{rng.normal(50, 20):.{int(rng.integers(2, 6))}f}"
    if u < 0.95:
        return f"20{int(rng.integers(6, 21)):02d}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    return str(int(rng.choice([-1, -3, -7])))


def generate_export(
    path: str | os.PathLike[str],
    rows: int = 500_000,
    columns: int = 2_000,
    *,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> Path:
    """Write a UK Biobank-shaped export of ``rows`` × ``columns`` (see the module doc).

    Returns
    -------
    Path
        The CSV written.
    """
    n_std = len(_LOW) + len(_HIGH)
    if columns < n_std + 3:
        raise ValueError(f"columns must be at least {n_std + 3}")
    rng = np.random.default_rng(seed)
    n_fill = columns - 1 - n_std
    n_mid = int(n_fill * 0.85)  # fields 55..21000 sit between the two groups of standard fields
    n_tail = n_fill - n_mid
    mid_names = [f"{100 + i // 4}-{i % 4}.0" for i in range(n_mid)]
    tail_names = [f"{22000 + i // 2}-0.{i % 2}" for i in range(n_tail)]
    header = ",".join(["eid", *_LOW, *mid_names, *_HIGH, *tail_names])
    pool = 256
    mid_pool = [",".join(_filler_cell(rng) for _ in range(n_mid)) for _ in range(pool)]
    tail_pool = [",".join(_filler_cell(rng) for _ in range(n_tail)) for _ in range(pool)]
    centres = np.array([11025, 11026, 11027, 11028])
    block = 10_000
    task = progress.task("generate export", rows)
    out = Path(path)
    with open(out, "w", encoding="utf-8", newline="") as fh:
        fh.write(header + "\n")
        for start in range(0, rows, block):
            n = min(block, rows - start)
            by = rng.integers(1936, 1971, n)
            bm = rng.integers(1, 13, n)
            sex = rng.integers(0, 2, n)
            imaged = rng.random(n) < 0.10
            repeat = imaged & (rng.random(n) < 0.10)
            base_year = rng.integers(2006, 2011, n)
            img_year = rng.integers(2014, 2020, n)
            centre = centres[rng.integers(0, 4, n)]
            bmi = rng.normal(27, 4, (n, 4))
            mids = rng.integers(0, pool, n)
            tails = rng.integers(0, pool, n)
            lines = []
            for k in range(n):
                # whole years at the visit (May 2006-10, March 2014-19, September two years later)
                age0 = base_year[k] - by[k] - int(bm[k] > 5)
                age2 = img_year[k] - by[k] - int(bm[k] > 3)
                age3 = img_year[k] + 2 - by[k] - int(bm[k] > 9)
                v2 = imaged[k]
                v3 = repeat[k]
                d0 = f"{base_year[k]}-05-{1 + k % 28:02d}"
                d2 = f"{img_year[k]}-03-{1 + k % 28:02d}" if v2 else ""
                d3 = f"{img_year[k] + 2}-09-{1 + k % 28:02d}" if v3 else ""
                c2 = str(centre[k]) if v2 else ""
                c3 = str(centre[k]) if v3 else ""
                low = f"{sex[k]},{by[k]},{bm[k]},{d0},,{d2},{d3},11009,,{c2},{c3}"
                high = (
                    f"{bmi[k, 0]:.4f},,{f'{bmi[k, 2]:.4f}' if v2 else ''},{f'{bmi[k, 3]:.4f}' if v3 else ''},"
                    f"{age0},,{age2 if v2 else ''},{age3 if v3 else ''}"
                )
                lines.append(f"{1_000_000 + start + k},{low},{mid_pool[mids[k]]},{high},{tail_pool[tails[k]]}\n")
            fh.write("".join(lines))
            task.advance(n)
    task.close()
    return out


def _status_mb(key: str) -> float | None:
    """``VmHWM``/``VmRSS`` of this process from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB).

    ``VmHWM`` where /proc exists: unlike ``ru_maxrss`` it is not inherited across the
    fork + exec that starts a spawned process, so it is this process's own peak, and
    :func:`reset_peak_rss` can reset it. Elsewhere ``ru_maxrss`` (since the process began).

    Returns
    -------
    float
        Peak resident set size in MiB.
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory to its current one (Linux; a no-op elsewhere).

    Writes ``5`` to ``/proc/self/clear_refs``, which resets ``VmHWM``, so that
    :func:`process_peak_rss_mb` then measures the peak of what follows.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def _read_in_child(path: str, chunksize: int, eids: list[str] | None) -> tuple[float, float, float, int]:
    import pandas  # noqa: F401  (imports count as baseline)

    from bodyage.ukb import read_visits

    baseline = _status_mb("VmRSS") or process_peak_rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    visits = read_visits(path, chunksize=chunksize, eids=eids)
    seconds = time.perf_counter() - t0
    return seconds, process_peak_rss_mb(), baseline, len(visits.table)


def _naive_in_child(path: str, nrows: int) -> float:
    import warnings

    import pandas as pd

    with warnings.catch_warnings():  # mixed-type columns: that is the naive reader's problem
        warnings.simplefilter("ignore")
        pd.read_csv(path, nrows=nrows)
    return process_peak_rss_mb()


def _in_fresh_process(fn: Any, *args: Any) -> Any:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_export_reader(
    rows: int = 500_000,
    columns: int = 2_000,
    *,
    chunksize: int = 50_000,
    subset: int = 40_000,
    naive_rows: int = 20_000,
    workdir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> ExportBench:
    """Generate a full-size export, read it in a fresh process, report time and peak memory.

    Parameters
    ----------
    rows, columns
        Shape of the export (a real one: ~500,000 × thousands; ~3.5 GB at 2,000 columns).
    chunksize
        Rows the reader takes at a time.
    subset
        Also read only this many participants (0: skip), as ``cohort ukb`` does.
    naive_rows
        Also measure ``pandas.read_csv`` of all columns of this many rows (0: skip).
    workdir
        Where to write the file (default: the system's temporary folder); it is deleted.
    seed
        Seed of the generated values.
    progress
        Progress display (generation).

    Returns
    -------
    ExportBench
        Sizes, seconds and peak memory.
    """
    tmp = Path(tempfile.mkdtemp(prefix="bodyage-bench-ukb-", dir=workdir))
    try:
        path = tmp / "ukb_export.csv"
        t0 = time.perf_counter()
        generate_export(path, rows, columns, seed=seed, progress=progress)
        generate_s = time.perf_counter() - t0
        read_s, peak, baseline, rows_out = _in_fresh_process(_read_in_child, str(path), chunksize, None)
        sub_s = sub_peak = 0.0
        if subset:
            eids = [
                str(1_000_000 + i) for i in np.random.default_rng(seed).choice(rows, min(subset, rows), replace=False)
            ]
            sub_s, sub_peak, _, _ = _in_fresh_process(_read_in_child, str(path), chunksize, eids)
        naive_peak = float(_in_fresh_process(_naive_in_child, str(path), naive_rows)) if naive_rows else 0.0
        return ExportBench(
            rows=rows,
            columns=columns,
            file_gb=path.stat().st_size / 1e9,
            generate_s=generate_s,
            read_s=read_s,
            peak_rss_mb=peak,
            baseline_rss_mb=baseline,
            rows_out=rows_out,
            subset_read_s=sub_s,
            subset_peak_rss_mb=sub_peak,
            chunksize=chunksize,
            naive_rows=naive_rows,
            naive_peak_rss_mb=naive_peak,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
