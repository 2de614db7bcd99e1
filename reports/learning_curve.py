"""The learning curve on planted truth: out-of-fold MAE against the number of subjects.

Usage (from the repository root; resumable, run it in steps)::

    OMP_NUM_THREADS=1 python reports/learning_curve.py WORK --n 300 --seeds 0,1
    OMP_NUM_THREADS=1 python reports/learning_curve.py WORK --n 1000 --seeds 0,1
    OMP_NUM_THREADS=1 python reports/learning_curve.py WORK --n 3000 --seeds 0
    python reports/learning_curve.py WORK --collect          # table and figure from what is done

For every N it simulates the scenario (default: ``default``, same planted ageing and seed,
only ``--subjects`` changes) into ``WORK/study_N`` and measures the region-mean ridge
yardstick (``reports/region_probe.py``: true masks, at the model grid and the native grid).
For every (N, seed) it trains ``bodyage train`` with that seed into ``WORK/run_N_sSEED``
(train resumes an interrupted run; the minutes and peak memory of every invocation are kept
in ``WORK/run_N_sSEED/learning_curve_timing.json`` and summed / maximised) and reads the
out-of-fold MAE and the oracle's from the run's ``metrics.json``.

Writes ``docs/results/learning_curve.json`` — a list of rows ``{n_subjects, seed, mae,
oracle_mae, mae_ratio, yardstick_mae_model_grid, yardstick_mae_native, train_minutes,
peak_rss_gb}`` (DESIGN §9), each also naming n_scans, the bodyage version and git revision
the run recorded, the command, the machine (CPU model and whether it has AMX / AVX-512
bfloat16 kernels), the threads and the load average — plus ``learning_curve_table.json``
(the table the validation page shows) and ``figures/learning_curve.png`` (MAE against N,
log x, with the oracle floor and the yardstick). Rows of other N already in the JSON are
kept, so each step adds to the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import RESULTS, machine, now_iso

TIMING = "learning_curve_timing.json"
YARDSTICK = "learning_curve_yardstick.json"


# ------------------------------------------------------------------ running
def bodyage_exe() -> str:
    """The ``bodyage`` command next to this Python (the project's virtual environment)."""
    exe = Path(sys.executable).parent / "bodyage"
    return str(exe) if exe.is_file() else (shutil.which("bodyage") or "bodyage")


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall minutes, peak resident memory in GB of it or its largest waited-for child)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    minutes = (time.perf_counter() - started) / 60
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}")
    return minutes, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------ steps
def ensure_study(work: Path, n: int, scenario: str) -> Path:
    """``WORK/study_N`` simulated with ``--subjects N`` (kept when complete)."""
    study = work / f"study_{n}"
    if (study / "truth.json").is_file() and (study / "cohort.csv").is_file():
        return study
    if study.exists():
        shutil.rmtree(study)  # an interrupted simulation: simulate needs a new or empty folder
    cmd = [bodyage_exe(), "simulate", str(study), "--scenario", scenario, "--subjects", str(n)]
    print(f"[learning curve] {' '.join(cmd)}", flush=True)
    run_measured(cmd)
    return study


def model_grid_factor(study: Path, grid: list[int] | None) -> int:
    """How many native voxels one model voxel spans along x (the yardstick coarsens by this)."""
    if not grid:
        return 2
    native = json.loads((study / "study.json").read_text()).get("grid", {}).get("shape")
    if not native:
        return 2
    return max(1, round(int(native[0]) / int(grid[0])))


def ensure_yardstick(study: Path, factor: int) -> dict[str, float]:
    """The ridge yardstick's MAE at the native grid and at the model grid (cached in the study)."""
    path = study / YARDSTICK
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("factor") == factor:
            return cached
    from region_probe import probe  # a sibling script, as provenance: reports/ is on the path

    print(f"[learning curve] region-mean yardstick on {study.name} (native and /{factor})", flush=True)
    maes = probe(study, factor)
    out = {"factor": factor, "native": maes[1], "model_grid": maes[factor]}
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def train(study: Path, run: Path, seed: int, threads: int | None, extra: list[str], command: str) -> None:
    """Train (or resume) one run; add this invocation's minutes and peak memory to its timing file."""
    if (run / "metrics.json").is_file():
        return
    cmd = [bodyage_exe(), "train", str(study), "--run", str(run), "--seed", str(seed), "--quiet", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"[learning curve] {' '.join(cmd)}", flush=True)
    load = os.getloadavg()
    minutes, rss = run_measured(cmd)
    timing_path = run / TIMING
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"invocations": []}
    timing["command"] = command
    timing["invocations"].append(
        {"minutes": minutes, "peak_rss_gb": rss, "threads": threads, "load_before": load, "load_after": os.getloadavg()}
    )
    timing_path.write_text(json.dumps(timing, indent=2) + "\n")


#: an epoch longer than this multiple of the median epoch was paused, not slow
PAUSE_FACTOR = 30
#: epochs of the schedule's warm-up, left out of the inner-validation spread
WARMUP_EPOCHS = 5


def dynamics(run: Path) -> dict[str, Any]:
    """What the training logs say about the recipe at this N (``RUN/training_log.csv``).

    ``final_train_loss`` and ``final_inner_val_mae``: the last epoch's training loss and
    inner-validation MAE (years, mean over folds); training loss near the validation MAE
    means the model is not fitting the training set better than new subjects (no
    overfitting: more data or capacity, not regularisation, is what helps).
    ``inner_val_mae_max``: the largest inner-validation MAE after the warm-up (any fold),
    the BatchNorm jumps; ``late_improvement``: the mean inner-validation MAE of the ten
    epochs before the last five minus that of the last five (> 0: still improving when the
    schedule ended).
    """
    path = run / "training_log.csv"
    if not path.is_file():
        return {}
    import pandas as pd

    log = pd.read_csv(path)
    last = log["epoch"].max()
    by_epoch = log.groupby("epoch")[["train_loss_years", "val_mae"]].mean()
    late = by_epoch.loc[last - 4 : last, "val_mae"].mean()
    before = by_epoch.loc[last - 14 : last - 5, "val_mae"].mean()
    return {
        "final_train_loss": float(by_epoch.loc[last, "train_loss_years"]),
        "final_inner_val_mae": float(by_epoch.loc[last, "val_mae"]),
        "inner_val_mae_max": float(log.loc[log["epoch"] >= WARMUP_EPOCHS, "val_mae"].max()),
        "late_improvement": float(before - late),
        "seconds_per_epoch": float(log["seconds"].median()),
        "longest_epoch_seconds": float(log["seconds"].max()),
    }


def row(work: Path, n: int, seed: int) -> dict[str, Any] | None:
    """The curve's row of a finished run, or ``None`` if it has not finished."""
    study, run = work / f"study_{n}", work / f"run_{n}_s{seed}"
    if not (run / "metrics.json").is_file():
        return None
    metrics = json.loads((run / "metrics.json").read_text())
    record = json.loads((run / "run.json").read_text())
    timing = json.loads((run / TIMING).read_text()) if (run / TIMING).is_file() else {"invocations": []}
    inv = timing["invocations"]
    ys = json.loads((study / YARDSTICK).read_text()) if (study / YARDSTICK).is_file() else {}
    oracle = float(metrics["oracle_mae"])
    mae = float(metrics["overall"]["mae"])
    return {
        "n_subjects": n,
        "seed": seed,
        "mae": mae,
        "oracle_mae": oracle,
        "mae_ratio": mae / oracle,
        "yardstick_mae_model_grid": ys.get("model_grid"),
        "yardstick_mae_native": ys.get("native"),
        "train_minutes": sum(i["minutes"] for i in inv) if inv else None,
        "peak_rss_gb": max(i["peak_rss_gb"] for i in inv) if inv else None,
        "n_scans": record.get("n_scans"),
        "baseline_mae": metrics.get("baseline_mae"),
        "informative": metrics.get("informative"),
        "grid": record["arguments"].get("grid"),
        "epochs": record["arguments"].get("epochs"),
        "training_dtype": record.get("training_dtype"),
        **dynamics(run),
        "invocations": len(inv),
        "threads": [i["threads"] for i in inv],
        "load_average": [i["load_before"] for i in inv],
        "load_start_end": [[round(i["load_before"][0], 1), round(i["load_after"][0], 1)] for i in inv],
        "bodyage_version": record.get("bodyage_version"),
        "git_revision": record.get("git_revision"),
        "command": timing.get("command"),
        "machine": machine(bf16=True),  # CPU model, count, AMX / AVX-512 bfloat16 kernels
        "generated": now_iso(),
    }


# ------------------------------------------------------------------ outputs
def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    """The JSON rows, the table the validation page renders and the figure."""
    rows = sorted(rows, key=lambda r: (r["n_subjects"], r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curve.json").write_text(json.dumps(rows, indent=2) + "\n")

    def f(v: Any, d: int = 2) -> str:
        return "" if v is None else f"{v:.{d}f}"

    table = {
        "columns": [
            "subjects",
            "scans",
            "seed",
            "MAE (y)",
            "oracle (y)",
            "ratio",
            "yardstick, model grid",
            "yardstick, native",
            "train (min)",
            "threads",
            "1-min load, start → end",
            "peak RSS (GB)",
        ],
        "rows": [
            [
                r["n_subjects"],
                r.get("n_scans"),
                r["seed"],
                f(r["mae"]),
                f(r["oracle_mae"]),
                f(r["mae_ratio"]),
                f(r["yardstick_mae_model_grid"]),
                f(r["yardstick_mae_native"]),
                f(r["train_minutes"], 1),
                ",".join(str(t) for t in r.get("threads") or []),
                "; ".join(f"{a} → {b}" for a, b in r.get("load_start_end") or []),
                f(r["peak_rss_gb"], 1),
            ]
            for r in rows
        ],
    }
    cpu = {(r.get("machine") or {}).get("cpu_model") for r in rows}
    summary = {"table": table, "cpu": ", ".join(sorted(c or "?" for c in cpu)), "n_rows": len(rows)}
    summary["summary"] = summarise(rows)
    summary["recipe"] = recipe(rows)
    (out / "learning_curve_table.json").write_text(json.dumps(summary, indent=2) + "\n")
    if rows:
        plot(rows, out / "figures" / "learning_curve.png")


def summarise(rows: list[dict[str, Any]]) -> str:
    """Sentences from the rows: MAE and ratio per N (range over seeds), the yardstick, the N = 3,000 goal."""
    ns = sorted({r["n_subjects"] for r in rows})
    parts = []
    for n in ns:
        at = [r for r in rows if r["n_subjects"] == n]
        maes = sorted(r["mae"] for r in at)
        ratios = sorted(r["mae_ratio"] for r in at)
        if len(at) > 1:
            text = f"N = {n}: MAE {maes[0]:.2f}–{maes[-1]:.2f} years over {len(at)} seeds, "
            text += f"{ratios[0]:.2f}–{ratios[-1]:.2f}× the oracle"
        else:
            text = f"N = {n}: MAE {maes[0]:.2f} years (one seed), {ratios[0]:.2f}× the oracle"
        ys = at[0]["yardstick_mae_model_grid"]
        if ys is not None:
            side = "at or below" if maes[-1] <= ys else "above"
            text += f", {side} the model-grid yardstick's {ys:.2f}"
        parts.append(text + ".")
    fits = [r for r in rows if r.get("final_train_loss") is not None]
    if fits:
        gaps = [r["final_inner_val_mae"] - r["final_train_loss"] for r in fits]
        parts.append(
            "At the end of training the training loss is within "
            f"{min(gaps):+.2f} to {max(gaps):+.2f} years of the inner-validation MAE at every N "
            f"(inner validation jumps to {max(r['inner_val_mae_max'] for r in fits):.1f} years after the warm-up "
            f"in at least one fold; in the last five epochs it still improved by "
            f"{min(r['late_improvement'] for r in fits):.2f} to {max(r['late_improvement'] for r in fits):.2f} "
            "years over the ten before)."
        )
    for r in rows:  # a run stopped and continued (SIGSTOP/SIGCONT, a suspended job) counts the pause as wall time
        longest, median = r.get("longest_epoch_seconds"), r.get("seconds_per_epoch")
        if longest is not None and median and r.get("train_minutes") and longest > PAUSE_FACTOR * median:
            parts.append(
                f"The train minutes of N = {r['n_subjects']}, seed {r['seed']} include a pause: one epoch took "
                f"{longest / 60:.1f} min against a median of {median:.1f} s; without it, about "
                f"{r['train_minutes'] - (longest - median) / 60:.1f} min."
            )
    if ns:
        worst = max(r["mae_ratio"] for r in rows if r["n_subjects"] == ns[-1])
        verdict = "meets" if worst <= 1.15 else "does not meet"
        parts.append(f"At the largest N measured ({ns[-1]}) the ratio {verdict} the goal of 1.15× the oracle.")
    return " ".join(parts)


#: a fall in mean MAE smaller than this (years) between the two largest N is a plateau
PLATEAU_YEARS = 0.25
#: training loss within this (years) of the inner-validation MAE: the model does not fit its training set better
UNDERFIT_YEARS = 0.5


def recipe(rows: list[dict[str, Any]]) -> str:
    """What the curve says the large-N recipe needs, from the two largest N (sentences for the docs)."""
    ns = sorted({r["n_subjects"] for r in rows})
    if len(ns) < 2:
        return "Too few study sizes measured to say how the recipe should scale."

    def mean(key: str, n: int) -> float | None:
        vals = [r[key] for r in rows if r["n_subjects"] == n and r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    prev, last = ns[-2], ns[-1]
    mae_prev, mae_last = mean("mae", prev), mean("mae", last)
    assert mae_prev is not None and mae_last is not None
    gain = mae_prev - mae_last
    parts = []
    if gain < PLATEAU_YEARS:
        parts.append(
            f"From N = {prev} to N = {last} the mean MAE fell by {gain:.2f} years ({mae_prev:.2f} → {mae_last:.2f}), "
            f"less than {PLATEAU_YEARS}: with this recipe, more subjects no longer buy accuracy."
        )
    else:
        parts.append(
            f"From N = {prev} to N = {last} the mean MAE fell by {gain:.2f} years ({mae_prev:.2f} → {mae_last:.2f}): "
            "the recipe is still data-limited there."
        )
    train_loss, val = mean("final_train_loss", last), mean("final_inner_val_mae", last)
    if train_loss is not None and val is not None:
        if val - train_loss < UNDERFIT_YEARS:
            parts.append(
                f"At N = {last} the final training loss ({train_loss:.2f} years) is within {UNDERFIT_YEARS} of the "
                f"inner-validation MAE ({val:.2f}): the model fits its training subjects no better than new ones, "
                "so it underfits; regularisation or early stopping would not help, capacity or input detail might."
            )
        else:
            parts.append(
                f"At N = {last} the final training loss ({train_loss:.2f} years) is below the inner-validation MAE "
                f"({val:.2f}) by more than {UNDERFIT_YEARS}: the model overfits, and more data or regularisation helps."
            )
    native, grid = mean("yardstick_mae_native", last), mean("yardstick_mae_model_grid", last)
    model_grid = next((r.get("grid") for r in rows if r["n_subjects"] == last and r.get("grid")), None)
    grid_text = "×".join(str(g) for g in model_grid) if model_grid else "its"
    if native is not None and grid is not None:
        if native < mae_last:
            parts.append(
                f"A ridge regression on the true-mask region means reads age better at the simulated grid "
                f"({native:.2f}) than the CNN does at its {grid_text} model grid ({mae_last:.2f}; the same ridge at "
                f"the model grid: {grid:.2f}): at this N the grid, not the number of subjects, limits the model. "
                "A UK Biobank run should therefore train at a finer grid (the native resolution where memory "
                "allows) with wider layers; that curve needs a GPU and is not measured here."
            )
        else:
            parts.append(
                f"The CNN ({mae_last:.2f}) is at or below the ridge on true-mask region means at both grids "
                f"(model grid {grid:.2f}, native {native:.2f}): a finer grid is not indicated by this yardstick."
            )
    return " ".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """MAE against subjects (log x): each seed, the oracle floor and the yardstick at both grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    ns = sorted({r["n_subjects"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=150)
    ax.scatter([r["n_subjects"] for r in rows], [r["mae"] for r in rows], color="C0", zorder=3, label="CNN, each seed")
    means = [float(np.mean([r["mae"] for r in rows if r["n_subjects"] == n])) for n in ns]
    ax.plot(ns, means, color="C0", lw=1.5)

    def per_n(key: str) -> list[float | None]:
        return [next((r[key] for r in rows if r["n_subjects"] == n and r[key] is not None), None) for n in ns]

    for key, colour, label in (
        ("yardstick_mae_model_grid", "C1", "ridge on true-mask region means, model grid"),
        ("yardstick_mae_native", "C2", "ridge on true-mask region means, native grid"),
        ("oracle_mae", "k", "oracle (planted floor)"),
    ):
        vals = per_n(key)
        pts = [(n, v) for n, v in zip(ns, vals, strict=True) if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=colour, ls="--" if key != "oracle_mae" else ":", lw=1.2, label=label)
    oracle = [(n, v) for n, v in zip(ns, per_n("oracle_mae"), strict=True) if v is not None]
    if oracle:
        xs, ys = zip(*oracle, strict=True)
        ax.plot(xs, [1.15 * y for y in ys], color="0.6", ls=":", lw=1.0, label="1.15 × oracle (goal at N = 3,000)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("subjects in the study (log scale)")
    ax.set_ylabel("out-of-fold MAE (years)")
    ax.set_ylim(bottom=0)
    ax.set_title("Learning curve on the default scenario")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the steps asked for; rewrite the curve's files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="folder for the studies and runs (large: ~1.4 MB per scan)")
    parser.add_argument("--n", default="", help="comma-separated subject counts to run now, e.g. 300,1000")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-arg", action="append", default=[], help="extra argument for bodyage train")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--collect", action="store_true", help="train nothing: rows of every finished run in WORK")
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    # the command as a reader reruns it: the work folder named WORK, no --out (a path of this machine)
    command = " ".join(
        ["python reports/learning_curve.py WORK", f"--seeds {args.seeds}", f"--scenario {args.scenario}"]
        + ([f"--threads {args.threads}"] if args.threads else [])
        + [f"--train-arg={a}" for a in args.train_arg]
    )

    seeds = [int(s) for s in args.seeds.split(",") if s]
    for n in [int(x) for x in args.n.split(",") if x] if not args.collect else []:
        study = ensure_study(work, n, args.scenario)
        for seed in seeds:
            run = work / f"run_{n}_s{seed}"
            train(
                study,
                run,
                seed,
                args.threads,
                args.train_arg,
                f"{command} --n {n}".replace("--seeds " + args.seeds, f"--seeds {seed}"),
            )
            grid = json.loads((run / "run.json").read_text())["arguments"].get("grid")
            ensure_yardstick(study, model_grid_factor(study, grid))

    existing: dict[tuple[int, int], dict[str, Any]] = {}
    path = args.out / "learning_curve.json"
    if path.is_file():
        for r in json.loads(path.read_text()):
            existing[(r["n_subjects"], r["seed"])] = r
    for run in sorted(work.glob("run_*_s*")):
        n_text, seed_text = run.name[len("run_") :].split("_s")
        key = (int(n_text), int(seed_text))
        fresh = row(work, *key)
        if fresh is not None and (key not in existing or not args.collect):
            existing[key] = fresh
        elif key in existing:  # a collected row keeps its numbers; the training logs add what it lacks
            existing[key] = {**dynamics(run), **existing[key]}
    write_outputs(list(existing.values()), args.out)
    for r in sorted(existing.values(), key=lambda r: (r["n_subjects"], r["seed"])):
        print(
            f"N={r['n_subjects']} seed={r['seed']}: MAE {r['mae']:.2f} (oracle {r['oracle_mae']:.2f}, "
            f"ratio {r['mae_ratio']:.2f}); yardstick {r['yardstick_mae_model_grid']} / {r['yardstick_mae_native']}; "
            f"{r['train_minutes']} min, {r['peak_rss_gb']} GB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
