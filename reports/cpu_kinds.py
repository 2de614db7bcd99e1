"""The demo on a CPU with AVX2 only, emulated on this one; write ``docs/results/cpu_kinds.json``.

Usage: python reports/cpu_kinds.py --work DIR [--study DIR] [--repeats 2] [--epochs 3]
                                   [--threads 2] [--demo] [--out docs/results/cpu_kinds.json]

Our 2-core machines come in kinds: some CPUs have AVX-512 (some of those AMX too), some only
AVX2. Training runs float32 on every CPU (``--precision auto``), so what differs between the
kinds is the width of the vector kernels torch (ATen) and oneDNN (its convolutions) dispatch
to. Both can be told to use nothing wider than AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, :data:`KINDS`). In one invocation, on one machine, this script:

1. checks that the setting takes: torch reports its kernel level under each kind;
2. runs the same short training side by side (``bodyage train`` on the default study,
   2 folds x ``--epochs`` epochs, ``--threads``), with this CPU's own kernels and with AVX2's,
   alternating, ``--repeats`` times each, and takes the ratio of the median seconds per epoch
   (``training_log.csv``);
3. with ``--demo``: runs the whole ``bodyage demo`` with AVX2 kernels and reads each stage's
   minutes from its record, as ``reports/docs_results.py`` does for the demo page.

What it is not: a machine whose CPU has only AVX2 also differs in clock, cache and memory
bandwidth; the emulation isolates the instruction set. The JSON names the CPU and its flags,
the load before and after each step, and the kernels each row ran with. Resumable: a probe
run or a demo folder that finished is read, not rerun. No machine path is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from docs_results import STAGE_RECORDS, minutes_between, read_json
from provenance import RESULTS, cpu_flags, load_average, machine, neutral_command, revision, utc_minute, write_json

#: environment of each kind of CPU: the machine's own kernels, and nothing wider than AVX2
KINDS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
#: the demo's promise (docs/design.md): within this many minutes on any 2-core machine of ours
DEMO_MINUTES_GOAL = 10.0
#: the lscpu flags that name the kinds
KIND_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def env_for(kind: str) -> dict[str, str]:
    """The process environment of a kind: this one's, with the kind's settings (and no inherited ones)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    return env | KINDS[kind]


def capability(kind: str) -> str:
    """The kernel level torch dispatches to under ``kind`` (``AVX512``, ``AVX2``, ...), as torch reports it."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env_for(kind), capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def seconds_per_epoch(run: Path) -> float | None:
    """Median wall seconds of an epoch in ``RUN/training_log.csv``; ``None`` without a finished run."""
    log = run / "training_log.csv"
    if not (run / "metrics.json").is_file() or not log.is_file():
        return None
    import pandas as pd

    seconds = pd.read_csv(log)["seconds"]
    return float(seconds.median()) if len(seconds) else None


def ratio(rows: list[dict[str, Any]], slow: str = "avx2", fast: str = "native") -> float | None:
    """Median seconds per epoch of ``slow`` over ``fast`` across the probe rows; ``None`` if either is missing."""
    med = {}
    for kind in (slow, fast):
        vals = [r["seconds_per_epoch"] for r in rows if r["kind"] == kind and r["seconds_per_epoch"] is not None]
        if not vals:
            return None
        med[kind] = statistics.median(vals)
    return med[slow] / med[fast]


def demo_minutes(demo: Path) -> dict[str, float | None]:
    """Minutes of each stage of a ``bodyage demo`` folder (and their total), from the stage records."""
    minutes = {stage: minutes_between(read_json(demo / rel)) for stage, rel in STAGE_RECORDS.items()}
    known = [m for m in minutes.values() if m is not None]
    minutes["total"] = sum(known) if len(known) == len(STAGE_RECORDS) else None
    return minutes


def summary(probe_ratio: float | None, avx2_demo: dict[str, Any] | None, native_total: float | None) -> str:
    """One paragraph: the per-epoch ratio, the emulated demo's minutes beside this CPU's, and the goal."""
    parts = []
    if probe_ratio is not None:
        parts.append(f"With AVX2 kernels a training epoch took {probe_ratio:.2f}x as long as with this CPU's own.")
    if avx2_demo and avx2_demo["minutes"].get("total") is not None:
        total = avx2_demo["minutes"]["total"]
        within = "within" if total <= DEMO_MINUTES_GOAL else "over"
        parts.append(
            f"The whole demo took {total:.1f} min with AVX2 kernels ({within} the {DEMO_MINUTES_GOAL:.0f}-minute goal)"
            + (
                f", against {native_total:.1f} min with this CPU's own kernels on the demo page."
                if native_total
                else "."
            )
        )
    parts.append(
        "The emulation changes the instruction set only: a CPU that has only AVX2 may also differ in clock, "
        "cache and memory bandwidth."
    )
    return " ".join(parts)


def tables(
    rows: list[dict[str, Any]], avx2_demo: dict[str, Any] | None, native: dict[str, Any], native_mae: Any = None
) -> dict[str, Any]:
    """The page's tables ({"columns", "rows"}): the side-by-side probe and the demo's stages by kind."""
    probe = {
        "columns": ["kernels", "repeat", "torch reports", "s / epoch", "load before"],
        "rows": [
            [
                r["kind"],
                r["repeat"],
                r["capability"],
                _fmt(r["seconds_per_epoch"], 1),
                _fmt((r["load_start"] or [None])[0], 1),
            ]
            for r in rows
        ],
    }
    stages = [*STAGE_RECORDS, "total"]
    emulated = (avx2_demo or {}).get("minutes", {})
    demo = {
        "columns": ["stage", "this CPU's kernels (demo page)", "AVX2 kernels (emulated)"],
        "rows": [[s, _fmt(native.get(s), 1), _fmt(emulated.get(s), 1)] for s in stages]
        + [["out-of-fold MAE (years)", _fmt(native_mae, 2), _fmt((avx2_demo or {}).get("mae"), 2)]],
    }
    return {"probe": probe, "demo": demo}


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def run_bodyage(args: list[str], kind: str) -> dict[str, Any]:
    """Run ``bodyage ARGS`` with the kind's kernels; its wall minutes and the load before and after."""
    exe = Path(sys.executable).with_name("bodyage")
    load0, t0 = load_average(1), time.perf_counter()
    subprocess.run([str(exe), *args], env=env_for(kind), check=True)
    return {"minutes": round((time.perf_counter() - t0) / 60.0, 2), "load_start": load0, "load_end": load_average(1)}


def main(argv: list[str] | None = None) -> None:
    """Probe both kinds side by side, optionally run the demo with AVX2 kernels, write the JSON file."""
    from bodyage import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (probe runs, the demo)")
    ap.add_argument("--study", type=Path, default=None, help="a default study [default: simulate WORK/study]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo", action="store_true", help="also run the whole demo with AVX2 kernels")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_kinds.json")
    args = ap.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = utc_minute()
    study = args.study or work / "study"
    if not (study / "study.json").is_file():
        run_bodyage(["simulate", str(study)], "native")

    caps = {kind: capability(kind) for kind in KINDS}
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for kind in KINDS:
            run = work / "probe" / f"{kind}_{repeat}"
            cmd = ["train", str(study), "--run", str(run), "--folds", "2", "--epochs", str(args.epochs)]
            cmd += ["--threads", str(args.threads), "--seed", str(repeat), "--quiet"]
            step: dict[str, Any] = {"minutes": None, "load_start": None, "load_end": None}  # finished before
            if seconds_per_epoch(run) is None:
                step = run_bodyage(cmd, kind)
            rows.append({"kind": kind, "repeat": repeat, "capability": caps[kind]} | step)
            rows[-1]["seconds_per_epoch"] = seconds_per_epoch(run)

    avx2_demo = None
    if args.demo:
        demo = work / "demo_avx2"
        wall = run_bodyage(["demo", str(demo)], "avx2") if demo_minutes(demo)["total"] is None else None
        overall = (read_json(demo / "run" / "metrics.json") or {}).get("overall") or {}
        avx2_demo = {"capability": caps["avx2"], "minutes": demo_minutes(demo), "mae": overall.get("mae"), "wall": wall}

    here = machine(bf16=True) | {"flags": cpu_flags(KIND_FLAGS), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    native_page = read_json(RESULTS / "demo.json") or {}
    native = native_page.get("minutes") or {}
    probe_ratio = ratio(rows)
    names = {str(work): "WORK", str(study): "STUDY"}
    result = {
        "schema": 1,
        "kinds": KINDS,
        "probe": {"settings": {"folds": 2, "epochs": args.epochs, "threads": args.threads}, "rows": rows},
        "ratio_avx2_over_native": probe_ratio,
        "demo_avx2": avx2_demo,
        "demo_native_minutes": native,
        "demo_native_source": (native_page.get("source") or {}).get("run_started"),
        "goal_minutes": DEMO_MINUTES_GOAL,
        "summary": summary(probe_ratio, avx2_demo, native.get("total")),
        "tables": tables(rows, avx2_demo, native, native_page.get("mae")),
        "source": {
            "script": "reports/cpu_kinds.py",
            "command": neutral_command(["python", "reports/cpu_kinds.py", *(argv or sys.argv[1:])], names),
            "bodyage_version": __version__,
            "git_revision": revision(),
            "started": started,
            "generated": utc_minute(),
            "machine": here,
        },
    }
    write_json(args.out, json.loads(json.dumps(result)))


if __name__ == "__main__":
    main()
