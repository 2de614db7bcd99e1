"""``bodyage stats RUN``: every analysis of docs/design.md §7, written to ``RUN/stats`` and ``RUN/figures``.

:func:`run_stats` is the one library call of the command. Output file names are stable
(``report`` inputs every ``.tex`` of ``RUN/stats`` and includes every figure of
``RUN/figures``):

``RUN/stats/``
    ``age_accuracy.{parquet,csv,tex}``, ``gap_correction.{parquet,csv}`` (per-fold
    coefficients of the linear/quadratic corrections; empty for ``train``/``none``),
    ``phenotype_models.{parquet,csv,tex}``, ``region_models.{parquet,csv}`` and
    ``region_models_<method>.tex``, ``region_joint.{parquet,csv}`` and
    ``region_joint_<method>.tex``, ``region_gap_correlations.{parquet,csv}`` and
    ``region_gap_correlations_<method>.tex``, ``run.json``.
``RUN/figures/``
    ``age_scatter``, ``phenotype_forest``, ``region_heatmap_<method>`` (``.pdf`` + ``.png``).

Region outputs are written only when the run has ``attributions.parquet``. Every run
writes one complete set: files an earlier run wrote and this one did not (per-method
files of methods no longer in the run, figures after ``figures=False``) are removed, and
the record is written last (:mod:`analysis.stats_record`), so a report never mixes runs.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import stats_record
from analysis._typing import FdrFamily, GapCorrection, MixedEngine, RegionLevel, RegionMetric
from analysis.agegap import GapCorrectionResult, age_accuracy, correct_gap, gap_note
from analysis.captions import load_captions
from analysis.design import DEFAULT_GROUP, exclusions_by
from analysis.phenotypes import phenotype_exclusions, phenotype_models
from analysis.regionjoint import joint_region_model
from analysis.regionmodels import ALPHA, region_gap_correlations, region_models
from analysis.run import ATTRIBUTIONS_FILE, COHORT_FILE, FIGURES_DIR, PREDICTIONS_FILE, STATS_DIR, RunTables, as_run
from bodyage.errors import BodyageWarning, InputError
from bodyage.progress import NO_PROGRESS, Progress

#: per-method outputs (removed when their method is gone)
_PER_METHOD = re.compile(r"^(region_models|region_joint|region_gap_correlations|region_heatmap)_(.+)\.(tex|pdf|png)$")


@dataclass(frozen=True)
class StatsResult:
    """What :func:`run_stats` computed and wrote.

    Attributes
    ----------
    stats_dir, figures_dir
        Output folders.
    gap
        The corrected gap.
    accuracy, phenotypes
        :func:`analysis.agegap.age_accuracy`, :func:`analysis.phenotypes.phenotype_models`.
    regions, joint, gap_correlations
        :func:`analysis.regionmodels.region_models`, ``joint_region_model``,
        ``region_gap_correlations`` (``None`` without attributions).
    files
        Every file written.
    alpha
        FDR level.
    """

    stats_dir: Path
    figures_dir: Path
    gap: GapCorrectionResult = field(repr=False)
    accuracy: pd.DataFrame = field(repr=False)
    phenotypes: pd.DataFrame = field(repr=False)
    regions: pd.DataFrame | None = field(repr=False)
    joint: pd.DataFrame | None = field(repr=False)
    gap_correlations: pd.DataFrame | None = field(repr=False)
    files: tuple[Path, ...] = ()
    alpha: float = ALPHA

    def summary(self) -> list[str]:
        """A few lines for the command line: counts and names of phenotypes/regions, never ids."""
        acc = self.accuracy.iloc[0]
        lines = [
            f"age: {int(acc['n'])} scans, MAE {acc['mae']:.2f} y (mean-age baseline {acc['baseline_mae']:.2f}), "
            f"r {acc['pearson_r']:.2f}; gap-age correlation {acc['gap_age_r']:.2f} -> "
            f"{acc['corrected_gap_age_r']:.2f} ({self.gap.correction})"
        ]
        if note := gap_note(self.accuracy):
            lines.append(f"WARNING: {note}")
        sep = self.phenotypes[self.phenotypes["model"] == "separate"]
        sig = sep[sep["q"] < self.alpha]
        lines.append(
            f"phenotype models: {len(sep)} phenotype(s), significant at FDR {self.alpha:g}: "
            + (", ".join(f"{p} ({e:+.2f} y)" for p, e in zip(sig["phenotype"], sig["estimate"], strict=True)) or "none")
        )
        flagged = self.phenotypes[self.phenotypes["boundary"] | ~self.phenotypes["converged"]]
        if len(flagged):
            lines.append(
                f"flags: {len(flagged)} model row(s) with a boundary variance or no convergence "
                "(see the 'warning' column of phenotype_models.csv)"
            )
        if self.regions is not None:
            for method, sub in self.regions.groupby("method", sort=False):
                hits = sub[sub["significant"]]
                lines.append(
                    f"region models, {method} ({sub['metric'].iloc[0]}): {sub['region'].nunique()} regions × "
                    f"{sub['phenotype'].nunique()} phenotypes, {len(hits)} significant"
                    + (
                        ": "
                        + ", ".join(f"{r}/{p}" for r, p in zip(hits["region"][:6], hits["phenotype"][:6], strict=True))
                        if len(hits)
                        else ""
                    )
                    + (" ..." if len(hits) > 6 else "")
                )
        lines.append(f"tables in {self.stats_dir}, figures in {self.figures_dir}")
        return lines


def run_stats(
    run: RunTables | str | os.PathLike[str],
    *,
    phenotypes: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    group: str | None = DEFAULT_GROUP,
    metric: RegionMetric | None = None,
    correction: GapCorrection = "train",
    methods: Sequence[str] | None = None,
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
    engine: MixedEngine = "auto",
    alpha: float = ALPHA,
    fdr_family: FdrFamily = "method",
    captions: str | os.PathLike[str] | Mapping[str, str] | None = None,
    figures: bool = True,
    out: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> StatsResult:
    """Run every statistic of docs/design.md §7 and write tables, LaTeX and figures.

    Parameters
    ----------
    run
        Run folder or tables.
    phenotypes, covariates, default_covariates, group
        See :func:`analysis.phenotypes.phenotype_models`: ``covariates`` are added to age,
        age² and sex unless ``default_covariates`` is false.
    metric, methods, level, grouping
        See :func:`analysis.regionmodels.region_models`.
    correction
        Age-gap correction (:mod:`analysis.agegap`).
    engine
        Mixed-model solver (:mod:`analysis.mixed`).
    alpha
        FDR level.
    fdr_family
        Family of the region analyses' Benjamini–Hochberg correction (:mod:`analysis.fdr`).
    captions
        Captions of the LaTeX tables: a YAML/JSON file or a mapping of table stem to
        caption (:func:`analysis.captions.load_captions`); checked before anything is fitted.
    figures
        Draw the figures.
    out
        Folder holding ``stats/`` and ``figures/``; default the run folder.
    progress
        Progress display.

    Returns
    -------
    StatsResult

    Raises
    ------
    InputError, RunError, StudyError
        For bad options or inconsistent tables, naming the column, file or option.
    """
    from analysis import figures as figs
    from analysis import tables as tab
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    tables = as_run(run)
    base = Path(out) if out is not None else tables.root
    if base is None:
        raise InputError("run tables built in memory need an output folder (out=...)")
    progress = progress or NO_PROGRESS
    caption_map = load_captions(captions, methods=tables.methods if tables.attributions is not None else ())
    arguments = {
        "run": str(tables.root) if tables.root else None,
        "phenotypes": list(phenotypes) if phenotypes is not None else None,
        "covariates": list(covariates) if covariates is not None else None,
        "default_covariates": default_covariates,
        "group": group,
        "metric": metric,
        "correction": correction,
        "methods": list(methods) if methods is not None else None,
        "level": level,
        "engine": engine,
        "alpha": alpha,
        "fdr_family": fdr_family,
        "captions": str(captions) if isinstance(captions, (str, os.PathLike)) else caption_map or None,
    }
    inputs = {}
    if tables.root is not None:
        inputs["predictions"] = tables.root / PREDICTIONS_FILE
        if tables.attributions is not None:
            inputs["attributions"] = tables.root / ATTRIBUTIONS_FILE
    if tables.study_root is not None:
        inputs["cohort"] = tables.study_root / COHORT_FILE
    record = build_run_record(
        "stats", arguments, inputs=inputs, extra={"study": str(tables.study_root) if tables.study_root else None}
    )
    stats_dir = base / STATS_DIR
    fig_dir = base / FIGURES_DIR
    stats_dir.mkdir(parents=True, exist_ok=True)
    previous = stats_record.begin(base)
    written: list[Path] = []

    gap = correct_gap(tables, correction)
    acc = age_accuracy(gap)
    written += tab.write_frame(acc, stats_dir, "age_accuracy")
    view, spec = tab.accuracy_table(acc, gap.correction)
    written.append(tab.write_tex(view, stats_dir, "age_accuracy", spec, captions=caption_map))
    written += tab.write_frame(gap.coefficients, stats_dir, "gap_correction")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BodyageWarning)
        pheno = phenotype_models(
            tables,
            phenotypes=phenotypes,
            covariates=covariates,
            default_covariates=default_covariates,
            group=group,
            engine=engine,
            gap=gap,
            progress=progress,
        )
    _reemit(caught)
    written += tab.write_frame(pheno, stats_dir, "phenotype_models")
    view, spec = tab.phenotype_table(pheno, alpha)
    written.append(
        tab.write_tex(view, stats_dir, "phenotype_models", tab.with_note(spec, gap_note(acc)), captions=caption_map)
    )
    phenos = list(pheno.loc[pheno["model"] == "separate", "phenotype"])

    regions = joint = corr = None
    if tables.attributions is not None:
        region_args = {
            "phenotypes": phenos,
            "covariates": covariates,
            "default_covariates": default_covariates,
            "group": group,
            "metric": metric,
            "methods": methods,
            "level": level,
            "grouping": grouping,
            "alpha": alpha,
            "fdr_family": fdr_family,
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BodyageWarning)
            regions = region_models(tables, **region_args, progress=progress)  # type: ignore[arg-type]
            joint = joint_region_model(tables, **region_args)  # type: ignore[arg-type]
            corr = region_gap_correlations(
                tables,
                covariates=covariates,
                default_covariates=default_covariates,
                metric=metric,
                methods=methods,
                level=level,
                grouping=grouping,
                alpha=alpha,
                fdr_family=fdr_family,
                gap=gap,
                progress=progress,
            )
        _reemit(caught)
        written += tab.write_frame(regions, stats_dir, "region_models")
        written += tab.write_frame(joint, stats_dir, "region_joint")
        written += tab.write_frame(corr, stats_dir, "region_gap_correlations")
        for method in pd.unique(regions["method"]):
            view, spec = tab.region_table(regions, method, alpha)
            written.append(tab.write_tex(view, stats_dir, f"region_models_{method}", spec, captions=caption_map))
            view, spec = tab.region_table(joint, method, alpha, joint=True)
            written.append(tab.write_tex(view, stats_dir, f"region_joint_{method}", spec, captions=caption_map))
            view, spec = tab.gap_correlation_table(corr, method, alpha)
            spec = tab.with_note(spec, gap_note(acc))
            written.append(
                tab.write_tex(view, stats_dir, f"region_gap_correlations_{method}", spec, captions=caption_map)
            )

    if figures:
        fig_dir.mkdir(parents=True, exist_ok=True)
        task = progress.task("figures", total=2 + (0 if regions is None else regions["method"].nunique()))
        written += figs.age_scatter(gap.scans, fig_dir)
        task.advance()
        written += figs.forest_plot(pheno, fig_dir)
        task.advance()
        if regions is not None:
            for method in pd.unique(regions["method"]):
                written += figs.region_heatmap(regions, method, fig_dir, regions=tables.regions)
                task.advance()
        task.close()
    _remove_stale([stats_dir, fig_dir] if figures else [stats_dir], written)
    removed = stats_record.remove_previous(base, previous, written, figures=figures)
    record_path = stats_record.record_path(base)
    write_record(
        record_path,
        finish_run_record(
            record,
            outputs=sorted(str(p.relative_to(base)) for p in written),
            removed=removed,
            phenotypes=phenos,
            n_scans=len(gap.scans),
            exclusions={
                "phenotype_models": phenotype_exclusions(pheno),
                **({} if regions is None else {"region_models": exclusions_by(regions, "phenotype")}),
            },
        ),
    )
    written.append(record_path)
    return StatsResult(
        stats_dir=stats_dir,
        figures_dir=fig_dir,
        gap=gap,
        accuracy=acc,
        phenotypes=pheno,
        regions=regions,
        joint=joint,
        gap_correlations=corr,
        files=tuple(written),
        alpha=alpha,
    )


def _reemit(caught: Sequence[warnings.WarningMessage]) -> None:
    """Re-emit recorded warnings once each (they were recorded to de-duplicate them)."""
    seen: set[str] = set()
    for w in caught:
        text = str(w.message)
        if text not in seen:
            seen.add(text)
            warnings.warn(text, w.category, stacklevel=3)


def _remove_stale(folders: Sequence[Path], written: Sequence[Path]) -> None:
    keep = {p.resolve() for p in written}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _PER_METHOD.match(path.name) and path.resolve() not in keep:
                path.unlink()
