"""Phenotype models of the corrected age gap (docs/design.md §7).

``gap ~ phenotype + age + age² + sex`` for each phenotype alone, and one joint model with
every phenotype, fitted by REML with random intercepts (:mod:`analysis.mixed`).

Model form, chosen to stay fast at 40,000 subjects:

- without repeat visits: a random intercept for ``group`` (``site`` by default). With a
  handful of sites statsmodels' MixedLM takes ~2 s on 46,000 scans.
- with repeat visits: a random intercept for the subject, and ``group`` as fixed effects
  (one indicator per site but the first). Subjects nested in sites as variance
  components took statsmodels 160 s on 100,000 rows; with 4–22 sites a site random
  intercept is estimated from so few groups that fixed site effects lose nothing, and a
  single subject intercept is solved exactly and fast (:mod:`analysis.mixed`, ``auto``).
- ``group=None``: no site term; a subject intercept with repeats, OLS without.

Covariates: age (with age²) and sex are in every model unless ``default_covariates`` is
false; ``covariates`` adds columns to them (:func:`resolve_covariates`). The ``covariates``
column of every result names the covariates actually used.

Rows with a missing phenotype, covariate or group value are excluded from that model and
counted by reason (:func:`analysis.design.build_design`: ``n_missing_phenotype``,
``n_missing_covariate`` with ``missing_by_covariate``, ``n_missing_group``,
``n_missing_other``); the joint model uses the scans with every phenotype present.
:func:`phenotype_exclusions` collects the counts for ``stats/run.json``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis._typing import GapCorrection, MixedEngine
from analysis.agegap import GapCorrectionResult, correct_gap
from analysis.design import (
    DEFAULT_COVARIATES,
    DEFAULT_GROUP,
    EXCLUSION_COLUMNS,
    build_design,
    check_columns,
    covariate_block,
    exclusion_columns,
    exclusions_by,
    exclusions_of,
    is_binary,
    numeric_values,
)
from analysis.fdr import benjamini_hochberg
from analysis.mixed import LinearFit, fit_ols, fit_random_intercept
from analysis.run import RunTables, as_run
from bodyage.errors import BodyageWarning, InputError
from bodyage.progress import NO_PROGRESS, Progress

#: name of the subject random intercept
SUBJECT = "subject"
#: columns of :func:`phenotype_models`, in order
PHENOTYPE_MODEL_COLUMNS: list[str] = [
    "model",
    "phenotype",
    "kind",
    "per",
    "phenotype_sd",
    "n",
    *EXCLUSION_COLUMNS,
    "estimate",
    "se",
    "ci_low",
    "ci_high",
    "stat",
    "df",
    "p",
    "q",
    "random_effect",
    "fixed_effects",
    "n_groups",
    "group_var",
    "resid_var",
    "boundary",
    "converged",
    "engine",
    "warning",
    "correction",
    "covariates",
    "df_note",
]


@dataclass(frozen=True)
class ModelForm:
    """Which grouping gets the random intercept and which enters as fixed effects.

    Attributes
    ----------
    random
        Column whose levels get a random intercept (``subject_id`` or the group), or ``None``.
    random_name
        Its name in results (``"subject"`` or the group column).
    fixed_group
        Grouping column entered as fixed-effect indicators, or ``None``.
    cluster
        Column to cluster standard errors on in OLS region models (subjects with repeats), or ``None``.
    """

    random: str | None
    random_name: str | None
    fixed_group: str | None
    cluster: str | None


def model_form(tables: RunTables, group: str | None) -> ModelForm:
    """Choose the model form of the module docstring for these tables and ``group``.

    Raises
    ------
    InputError
        If ``group`` is not a column or has no values.
    """
    scans = tables.scans
    if group is not None:
        check_columns(scans, [group], "group")
        if scans[group].isna().all():
            raise InputError(f"group {group!r} has no non-missing values")
    if tables.has_repeats:
        return ModelForm(random="subject_id", random_name=SUBJECT, fixed_group=group, cluster="subject_id")
    return ModelForm(random=group, random_name=group, fixed_group=None, cluster=None)


def resolve_phenotypes(tables: RunTables, phenotypes: Sequence[str] | None) -> list[str]:
    """Return the phenotypes to model.

    Given names are checked strictly: each must be a numeric, non-constant column with a
    value somewhere. With ``None``, every non-reserved cohort column is a candidate
    (docs/design.md §4); candidates that fail the same checks are skipped with one warning.

    Raises
    ------
    InputError
        If a given phenotype is invalid, or no phenotype remains.

    Warns
    -----
    BodyageWarning
        Naming the default candidates that were skipped and why.
    """
    scans = tables.scans
    if phenotypes is not None:
        names = list(dict.fromkeys(phenotypes))
        if not names:
            raise InputError("no phenotype given")
        for name in names:
            if name in ("age", "sex", "gap", "age_gap", "age_gap_corrected", "predicted_age"):
                raise InputError(f"phenotype {name!r} is a covariate or the outcome, not a phenotype")
            numeric_values(scans, name, "phenotype")
        return names
    kept: list[str] = []
    skipped: list[str] = []
    for name in tables.phenotype_columns():
        try:
            numeric_values(scans, name, "phenotype")
        except InputError as err:
            skipped.append(str(err))
        else:
            kept.append(name)
    if skipped:
        warnings.warn("skipped default phenotype(s): " + "; ".join(skipped), BodyageWarning, stacklevel=3)
    if not kept:
        raise InputError(
            "the cohort has no phenotype columns that are numeric and not constant; name them with --phenotype"
        )
    return kept


def resolve_covariates(
    tables: RunTables,
    covariates: Sequence[str] | None,
    phenotypes: Sequence[str],
    *,
    default_covariates: bool = True,
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Return the coded covariate columns and the covariate names used.

    The defaults (age, which brings age², and sex) come first unless ``default_covariates``
    is false; given covariates are added to them, never replace them (docs/design.md §7 keeps
    age in every gap model: replacing it let a phenotype correlated with age stand in for
    the age bias of an uncorrected gap). A default that is constant (e.g. sex in a one-sex
    cohort) is left out with a warning; given covariates are checked strictly.

    Parameters
    ----------
    covariates
        Columns added to the defaults; ``None`` or empty: the defaults only.
    phenotypes
        The phenotypes modelled (a default that is one of them is left out).
    default_covariates
        Include age, age² and sex. With ``False`` only ``covariates`` are used (possibly none).

    Raises
    ------
    InputError
        If a given covariate is not a column, has no values, is constant, or is also a phenotype.
    """
    scans = tables.scans
    given = tuple(dict.fromkeys(covariates or ()))
    clash = [c for c in given if c in phenotypes]
    if clash:
        raise InputError(f"covariate {clash[0]!r} is also a phenotype")
    names: list[str] = []
    for name in DEFAULT_COVARIATES if default_covariates else ():
        if name in phenotypes:
            continue
        if name in given:  # also given: checked strictly below
            names.append(name)
            continue
        try:
            covariate_block(scans, [name])
        except InputError as err:
            warnings.warn(f"default covariate left out: {err}", BodyageWarning, stacklevel=3)
        else:
            names.append(name)
    names += [n for n in given if n not in names]
    return covariate_block(scans, names), tuple(names)


def phenotype_exclusions(res: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """Scans left out of each phenotype model, by reason (for ``stats/run.json``).

    Parameters
    ----------
    res
        Output of :func:`phenotype_models`.

    Returns
    -------
    dict
        ``{"separate": {phenotype: {reason: n}}, "joint": {reason: n}}`` (``"joint"`` only
        when the joint model ran); reasons as in :func:`analysis.design.exclusions_of`.
    """
    out = {"separate": exclusions_by(res[res["model"] == "separate"], "phenotype")}
    joint = res[res["model"] == "joint"]
    if len(joint):
        out["joint"] = {"all phenotypes": exclusions_of(joint.iloc[0])}
    return out


def _term(fit: LinearFit, name: str) -> dict[str, float]:
    """``fit.term(name)`` with its t test's ``df`` (Satterthwaite, or n − p for OLS); NaN for a z test."""
    term = fit.term(name)
    df = term.get("df", getattr(fit, "df_resid", None))
    return {**term, "df": float(df) if df is not None and np.isfinite(df) else float("nan")}


def _df_note(fit: LinearFit) -> str:
    """How the fit's tests were made (its ``df_note`` where it has one)."""
    note = getattr(fit, "df_note", "")
    if note:
        return str(note)
    if getattr(fit, "df_resid", None) is not None:
        return "t tests with the residual degrees of freedom (n minus the number of terms)"
    return "Wald z tests (normal approximation)"


def _fit(
    y: np.ndarray, X: np.ndarray, names: Sequence[str], groups: np.ndarray | None, form: ModelForm, engine: MixedEngine
) -> LinearFit:
    if groups is None or form.random_name is None:
        return fit_ols(y, X, names)
    return fit_random_intercept(y, X, names, groups, group=form.random_name, engine=engine)


def phenotype_models(
    run: RunTables | str | os.PathLike[str],
    *,
    phenotypes: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    group: str | None = DEFAULT_GROUP,
    correction: GapCorrection = "train",
    engine: MixedEngine = "auto",
    joint: bool = True,
    gap: GapCorrectionResult | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Fit the phenotype models of the corrected age gap.

    Parameters
    ----------
    run
        Run tables or a run folder.
    phenotypes
        Phenotype columns; ``None``: every non-reserved cohort column (docs/design.md §4).
    covariates
        Covariate columns added to the defaults (:func:`resolve_covariates`). ``age`` brings ``age²``.
    default_covariates
        Adjust for age, age² and sex (default). ``False`` leaves only ``covariates``.
    group
        Grouping column (random intercept or fixed effects, see the module docstring), or ``None``.
    correction
        Age-gap correction (:func:`analysis.agegap.correct_gap`); ignored if ``gap`` is given.
    engine
        Mixed-model solver (:func:`analysis.mixed.fit_random_intercept`).
    joint
        Also fit the joint model with every phenotype.
    gap
        A precomputed :func:`analysis.agegap.correct_gap` result.
    progress
        Progress display (one step per model).

    Returns
    -------
    pandas.DataFrame
        One row per (``model``, ``phenotype``), ``model`` ``"separate"`` or ``"joint"``:
        ``kind`` (binary/continuous), ``per`` (``"1 vs 0"`` or ``"per unit"``),
        ``phenotype_sd``, ``n``, the scans left out by reason (``n_missing_phenotype``,
        ``n_missing_covariate`` and per covariate ``missing_by_covariate`` as a JSON object,
        ``n_missing_group``, ``n_missing_other``), ``estimate`` (years of corrected gap),
        ``se``, ``ci_low``, ``ci_high`` (95%), ``stat`` (z, or t), ``df`` (the t test's
        degrees of freedom; NaN for z), ``p``, ``q`` (Benjamini–Hochberg over the
        phenotypes of that model), ``random_effect``, ``fixed_effects``, ``n_groups``,
        ``group_var``, ``resid_var``, ``boundary``, ``converged``, ``engine``, ``warning``
        (text, empty if none), ``correction``, ``covariates`` (names used, ``", "``-joined;
        age brings age²), ``df_note`` (how the tests were made: z or t and which df).

    Raises
    ------
    InputError
        For an invalid phenotype, covariate or group (naming it).

    Warns
    -----
    BodyageWarning
        When a model did not converge or was refitted by the fallback solver.
    """
    tables = as_run(run)
    progress = progress or NO_PROGRESS
    gap = gap or correct_gap(tables, correction)
    scans = gap.scans
    phenos = resolve_phenotypes(tables, phenotypes)
    cov, cov_names = resolve_covariates(tables, covariates, phenos, default_covariates=default_covariates)
    form = model_form(tables, group)
    sets: list[tuple[str, list[str]]] = [("separate", [p]) for p in phenos]
    if joint and len(phenos) > 1:
        sets.append(("joint", phenos))
    task = progress.task("phenotype models", total=len(sets))
    rows: list[dict[str, object]] = []
    for model, names in sets:
        design = build_design(
            scans, names, cov, fixed_group=form.fixed_group, random_group=form.random, outcome=scans["gap"]
        )
        y = scans["gap"].to_numpy(float)[design.rows]
        groups = scans[form.random].to_numpy()[design.rows] if form.random is not None else None
        fit = _fit(y, design.X, design.names, groups, form, engine)
        for name in names:
            values = numeric_values(scans, name, "phenotype")[design.rows]
            binary = is_binary(values)
            notes = list(fit.warnings)
            if design.dropped:
                notes.append(f"constant on the rows used, left out: {', '.join(design.dropped)}")
            rows.append(
                {
                    "model": model,
                    "phenotype": name,
                    "kind": "binary" if binary else "continuous",
                    "per": "1 vs 0" if binary else "per unit",
                    "phenotype_sd": float(values.std()),
                    "n": design.n,
                    **exclusion_columns(design),
                    **_term(fit, name),
                    "random_effect": fit.group or "",
                    "fixed_effects": form.fixed_group or "",
                    "n_groups": fit.n_groups,
                    "group_var": fit.group_var,
                    "resid_var": fit.resid_var,
                    "boundary": fit.boundary,
                    "converged": fit.converged,
                    "engine": fit.engine,
                    "warning": "; ".join(notes),
                    "correction": gap.correction,
                    "covariates": ", ".join(cov_names),
                    "df_note": _df_note(fit),
                }
            )
        if not fit.converged or any("refitted" in w for w in fit.warnings):
            warnings.warn(
                f"phenotype model ({model}, {', '.join(names)}): {fit.warning_text}", BodyageWarning, stacklevel=2
            )
        task.advance()
    task.close()
    out = pd.DataFrame(rows)
    out["q"] = np.nan
    for _, idx in out.groupby("model").groups.items():
        out.loc[idx, "q"] = benjamini_hochberg(out.loc[idx, "p"].to_numpy())
    return out[PHENOTYPE_MODEL_COLUMNS]
