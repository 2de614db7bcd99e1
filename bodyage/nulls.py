"""Null models of attribution: what a method reports for models that learned nothing about age.

A region ranking means "the model uses these regions" only where it differs from what
the same method reports for a model that cannot know age. Two nulls are built into
``bodyage attribute`` (:func:`bodyage.attribute.attribute_run` with a :class:`NullConfig`):

- **random weights** (model randomisation, Adebayo et al. 2018): for every fold model,
  ``copies`` copies with all weights re-initialised (seeded,
  :func:`bodyage.attribute_sanity.randomise`), each explaining the scans of its fold (the
  scans that fold's trained model explains) with the same methods, settings and region
  aggregation;
- **permuted labels**: the same training code, with the same settings as the trained
  run (its ``run.json``), on the study with the subjects' ages permuted within each
  cross-validation fold (:func:`permute_ages`), trained into ``RUN/nulls/permuted_labels/``
  as an ordinary, resumable run folder and attributed like the trained model. It has
  learned the cohort's images and the label distribution, but not the age of any scan.

Outputs, in ``RUN/``:

- ``attributions_null.parquet``: the columns of ``attributions.parquet``
  (:data:`bodyage.attribute.ATTRIBUTION_COLUMNS`) plus ``null`` (``random_weights`` or
  ``permuted_labels``) and ``copy`` (0 … copies − 1; the permuted-label model is copy 0);
- ``attribution_nulls.csv`` (:data:`BAND_COLUMNS`): per method, region and null kind the
  trained importance, the null's mean and its 2.5–97.5 % band over copies, and trained
  minus the null mean.

Both are resumable: every copy × method × scan result is a part file
(``RUN/attribute/nulls/random_weights/copy{c}/<method>-<fingerprint>/<scan id>.parquet``),
and the permuted-label model resumes like ``train`` and ``attribute``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.atomic import remove_stale_temps, write_with
from bodyage.errors import InputError, RunError
from bodyage.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from bodyage.attribute_inputs import AttributeConfig, RunInputs

#: the null kinds, in the order of the tables
NULL_KINDS: tuple[str, ...] = ("random_weights", "permuted_labels")
NULL_ATTRIBUTIONS = "attributions_null.parquet"
NULL_BANDS = "attribution_nulls.csv"
#: the permuted-label model's run folder, inside the trained run
PERMUTED_RUN = Path("nulls") / "permuted_labels"
#: part files of the random-weight copies, inside ``RUN/attribute``
PARTS = Path("nulls") / "random_weights"
BAND_COLUMNS: tuple[str, ...] = (
    "method",
    "region",
    "importance_measure",
    "null",
    "n_copies",
    "trained",
    "null_mean",
    "null_low",
    "null_high",
    "trained_minus_null",
    "above_band",
    "trained_share",
    "null_share_mean",
    "null_share_low",
    "null_share_high",
    "above_share_band",
)
#: quantiles of the band over copies
BAND_QUANTILES = (0.025, 0.975)


@dataclass(frozen=True)
class NullConfig:
    """Which nulls :func:`bodyage.attribute.attribute_run` adds.

    Attributes
    ----------
    copies
        Randomised-weight copies of each fold model (0: none).
    permuted
        Train and attribute the permuted-label model.
    scans
        Explain a seeded sample of this many scans under the nulls (``None``: every scan).
        The null band is a cohort mean over scans: a few hundred scans fix it well, and
        the cost of the random copies grows with ``copies × scans``.
    permuted_folds
        Cross-validation folds of the permuted-label model (``None``: the trained run's).
        Training costs about ``folds × (1 − 1/folds)`` passes over the study per epoch, so
        2 folds cost a quarter of 5 (``bodyage demo`` uses 2; docs/methods/nulls.md). Each
        of its models then sees half the study instead of ``1 − 1/folds`` of it: a cheaper,
        less-trained null, named as such in ``attribute.json``.
    """

    copies: int = 3
    permuted: bool = True
    scans: int | None = None
    permuted_folds: int | None = None


def check_nulls(cfg: NullConfig, world_size: int = 1) -> None:
    """Raise :class:`InputError` naming the option at fault.

    Under ``torchrun`` (``world_size`` > 1) the permuted-label model is refused: training it
    inside ``attribute`` would end the ranks' process group and start another, which
    ``torchrun``'s rendezvous store does not support (the ranks hang). The random copies
    are split by rank like the trained attribution.
    """
    if cfg.permuted and world_size > 1:
        raise InputError(
            f"--permuted cannot run under torchrun (WORLD_SIZE={world_size}): use --no-permuted here, "
            "and run `bodyage attribute RUN` in one process for the permuted-label model"
        )
    if cfg.copies < 0:
        raise InputError(f"--null-copies must be 0 or more, got {cfg.copies}")
    if cfg.scans is not None and cfg.scans < 1:
        raise InputError(f"--null-scans must be at least 1, got {cfg.scans}")
    if cfg.permuted_folds is not None and cfg.permuted_folds < 2:
        raise InputError(f"--null-permuted-folds must be at least 2, got {cfg.permuted_folds}")
    if cfg.copies == 0 and not cfg.permuted:
        raise InputError("--nulls with --null-copies 0 and --no-permuted leaves no null; use --no-nulls")


class Stopwatch:
    """Wall-clock and CPU seconds of named steps (``cost`` in ``attribute.json``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}
        self._t = (0.0, 0.0)

    def start(self) -> None:
        """Start timing a step."""
        self._t = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        """End the step started last and record it as ``name`` (added to earlier time of that name)."""
        wall, cpu = time.perf_counter() - self._t[0], time.process_time() - self._t[1]
        old = self.seconds.get(name, {"wall": 0.0, "cpu": 0.0})
        self.seconds[name] = {"wall": round(old["wall"] + wall, 2), "cpu": round(old["cpu"] + cpu, 2)}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the block as step ``name``."""
        self.start()
        try:
            yield
        finally:
            self.stop(name)


# ----------------------------------------------------------------------------- permuted labels


def permute_ages(cohort: pd.DataFrame, seed: int) -> npt.NDArray[np.float64]:
    """Ages of ``cohort``'s scans with the subjects' ages permuted within each fold.

    The unit is the subject: each subject takes the first-visit age of another subject of
    the same fold (a seeded permutation per fold), and each of its visits keeps its own
    offset from its first visit, so repeat visits stay years apart as they were. Per fold
    the multiset of first-visit ages is unchanged (every training set keeps its age
    distribution), while the link between a subject's images and its age is broken.

    Parameters
    ----------
    cohort
        One row per scan with ``subject_id``, ``visit``, ``age`` and ``fold``.
    seed
        Seed of the permutations.

    Returns
    -------
    numpy.ndarray
        ``(len(cohort),)`` permuted ages, row-aligned with ``cohort``.
    """
    missing = [c for c in ("subject_id", "visit", "age", "fold") if c not in cohort.columns]
    if missing:
        raise InputError(f"permute_ages: cohort lacks column(s) {', '.join(missing)}")
    subj = cohort["subject_id"].astype(str).to_numpy()
    age = cohort["age"].to_numpy(dtype=float)
    order = np.lexsort((cohort["visit"].to_numpy(), subj))
    first_rows = order[np.r_[True, subj[order][1:] != subj[order][:-1]]]  # each subject's first visit
    base = dict(zip(subj[first_rows], age[first_rows], strict=True))
    fold_of = dict(zip(subj[first_rows], cohort["fold"].to_numpy()[first_rows], strict=True))
    rng = np.random.default_rng(seed)
    new_base: dict[str, float] = {}
    for k in sorted(set(fold_of.values())):
        members = sorted(s for s, f in fold_of.items() if f == k)
        ages = np.array([base[s] for s in members])
        for s, a in zip(members, ages[rng.permutation(len(members))], strict=True):
            new_base[s] = float(a)
    return np.array([new_base[s] + (a - base[s]) for s, a in zip(subj, age, strict=True)])


def train_config_of(run: Path) -> tuple[str, Any]:
    """The study and :class:`~bodyage.train.TrainConfig` of ``run/run.json``, ages permuted with its seed.

    An organ clock's recorded grid is the one its crop made: left to the crop again.
    """
    from bodyage.train import TrainConfig

    path = run / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: cannot read the trained run's settings ({err})") from err
    args = record.get("arguments") or {}
    study = record.get("study") or args.get("study")
    if not study:
        raise RunError(f"{path}: records no study path")
    kwargs: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name in args and f.name != "permute_ages_seed":
            v = args[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if kwargs.get("regions"):
        kwargs["grid"] = None
    cfg = TrainConfig(**kwargs)
    return str(study), replace(cfg, permute_ages_seed=cfg.seed)


def permuted_model(
    run: Path,
    *,
    device: str,
    cache_dir: str | os.PathLike[str] | None,
    folds: int | None = None,
    progress: Progress = NO_PROGRESS,
) -> Path:
    """Train (or resume) the permuted-label model of ``run``; returns its run folder.

    Same study, folds and settings as the trained run (``folds``: other folds, see
    :attr:`NullConfig.permuted_folds`); the ages are permuted (:func:`permute_ages`) within
    its folds with the run's training seed, so the permuted-label model belongs to the
    trained run, whatever the attribution's ``--seed``.
    """
    from bodyage.train import train_run

    study, cfg = train_config_of(run)
    if folds is not None:
        cfg = replace(cfg, folds=folds)
    out = run / PERMUTED_RUN
    train_run(study, out, cfg, device=device, cache_dir=cache_dir, progress=progress, figures=False)
    return out


# ----------------------------------------------------------------------------- random weights


def copy_seed(seed: int, fold: int, copy: int) -> int:
    """Seed of the re-initialisation of copy ``copy`` of fold ``fold``'s model."""
    return int(np.random.SeedSequence([seed, fold, copy]).generate_state(1)[0])


def random_copy(model_file: Path, fold: int, copy: int, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A fold model with every weight re-initialised (on the CPU, so any device gets the same weights)."""
    from bodyage.attribute_sanity import randomise
    from bodyage.train import load_fold_model

    model, hp = load_fold_model(model_file)
    randomise(model, copy_seed(seed, fold, copy))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, hp


def copy_dir(run: Path, copy: int, method: str, fingerprint: str, seed: int) -> Path:
    """Part folder of one random copy and method."""
    key = hashlib.sha256(json.dumps([fingerprint, seed, copy]).encode()).hexdigest()[:12]
    return run / "attribute" / PARTS / f"copy{copy}" / f"{method}-{key}"


def sample_scans(scan_ids: Sequence[str], n: int | None, seed: int) -> list[str]:
    """The scans the nulls explain: all, or a seeded sample of ``n`` (sorted)."""
    ids = sorted(scan_ids)
    if n is None or n >= len(ids):
        return ids
    rng = np.random.default_rng([seed, 11])
    return sorted(ids[i] for i in rng.choice(len(ids), n, replace=False))


def explain_random_copies(
    inputs: RunInputs,
    cfg: AttributeConfig,
    nulls: NullConfig,
    rows: pd.DataFrame,
    fingerprints: dict[str, str],
    *,
    layer: str,
    n_labels: int,
    ids: npt.NDArray[np.int64],
    names: list[str],
    means: torch.Tensor | None,
    device: torch.device,
    progress: Progress = NO_PROGRESS,
) -> int:
    """Explain ``rows`` (scans with their ``fold``) under every random copy of their fold model.

    Batches are cut from all of a fold's rows, done or not, as in the trained attribution,
    so a resumed run gives identical values. Returns the number of scan × copy results written.
    """
    import torch

    from bodyage.attribute_explain import explain_batch, region_frames, voxel_ml
    from bodyage.attribution import scan_values

    run = inputs.run
    folders = {(c, m): copy_dir(run, c, m, fingerprints[m], cfg.seed) for c in range(nulls.copies) for m in cfg.methods}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    bar = progress.task("nulls: random weights", len(rows) * nulls.copies)
    n_new = 0
    for k in sorted(int(f) for f in rows["fold"].unique()):
        fold_rows = rows[rows["fold"] == k]
        pending = {
            key: {s for s in fold_rows["scan_id"] if not (folder / f"{s}.parquet").is_file()}
            for key, folder in folders.items()
        }
        bar.advance(sum(len(fold_rows) - len(v) for (_, m), v in pending.items() if m == cfg.methods[0]))
        models: dict[int, tuple[nn.Module, float]] = {}
        for start in range(0, len(fold_rows), cfg.batch_size):
            sub = fold_rows.iloc[start : start + cfg.batch_size]
            sids = list(sub["scan_id"])
            todo = [c for c in range(nulls.copies) if any(s in pending[(c, m)] for m in cfg.methods for s in sids)]
            if not todo:
                continue
            scans = [inputs.cache.scans[s] for s in sids]
            x = torch.from_numpy(np.stack([np.asarray(c.load(), dtype=np.float32) for c in scans])).to(device)
            lab = torch.from_numpy(np.stack([np.asarray(c.load_mask(), dtype=np.int64) for c in scans])).to(device)
            vml = np.array([voxel_ml(c.affine) for c in scans])
            for c in todo:
                if c not in models:
                    model, hp = random_copy(inputs.model_files[k], k, c, cfg.seed)
                    models[c] = (model.to(device), float(hp["age_sd"]))
                model, age_sd = models[c]
                methods = [m for m in cfg.methods if any(s in pending[(c, m)] for s in sids)]
                results = explain_batch(
                    model, x, lab, methods, cfg=cfg, layer=layer, n_labels=n_labels, age_sd=age_sd, means=means
                )
                for m, res in results.items():
                    frames = region_frames(m, sub, scan_values(res, lab, n_labels), ids, names, vml)
                    for i, sid in enumerate(sids):
                        if sid in pending[(c, m)]:
                            write_with(folders[(c, m)] / f"{sid}.parquet", partial(frames[i].to_parquet, index=False))
                n_done = sum(any(s in pending[(c, m)] for m in cfg.methods) for s in sids)
                n_new += n_done
                bar.advance(n_done)
    bar.close()
    return n_new


# ----------------------------------------------------------------------------- tables


def merge_nulls(
    run: Path,
    cfg: AttributeConfig,
    nulls: NullConfig,
    fingerprints: dict[str, str],
    scan_ids: Sequence[str],
    permuted: pd.DataFrame | None,
) -> pd.DataFrame:
    """``attributions_null.parquet``'s rows: the random copies' parts and the permuted model's table.

    Raises
    ------
    RunError
        If a random copy's result of a scan is missing (a rank stopped): run again.
    """
    from bodyage.attribute_tables import ATTRIBUTION_COLUMNS

    frames: list[pd.DataFrame] = []
    for c in range(nulls.copies):
        for m in cfg.methods:
            folder = copy_dir(run, c, m, fingerprints[m], cfg.seed)
            for sid in scan_ids:
                p = folder / f"{sid}.parquet"
                if not p.is_file():
                    raise RunError(f"{p}: random-weight null result missing (a rank stopped?); run again to finish it")
                frames.append(pd.read_parquet(p).assign(null="random_weights", copy=c))
    if permuted is not None:
        frames.append(permuted[list(ATTRIBUTION_COLUMNS)].assign(null="permuted_labels", copy=0))
    columns = [*ATTRIBUTION_COLUMNS, "null", "copy"]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)[columns]
    out["copy"] = out["copy"].astype("int64")
    out["null"] = pd.Categorical(out["null"], categories=list(NULL_KINDS))
    out = out.sort_values(["null", "copy", "method", "subject_id", "visit"], kind="mergesort")
    out["null"] = out["null"].astype(str)
    return out.reset_index(drop=True)


def _band(vals: npt.NDArray[np.float64]) -> tuple[int, float, float, float]:
    """Copies with a value, their mean and the 2.5–97.5 % quantiles (NaN without values)."""
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return 0, np.nan, np.nan, np.nan
    low, high = (float(q) for q in np.quantile(vals, BAND_QUANTILES))
    return len(vals), float(vals.mean()), low, high


def null_bands(
    attributions: pd.DataFrame,
    null_table: pd.DataFrame,
    measures: dict[str, str],
) -> pd.DataFrame:
    """Per method, region and null kind: trained importance beside the null's band over copies.

    Importance is :func:`bodyage.attribute_recovery.region_importance` with the method's measure,
    computed for the trained model and for each null copy alike (a cohort mean over the
    scans each explains). ``null_low``/``null_high`` are the 2.5 and 97.5 % quantiles over
    copies (with one copy, the permuted-label model's, the band is that value);
    ``above_band``: the trained importance exceeds ``null_high`` (the rule of
    ``clears_nulls`` in the recovery).

    The ``*_share`` columns compare profiles instead of magnitudes: each model's
    importance divided by its sum over the regions, so a model whose output barely moves
    (a random copy; a permuted-label model predicting near the mean age) is not "below"
    every region of the trained model for its scale alone. ``above_share_band``: the
    region takes a larger part of the trained model's importance than the null's 97.5 %.
    """
    from bodyage.attribute_recovery import region_importance

    rows: list[dict[str, Any]] = []
    for m, measure in measures.items():
        trained = region_importance(attributions, m, measure)
        trained_share = trained / trained.sum()
        for kind in NULL_KINDS:
            sub = null_table[null_table["null"] == kind]
            copies = sorted(int(c) for c in sub["copy"].unique())
            if not copies or not (sub["method"] == m).any():
                continue
            per_copy = pd.DataFrame({c: region_importance(sub[sub["copy"] == c], m, measure) for c in copies})
            per_copy = per_copy.reindex(trained.index)
            shares = per_copy / per_copy.sum(axis=0)
            for region in trained.index:
                n, mean, low, high = _band(per_copy.loc[region].to_numpy(dtype=float))
                _, s_mean, s_low, s_high = _band(shares.loc[region].to_numpy(dtype=float))
                t, ts = float(trained[region]), float(trained_share[region])
                rows.append(
                    {
                        "method": m,
                        "region": region,
                        "importance_measure": measure,
                        "null": kind,
                        "n_copies": n,
                        "trained": t,
                        "null_mean": mean,
                        "null_low": low,
                        "null_high": high,
                        "trained_minus_null": t - mean,
                        "above_band": bool(n and t > high),
                        "trained_share": ts,
                        "null_share_mean": s_mean,
                        "null_share_low": s_low,
                        "null_share_high": s_high,
                        "above_share_band": bool(n and ts > s_high),
                    }
                )
    return pd.DataFrame(rows, columns=list(BAND_COLUMNS))


def write_null_table(
    run: Path,
    cfg: AttributeConfig,
    nulls: NullConfig,
    fingerprints: dict[str, str],
    scan_ids: Sequence[str],
) -> pd.DataFrame:
    """Merge the nulls into ``attributions_null.parquet``; returns the table."""
    permuted = None
    if nulls.permuted:
        path = run / PERMUTED_RUN / "attributions.parquet"
        if not path.is_file():
            raise RunError(f"{path}: the permuted-label model's attributions are missing; run attribute again")
        permuted = pd.read_parquet(path)
    table = merge_nulls(run, cfg, nulls, fingerprints, scan_ids, permuted)
    write_with(run / NULL_ATTRIBUTIONS, partial(table.to_parquet, index=False))
    return table


def write_null_bands(
    run: Path, attributions: pd.DataFrame, table: pd.DataFrame, measures: dict[str, str]
) -> pd.DataFrame:
    """Write ``attribution_nulls.csv`` (:func:`null_bands`); returns it."""
    bands = null_bands(attributions, table, measures)
    write_with(run / NULL_BANDS, partial(bands.to_csv, index=False))
    return bands


def remove_null_tables(run: Path) -> None:
    """Remove the merged null tables of an earlier run (a run without nulls must not report stale ones).

    The per-scan parts and the permuted-label run stay: running with nulls again reuses them.
    """
    for name in (NULL_ATTRIBUTIONS, NULL_BANDS):
        (run / name).unlink(missing_ok=True)


def null_summary(bands: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """Per method and null kind: ``above`` (regions above the band) of ``regions``."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (m, kind), grp in bands.groupby(["method", "null"], sort=False):
        out.setdefault(str(m), {})[str(kind)] = {"above": int(grp["above_band"].sum()), "regions": len(grp)}
    return out


# ----------------------------------------------------------------------------- figures

#: colour and vertical offset of each null kind's band in :func:`draw_null_bands`
BAND_STYLE: dict[str, tuple[str, float]] = {"random_weights": ("#1f77b4", -0.18), "permuted_labels": ("#d62728", 0.18)}


def null_band_on_trained_scale(bands: pd.DataFrame, method: str, kind: str) -> pd.DataFrame:
    """A null's share band in the trained model's units: ``low``, ``mean``, ``high`` per region.

    Each share is multiplied by the trained model's total importance over the regions:
    the importance a region would have if the trained model spread its importance like
    the null. Bars of the trained importance can then carry the band on their own axis,
    which raw null values (a copy whose output barely moves) cannot.
    """
    sub = bands[(bands["method"] == method) & (bands["null"] == kind)].set_index("region")
    total = float(sub["trained"].sum())
    return pd.DataFrame(
        {
            "low": sub["null_share_low"] * total,
            "mean": sub["null_share_mean"] * total,
            "high": sub["null_share_high"] * total,
        }
    )


def draw_null_bands(
    ax: Any, bands: pd.DataFrame, method: str, regions: Sequence[str], *, scale: float | None = None
) -> list[str]:
    """Overlay each null's band on a horizontal bar chart of regions (``regions`` in bar order, bottom up).

    Draws, per null kind, a line from the 2.5 to the 97.5 % share band and a dot at its mean,
    just above or below each bar. Returns the legend labels of the kinds drawn. Needs no
    matplotlib import: only ``ax.hlines`` and ``ax.plot``.

    Parameters
    ----------
    ax
        The axes of the bar chart.
    bands
        ``attribution_nulls.csv`` (:func:`null_bands`).
    method
        The method whose bands are drawn.
    regions
        The regions of the bars, bottom up.
    scale
        ``None``: the bands in the trained model's units (:func:`null_band_on_trained_scale`);
        a number: the shares times ``scale`` (100 for bars in percent of the total).
    """
    drawn = []
    y = np.arange(len(regions), dtype=float)
    for kind, (colour, dy) in BAND_STYLE.items():
        sel = (bands["method"] == method) & (bands["null"] == kind)
        if not sel.any():
            continue
        if scale is None:
            band = null_band_on_trained_scale(bands, method, kind).reindex(list(regions))
        else:
            sub = bands[sel].set_index("region").reindex(list(regions))
            band = pd.DataFrame(
                {
                    "low": sub["null_share_low"] * scale,
                    "mean": sub["null_share_mean"] * scale,
                    "high": sub["null_share_high"] * scale,
                }
            )
        label = band_label(kind, int(bands.loc[sel, "n_copies"].max()))
        ax.hlines(y + dy, band["low"], band["high"], colors=colour, linewidth=1.2, label=label)
        ax.plot(band["mean"], y + dy, "o", color=colour, markersize=2.2)
        drawn.append(label)
    return drawn


def band_label(kind: str, n_copies: int) -> str:
    """Legend label of a null's band: what the line and the dot are."""
    name = {"random_weights": "random-weights null", "permuted_labels": "permuted-label null"}.get(
        kind, f"{kind.replace('_', ' ')} null"
    )
    if n_copies <= 1:
        return f"{name}: one model (dot)"
    return f"{name}: 2.5–97.5 % of {n_copies} copies (line), mean (dot)"
