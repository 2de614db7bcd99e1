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

**Modules.** This module holds the run (:func:`attribute_run`); its parts live beside it:
settings and inputs in :mod:`bodyage.attribute_inputs`, one batch through the methods in
:mod:`bodyage.attribute_explain`, file names, parts and merged tables in
:mod:`bodyage.attribute_tables`, region importance and recovery in
:mod:`bodyage.attribute_recovery`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bodyage.atomic import remove_stale_temps, write_json, write_with
from bodyage.attribute_explain import cohort_means, explain_batch, region_frames, slice_frames, voxel_ml, z_positions
from bodyage.attribute_inputs import AttributeConfig, check_config, check_scan_mask, load_run_inputs, resolve_layer
from bodyage.attribute_recovery import recovery_summary
from bodyage.attribute_tables import (
    ATTRIBUTION_COLUMNS,
    ATTRIBUTIONS,
    FAILURES,
    GROUP_ATTRIBUTIONS,
    RECORD,
    RECOVERY,
    SANITY,
    SLICE_PROFILES,
    STATE_DIR,
    group_table,
    merge_parts,
    method_fingerprint,
    part_dir,
    write_failures,
    write_part,
)
from bodyage.attribution import COHORT_MEAN_BASELINES, METHODS, label_lookup, scan_values
from bodyage.errors import RunError
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

log = logging.getLogger(__name__)


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
    from bodyage.distributed import rank_group, shard, world_info
    from bodyage.provenance import build_run_record, finish_run_record, write_record
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
                    frames = region_frames(m, sub, vals, ids, names, vml)
                    slice_parts = slice_frames(m, sub, res.maps, zmm) if res.maps is not None else None
                    for i, sid in enumerate(sids):
                        if sid not in pending[m]:
                            continue
                        df = frames[i]
                        for key, arr in res.check.items():
                            df[key] = float(arr[i])
                        write_part(
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
        write_failures(run, failures)
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
    write_failures(run, failures)
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
