"""Settings and inputs of ``bodyage attribute``: what to run, and the trained run to explain.

:class:`AttributeConfig` holds the methods and their settings (checked by
:func:`check_config` before any work); :func:`load_run_inputs` reads a trained run (its
study, out-of-fold predictions, fold checkpoints and preprocessing cache) into
:class:`RunInputs`; :func:`check_scan_mask` says why a scan cannot be explained by region;
:func:`resolve_layer` picks the GradCAM layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bodyage.attribution import BASELINES, DEFAULT_BASELINE, IG_STEPS, check_methods
from bodyage.errors import InputError, RunError
from bodyage.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from bodyage.preprocess import CacheResult
    from bodyage.regions import LabelTable
    from bodyage.study import Study


@dataclass(frozen=True)
class AttributeConfig:
    """Settings of an attribution run.

    Attributes
    ----------
    methods
        Methods to run (keys of :data:`~bodyage.attribution.METHODS`).
    layer
        GradCAM stage (``block1`` …); ``None``: the one stored with the checkpoint.
    baseline
        Baseline of ``ablation`` and ``shapley``: ``shift``, ``mean``, ``erase`` or ``blur``
        (:data:`~bodyage.region_ops.DEFAULT_BASELINE`, chosen on the development scenario).
    samples
        Shapley permutations.
    ig_steps
        Integration steps of integrated gradients.
    batch_size
        Scans per forward/backward pass.
    seed
        Seed of Shapley sampling, the baseline sample and the sanity randomisation.
    groups
        Also write ``attributions_groups.parquet``.
    save_maps
        Write NIfTI and PNG maps of this many scans.
    figures
        Write the cohort figures.
    """

    methods: tuple[str, ...] = ("gradcam", "ablation")
    layer: str | None = None
    baseline: str = DEFAULT_BASELINE
    samples: int = 25
    ig_steps: int = IG_STEPS
    batch_size: int = 8
    seed: int = 0
    groups: bool = False
    save_maps: int = 0
    figures: bool = True

    def method_settings(self, method: str) -> dict[str, Any]:
        """The settings a method's results depend on (hashed into its parts folder)."""
        if method == "gradcam":
            return {"layer": self.layer}
        if method == "integrated_gradients":
            return {"ig_steps": self.ig_steps, "baseline": "zeros"}
        if method == "ablation":
            return {"baseline": self.baseline}
        return {"baseline": self.baseline, "samples": self.samples, "seed": self.seed}


def check_config(cfg: AttributeConfig) -> AttributeConfig:
    """Validate options before any work; returns the config with methods normalised.

    Raises
    ------
    InputError
        Naming the option at fault.
    """
    methods = tuple(check_methods(cfg.methods))
    if cfg.baseline not in BASELINES:
        raise InputError(f"--baseline must be one of {', '.join(BASELINES)}; {cfg.baseline!r} was provided")
    if cfg.samples < 1:
        raise InputError(f"--samples must be at least 1, got {cfg.samples}")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.save_maps < 0:
        raise InputError(f"--save-maps must be 0 or more, got {cfg.save_maps}")
    if cfg.ig_steps < 2:
        raise InputError(f"--ig-steps must be at least 2, got {cfg.ig_steps}")
    return AttributeConfig(**{**asdict(cfg), "methods": methods})


# ----------------------------------------------------------------------------- inputs


@dataclass
class RunInputs:
    """A run's study, predictions, cache and fold models, ready to explain scans."""

    run: Path
    study: Study
    predictions: pd.DataFrame
    cache: CacheResult
    hparams: dict[int, dict[str, Any]]
    model_files: dict[int, Path]
    labels: LabelTable | None
    failures: list[dict[str, str]]


def load_run_inputs(
    run_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress = NO_PROGRESS,
) -> RunInputs:
    """Read a trained run: its study (from ``run.json``), predictions, fold checkpoints and cache.

    Raises
    ------
    RunError
        If the run folder, ``run.json``, ``predictions.parquet`` or a fold model is missing.
    """
    from bodyage.preprocess import PreprocessSettings, build_cache
    from bodyage.study import load_study
    from bodyage.train import load_fold_model

    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: run folder not found")
    rec_path = run / "run.json"
    if not rec_path.is_file():
        raise RunError(f"{rec_path}: not found (is {run} a run folder made by `bodyage train`?)")
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunError(f"{rec_path}: not valid JSON ({err.msg})") from err
    study_path = record.get("study") or (record.get("arguments") or {}).get("study")
    if not study_path:
        raise RunError(f"{rec_path}: records no study path")
    pred_path = run / "predictions.parquet"
    if not pred_path.is_file():
        raise RunError(f"{pred_path}: not found; run `bodyage train` to the end first")
    preds = pd.read_parquet(pred_path)
    preds["subject_id"] = preds["subject_id"].astype(str)
    preds["visit"] = preds["visit"].astype(int)
    folds = sorted(int(f) for f in preds["fold"].unique())
    files = {k: run / "models" / f"fold{k}.pt" for k in folds}
    hps: dict[int, dict[str, Any]] = {}
    for k, f in files.items():
        if not f.is_file():
            raise RunError(f"{f}: fold model not found; run `bodyage train` to the end first")
        _, hps[k] = load_fold_model(f)
    hp0 = hps[folds[0]]
    channels = tuple(hp0["channels"])
    study = load_study(study_path, channels=channels)
    pp = hp0.get("preprocess") or {}
    settings = PreprocessSettings(
        grid=(int(hp0["grid"][0]), int(hp0["grid"][1]), int(hp0["grid"][2])),
        channels=channels,
        **{k: v for k, v in pp.items() if k not in ("grid", "channels")},
    )
    keys = preds["subject_id"] + "_" + preds["visit"].astype(str)
    preds = preds.assign(scan_id=keys.to_numpy())
    known = set(study.cohort["scan_id"])
    failures: list[dict[str, str]] = []
    for sid in sorted(set(preds["scan_id"]) - known):
        failures.append({"scan_id": sid, "stage": "attribute", "reason": "predicted by train but not in cohort.csv"})
    preds = preds[preds["scan_id"].isin(known)].reset_index(drop=True)
    if cache_dir is None and record.get("arguments", {}).get("cache"):
        cache_dir = record["arguments"]["cache"]
    cache = build_cache(study, settings, cache_root=cache_dir, scan_ids=list(preds["scan_id"]), progress=progress)
    for fail in cache.failures.to_dict("records"):
        failures.append({"scan_id": str(fail["scan_id"]), "stage": "attribute", "reason": str(fail["reason"])})
    return RunInputs(
        run=run,
        study=study,
        predictions=preds,
        cache=cache,
        hparams=hps,
        model_files=files,
        labels=study.labels,
        failures=failures,
    )


def check_scan_mask(inputs: RunInputs, scan_id: str, n_labels: int) -> str | None:
    """The reason a scan cannot be explained by region (``None`` when it can)."""
    if inputs.labels is None:
        return f"the mask has no label table ({inputs.study.root / 'labels.json'} is missing)"
    cs = inputs.cache.scans[scan_id]
    if cs.mask is None:
        return "no mask (run `bodyage segment` first)"
    mask = cs.load_mask()
    if tuple(mask.shape) != tuple(cs.load().shape[1:]):
        return f"mask grid {tuple(mask.shape)} does not match the image grid {tuple(cs.load().shape[1:])}"
    ids = np.unique(mask)
    unknown = [int(i) for i in ids if i != 0 and (i >= n_labels or int(i) not in inputs.labels.names)]
    if unknown:
        return f"mask label ids {unknown[:5]} are not in the label table labels.json"
    return None


def resolve_layer(model: nn.Module, layer: str | None, hparams: dict[str, Any]) -> str:
    """The GradCAM layer: ``layer``, else the model registry's ``default_layer``, checked against the model.

    The registry, not the checkpoint's recorded default, decides: the default was chosen
    on evidence after some runs were trained.
    """
    from bodyage.models import MODELS, get_layer

    spec = MODELS.get(str(hparams.get("model")))
    name = layer or (spec.default_layer if spec is not None else str(hparams.get("default_layer") or "block1"))
    get_layer(model, name)
    return name
