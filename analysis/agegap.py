"""The age gap and its bias correction; accuracy of the age predictions.

The gap (predicted minus chronological age) of a regressor that shrinks towards the
mean age is negatively correlated with age. docs/design.md §7 corrects it with a linear fit
made on held-out predictions and applied out of sample. Four choices
(:data:`analysis._typing.GAP_CORRECTIONS`):

``train`` (default)
    Use ``age_gap_corrected`` of ``predictions.parquet``: ``bodyage train`` fitted
    ``ŷ = αy + β`` on held-out predictions inside the training folds and applied it to
    the test fold (Beheshti et al. 2019; de Lange & Cole 2020).
``linear``
    Smith et al. 2019, linear: regress the gap on age, ``δ = β₀ + β₁y``, and subtract the
    fit. The fit for the scans of fold *k* uses the scans of every other fold, so each
    scan is corrected by a fit that never saw it (its own out-of-fold prediction included).
``quadratic``
    Smith et al. 2019, with ``y²`` added: ``δ = β₀ + β₁y + β₂y²``; fitted the same way.
``none``
    The uncorrected gap.

Downstream models keep age and age² as covariates whatever the choice (docs/design.md §7).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis._typing import GAP_CORRECTIONS, GapCorrection
from analysis.run import PREDICTIONS_FILE, RunTables, as_run
from bodyage.accuracy import baseline_predictions, informative, uninformative_note
from bodyage.errors import BodyageWarning, InputError, RunError

#: width of the age bands of :func:`age_accuracy` (years)
AGE_BAND_YEARS = 10


@dataclass(frozen=True)
class GapCorrectionResult:
    """The corrected gap of every scan and how it was obtained.

    Attributes
    ----------
    scans
        :attr:`RunTables.scans` with ``gap`` (the corrected gap the models use, years)
        and ``predicted_age_corrected`` (``age + gap``) added.
    coefficients
        One row per fold for ``linear``/``quadratic`` (``fold``, ``n_fit``,
        ``out_of_sample``, ``intercept``, ``slope``, ``quadratic``, ``age_centre``:
        ``δ̂ = intercept + slope·(y − c) + quadratic·(y − c)²``); empty otherwise.
    correction
        The correction used.
    """

    scans: pd.DataFrame
    coefficients: pd.DataFrame
    correction: GapCorrection


def correct_gap(run: RunTables | str | os.PathLike[str], correction: GapCorrection = "train") -> GapCorrectionResult:
    """Return the bias-corrected age gap of every scan (see the module docstring).

    Parameters
    ----------
    run
        Run tables or a run folder.
    correction
        ``train``, ``linear``, ``quadratic`` or ``none``.

    Returns
    -------
    GapCorrectionResult

    Raises
    ------
    InputError
        If ``correction`` is unknown.
    RunError
        If ``correction="train"`` and ``age_gap_corrected`` has missing values.

    Warns
    -----
    BodyageWarning
        If the predictions have a single fold: ``linear``/``quadratic`` are then fitted in
        sample (flagged ``out_of_sample=False`` in the coefficients).
    """
    if correction not in GAP_CORRECTIONS:
        raise InputError(f"correction {correction!r} is not one of {', '.join(GAP_CORRECTIONS)}")
    tables = as_run(run)
    scans = tables.scans.copy()
    coefs = pd.DataFrame(columns=["fold", "n_fit", "out_of_sample", "intercept", "slope", "quadratic", "age_centre"])
    if correction == "train":
        bad = int(scans["age_gap_corrected"].isna().sum())
        if bad:
            raise RunError(
                f"{PREDICTIONS_FILE}: column 'age_gap_corrected' has {bad} missing value(s); "
                "use --correction linear or quadratic"
            )
        scans["gap"] = scans["age_gap_corrected"]
    elif correction == "none":
        scans["gap"] = scans["age_gap"]
    else:
        scans["gap"], coefs = _smith_out_of_fold(scans, quadratic=correction == "quadratic")
    scans["predicted_age_corrected"] = scans["age"] + scans["gap"]
    return GapCorrectionResult(scans=scans, coefficients=coefs, correction=correction)


def _smith_out_of_fold(scans: pd.DataFrame, *, quadratic: bool) -> tuple[pd.Series, pd.DataFrame]:
    age = scans["age"].to_numpy(float)
    gap = scans["age_gap"].to_numpy(float)
    folds = scans["fold"].to_numpy()
    levels = np.unique(folds)
    out = np.full(len(scans), np.nan)
    rows = []
    if len(levels) < 2:
        warnings.warn(
            "predictions have a single fold: the age-gap correction is fitted on the same scans it corrects",
            BodyageWarning,
            stacklevel=3,
        )
    for k in levels:
        test = folds == k
        fit = ~test if len(levels) > 1 else test
        centre = float(age[fit].mean())
        design = _age_design(age - centre, quadratic)
        beta, *_ = np.linalg.lstsq(design[fit], gap[fit], rcond=None)
        out[test] = gap[test] - design[test] @ beta
        rows.append(
            {
                "fold": int(k),
                "n_fit": int(fit.sum()),
                "out_of_sample": len(levels) > 1,
                "intercept": float(beta[0]),
                "slope": float(beta[1]),
                "quadratic": float(beta[2]) if quadratic else 0.0,
                "age_centre": centre,
            }
        )
    return pd.Series(out, index=scans.index), pd.DataFrame(rows)


def _age_design(centred_age: np.ndarray, quadratic: bool) -> np.ndarray:
    cols = [np.ones_like(centred_age), centred_age]
    if quadratic:
        cols.append(centred_age**2)
    return np.column_stack(cols)


def age_accuracy(gap: GapCorrectionResult, *, band_years: int = AGE_BAND_YEARS) -> pd.DataFrame:
    """Accuracy of the age predictions, overall and by site, sex and age band.

    Parameters
    ----------
    gap
        Output of :func:`correct_gap`.
    band_years
        Width of the age bands (years), starting at a multiple of it.

    Returns
    -------
    pandas.DataFrame
        One row per subset: ``subset`` (``overall``, ``site``, ``sex``, ``age band``),
        ``level``, ``n``, ``mae``, ``rmse``, ``r2``, ``pearson_r`` (predicted vs
        chronological age, uncorrected predictions), ``baseline_mae`` (the MAE of predicting
        each scan at the mean age of the other folds, :func:`bodyage.accuracy.baseline_predictions`),
        ``mean_gap`` and ``gap_age_r`` (uncorrected gap), ``mean_corrected_gap`` and
        ``corrected_gap_age_r`` (the gap the models use; its correlation with age should be
        near 0). Scans with a missing site form a level ``missing``. There is no MAE of the
        corrected predictions: they use the true age, so it is small even for a model that
        learned nothing. Within a narrow age band ``r2``
        compares with that band's own age variance and can be negative.
    """
    scans = gap.scans.assign(baseline_age=baseline_predictions(gap.scans["age"], gap.scans["fold"]))
    band_lo = (np.floor(scans["age"] / band_years) * band_years).astype(int)
    bands = band_lo.astype(str) + "-" + (band_lo + band_years - 1).astype(str)
    rows = [_accuracy_row("overall", "all", scans)]
    for subset, key in (("site", scans["site"]), ("sex", scans["sex"]), ("age band", bands)):
        for level in sorted(pd.unique(key.dropna()), key=_natural):
            rows.append(_accuracy_row(subset, str(level), scans[key == level]))
        if key.isna().any():  # counted, not dropped and not a level named "nan"
            rows.append(_accuracy_row(subset, "missing", scans[key.isna().to_numpy()]))
    return pd.DataFrame(rows)


def _natural(value: object) -> tuple[int, float | str]:
    text = str(value)
    head = text.split("-")[0]
    try:
        return (0, float(head))
    except ValueError:
        return (1, text)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _accuracy_row(subset: str, level: str, df: pd.DataFrame) -> dict[str, object]:
    y = df["age"].to_numpy(float)
    yhat = df["predicted_age"].to_numpy(float)
    err = yhat - y
    gap = df["gap"].to_numpy(float)
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else float("nan")
    return {
        "subset": subset,
        "level": level,
        "n": len(df),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "pearson_r": _corr(yhat, y),
        "baseline_mae": float(np.abs(df["baseline_age"].to_numpy(float) - y).mean()),
        "mean_gap": float(err.mean()),
        "gap_age_r": _corr(err, y),
        "mean_corrected_gap": float(np.nanmean(gap)) if np.isfinite(gap).any() else float("nan"),
        "corrected_gap_age_r": _corr(gap[np.isfinite(gap)], y[np.isfinite(gap)]),
    }


def model_signal(acc: pd.DataFrame) -> tuple[bool, str]:
    """Whether the model behind an :func:`age_accuracy` table learned age, and the evidence.

    The rule is :func:`bodyage.accuracy.informative` (out-of-fold MAE below 0.95 × the
    mean-age baseline's, and Pearson r's 95% CI above 0), applied to the ``overall`` row.
    """
    return informative(_overall(acc))


def gap_note(acc: pd.DataFrame) -> str:
    """A sentence for every table or summary resting on the age gap; ``""`` when the model is informative.

    Parameters
    ----------
    acc
        Output of :func:`age_accuracy`.
    """
    return uninformative_note(_overall(acc))


def _overall(acc: pd.DataFrame) -> dict[str, object]:
    row = acc[acc["subset"] == "overall"].iloc[0]
    return {"overall": {k: row[k] for k in ("n", "mae", "pearson_r")}, "baseline_mae": row["baseline_mae"]}
