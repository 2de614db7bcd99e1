"""``bodyage attribute``: organ-level attribution of a trained run.

:func:`attribute_run` explains every scan of a run with the methods of
:data:`bodyage.attribution.METHODS`, each scan by the fold model that did not train on
its subject, on exactly the tensors training saw (the run's preprocessing cache), and
writes, in ``RUN/``:

- ``attributions.parquet``: one row per scan × method × region (docs/design.md §3): ``fold``,
  ``n_voxels``, ``volume_ml`` (on the model grid), ``mass``, ``abs_mass``, ``share``,
  ``density``, ``enrichment``, ``abs_density``; every value NaN where the region is absent
  from the scan. For ``ablation`` and ``shapley`` ``mass`` is the change in predicted age
  in years; for voxel methods it is the summed map (years × voxels) and ``abs_mass`` the
  size-weighted total of ``|map|``, while ``abs_density`` (abs_mass / n_voxels) is the
  intensive mean ``|map|`` per voxel. ``share`` and ``enrichment`` are relative to the
  segmented body (labels > 0);
- ``attributions_groups.parquet`` (``groups=True``): the same at the level of
  :data:`bodyage.regions.REGION_GROUPS` (members' masses and voxels summed; ``ablation``
  of a multi-member group is a joint ablation of its members, :mod:`bodyage.attribute_groups`);
- ``attribution_stability.csv``: per method and region the importance over the fold
  models (mean, min–max, t-interval; :mod:`bodyage.attribute_stability`), whose rank
  stability (Kendall's W, top-k Jaccard) goes into ``attribution_recovery.json``;
- ``slice_profiles.parquet``: per scan and voxel method, attribution ``mass`` and
  ``abs_mass`` per axial slice, ``z_mm`` from the top of the field of view;
- ``attribution_recovery.json``: per method its ``importance_measure`` and, on a
  simulated study, precision@k, Spearman with the planted information and agreement
  with ``ablation`` (docs/design.md §6);
- ``attribute.json``: provenance; ``failures.csv`` gains the scans that could not be
  explained (stage ``attribute``), next to those of ``train``;
- ``figures/``: cohort figures, and with ``save_maps`` the maps of N scans under
  ``attribute/maps/`` (NIfTI + PNG, named by an anonymous index; ``maps.csv`` maps it to
  the scan).

**Resume.** Each scan × method result is written atomically to
``RUN/attribute/parts/<method>-<fingerprint>/<scan id>.parquet`` (the fingerprint hashes
the checkpoint, label table and the method's settings); a scan with a result is skipped,
so a killed run started again does only the rest, and a method added later reuses the
others. Batches are cut from all of a fold's scans, done or not, so a scan's values do not
depend on where a run was killed. The tables are merged from the parts at the end.

**Scale.** Under ``torchrun --nproc_per_node N`` scans are split by rank; each rank writes
its parts, all meet at a barrier, and rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.atomic import remove_stale_temps, write_json, write_with
from bodyage.attribution import (
    BASELINES,
    COHORT_MEAN_BASELINES,
    IG_STEPS,
    METHODS,
    attribute_batch,
    check_methods,
    label_lookup,
    region_means,
    region_measures,
    scan_values,
    slice_mass,
)
from bodyage.errors import InputError, RunError
from bodyage.nulls import (
    NullConfig,
    Stopwatch,
    check_nulls,
    explain_random_copies,
    null_summary,
    permuted_model,
    remove_null_tables,
    sample_scans,
    write_null_bands,
    write_null_table,
)
from bodyage.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from bodyage.preprocess import CacheResult
    from bodyage.regions import LabelTable
    from bodyage.study import Study

log = logging.getLogger(__name__)

ATTRIBUTIONS = "attributions.parquet"
GROUP_ATTRIBUTIONS = "attributions_groups.parquet"
SLICE_PROFILES = "slice_profiles.parquet"
RECOVERY = "attribution_recovery.json"
RECORD = "attribute.json"
SANITY = "sanity.json"
FAILURES = "failures.csv"
STATE_DIR = "attribute"
#: scans whose region means make the cohort means of the shift and mean baselines (a seeded sample on big cohorts)
BASELINE_SCANS = 500
ATTRIBUTION_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "method",
    "region",
    "fold",
    "n_voxels",
    "volume_ml",
    "mass",
    "abs_mass",
    "share",
    "density",
    "enrichment",
    "abs_density",
)
SLICE_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "fold", "method", "z_index", "z_mm", "mass", "abs_mass")
FAILURE_COLUMNS: tuple[str, ...] = ("scan_id", "stage", "reason")


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
        Baseline of ``ablation`` and ``shapley``: ``shift``, ``mean``, ``erase`` or ``blur``.
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
    baseline: str = "shift"
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


@dataclass(frozen=True)
class AttributeResult:
    """What :func:`attribute_run` did."""

    run: Path
    methods: tuple[str, ...]
    layer: str
    n_scans: int
    n_new: int
    n_skipped: int
    n_failed: int
    recovery: dict[str, Any] = field(default_factory=dict)
    sanity: dict[str, Any] | None = None
    minutes: float = 0.0
    merged: bool = True
    #: per method and null kind: regions above the null band, of all regions (:func:`bodyage.nulls.null_summary`)
    nulls: dict[str, Any] | None = None
    #: wall and CPU seconds of the trained attribution and of each null (``attribute.json``: ``cost``)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)

    def line(self) -> str:
        """One-line summary for the command line."""
        if not self.merged:
            return f"rank done: {self.n_new} new, {self.n_skipped} reused"
        parts = [
            f"{self.n_scans} scans x {', '.join(self.methods)} (layer {self.layer}): "
            f"{self.n_new} new, {self.n_skipped} reused, {self.n_failed} in failures.csv; {self.minutes:.1f} min"
        ]
        rec = self.recovery.get("methods", {})
        for m, r in rec.items():
            if r.get("precision_at_k") is not None:
                parts.append(
                    f"{m}: precision@{r['k']} {r['precision_at_k']:.3f} ({r['importance_measure']}), "
                    f"Spearman vs ablation {_fmt(r.get('agreement_with_ablation'))}"
                )
        for m, by_kind in (self.nulls or {}).items():
            above = ", ".join(f"{v['above']}/{v['regions']} above the {k} band" for k, v in by_kind.items())
            parts.append(f"nulls {m}: {above}")
        return "; ".join(parts)


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.2f}"


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


# ----------------------------------------------------------------------------- helpers


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def part_dir(run: Path, method: str, fingerprint: str) -> Path:
    """Folder of one method's per-scan results."""
    return run / STATE_DIR / "parts" / f"{method}-{fingerprint}"


def method_fingerprint(cfg: AttributeConfig, method: str, hparams: dict[int, dict[str, Any]], labels: Any) -> str:
    """Hash of what a method's results depend on: checkpoints, label table, its settings."""
    ck = {k: hp.get("config_hash") for k, hp in sorted(hparams.items())}
    return _hash({"method": method, "settings": cfg.method_settings(method), "checkpoints": ck, "labels": labels})


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


def voxel_ml(affine: npt.NDArray[np.float64]) -> float:
    """Volume of one voxel of ``affine`` in ml."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def z_positions(affine: npt.NDArray[np.float64], nz: int) -> npt.NDArray[np.float64]:
    """Distance (mm) of each axial slice centre below the top slice of the field of view (RAS+ grid)."""
    step = float(np.linalg.norm(np.asarray(affine)[:3, 2]))
    sup = float(np.asarray(affine)[2, 2]) >= 0  # z index grows towards the head in RAS+
    k = np.arange(nz, dtype=float)
    return ((nz - 1 - k) if sup else k) * step


def cohort_means(inputs: RunInputs, scan_ids: Sequence[str], n_labels: int, seed: int) -> torch.Tensor:
    """``(n_labels, C)`` mean intensity per region and channel over (a seeded sample of) the cohort."""
    import torch

    ids = list(scan_ids)
    if len(ids) > BASELINE_SCANS:
        rng = np.random.default_rng(seed)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), BASELINE_SCANS, replace=False))]
    acc: torch.Tensor | None = None
    for sid in ids:
        cs = inputs.cache.scans[sid]
        x = torch.from_numpy(np.asarray(cs.load(), dtype=np.float32))[None]
        lab = torch.from_numpy(np.asarray(cs.load_mask(), dtype=np.int64))[None].clamp(max=n_labels - 1)
        part = region_means(x, lab, n_labels)
        acc = part if acc is None else acc + part
    if acc is None:
        raise RunError("no scan to compute the cohort means of the ablation baseline from")
    counts = acc[:, -1:].clamp(min=1)
    return (acc[:, :-1] / counts).float()


# ----------------------------------------------------------------------------- one batch


def _scan_frames(
    method: str,
    sub: pd.DataFrame,
    values: dict[str, npt.NDArray[np.float64]],
    ids: npt.NDArray[np.int64],
    names: list[str],
    vml: npt.NDArray[np.float64],
) -> list[pd.DataFrame]:
    """One long region table per scan of a batch."""
    m = region_measures(values["mass"][:, ids], values["abs_mass"][:, ids], values["count"][:, ids], vml)
    out = []
    for i in range(len(sub)):
        row = sub.iloc[i]
        df = pd.DataFrame(
            {
                "subject_id": str(row["subject_id"]),
                "visit": int(row["visit"]),
                "method": method,
                "region": names,
                "fold": int(row["fold"]),
                **{c: m[c][i] for c in ATTRIBUTION_COLUMNS[5:]},
            }
        )
        out.append(df)
    return out


def _slice_frames(
    method: str, sub: pd.DataFrame, maps: torch.Tensor, z_mm: list[npt.NDArray[np.float64]]
) -> list[pd.DataFrame]:
    prof = slice_mass(maps)
    absprof = slice_mass(maps.abs())
    out = []
    for i in range(len(sub)):
        row = sub.iloc[i]
        nz = prof.shape[1]
        out.append(
            pd.DataFrame(
                {
                    "subject_id": str(row["subject_id"]),
                    "visit": int(row["visit"]),
                    "fold": int(row["fold"]),
                    "method": method,
                    "z_index": np.arange(nz),
                    "z_mm": z_mm[i],
                    "mass": prof[i],
                    "abs_mass": absprof[i],
                }
            )
        )
    return out


def _write_part(path: Path, regions: pd.DataFrame, slices: pd.DataFrame | None) -> None:
    if slices is not None:
        write_with(path.with_suffix(".slices.parquet"), partial(slices.to_parquet, index=False))
    write_with(path, partial(regions.to_parquet, index=False))  # last: marks the scan done


def explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    methods: Sequence[str],
    *,
    cfg: AttributeConfig,
    layer: str,
    n_labels: int,
    age_sd: float,
    means: torch.Tensor | None,
) -> dict[str, Any]:
    """Run each method on one batch; returns ``{method: BatchAttribution}``."""
    import torch

    from bodyage.models import get_layer

    out: dict[str, Any] = {}
    for method in methods:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # Shapley permutations: the same for a scan alone or in a batch
        try:
            out[method] = attribute_batch(
                method,
                model,
                x,
                labels,
                n_labels=n_labels,
                age_sd=age_sd,
                layer=get_layer(model, layer),
                baseline=cfg.baseline,
                cohort_means=means,
                samples=cfg.samples,
                ig_steps=cfg.ig_steps,
            )
        finally:
            torch.random.set_rng_state(gen_state)
    return out


# ----------------------------------------------------------------------------- the step


def attribute_run(
    run_dir: str | os.PathLike[str],
    config: AttributeConfig | None = None,
    *,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    sanity: bool = False,
    sanity_scans: int = 16,
    runs: Sequence[str | os.PathLike[str]] = (),
    nulls: NullConfig | None = None,
    scan_ids: Sequence[str] | None = None,
    progress: Progress = NO_PROGRESS,
) -> AttributeResult:
    """Explain every scan of a trained run; write the attribution tables (module docstring).

    Parameters
    ----------
    run_dir
        Run folder made by ``bodyage train``.
    config
        Methods and their settings (:class:`AttributeConfig`).
    device
        ``auto``, ``cpu`` or ``cuda``.
    cache_dir
        Preprocessing cache (default: the one training used).
    sanity
        Also run the model-randomisation check and write ``sanity.json``.
    sanity_scans
        Scans in the sanity check's sample.
    runs
        Other training runs (seeds) of the same study, already attributed: region
        importance with intervals over runs -> ``attribution_stability_runs.csv`` and
        ``run_stability`` in ``attribution_recovery.json``.
    nulls
        Also explain the scans under null models (:mod:`bodyage.nulls`) and write
        ``attributions_null.parquet`` and ``attribution_nulls.csv``.
    scan_ids
        Explain only these scans (the nulls' sample; ``None``: every scan).
    progress
        Progress display.

    Returns
    -------
    AttributeResult

    Raises
    ------
    RunError
        Missing run outputs, or no scan could be explained (after ``failures.csv``).
    InputError, CheckpointError
        Bad options or checkpoints.
    """
    import torch

    from bodyage.device import resolve_device
    from bodyage.distributed import shard, world_info
    from bodyage.provenance import build_run_record, finish_run_record, write_record
    from bodyage.segment import rank_group
    from bodyage.train import load_fold_model

    started = time.perf_counter()
    cfg = check_config(config or AttributeConfig())
    world = world_info()
    if nulls is not None:
        check_nulls(nulls, world.world_size)
    dev = resolve_device(device, world.local_rank)
    inputs = load_run_inputs(run_dir, cache_dir=cache_dir, progress=progress if world.is_main else NO_PROGRESS)
    run = inputs.run
    label_names = dict(inputs.labels.names) if inputs.labels is not None else {}
    ids, names, n_labels = label_lookup(label_names) if label_names else (np.zeros(0, np.int64), [], 1)
    folds = sorted(inputs.model_files)
    probe, hp_probe = load_fold_model(inputs.model_files[folds[0]])
    layer = resolve_layer(probe, cfg.layer, hp_probe)
    cfg = AttributeConfig(**{**asdict(cfg), "layer": layer})
    fps = {m: method_fingerprint(cfg, m, inputs.hparams, label_names) for m in cfg.methods}

    record = build_run_record(
        "attribute",
        {
            "run": run,
            **asdict(cfg),
            "device": device,
            "sanity": sanity,
            "sanity_scans": sanity_scans,
            "runs": [str(r) for r in runs],
            "nulls": asdict(nulls) if nulls is not None else None,
        },
        seed=cfg.seed,
        inputs={"predictions": run / "predictions.parquet"},
        extra={
            "study": str(inputs.study.root.resolve()),
            "fingerprints": fps,
            "world_size": world.world_size,
            "methods": {m: asdict(METHODS[m]) for m in cfg.methods},
            "importance_measure": {m: METHODS[m].importance_measure for m in cfg.methods},
        },
    )

    # scans this run can explain, and the reason for the others
    preds = inputs.predictions
    cached = preds[preds["scan_id"].isin(list(inputs.cache.scans))].reset_index(drop=True)
    failures = list(inputs.failures)
    ok_rows = []
    for i, sid in enumerate(cached["scan_id"]):
        reason = check_scan_mask(inputs, sid, n_labels)
        if reason is None:
            ok_rows.append(i)
        else:
            failures.append({"scan_id": sid, "stage": "attribute", "reason": reason})
    todo = cached.iloc[ok_rows].sort_values(["fold", "scan_id"]).reset_index(drop=True)
    if scan_ids is not None:
        todo = todo[todo["scan_id"].isin(set(scan_ids))].reset_index(drop=True)
    null_ids: list[str] = []
    clock = Stopwatch()  # the cost of the nulls beside the trained attribution's (attribute.json: cost)
    if nulls is not None:
        null_ids = sample_scans(list(todo["scan_id"]), nulls.scans, cfg.seed)
        if nulls.permuted:  # an ordinary run folder, trained and attributed like this run (resumable)
            with clock.time("permuted_train"):
                null_run = permuted_model(
                    run, device=device, cache_dir=cache_dir, folds=nulls.permuted_folds, progress=progress
                )
            null_cfg = AttributeConfig(**{**asdict(cfg), "figures": False, "save_maps": 0, "groups": False})
            with clock.time("permuted_attribute"):
                attribute_run(
                    null_run, null_cfg, device=device, cache_dir=cache_dir, scan_ids=null_ids, progress=progress
                )
    for m in cfg.methods:
        part_dir(run, m, fps[m]).mkdir(parents=True, exist_ok=True)
    # what a killed run left half-written (only files of processes that no longer run)
    for folder in (run, run / "figures", run / STATE_DIR / "maps", *(part_dir(run, m, fps[m]) for m in cfg.methods)):
        remove_stale_temps(folder)

    means = None
    if any(METHODS[m].level == "region" for m in cfg.methods) and cfg.baseline in COHORT_MEAN_BASELINES and len(todo):
        means = cohort_means(inputs, list(todo["scan_id"]), n_labels, cfg.seed).to(dev)

    mine = todo.iloc[shard(list(range(len(todo))), world)].reset_index(drop=True)
    n_new = n_skipped = 0
    clock.start()
    with rank_group(world) as barrier:
        bar = progress.task("attribute", len(mine))
        for k in folds:
            fold_rows = mine[mine["fold"] == k]
            pending = {
                m: {sid for sid in fold_rows["scan_id"] if not (part_dir(run, m, fps[m]) / f"{sid}.parquet").is_file()}
                for m in cfg.methods
            }
            need = sorted(set().union(*pending.values())) if pending else []
            n_skipped += len(fold_rows) - len(need)
            bar.advance(len(fold_rows) - len(need))
            if not need:
                continue
            model, hp = load_fold_model(inputs.model_files[k], device=dev)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            age_sd = float(hp["age_sd"])
            # batches are cut from all of the fold's scans, done or not, so a resumed run
            # explains each scan in the same batch as an uninterrupted one: bit-identical
            # values (convolution kernels round differently by batch size, ~1e-7 years)
            for start in range(0, len(fold_rows), cfg.batch_size):
                sub = fold_rows.iloc[start : start + cfg.batch_size]
                sids = list(sub["scan_id"])
                if not any(s in pending[m] for m in cfg.methods for s in sids):
                    continue
                scans = [inputs.cache.scans[s] for s in sids]
                x = torch.from_numpy(np.stack([np.asarray(c.load(), dtype=np.float32) for c in scans])).to(dev)
                lab = torch.from_numpy(np.stack([np.asarray(c.load_mask(), dtype=np.int64) for c in scans])).to(dev)
                vml = np.array([voxel_ml(c.affine) for c in scans])
                zmm = [z_positions(c.affine, x.shape[-1]) for c in scans]
                methods = [m for m in cfg.methods if any(s in pending[m] for s in sids)]
                results = explain_batch(
                    model, x, lab, methods, cfg=cfg, layer=layer, n_labels=n_labels, age_sd=age_sd, means=means
                )
                for m, res in results.items():
                    vals = scan_values(res, lab, n_labels)
                    frames = _scan_frames(m, sub, vals, ids, names, vml)
                    slice_parts = _slice_frames(m, sub, res.maps, zmm) if res.maps is not None else None
                    for i, sid in enumerate(sids):
                        if sid not in pending[m]:
                            continue
                        df = frames[i]
                        for key, arr in res.check.items():
                            df[key] = float(arr[i])
                        _write_part(
                            part_dir(run, m, fps[m]) / f"{sid}.parquet",
                            df,
                            slice_parts[i] if slice_parts is not None else None,
                        )
                n_done = sum(any(s in pending[m] for m in cfg.methods) for s in sids)
                n_new += n_done
                bar.advance(n_done)
        bar.close()
        clock.stop("trained_attribute")
        if nulls is not None and nulls.copies:
            clock.start()
            explain_random_copies(
                inputs,
                cfg,
                nulls,
                mine[mine["scan_id"].isin(set(null_ids))],
                fps,
                layer=layer,
                n_labels=n_labels,
                ids=ids,
                names=names,
                means=means,
                device=dev,
                progress=progress,
            )
            clock.stop("random_weights")
        barrier()

    if not world.is_main:
        return AttributeResult(
            run=run,
            methods=cfg.methods,
            layer=layer,
            n_scans=len(mine),
            n_new=n_new,
            n_skipped=n_skipped,
            n_failed=0,
            merged=False,
        )

    attributions, slices, checks = merge_parts(run, cfg.methods, fps, list(todo["scan_id"]), failures)
    if attributions.empty:
        _write_failures(run, failures)
        first = failures[0]["reason"] if failures else "no scans"
        raise RunError(f"no scan of {run} could be explained (first reason: {first}); see {run / FAILURES}")
    write_with(run / ATTRIBUTIONS, partial(attributions.to_parquet, index=False))
    write_with(run / SLICE_PROFILES, partial(slices.to_parquet, index=False))
    if cfg.groups:
        grouped = group_table(attributions)
        if "ablation" in cfg.methods:
            from bodyage.attribute_groups import joint_ablation, with_joint

            joint = joint_ablation(
                inputs, todo, cfg, fingerprint=fps["ablation"], n_labels=n_labels, device=dev, means=means
            )
            grouped = with_joint(grouped, joint, ATTRIBUTION_COLUMNS)
        write_with(run / GROUP_ATTRIBUTIONS, partial(grouped.to_parquet, index=False))
    _write_failures(run, failures)
    # the null table before the recovery, which reads it; without --nulls no stale one is left
    null_table = None
    if nulls is not None:
        null_table = write_null_table(run, cfg, nulls, fps, null_ids)
    else:
        remove_null_tables(run)

    recovery = recovery_summary(attributions, inputs.study.root, cfg.methods, run=run)
    recovery["layer"] = layer
    recovery["checks"] = checks
    from bodyage.attribute_stability import STABILITY, stability_tables

    ks = {m: int(e["k"]) for m, e in recovery["methods"].items() if isinstance(e.get("k"), int) and e["k"] > 0}
    stab_table, stab = stability_tables(attributions, recovery["importance_measure"], ks)
    write_with(run / STABILITY, partial(stab_table.to_csv, index=False))
    for m, summary in stab.items():
        recovery["methods"][m]["stability"] = summary
    if runs:
        from bodyage.attribute_stability import RUN_STABILITY, runs_stability

        runs_table, runs_stab = runs_stability(attributions, runs, recovery["importance_measure"], ks)
        write_with(run / RUN_STABILITY, partial(runs_table.to_csv, index=False))
        for m, summary in runs_stab.items():
            recovery["methods"][m]["run_stability"] = summary
    write_json(run / RECOVERY, recovery)
    null_counts = None
    if null_table is not None:
        null_counts = null_summary(write_null_bands(run, attributions, null_table, recovery["importance_measure"]))

    sanity_result = None
    from bodyage.attribute_sanity import sanity_check, sanity_from_nulls, usable_nulls

    if sanity and null_table is not None and usable_nulls(null_table):
        # the null models' random copies are the randomised models: reuse them, run nothing again
        sanity_result = sanity_from_nulls(
            attributions, null_table, recovery["importance_measure"], seed=cfg.seed, layer=layer
        )
        write_json(run / SANITY, sanity_result)
    elif sanity:
        sanity_result = sanity_check(
            inputs,
            cfg,
            list(todo["scan_id"]),
            layer=layer,
            n_scans=sanity_scans,
            device=dev,
            means=means,
            n_labels=n_labels,
        )
        write_json(run / SANITY, sanity_result)
    if cfg.figures or cfg.save_maps:
        from bodyage.attribute_figures import cohort_figures, save_maps

        if cfg.figures:
            cohort_figures(run, attributions, slices, inputs, recovery, baseline=cfg.baseline)
        if cfg.save_maps:
            save_maps(
                run, inputs, todo.head(cfg.save_maps), cfg, layer=layer, n_labels=n_labels, device=dev, means=means
            )

    minutes = (time.perf_counter() - started) / 60.0
    n_failed = len({f["scan_id"] for f in failures})
    write_record(
        run / RECORD,
        finish_run_record(
            record,
            minutes=round(minutes, 2),
            n_scans=int(attributions[["subject_id", "visit"]].drop_duplicates().shape[0]),
            n_failed=n_failed,
            layer=layer,
            checks=checks,
            cost=clock.seconds,
            null_scans=len(null_ids),
        ),
    )
    return AttributeResult(
        run=run,
        methods=cfg.methods,
        layer=layer,
        n_scans=len(todo),
        n_new=n_new,
        n_skipped=n_skipped,
        n_failed=n_failed,
        recovery=recovery,
        sanity=sanity_result,
        minutes=minutes,
        nulls=null_counts,
        cost=clock.seconds,
    )


def _write_failures(run: Path, failures: list[dict[str, str]]) -> None:
    """Add this step's failures to ``RUN/failures.csv``, keeping other steps' rows."""
    path = run / FAILURES
    old = pd.read_csv(path, dtype=str) if path.is_file() and path.stat().st_size else pd.DataFrame()
    if len(old.columns) and "stage" in old.columns:
        old = old[old["stage"] != "attribute"]
    new = pd.DataFrame(failures, columns=list(FAILURE_COLUMNS)).drop_duplicates("scan_id")
    out = pd.concat([old, new], ignore_index=True) if len(old.columns) else new
    write_with(path, partial(out.to_csv, index=False))


def merge_parts(
    run: Path,
    methods: Sequence[str],
    fingerprints: dict[str, str],
    scan_ids: Sequence[str],
    failures: list[dict[str, str]],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read every scan × method part into the two long tables; a missing part is a failure."""
    reg: list[pd.DataFrame] = []
    sl: list[pd.DataFrame] = []
    checks: dict[str, Any] = {}
    for m in methods:
        folder = part_dir(run, m, fingerprints[m])
        for sid in scan_ids:
            p = folder / f"{sid}.parquet"
            if not p.is_file():
                failures.append(
                    {"scan_id": sid, "stage": "attribute", "reason": f"{m}: no result (a rank stopped?); run again"}
                )
                continue
            reg.append(pd.read_parquet(p))
            sp = p.with_suffix(".slices.parquet")
            if sp.is_file():
                sl.append(pd.read_parquet(sp))
    attributions = pd.concat(reg, ignore_index=True) if reg else pd.DataFrame(columns=list(ATTRIBUTION_COLUMNS))
    if "efficiency_error" in attributions.columns:
        err = attributions.groupby(["subject_id", "visit"])["efficiency_error"].first().abs()
        checks["shapley_efficiency_max_abs_error_years"] = float(err.max())
    if "abs_density" not in attributions.columns:  # parts written before the column existed
        attributions["abs_density"] = attributions["abs_mass"] / attributions["n_voxels"]
    attributions = attributions[list(ATTRIBUTION_COLUMNS)]
    attributions = attributions.sort_values(["method", "subject_id", "visit"], kind="mergesort").reset_index(drop=True)
    slices = pd.concat(sl, ignore_index=True) if sl else pd.DataFrame(columns=list(SLICE_COLUMNS))
    return attributions, slices[list(SLICE_COLUMNS)], checks


def group_table(attributions: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the long table to region groups (:func:`bodyage.regions.group_of`).

    Masses, absolute masses, voxels and volumes of the members are summed (for region
    methods the sum of the members' values; ``attribute_run`` replaces ablation's by a
    joint ablation, :mod:`bodyage.attribute_groups`); share, density, enrichment and
    abs_density are recomputed. A group is NaN in a scan where all its members are absent.
    """
    from bodyage.regions import group_of

    df = attributions.copy()
    df["region"] = df["region"].map(group_of)
    keys = ["subject_id", "visit", "method", "region", "fold"]
    summed = df.groupby(keys, sort=False)[["n_voxels", "volume_ml", "mass", "abs_mass"]].sum(min_count=1).reset_index()
    scan = ["subject_id", "visit", "method"]
    body_abs = summed.groupby(scan)["abs_mass"].transform("sum")
    body_vox = summed.groupby(scan)["n_voxels"].transform("sum")
    summed["share"] = summed["abs_mass"] / body_abs
    summed["density"] = summed["mass"] / summed["n_voxels"]
    summed["enrichment"] = summed["share"] / (summed["n_voxels"] / body_vox)
    summed["abs_density"] = summed["abs_mass"] / summed["n_voxels"]
    return summed[list(ATTRIBUTION_COLUMNS)]


# ----------------------------------------------------------------------------- recovery


def region_importance(attributions: pd.DataFrame, method: str, measure: str | None = None) -> pd.Series:
    """Mean importance per region over scans (docs/design.md §6), sorted descending.

    ``abs_mass`` means the mean of ``|mass|`` and ``density`` the mean of ``|density|`` (a
    strongly negative region matters as much as a positive one); regions absent from a scan
    are left out of that region's mean.
    """
    measure = measure or METHODS[method].importance_measure
    sub = attributions[attributions["method"] == method]
    vals = sub["mass"].abs() if measure == "abs_mass" else sub[measure]
    if measure == "density":
        vals = vals.abs()
    imp = vals.groupby(sub["region"]).mean().dropna()
    return imp.sort_values(ascending=False, kind="mergesort")


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation over the common index (NaN when undefined)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 3:
        return math.nan
    ra, rb = both["a"].rank().to_numpy(), both["b"].rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def precision_at_k(importance: pd.Series, information: dict[str, float]) -> dict[str, Any]:
    """precision@k of the planted regions (k = regions with information > 0) and Spearman."""
    info = pd.Series({str(k): float(v) for k, v in information.items()}, dtype=float)
    planted = set(info.index[info > 0])
    k = len(planted)
    order = sorted(importance.index, key=lambda r: (-float(importance[r]), str(r)))
    top = order[:k]
    return {
        "k": k,
        "precision_at_k": len(planted.intersection(top)) / k if k else math.nan,
        "spearman": spearman(info.reindex(importance.index).fillna(0.0), importance),
        "top_regions": top,
    }


def _importance_of(method: str, measure: str, table: pd.DataFrame) -> pd.Series:
    """:func:`region_importance` with the arguments in the order :func:`functools.partial` needs."""
    return region_importance(table, method, measure)


def recovery_summary(
    attributions: pd.DataFrame,
    study_root: Path,
    methods: Sequence[str],
    measures: dict[str, str] | None = None,
    *,
    run: Path | None = None,
) -> dict[str, Any]:
    """Per method: importance measure, ranking, and on simulated studies precision@k (docs/design.md §6).

    On simulated studies each method also carries what its precision@k must beat
    (:mod:`bodyage.floors`): ``floors``, ``floor_max``, ``floor_max_by``,
    ``beats_floors_by`` and, when ``run`` holds ``attributions_null.parquet``, ``nulls``,
    ``clears_nulls`` and ``beats_nulls_by``. The region signals behind the floors are
    cached in ``run`` (:func:`bodyage.region_signals.cached_region_signals`).
    """
    from bodyage.errors import StudyError
    from bodyage.floors import NULLS_FILE, floor_scores, floors_entry, margins, null_entry
    from bodyage.region_signals import cached_region_signals

    truth_path = Path(study_root) / "truth.json"
    info = None
    if truth_path.is_file():
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        info = truth.get("region_information")
    out: dict[str, Any] = {"importance_measure": {}, "methods": {}}
    imps: dict[str, pd.Series] = {}
    for m in methods:
        measure = (measures or {}).get(m, METHODS[m].importance_measure)
        imps[m] = region_importance(attributions, m, measure)
        out["importance_measure"][m] = measure
    scores = None
    nulls = None
    floors_note = None
    if info:
        try:
            scores = floor_scores(cached_region_signals(study_root, run))
        except StudyError as err:  # recorded in the entry: floors_note
            floors_note = str(err)
        if run is not None and (Path(run) / NULLS_FILE).is_file():
            nulls = pd.read_parquet(Path(run) / NULLS_FILE)

    def score(imp: pd.Series) -> float:
        return float(precision_at_k(imp, info or {})["precision_at_k"])

    for m in methods:
        entry: dict[str, Any] = {"importance_measure": out["importance_measure"][m]}
        if info:
            entry.update(precision_at_k(imps[m], info))
            if scores is not None:
                entry.update(floors_entry(scores, score))
            else:
                entry.update({"floors": None, "floor_max": None, "floor_max_by": None, "floors_note": floors_note})
            entry.update(null_entry(nulls, m, imps[m], partial(_importance_of, m, out["importance_measure"][m]), score))
            margins(entry)
        else:
            entry["top_regions"] = list(imps[m].index[:10])
        entry["agreement_with_ablation"] = spearman(imps[m], imps["ablation"]) if "ablation" in imps else math.nan
        out["methods"][m] = entry
    return out
