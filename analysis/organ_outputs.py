"""``bodyage stats DIR`` on a clocks folder: organ gap tables, LaTeX and figures in ``DIR/stats`` and ``DIR/figures``.

:func:`run_organ_stats` is the one library call. Output names are stable:

``DIR/stats/``
    ``clocks.{parquet,csv,tex}`` (each clock's accuracy and informative flag),
    ``organ_gap_models.{parquet,csv,tex}`` (:func:`analysis.organ_stats.organ_gap_models`;
    the LaTeX table "organ age gaps by phenotype"), ``clock_correlations.{parquet,csv,tex}``
    (:func:`analysis.organ_stats.clock_correlations`), ``run.json`` (written last, as
    :mod:`analysis.stats_record` does for a run; it records ``organ_ages.parquet`` and
    ``clocks.json`` with their SHA-256).
``DIR/figures/``
    ``clock_correlations.{pdf,png}``.
``DIR/clock_recovery.json``
    On a simulated study (:func:`analysis.clock_recovery.clock_recovery`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import stats_record
from analysis._typing import MixedEngine
from analysis.clock_recovery import CLOCK_RECOVERY_FILE, TRUTH_TABLE, clock_recovery
from analysis.design import DEFAULT_GROUP, covariate_list, exclusions_of
from analysis.figures import new_figure, save
from analysis.latex import Column, LatexTable, render
from analysis.notes import summarise_warnings
from analysis.organ_stats import (
    CLOCKS_FILE,
    ORGAN_AGES_FILE,
    ORGAN_MODEL_COLUMNS,
    ClockTables,
    clock_correlations,
    excluded_clocks,
    load_clocks,
    mean_correlation,
    organ_gap_models,
)
from analysis.recovery import TRUTH_FILE
from analysis.regionmodels import ALPHA
from analysis.run import FIGURES_DIR, STATS_DIR
from analysis.tables import exclusions_note, label, write_frame, write_tex
from bodyage.errors import InputError
from bodyage.progress import NO_PROGRESS, Progress

#: figures of a clocks folder's stats
CORRELATION_FIGURE = "clock_correlations"
#: most rows of one LaTeX float: a longer organ table is split between phenotypes into parts
MAX_ORGAN_ROWS = 30
#: marker of an uninformative clock in tables and figures
UNINFORMATIVE_MARK = " (uninformative)"


@dataclass(frozen=True)
class OrganStatsResult:
    """What :func:`run_organ_stats` computed and wrote."""

    stats_dir: Path
    figures_dir: Path
    clocks: pd.DataFrame = field(repr=False)
    models: pd.DataFrame = field(repr=False)
    correlations: pd.DataFrame = field(repr=False)
    excluded: Mapping[str, str] = field(default_factory=dict)
    recovery: Mapping[str, Any] | None = field(repr=False, default=None)
    files: tuple[Path, ...] = ()
    alpha: float = ALPHA

    def summary(self) -> list[str]:
        """A few lines for the command line (clock and phenotype names, never ids)."""
        info = self.clocks[self.clocks["informative"]]
        lines = [f"clocks: {len(self.clocks)} ({len(info)} informative)"]
        if self.excluded:
            lines.append("left out of the tests (uninformative): " + ", ".join(self.excluded))
        if self.models.empty:
            lines.append("organ gap models: no informative clock, nothing tested (see --include-uninformative)")
        for gap, sub in self.models.groupby("gap", sort=False):
            hits = sub[sub["significant"]]
            lines.append(
                f"organ gap models ({gap} gap): {sub['clock'].nunique()} clocks × {sub['phenotype'].nunique()} "
                f"phenotypes, significant at FDR {self.alpha:g}: "
                + (", ".join(f"{c}/{p}" for c, p in zip(hits["clock"], hits["phenotype"], strict=True)) or "none")
            )
        lines.append(f"mean r between informative clocks' corrected gaps: {_f(mean_correlation(self.correlations))}")
        if self.recovery is not None:
            for clock, e in self.recovery["clocks"].items():
                lines.append(
                    f"recovery {clock}: r planted {_f(e['r_planted'])}, specific {_f(e['r_planted_specific'])}"
                    + (" (planted)" if e["planted"] else "")
                )
        lines.append(f"tables in {self.stats_dir}, figures in {self.figures_dir}")
        return lines


def _f(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{float(v):.2f}"


def _range(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def clocks_frame(tab: ClockTables) -> pd.DataFrame:
    """One row per clock: regions, n, MAE, baseline MAE, r, informative and why (from ``clocks.json``)."""
    rows = []
    for name in tab.names:
        e = tab.clocks[name]
        sub = tab.organ_ages[tab.organ_ages["clock"] == name]
        err = (sub["predicted_age"] - sub["age"]).abs()
        r = float(np.corrcoef(sub["predicted_age"], sub["age"])[0, 1]) if len(sub) > 2 else float("nan")
        rows.append(
            {
                "clock": name,
                "regions": ", ".join(tab.regions(name)) or "(whole body)",
                "n": int(e.get("n", len(sub))),
                "mae": float(e.get("mae", err.mean())),
                "baseline_mae": float(e.get("baseline_mae", float("nan"))),
                "pearson_r": float(e.get("pearson_r", r)),
                "informative": tab.informative(name),
                "informative_reason": str(e.get("informative_reason", "")),
            }
        )
    return pd.DataFrame(rows)


def clocks_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :func:`clocks_frame`."""
    view = frame.assign(flag=np.where(frame["informative"], "yes", "no"))
    table = LatexTable(
        columns=(
            Column("Clock", "clock", "text", wrap=False),
            Column("Regions", "regions", "text"),
            Column("n", "n", "int"),
            Column("MAE", "mae", digits=2),
            Column("Baseline MAE", "baseline_mae", digits=2),
            Column("r", "pearson_r", digits=2),
            Column("Informative", "flag", "text"),
        ),
        caption="Organ age clocks: out-of-fold accuracy",
        label=label("clocks"),
        notes=(
            "Each clock is an age model trained on an input restricted to its regions, with the folds of the "
            "whole-body model. MAE (years) and Pearson r of the out-of-fold predictions; baseline: predicting each "
            "scan at the mean age of the other folds. A clock not clearly better than the baseline is uninformative "
            "and left out of the phenotype tests by default.",
        ),
    )
    return view, table


def organ_table(models: pd.DataFrame, alpha: float, excluded: Mapping[str, str]) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :func:`analysis.organ_stats.organ_gap_models`: "organ age gaps by phenotype".

    One block per phenotype, one row per clock; the corrected and the conditioned gap side by side.
    """
    key = ["phenotype", "clock"]
    corr = models[models["gap"] == "corrected"].set_index(key)
    cond = models[models["gap"] == "conditioned"].set_index(key)
    index = corr.index.append(cond.index.difference(corr.index)) if len(cond) else corr.index
    view = pd.DataFrame(index=index).reset_index()
    base = pd.concat([corr, cond[~cond.index.isin(corr.index)]])
    for col in ("per", "n", "informative"):
        view[col] = [base.loc[k, col] for k in index]
    for tag, src in (("c", corr), ("k", cond)):
        for col in ("estimate", "ci_low", "ci_high", "q"):
            view[f"{col}_{tag}"] = [src.loc[k, col] if k in src.index else np.nan for k in index]
    view["name"] = view["clock"] + np.where(view["informative"].astype(bool), "", UNINFORMATIVE_MARK)
    order = {p: i for i, p in enumerate(dict.fromkeys(models["phenotype"]))}
    clock_order = {c: i for i, c in enumerate(dict.fromkeys(models["clock"]))}
    view = view.assign(_p=view["phenotype"].map(order), _c=view["clock"].map(clock_order))
    view = view.sort_values(["_p", "_c"], kind="mergesort").reset_index(drop=True)
    view["block"] = view["phenotype"] + " (" + view["per"].astype(str) + ")"
    first = models.iloc[0]
    mixed = bool(first["random_effect"])
    re_text = f"a random intercept for {first['random_effect']}" if mixed else "no random intercept"
    fe_text = f", {first['fixed_effects']} as fixed effects" if first["fixed_effects"] else ""
    df_notes = list(dict.fromkeys(str(t) for t in models["df_note"] if t))
    n_tests = {str(g): int(s["p"].notna().sum()) for g, s in models.groupby("gap", sort=False)}
    by_model = {
        f"{row['clock']}/{row['phenotype']}" + ("" if row["gap"] == "corrected" else " (conditioned)"): exclusions_of(
            row
        )
        for _, row in models.iterrows()
    }
    warned = summarise_warnings(list(models["warning"]), where="the warning column of organ_gap_models.csv")
    notes = [
        f"Linear {'mixed ' if mixed else ''}models of each clock's organ age gap on each phenotype alone, "
        f"adjusted for {covariate_list(str(first['covariates']))}, {re_text}{fe_text}; {'REML' if mixed else 'OLS'}. "
        "Corrected: the clock's bias-corrected gap (years); conditioned: its gap conditioned on the overall ageing "
        "gap (as bodyage clocks makes it: the residual on the mean of the other informative organ clocks' gaps, fitted "
        "out of fold): what the organ adds "
        "beyond the body's shared ageing. Estimates per unit of the phenotype or carriers vs non-carriers (1 vs 0).",
        *(f"Tests: {t.rstrip('.')}." for t in df_notes),
        f"Scans per model: {_range(models['n'])} (all counts in organ_gap_models.csv).",
        "q: Benjamini--Hochberg over the "
        + " and ".join(f"{n} clock-phenotype tests of the {g} gap" for g, n in n_tests.items())
        + f" (one family per gap), significant at {alpha:g}.",
        exclusions_note(by_model),
    ]
    if excluded:
        notes.append(
            "Left out of the tests as uninformative (not better than predicting the mean age): "
            + "; ".join(f"{c} ({why})" for c, why in excluded.items())
            + "."
        )
    if warned:
        notes.append(warned)
    group_c, group_k = "Corrected gap", "Conditioned gap"
    table = LatexTable(
        columns=(
            Column("Clock", "name", "text"),
            Column("Estimate", "estimate_c", digits=2, group=group_c),
            Column("95% CI", "ci_low_c", "ci", digits=2, high="ci_high_c", group=group_c),
            Column("q", "q_c", "p", stars="q_c", group=group_c),
            Column("Estimate", "estimate_k", digits=2, group=group_k),
            Column("95% CI", "ci_low_k", "ci", digits=2, high="ci_high_k", group=group_k),
            Column("q", "q_k", "p", stars="q_k", group=group_k),
        ),
        caption="Organ age gaps by phenotype (years)",
        label=label("organ_gap_models"),
        notes=tuple(notes),
        section="block",
    )
    return view, table


def organ_parts(view: pd.DataFrame) -> list[pd.DataFrame]:
    """Split the rows of :func:`organ_table` between phenotypes into parts of at most :data:`MAX_ORGAN_ROWS`.

    A phenotype's rows stay together (a phenotype with more clocks than that is a part alone).
    """
    parts: list[pd.DataFrame] = []
    current: list[pd.DataFrame] = []
    size = 0
    for _, block in view.groupby("block", sort=False):
        if current and size + len(block) > MAX_ORGAN_ROWS:
            parts.append(pd.concat(current))
            current, size = [], 0
        current.append(block)
        size += len(block)
    if current or not parts:
        parts.append(pd.concat(current) if current else view)
    return parts


def write_organ_tex(view: pd.DataFrame, table: LatexTable, path: Path) -> Path:
    """Write the organ table as one float per part (:func:`organ_parts`); later parts say they continue it."""
    from bodyage.atomic import write_text

    parts = organ_parts(view)
    texts = [render(parts[0], table)]
    for i, part in enumerate(parts[1:], start=2):
        cont = replace(
            table,
            caption=f"{table.caption}, continued ({i} of {len(parts)})",
            label=f"{table.label}-{i}",
            notes=("Notes as in the first part of the table.",),
        )
        texts.append(render(part, cont))
    return write_text(path, "".join(texts))


def correlation_matrix(corr: pd.DataFrame) -> pd.DataFrame:
    """The clock × clock matrix of :func:`analysis.organ_stats.clock_correlations` (clock order kept)."""
    names = list(dict.fromkeys(corr["clock_a"]))
    return corr.pivot(index="clock_a", columns="clock_b", values="r").reindex(index=names, columns=names)


def correlation_table(corr: pd.DataFrame) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of the correlation matrix: lower triangle, columns numbered as the rows."""
    mat = correlation_matrix(corr)
    names = list(mat.index)
    info = corr.drop_duplicates("clock_a").set_index("clock_a")["informative_a"]
    view = pd.DataFrame(
        {"name": [f"{i + 1} {n}" + ("" if info[n] else UNINFORMATIVE_MARK) for i, n in enumerate(names)]}
    )
    cols = [Column("Clock", "name", "text")]
    for j, b in enumerate(names[:-1]):
        view[f"c{j}"] = [mat.loc[a, b] if i > j else np.nan for i, a in enumerate(names)]
        cols.append(Column(str(j + 1), f"c{j}", digits=2))
    n = corr.loc[corr["clock_a"] != corr["clock_b"], "n"]
    table = LatexTable(
        columns=tuple(cols),
        caption="Correlations between the organ age gaps of the clocks",
        label=label("clock_correlations"),
        notes=(
            "Pearson r between the bias-corrected organ age gaps of two clocks over the scans that have both "
            f"(n = {int(n.min()) if len(n) else 0}--{int(n.max()) if len(n) else 0}); columns are numbered as the "
            f"rows. Mean r between informative clocks: {_f(mean_correlation(corr))}. "
            "95% CIs are in clock_correlations.csv.",
        ),
    )
    return view[[c.key for c in cols]], table


def correlation_figure(corr: pd.DataFrame, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Heatmap of the clock × clock correlations, values written in the cells; uninformative clocks marked."""
    mat = correlation_matrix(corr)
    info = corr.drop_duplicates("clock_a").set_index("clock_a")["informative_a"]
    labels = [n + ("" if info[n] else UNINFORMATIVE_MARK) for n in mat.index]
    k = len(labels)
    fig = new_figure(3.0 + 0.6 * k, 2.0 + 0.5 * k)
    ax = fig.add_subplot()
    values = mat.to_numpy(float)
    im = ax.imshow(values, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            v = float(values[i, j])
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 else "k")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_title(
        f"Corrected organ age gaps\nmean r between informative clocks: {_f(mean_correlation(corr))}", fontsize=9
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson r")
    return save(fig, out_dir, CORRELATION_FIGURE)


def run_organ_stats(
    folder: ClockTables | str | os.PathLike[str],
    *,
    phenotypes: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    group: str | None = DEFAULT_GROUP,
    engine: MixedEngine = "auto",
    include_uninformative: bool = False,
    alpha: float = ALPHA,
    figures: bool = True,
    out: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> OrganStatsResult:
    """Fit the organ gap models and write tables, LaTeX and figures (see the module docstring).

    Parameters
    ----------
    folder
        A clocks folder (or its tables, with ``out``).
    phenotypes, covariates, default_covariates, group, engine, include_uninformative, alpha
        See :func:`analysis.organ_stats.organ_gap_models`.
    figures
        Draw the correlation figure.
    out
        Folder holding ``stats/`` and ``figures/``; default the clocks folder.
    progress
        Progress display.

    Returns
    -------
    OrganStatsResult

    Raises
    ------
    InputError, RunError, StudyError
        For bad options or tables, naming the option, column or file.
    """
    from bodyage.atomic import write_json
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    tab = folder if isinstance(folder, ClockTables) else load_clocks(folder)
    base = Path(out) if out is not None else tab.root
    if base is None:
        raise InputError("clock tables built in memory need an output folder (out=...)")
    progress = progress or NO_PROGRESS
    arguments = {
        "clocks": str(tab.root) if tab.root else None,
        "phenotypes": list(phenotypes) if phenotypes is not None else None,
        "covariates": list(covariates) if covariates is not None else None,
        "default_covariates": default_covariates,
        "group": group,
        "engine": engine,
        "include_uninformative": include_uninformative,
        "alpha": alpha,
    }
    inputs = {}
    if tab.root is not None:
        inputs = {"organ_ages": tab.root / ORGAN_AGES_FILE, "clocks": tab.root / CLOCKS_FILE}
    record = build_run_record(
        "stats", arguments, inputs=inputs, extra={"study": str(tab.study_root) if tab.study_root else None}
    )
    stats_dir, fig_dir = base / STATS_DIR, base / FIGURES_DIR
    stats_dir.mkdir(parents=True, exist_ok=True)
    previous = stats_record.begin(base)
    written: list[Path] = []

    frame = clocks_frame(tab)
    written += write_frame(frame, stats_dir, "clocks")
    view, spec = clocks_table(frame)
    written.append(write_tex(view, stats_dir, "clocks", spec))
    excluded = excluded_clocks(tab, include_uninformative=include_uninformative)
    models = pd.DataFrame(columns=ORGAN_MODEL_COLUMNS)
    if len(excluded) < len(tab.names):  # with every clock uninformative there is nothing to test
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models = organ_gap_models(
                tab,
                phenotypes=phenotypes,
                covariates=covariates,
                default_covariates=default_covariates,
                group=group,
                engine=engine,
                include_uninformative=include_uninformative,
                alpha=alpha,
                progress=progress,
            )
        for w in {str(w.message): w for w in caught}.values():
            warnings.warn(str(w.message), w.category, stacklevel=2)
        written += write_frame(models, stats_dir, "organ_gap_models")
        view, spec = organ_table(models, alpha, excluded)
        written.append(write_organ_tex(view, spec, stats_dir / "organ_gap_models.tex"))
    corr = clock_correlations(tab)
    written += write_frame(corr, stats_dir, "clock_correlations")
    view, spec = correlation_table(corr)
    written.append(write_tex(view, stats_dir, "clock_correlations", spec))
    if figures:
        fig_dir.mkdir(parents=True, exist_ok=True)
        written += correlation_figure(corr, fig_dir)

    rec = None
    if (
        tab.study_root is not None
        and (tab.study_root / TRUTH_FILE).is_file()
        and (tab.study_root / TRUTH_TABLE).is_file()
    ):
        rec = clock_recovery(tab, models, alpha=alpha)
        written.append(write_json(base / CLOCK_RECOVERY_FILE, rec))
    removed = stats_record.remove_previous(base, previous, written, figures=figures)
    record_path = stats_record.record_path(base)
    write_record(
        record_path,
        finish_run_record(
            record,
            outputs=sorted(str(p.relative_to(base)) for p in written),
            removed=removed,
            phenotypes=list(dict.fromkeys(models["phenotype"].astype(str))),
            clocks=tab.names,
            excluded_clocks=dict(excluded),
            exclusions={"organ_gap_models": _exclusions(models)},
        ),
    )
    written.append(record_path)
    return OrganStatsResult(
        stats_dir=stats_dir,
        figures_dir=fig_dir,
        clocks=frame,
        models=models,
        correlations=corr,
        excluded=excluded,
        recovery=rec,
        files=tuple(written),
        alpha=alpha,
    )


def _exclusions(models: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for _, row in models.iterrows():
        out.setdefault(f"{row['clock']} ({row['gap']})", {})[str(row["phenotype"])] = exclusions_of(row)
    return out
