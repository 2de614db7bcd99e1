"""k-fold training of the 3D CNN age regressor with out-of-fold predictions.

:func:`train_run` is the one call behind ``bodyage train``. For each fold *k* it trains
a model on the other folds (minus an inner validation split of subjects), stops early on
the validation MAE, fits the age-bias correction on the inner-validation predictions and
predicts fold *k*'s scans. Every scan is predicted exactly once, by the model that never
saw its subject.

Resume: after every epoch the fold's state (model, optimiser, scheduler, best model,
history, random states) is written atomically to ``models/fold{k}.partial.pt``; a
finished fold leaves ``models/fold{k}.pt`` and ``models/fold{k}.predictions.parquet``.
Running the same command again skips finished folds and continues an interrupted one at
its last completed epoch; a fold whose checkpoint says it had stopped early is finalised
from its best state without training further, and a corrupt partial checkpoint is
deleted with a warning and its fold trained again.

Divergence: a training loss or inner-validation MAE that becomes NaN or infinite stops
the run with :class:`~bodyage.errors.RunError` naming the fold and epoch, before that
epoch's partial checkpoint is written, so the fold keeps its last good epoch.

The pieces: :mod:`bodyage.train_config` (the options, their checks and the run's hash),
:mod:`bodyage.checkpoints` (fold models and partial checkpoints), :mod:`bodyage.train_data`
(cached scans as tensors, augmentation) and :mod:`bodyage.train_fold` (one fold's epochs).

Scale out: under ``torchrun --nproc_per_node N`` each fold is trained with
DistributedDataParallel (NCCL on GPU, gloo on CPU), each rank taking its share of every
epoch's batches; rank 0 writes all outputs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bodyage.accuracy import prediction_metrics
from bodyage.atomic import remove_stale_temps, write_json, write_with
from bodyage.checkpoints import checkpoint_hparams, load_fold_model
from bodyage.distributed import WorldInfo, world_info
from bodyage.errors import CheckpointError, InputError, RunError, StudyError
from bodyage.folds import BiasCorrection, assign_folds, inner_split
from bodyage.models import MODELS, build_model, check_grid
from bodyage.preprocess import PreprocessSettings, auto_grid, build_cache
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.provenance import build_run_record, finish_run_record, write_record
from bodyage.study import TRUTH_FILE, Study, load_study
from bodyage.train_config import TrainConfig, autocast_dtype, check_config, dtype_name, hash_config
from bodyage.train_config import parse_grid as parse_grid  # re-exported: `from bodyage.train import parse_grid`
from bodyage.train_data import ScanTensors
from bodyage.train_fold import predict, train_fold

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREDICTIONS = "predictions.parquet"
METRICS = "metrics.json"
TRAINING_LOG = "training_log.csv"
FAILURES = "failures.csv"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_run` produced."""

    run: Path
    metrics: dict[str, Any]
    n_scans: int
    n_failed: int
    folds_trained: int
    folds_skipped: int
    minutes: float
    training_dtype: str = "float32"


def _grid_of_first_readable(study: Study, cohort: pd.DataFrame, channel: str) -> tuple[int, int, int]:
    """The automatic grid from the first scan whose image loads (an unreadable one is a failures row later)."""
    from bodyage.volumes import load_volume

    problems = []
    for path in cohort[channel]:
        try:
            return auto_grid(load_volume(study.path(path)).shape)
        except (InputError, StudyError) as err:
            problems.append(str(err))
            if len(problems) >= 20:
                break
    raise StudyError(f"no readable {channel} image among the first {len(problems)} scans: {problems[0]}")


def _check_run_folder(run: Path, config_hash: str) -> None:
    rec = run / RUN_FILE
    if not rec.is_file():
        return
    try:
        old = json.loads(rec.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{rec}: not valid JSON; use a new --run folder") from err
    old_hash = old.get("config_hash")
    if old_hash is not None and old_hash != config_hash:
        raise RunError(
            f"{run}: was started with other settings (config {old_hash}, now {config_hash}); "
            "run again with the same arguments to resume, or choose a new --run folder"
        )


def train_run(
    study_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    progress: Progress = NO_PROGRESS,
    figures: bool = True,
    threads: int | None = None,
) -> TrainResult:
    """Train k fold models and write out-of-fold predictions (docs/design.md §3).

    Parameters
    ----------
    study_dir
        Study folder (``cohort.csv``, images).
    run_dir
        Run folder to write (or resume).
    config
        Training settings (:class:`TrainConfig`).
    device
        ``auto``, ``cpu`` or ``cuda``.
    cache_dir
        Where preprocessed tensors are cached (default ``STUDY/cache``).
    strict
        Stop at the first scan that cannot be preprocessed instead of listing it in
        ``failures.csv``.
    progress
        Progress display.
    figures
        Write learning curves and the predicted-vs-age scatter.
    threads
        CPU threads for torch (default: the machine's cores shared among the processes).

    Raises
    ------
    StudyError, InputError
        For a bad study (missing ages, duplicate keys, ...), bad options, or too few
        subjects for the folds.
    RunError
        If ``run_dir`` holds a run with other settings.
    """
    import torch

    started = time.perf_counter()
    cfg = config or TrainConfig()
    check_config(cfg)
    info = world_info()
    study = load_study(study_dir, channels=cfg.channels)
    run = Path(run_dir)
    dev = _init_distributed(info, device, threads)

    cohort = study.cohort.reset_index(drop=True)
    failures: list[dict[str, str]] = []
    if cfg.exclude_qc:
        from bodyage.qc import excluded_scans

        excluded = excluded_scans(study, cfg.exclude_qc)
        for sid in sorted(excluded & set(cohort["scan_id"])):
            failures.append(
                {"scan_id": sid, "stage": "qc", "reason": f"excluded by --exclude-qc {','.join(cfg.exclude_qc)}"}
            )
        cohort = cohort[~cohort["scan_id"].isin(excluded)].reset_index(drop=True)

    # folds of the whole cohort, before preprocessing failures: a scan's fold does not depend
    # on which other scans fail, so every clock of a study shares the whole-body run's folds
    cohort["fold"] = assign_folds(cohort, cfg.folds, cfg.seed).to_numpy()
    crop = None
    if cfg.regions:
        from bodyage.crop import plan_crop, resolve_regions

        if cfg.grid is not None:
            raise InputError("--grid cannot be combined with --region: the clock's crop sets its grid")
        regions = resolve_regions(cfg.regions, study)
        crop = plan_crop(study, cohort, regions, margin_mm=cfg.crop_margin_mm)
        cfg = replace(cfg, regions=regions, grid=crop.grid)
        if cfg.precision == "auto" and dev.type == "cpu":
            # bfloat16 batch norm on a mostly-zero masked input diverged to NaN within a few
            # epochs (liver clock, default study); a clock's small crop is cheap in float32
            cfg = replace(cfg, precision="fp32")
    grid = cfg.grid
    if grid is None:
        grid = _grid_of_first_readable(study, cohort, cfg.channels[0])
        cfg = replace(cfg, grid=grid)
    check_grid(cfg.model, grid, **cfg.model_kwargs)  # before the run folder exists
    settings = PreprocessSettings(grid=grid, channels=cfg.channels, crop=crop)
    config_hash = hash_config(cfg, study.root, settings)
    if info.is_main:
        _check_run_folder(run, config_hash)
        (run / "models").mkdir(parents=True, exist_ok=True)
        for folder in (run, run / "models", run / "figures"):  # what a killed run left half-written
            remove_stale_temps(folder)
    _barrier(info)

    record = build_run_record(
        "train",
        {"study": str(study.root), "run": str(run), **cfg.to_dict(), "device": device, "strict": strict},
        seed=cfg.seed,
        inputs={"cohort": study.root / "cohort.csv"},
        extra={
            "study": str(study.root.resolve()),
            "config_hash": config_hash,
            "world_size": info.world_size,
            **({"regions": list(cfg.regions), "crop": crop.to_dict()} if crop is not None else {}),
        },
    )
    if info.is_main:
        write_record(run / RUN_FILE, record)

    # preprocessing: rank 0 builds the cache, the others reuse it
    if info.is_main:
        cache = build_cache(study, settings, cache_root=cache_dir, scan_ids=list(cohort["scan_id"]), progress=progress)
    _barrier(info)
    if not info.is_main:
        cache = build_cache(study, settings, cache_root=cache_dir, scan_ids=list(cohort["scan_id"]))
    for f in cache.failures.to_dict("records"):
        if strict:
            raise InputError(f"{f['reason']} (--strict stops at the first bad scan)")
        failures.append({str(k): str(v) for k, v in f.items()})
    cohort = cohort[cohort["scan_id"].isin(list(cache.scans))].reset_index(drop=True)
    if cohort.empty:
        raise StudyError(f"no scan could be preprocessed; the first reason: {failures[0]['reason']}")

    ages = cohort["age"].to_numpy(dtype=float)
    if cfg.permute_ages_seed is not None:
        from bodyage.nulls import permute_ages

        ages = permute_ages(cohort, cfg.permute_ages_seed)  # a permuted-label null model
    data = ScanTensors(cache, list(cohort["scan_id"]))
    training_dtype = dtype_name(autocast_dtype(cfg.precision, dev))
    models_dir = run / "models"
    all_history: list[dict[str, Any]] = []
    trained = skipped = 0
    for k in range(cfg.folds):
        final = models_dir / f"fold{k}.pt"
        fold_pred_file = models_dir / f"fold{k}.predictions.parquet"
        if final.is_file() and fold_pred_file.is_file():
            try:
                _, hp_old = load_fold_model(final, grid=settings.grid, channels=settings.channels)
            except CheckpointError:
                hp_old = {}
            if hp_old.get("config_hash") == config_hash:
                skipped += 1
                log_file = models_dir / f"fold{k}.log.csv"
                if log_file.is_file():
                    all_history += [{str(k): v for k, v in r.items()} for r in pd.read_csv(log_file).to_dict("records")]
                continue
        test = cohort["fold"].to_numpy() == k
        rest = cohort[~test]
        is_val = np.zeros(len(cohort), dtype=bool)
        is_val[np.nonzero(~test)[0]] = inner_split(rest, cfg.val_fraction, cfg.seed + k)
        train_idx = np.nonzero(~test & ~is_val)[0]
        val_idx = np.nonzero(is_val)[0]
        test_idx = np.nonzero(test)[0]
        age_mean = float(ages[train_idx].mean())
        age_sd = float(ages[train_idx].std()) or 1.0
        hp = checkpoint_hparams(
            cfg.model,
            cfg.model_kwargs,
            settings,
            fold=k,
            folds=cfg.folds,
            age_mean=age_mean,
            age_sd=age_sd,
            config_hash=config_hash,
            default_layer=MODELS[cfg.model].default_layer,
            regions=list(cfg.regions),
            crop=crop.to_dict() if crop is not None else None,
        )
        best, history = train_fold(k, cfg, hp, data, ages, train_idx, val_idx, models_dir, dev, info, progress)
        all_history += history
        if info.is_main:
            model = build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs).to(dev)
            model.load_state_dict(best["state_dict"])
            val_pred = predict(model, data, val_idx, dev) * age_sd + age_mean
            bias = BiasCorrection.fit(ages[val_idx], val_pred)
            test_pred = predict(model, data, test_idx, dev) * age_sd + age_mean
            hp.update(
                training_dtype=training_dtype,
                best_epoch=int(best["epoch"]),
                best_val_mae=float(best["val_mae"]),
                bias={"slope": bias.slope, "intercept": bias.intercept, "n": bias.n},
                n_train=len(train_idx),
                n_val=len(val_idx),
                n_test=len(test_idx),
            )
            sub = cohort.iloc[test_idx]
            fold_pred = pd.DataFrame(
                {
                    "subject_id": sub["subject_id"].to_numpy(),
                    "visit": sub["visit"].to_numpy(),
                    "fold": k,
                    "age": ages[test_idx],
                    "predicted_age": test_pred,
                    "age_gap": test_pred - ages[test_idx],
                    "age_gap_corrected": bias.apply(ages[test_idx], test_pred) - ages[test_idx],
                }
            )
            if cfg.permute_ages_seed is not None:  # `age` is the label it was trained on
                fold_pred["true_age"] = sub["age"].to_numpy(dtype=float)
            state = {"state_dict": {kk: v.cpu() for kk, v in best["state_dict"].items()}, "hparams": hp}
            write_with(models_dir / f"fold{k}.log.csv", partial(pd.DataFrame(history).to_csv, index=False))
            write_with(fold_pred_file, partial(fold_pred.to_parquet, index=False))
            write_with(final, partial(torch.save, state))
            (models_dir / f"fold{k}.partial.pt").unlink(missing_ok=True)
        trained += 1
        _barrier(info)

    metrics: dict[str, Any] = {}
    if info.is_main:
        preds = pd.concat([pd.read_parquet(models_dir / f"fold{k}.predictions.parquet") for k in range(cfg.folds)])
        preds = preds.sort_values(["subject_id", "visit"]).reset_index(drop=True)
        write_with(run / "predictions.parquet", lambda p: preds.to_parquet(p, index=False))
        metrics = _metrics(preds, study)
        write_json(run / METRICS, metrics)
        log_df = pd.DataFrame(all_history)
        write_with(run / TRAINING_LOG, lambda p: log_df.to_csv(p, index=False))
        fail_df = pd.DataFrame(failures, columns=["scan_id", "stage", "reason"])
        write_with(run / FAILURES, lambda p: fail_df.to_csv(p, index=False))
        if figures:
            from bodyage.train_figures import learning_curves, predicted_vs_age

            learning_curves(log_df, run / "figures")
            predicted_vs_age(preds, run / "figures", metrics)
        minutes = (time.perf_counter() - started) / 60.0
        write_record(
            run / RUN_FILE,
            finish_run_record(
                record,
                minutes=round(minutes, 2),
                n_scans=len(preds),
                n_failed=len(failures),
                training_dtype=training_dtype,
            ),
        )
    _barrier(info)
    _finish_distributed(info)
    return TrainResult(
        run=run,
        metrics=metrics,
        n_scans=len(cohort),
        n_failed=len(failures),
        folds_trained=trained,
        folds_skipped=skipped,
        minutes=(time.perf_counter() - started) / 60.0,
        training_dtype=training_dtype,
    )


def _metrics(preds: pd.DataFrame, study: Study) -> dict[str, Any]:
    # accuracy beside the mean-age baseline and the informative flag; never the accuracy of
    # the bias-corrected predictions (they use the true age)
    out = prediction_metrics(preds)
    truth = study.root / TRUTH_FILE
    if truth.is_file():
        oracle = float(json.loads(truth.read_text())["oracle_mae"])
        out["oracle_mae"] = oracle
        out["mae_ratio"] = out["overall"]["mae"] / oracle if oracle > 0 else float("nan")
    return out


# ----------------------------------------------------------------------------- torchrun


def _init_distributed(info: WorldInfo, device: str, threads: int | None = None) -> torch.device:
    import torch

    from bodyage.device import resolve_device

    dev = resolve_device(device, info.local_rank)
    if dev.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // info.world_size))
    if info.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def _barrier(info: WorldInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _finish_distributed(info: WorldInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
