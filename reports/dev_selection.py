"""Choose the attribution defaults on the development scenario; write ``docs/results/dev_selection.json``.

Usage: python reports/dev_selection.py --work DIR [--folds 5] [--epochs 40] [--seed 0] [--subjects N]
                                       [--layers block1,block2,block3,block4]
                                       [--baselines shift,mean,erase,blur] [--scans 120]
                                       [--out docs/results/dev_selection.json]

The defaults of ``bodyage attribute`` (GradCAM's layer and region measure, ablation's
baseline) are chosen on ``--scenario dev`` (another seed, other planted regions and effect
types) and reported on ``default`` (``reports/attribution_seeds.py``), so that no headline
number is scored on the scenario its settings were tuned on. This script:

1. ``bodyage simulate WORK/study --scenario dev`` (kept when it exists);
2. ``bodyage train WORK/study --run WORK/run`` with ``--folds``/``--epochs``/``--seed``
   (resumable, ``--threads 1``);
3. explains one seeded sample of ``--scans`` scans (the nulls' sampling,
   :func:`bodyage.nulls.sample_scans`) with every candidate, through the library call of
   ``bodyage attribute`` (:func:`bodyage.attribute.attribute_run`, which the command line
   has no scan-subset option for): GradCAM once per layer, scored with every region measure
   of ``attributions.parquet``; ablation once per baseline, scored by mean ``|mass|`` (the
   measure docs/design.md §6 fixes for region-level methods);
4. scores each ranking against the dev truth as ``recovery.json`` does
   (:func:`analysis.recovery.region_importance` and :func:`analysis.recovery.method_recovery`:
   precision@k, k = regions with planted information, and Spearman with
   ``region_information``) and records the dev floors beside them.

The chosen candidate per setting is the highest precision@k, ties broken by Spearman, then
in favour of today's default (a change needs evidence). The JSON records every candidate,
the choice, today's default, the version, git revision, CPU model, load and the commands;
no machine paths. Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provenance import cpu_model, load_average, neutral_command, revision, utc_minute, write_json

#: GradCAM region measures scored (columns of attributions.parquet; abs_mass is the mean of |mass|)
GRADCAM_MEASURES: tuple[str, ...] = ("abs_mass", "share", "enrichment", "density", "abs_density")


def machine() -> dict[str, Any]:
    """CPU model and count (lscpu), OpenMP threads, load average: what the timings were measured on."""
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": load_average(1),
    }


@contextmanager
def recorded(steps: list[dict[str, Any]], name: str, command: str) -> Iterator[None]:
    """Time the block; when it returns, add it to ``steps`` with its wall minutes and the load before and after."""
    load0, started, t0 = load_average(1), utc_minute(), time.perf_counter()
    yield
    steps.append(
        {
            "step": name,
            "command": command,
            "minutes": round((time.perf_counter() - t0) / 60.0, 2),
            "load_start": load0,
            "load_end": load_average(1),
            "started": started,
        }
    )


def timed(cmd: list[str], steps: list[dict[str, Any]], name: str) -> None:
    """Run a ``bodyage`` command (``OMP_NUM_THREADS=1``), recording its wall time and load; stop on failure."""
    exe = str(Path(sys.executable).with_name("bodyage"))
    with recorded(steps, name, "bodyage " + " ".join(cmd)):
        rc = subprocess.call([exe, *cmd], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc != 0:
        raise SystemExit(f"bodyage {' '.join(cmd)} failed (exit {rc})")


def earlier_steps(path: Path | None, names: dict[str, str], keep: set[str]) -> list[dict[str, Any]]:
    """Steps run before this script (JSON lines: ``name``, ``command``, ``wall_min``, loads), paths renamed.

    Only the steps named in ``keep`` are read.

    ``names`` maps machine paths to the neutral names the record uses (e.g. the work folder
    to ``dev``), so the JSON carries no machine path.
    """
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["name"] not in keep:
            continue
        out.append(
            {
                "step": rec["name"],
                "command": neutral_command(rec["command"], names),
                "minutes": rec["wall_min"],
                "load_start": rec["load_start"],
                "load_end": rec["load_end"],
                "started": rec.get("started"),
            }
        )
    return out


def append_steps(path: Path | None, steps: list[dict[str, Any]]) -> None:
    """Add steps this invocation ran to the ``--steps-log`` (read back by :func:`earlier_steps`)."""
    if path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        for s in steps:
            rec = {"name": s["step"], "command": s["command"], "wall_min": s["minutes"]}
            rec.update({"load_start": s["load_start"], "load_end": s["load_end"], "started": s.get("started")})
            f.write(json.dumps(rec) + "\n")


def pick(cands: list[dict[str, Any]], default: dict[str, Any]) -> dict[str, Any]:
    """The best candidate: precision@k, then Spearman, then today's default."""

    def key(c: dict[str, Any]) -> tuple[float, float, int]:
        sp = c["spearman"] if c["spearman"] == c["spearman"] else -2.0
        is_default = all(c.get(k) == v for k, v in default.items())
        return (c["precision_at_k"], sp, int(is_default))

    return max(cands, key=key)


def score_candidates(run: Path, study: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Attribute the sample with every candidate; score each ranking against the dev truth."""
    import pandas as pd
    import torch

    from analysis.recovery import method_recovery, read_truth, region_effects, region_importance
    from bodyage.attribute import AttributeConfig, attribute_run, load_run_inputs
    from bodyage.attribution import METHODS
    from bodyage.models import MODELS
    from bodyage.nulls import sample_scans

    torch.set_num_threads(1)
    truth = read_truth(study)
    if truth is None:
        raise SystemExit("the dev study has no truth.json")
    info = {str(k): float(v) for k, v in truth["region_information"].items()}
    effects = region_effects(truth)
    inputs = load_run_inputs(run)
    scans = sample_scans(list(inputs.predictions["scan_id"]), args.scans, args.seed)

    def scored(method: str, measure: str, table: pd.DataFrame) -> dict[str, Any]:
        imp = region_importance(table, method, measure)["mean"]
        rec = method_recovery(imp, info, effects)
        return {
            "precision_at_k": rec["precision_at_k"],
            "spearman": rec["spearman"],
            "k": rec["k"],
            "top_regions": rec["top_regions"],
            "by_effect": rec["by_effect"],
        }

    gradcam: list[dict[str, Any]] = []
    ablation: list[dict[str, Any]] = []
    floors: dict[str, Any] | None = None
    minutes: dict[str, float] = {}
    for layer in args.layers:
        t0 = time.perf_counter()
        attribute_run(run, AttributeConfig(methods=("gradcam",), layer=layer, figures=False), scan_ids=scans)
        minutes[f"gradcam {layer}"] = round((time.perf_counter() - t0) / 60.0, 2)
        table = pd.read_parquet(run / "attributions.parquet")
        for measure in GRADCAM_MEASURES:
            gradcam.append({"layer": layer, "measure": measure, **scored("gradcam", measure, table)})
        if floors is None:
            rec = json.loads((run / "attribution_recovery.json").read_text(encoding="utf-8"))
            entry = rec["methods"]["gradcam"]
            floors = {"floors": entry.get("floors"), "floor_max": entry.get("floor_max")}
    for baseline in args.baselines:
        t0 = time.perf_counter()
        attribute_run(run, AttributeConfig(methods=("ablation",), baseline=baseline, figures=False), scan_ids=scans)
        minutes[f"ablation {baseline}"] = round((time.perf_counter() - t0) / 60.0, 2)
        table = pd.read_parquet(run / "attributions.parquet")
        ablation.append({"baseline": baseline, **scored("ablation", "abs_mass", table)})

    model_name = json.loads((run / "run.json").read_text(encoding="utf-8"))["arguments"]["model"]
    default_gc = {"layer": MODELS[model_name].default_layer, "measure": METHODS["gradcam"].importance_measure}
    default_abl = {"baseline": AttributeConfig().baseline}
    best_gc, best_abl = pick(gradcam, default_gc), pick(ablation, default_abl)
    return {
        "n_scans": len(scans),
        "k": gradcam[0]["k"] if gradcam else None,
        "planted_regions": sorted(r for r, v in info.items() if v > 0),
        "floors": floors,
        "gradcam": {
            "candidates": gradcam,
            "default_before": default_gc,
            "chosen": {"layer": best_gc["layer"], "measure": best_gc["measure"]},
            "changed": {"layer": best_gc["layer"], "measure": best_gc["measure"]} != default_gc,
        },
        "ablation": {
            "candidates": ablation,
            "default_before": default_abl,
            "chosen": {"baseline": best_abl["baseline"]},
            "changed": best_abl["baseline"] != default_abl["baseline"],
        },
        "attribute_minutes": minutes,
    }


def study_size(study: Path) -> dict[str, Any]:
    """The dev study's subjects, scans and scenario seed, from its ``study.json`` (``None`` where it does not say)."""
    record = json.loads((study / "study.json").read_text(encoding="utf-8"))
    args = record.get("arguments") or {}
    command = f"bodyage simulate dev/study --scenario {args.get('scenario', 'dev')}"
    if args.get("subjects") is not None:
        command += f" --subjects {args['subjects']}"
    return {
        "subjects": record.get("n_subjects"),
        "study_scans": record.get("n_scans"),
        "scenario_seed": record.get("seed"),
        "simulate_command": command,
    }


def with_margins(res: dict[str, Any]) -> dict[str, Any]:
    """Add what the page says of the choice: the chosen candidate's margin over the old default, and the floor.

    Per method: ``best_precision`` (the chosen candidate's precision@k), ``default_precision``
    (the old default's), ``margin_regions`` (their difference in planted regions, k x the
    difference) and ``reaches_floor`` (the chosen precision@k at least the best model-free floor
    of the dev study, ``floor_max``).
    """
    k = res.get("k") or 0
    floor_max = (res.get("floors") or {}).get("floor_max")
    for method, keys in (("gradcam", ("layer", "measure")), ("ablation", ("baseline",))):
        entry = res.get(method)
        if not entry:
            continue

        def precision(setting: dict[str, Any], keys: tuple[str, ...] = keys, entry: dict[str, Any] = entry) -> Any:
            match = [c for c in entry["candidates"] if all(c.get(key) == setting.get(key) for key in keys)]
            return match[0]["precision_at_k"] if match else None

        best, before = precision(entry["chosen"]), precision(entry["default_before"])
        entry["best_precision"], entry["default_precision"] = best, before
        entry["margin_regions"] = round((best - before) * k) if best is not None and before is not None else None
        entry["floor_max"] = floor_max
        entry["reaches_floor"] = None if best is None or floor_max is None else best >= floor_max
    return res


def tables(res: dict[str, Any]) -> dict[str, Any]:
    """The docs' tables ({"columns", "rows"}): one for GradCAM (layer x measure), one for the baselines."""
    measures = list(GRADCAM_MEASURES)
    by = {(c["layer"], c["measure"]): c for c in res["gradcam"]["candidates"]}
    layers = list(dict.fromkeys(c["layer"] for c in res["gradcam"]["candidates"]))
    chosen_gc = res["gradcam"]["chosen"]

    def cell(c: dict[str, Any], chosen: bool) -> str:
        txt = f"{c['precision_at_k']:.2f} (ρ {c['spearman']:.2f})"
        return f"**{txt}**" if chosen else txt

    gc_rows = [
        [f"`{layer}`"]
        + [
            cell(by[(layer, m)], chosen_gc == {"layer": layer, "measure": m}) if (layer, m) in by else "–"
            for m in measures
        ]
        for layer in layers
    ]
    abl_rows = [
        [
            f"`{c['baseline']}`" + (" (chosen)" if c["baseline"] == res["ablation"]["chosen"]["baseline"] else ""),
            f"{c['precision_at_k']:.2f}",
            f"{c['spearman']:.2f}",
            ", ".join(c["top_regions"]),
        ]
        for c in res["ablation"]["candidates"]
    ]
    floor_rows = [[name, f"{v:.2f}"] for name, v in ((res.get("floors") or {}).get("floors") or {}).items()]
    return {
        "gradcam": {"columns": ["layer", *(f"`{m}`" for m in measures)], "rows": gc_rows},
        "ablation": {"columns": ["baseline", "precision@k", "Spearman", "top k regions"], "rows": abl_rows},
        "floors": {"columns": ["model-free floor", "precision@k"], "rows": floor_rows},
    }


def main(argv: list[str] | None = None) -> None:
    """Simulate the dev study, train, attribute every candidate, write the JSON file."""
    from bodyage import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (study, run)")
    ap.add_argument("--study", type=Path, default=None, help="the dev study [default: WORK/study]")
    ap.add_argument("--run", type=Path, default=None, help="the run trained on it [default: WORK/run]")
    # the demo's recipe: 2 folds x 12 epochs left the dev model uninformative (MAE 9.00 vs baseline 8.94)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subjects", type=int, default=None, help="subjects of the dev study [default: the scenario's]")
    ap.add_argument("--layers", default="block1,block2,block3,block4")
    ap.add_argument("--baselines", default="shift,mean,erase,blur")
    ap.add_argument("--scans", type=int, default=120, help="seeded sample of scans every candidate explains")
    ap.add_argument("--out", type=Path, default=Path("docs/results/dev_selection.json"))
    ap.add_argument(
        "--steps-log",
        type=Path,
        default=None,
        help="JSON lines of steps run before ({name, command (list), wall_min, load_start, load_end, started})",
    )
    ap.add_argument("--steps", default="train_dev", help="names of the --steps-log steps to record")
    ap.add_argument(
        "--settings-only",
        action="store_true",
        help="add the dev study's size (study.json) to an existing --out's settings; no training, no scoring",
    )
    args = ap.parse_args(argv)
    args.layers = [s for s in args.layers.split(",") if s]
    args.baselines = [s for s in args.baselines.split(",") if s]

    study, run = args.study or args.work / "study", args.run or args.work / "run"
    if args.settings_only:
        res = json.loads(args.out.read_text(encoding="utf-8"))
        res["settings"] |= study_size(study)
        write_json(args.out, with_margins(res))
        return
    started = utc_minute()
    load_start = load_average(1)
    names = {str(study): "dev/study", str(run): "dev/run"}
    steps = earlier_steps(args.steps_log, names, set(args.steps.split(",")))
    if not (study / "cohort.csv").is_file():
        simulate = ["simulate", str(study), "--scenario", "dev"]
        timed(simulate + (["--subjects", str(args.subjects)] if args.subjects else []), steps, "simulate")
    if not (run / "metrics.json").is_file():
        train = ["train", str(study), "--run", str(run), "--seed", str(args.seed)]
        train += ["--folds", str(args.folds), "--epochs", str(args.epochs), "--threads", "1", "--quiet"]
        timed(train, steps, "train")
    for step in steps:  # no machine paths in the record
        step["command"] = neutral_command(step["command"], names)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    if metrics.get("informative") is False:  # ranking regions of a model that learned no age selects on noise
        raise SystemExit(
            f"error: the dev model is uninformative (out-of-fold MAE {metrics['overall']['mae']:.2f} y vs the "
            f"mean-age baseline's {metrics.get('baseline_mae', float('nan')):.2f} y): no defaults can be chosen on "
            "it; train longer (--folds/--epochs) into a new --run"
        )
    t0 = time.perf_counter()
    res = score_candidates(run, study, args)
    res["settings"] = {
        "scenario": "dev",
        "folds": args.folds,
        "epochs": args.epochs,
        "train_seed": args.seed,
        "layers": args.layers,
        "baselines": args.baselines,
        "gradcam_measures": list(GRADCAM_MEASURES),
        "scans": res.pop("n_scans"),
        **study_size(study),
    }
    res = with_margins(res)
    res["model"] = {
        "mae": metrics["overall"]["mae"],
        "oracle_mae": metrics.get("oracle_mae"),
        "baseline_mae": metrics.get("baseline_mae"),
        "informative": metrics.get("informative"),
    }
    res["tables"] = tables(res)
    res["source"] = {
        "script": "reports/dev_selection.py",
        "command": "OMP_NUM_THREADS=1 python reports/dev_selection.py --work DIR "
        f"--folds {args.folds} --epochs {args.epochs} --seed {args.seed} --layers {','.join(args.layers)} "
        f"--baselines {','.join(args.baselines)} --scans {args.scans}",
        "bodyage_version": __version__,
        "git_revision": revision(),
        "started": started,
        "generated": utc_minute(),
        "machine": {**machine(), "load_average_start": load_start},
        "steps": steps,
        "candidates_minutes": round((time.perf_counter() - t0) / 60.0, 2),
    }
    write_json(args.out, res, indent=1, ensure_ascii=False)
    print(json.dumps({k: res[k] for k in ("model", "gradcam", "ablation")}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
