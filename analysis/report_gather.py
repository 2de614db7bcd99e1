"""Gathering for ``bodyage report``: copy a run's tables and figures and lay out the sections.

:func:`gather_outputs` copies the tables of ``RUN/stats`` (``.tex`` + ``.csv``), the figures of
``RUN/figures`` (``.pdf`` + ``.png``) and those of each ``RUN/compare/<name>/`` into the
report folder, keeping their paths relative to the run, and sorts them into the
report's sections (:data:`TABLE_ORDER`, :data:`TRAIN_FIGURES`, :data:`STATS_FIGURES`).
A figure is captioned by its step's ``captions.json``, else by :data:`FIGURE_CAPTIONS`,
else by its name. Figures whose file name carries a participant or scan id (per-scan
maps) are left out and returned, to be counted, never named.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.run import FIGURES_DIR, STATS_DIR

COMPARE_DIR = "compare"
CAPTIONS_FILE = "captions.json"

#: captions of the figures the steps are known to write (stem -> caption)
FIGURE_CAPTIONS: dict[str, str] = {
    "learning_curves": "Training and validation loss per epoch, one curve per fold.",
    "predicted_vs_age": "Out-of-fold predicted age against chronological age, and the bias-corrected age gap "
    "against age (years).",
    "age_scatter": "Predicted against chronological age by site, and the bias-corrected age gap against age.",
    "phenotype_forest": "Effects of the phenotypes on the corrected age gap (years, 95% CI), "
    "separate and joint models.",
    "region_heatmap": "Partial correlations of region importance with each phenotype; stars mark "
    "Benjamini-Hochberg q-values.",
    "comparison_effects": "Cohort comparison: Hedges' g with 95% CI, age gap and region importance.",
    "attribution_regions": "Each region's share of the model's total importance (mean over the fold models, "
    "whiskers the min-max over folds or training runs) beside the null models' share bands when nulls were run; "
    "regions sorted and coloured by kind, those above every null's band in bold.",
    "attribution_slices": "Mean attribution mass per axial slice along the body (95% band), young vs old "
    "tertiles, with the z-extents of the 12 most important regions.",
}
#: order of the stats tables in the report (others follow, sorted)
TABLE_ORDER: tuple[str, ...] = (
    "age_accuracy",
    "phenotype_models",
    "region_models",
    "region_joint",
    "region_gap_correlations",
)
#: figures of each section, by stem prefix; the rest of RUN/figures is "attribution"
TRAIN_FIGURES: tuple[str, ...] = ("learning_curves", "predicted_vs_age", "age_scatter")
STATS_FIGURES: tuple[str, ...] = ("phenotype_forest", "region_heatmap")


@dataclass
class ReportSection:
    """A section of the report: its title, tables and captioned figures.

    Attributes
    ----------
    title : str
        The section heading.
    tables : list[str]
        Table paths relative to the report folder, without suffix.
    figures : list[tuple[str, str]]
        ``(path relative to the report folder, caption)`` per figure.
    """

    title: str
    tables: list[str] = field(default_factory=list)  # paths relative to the report folder, no suffix
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative, caption)


def _copy(src: Path, dst: Path) -> Path:
    from bodyage.atomic import write_with

    return write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _table_key(stem: str) -> tuple[int, str]:
    for i, prefix in enumerate(TABLE_ORDER):
        if stem == prefix or stem.startswith(prefix + "_"):
            return i, stem
    return len(TABLE_ORDER), stem


def _figure_files(folder: Path) -> list[Path]:
    """One file per figure: the PDF when there is one, else the PNG."""
    if not folder.is_dir():
        return []
    stems: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".pdf" or (path.suffix == ".png" and path.stem not in stems):
            if path.suffix == ".png" and path.with_suffix(".pdf").is_file():
                continue
            stems[path.stem] = path
    return [stems[s] for s in sorted(stems)]


def _captions(folder: Path) -> dict[str, str]:
    path = folder / CAPTIONS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _caption(stem: str, declared: Mapping[str, str]) -> str:
    if stem in declared:
        return declared[stem]
    for prefix, text in FIGURE_CAPTIONS.items():
        if stem == prefix:
            return text
        if stem.startswith(prefix + "_"):
            return f"{text} Method: {stem[len(prefix) + 1 :].replace('_', ' ')}."
    return stem.replace("_", " ").capitalize() + "."


def _names_participant(stem: str, ids: set[str]) -> bool:
    """Whether a file name carries a participant or scan id (as a ``_``/``-``-separated token or run of tokens)."""
    tokens = stem.replace("-", "_").split("_")
    return any(
        "_".join(tokens[i:j]) in ids for i in range(len(tokens)) for j in range(i + 1, min(len(tokens), i + 3) + 1)
    )


def gather_outputs(
    run_root: Path, out_dir: Path, ids: set[str]
) -> tuple[list[Path], list[Path], list[ReportSection], list[str]]:
    """Copy tables (.tex + .csv) and figures (.pdf + .png) into the report and lay out its sections.

    Figures whose file name carries a participant or scan id (per-scan maps) are left
    out; their names are returned last.

    Parameters
    ----------
    run_root : Path
        The run folder (``RUN/stats``, ``RUN/figures``, ``RUN/compare/<name>/``).
    out_dir : Path
        The report folder; copies keep their paths relative to the run.
    ids : set[str]
        Participant and scan ids: a figure whose file name carries one is withheld.

    Returns
    -------
    tuple[list[Path], list[Path], list[ReportSection], list[str]]
        The copied tables, the copied figures, the report's sections in order, and the
        names of the withheld figures (to be counted, never named).
    """
    withheld: list[str] = []
    tables: list[Path] = []
    figures: list[Path] = []
    age = ReportSection("Age prediction")
    attribution = ReportSection("Attribution")
    phenos = ReportSection("Phenotypes and the age gap")
    regions = ReportSection("Region importance and phenotypes")
    other = ReportSection("Other tables")

    stats_src = run_root / STATS_DIR
    if stats_src.is_dir():
        for src in sorted([*stats_src.glob("*.tex"), *stats_src.glob("*.csv")]):
            tables.append(_copy(src, out_dir / STATS_DIR / src.name))
        for tex in sorted(stats_src.glob("*.tex"), key=lambda p: _table_key(p.stem)):
            rel = f"{STATS_DIR}/{tex.stem}"
            if tex.stem == "age_accuracy":
                age.tables.append(rel)
            elif tex.stem == "phenotype_models":
                phenos.tables.append(rel)
            elif tex.stem.startswith("region_"):
                regions.tables.append(rel)
            else:
                other.tables.append(rel)

    fig_src = run_root / FIGURES_DIR
    declared = _captions(fig_src)
    for fig in _figure_files(fig_src):
        if _names_participant(fig.stem, ids):
            withheld.append(f"{FIGURES_DIR}/{fig.name}")
            continue
        for src in (fig, fig.with_suffix(".png")):
            if src.is_file():
                figures.append(_copy(src, out_dir / FIGURES_DIR / src.name))
        entry = (f"{FIGURES_DIR}/{fig.name}", _caption(fig.stem, declared))
        if fig.stem.startswith(TRAIN_FIGURES):
            age.figures.append(entry)
        elif fig.stem.startswith(STATS_FIGURES):
            (phenos if fig.stem == "phenotype_forest" else regions).figures.append(entry)
        else:
            attribution.figures.append(entry)

    comparisons: list[ReportSection] = []
    cmp_src = run_root / COMPARE_DIR
    if cmp_src.is_dir():
        for folder in sorted(p for p in cmp_src.iterdir() if p.is_dir()):
            sec = ReportSection(f"Comparison: {_comparison_title(folder)}")
            rel_dir = f"{COMPARE_DIR}/{folder.name}"
            for tex in sorted(folder.glob("*.tex")):
                for src in (tex, tex.with_suffix(".csv")):
                    if src.is_file():
                        tables.append(_copy(src, out_dir / rel_dir / src.name))
                sec.tables.append(f"{rel_dir}/{tex.stem}")
            caps = _captions(folder)
            for fig in _figure_files(folder):
                if _names_participant(fig.stem, ids):
                    withheld.append(f"{rel_dir}/{fig.name}")
                    continue
                for src in (fig, fig.with_suffix(".png")):
                    if src.is_file():
                        figures.append(_copy(src, out_dir / rel_dir / src.name))
                sec.figures.append((f"{rel_dir}/{fig.name}", _caption(fig.stem, caps)))
            if sec.tables or sec.figures:
                comparisons.append(sec)
    sections = [age, attribution, phenos, regions, *comparisons, other]
    return _dedupe(tables), _dedupe(figures), sections, withheld


def _comparison_title(folder: Path) -> str:
    """``<cohort> vs <reference>`` from the comparison's ``run.json``, else the folder name."""
    record = read_json_or_none(folder / "run.json")
    args = record.get("arguments") if isinstance(record, Mapping) else None
    if isinstance(args, Mapping) and isinstance(args.get("cohort"), str) and isinstance(args.get("reference"), str):
        return f"{args['cohort']} vs {args['reference']}"
    return folder.name.replace("_", " ")


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def read_json_or_none(path: Path) -> Any:
    """Read a JSON file, or None if it is missing, unreadable or not valid JSON.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    Any
        The parsed content, or None.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
