"""Accuracy of out-of-fold age predictions beside a baseline, and whether a model learned age.

A model's MAE means little alone: on a cohort aged 45–80 a model that predicts every scan
at the mean age already has an MAE near 9 years. The baseline here is exactly that
predictor, out of fold: each scan of test fold *k* is predicted at the mean age of the
scans of the other folds (the folds its model trained on).

A model is **informative** (:func:`informative`, the one place the rule and its
thresholds live; ``train``, ``stats``, ``report`` and organ clocks all use it) when both

- its out-of-fold MAE is below :data:`MAX_MAE_RATIO` (0.95) × the baseline's MAE, and
- the lower end of the 95 % confidence interval of Pearson r (predicted vs chronological
  age, Fisher z, n scans) is above 0.

A model that fails either has not shown that it learned age; the age gap it produces is
then chronological age with a sign flipped plus noise, and its bias-corrected gap is
small because the correction uses the true age, not because the model is accurate. That
is why the accuracy of the bias-corrected predictions is never reported.

Torch-free, so the statistics layer can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError
from bodyage.folds import regression_metrics

#: an informative model's out-of-fold MAE is below this fraction of the baseline's MAE
MAX_MAE_RATIO = 0.95
#: confidence level of Pearson r's interval, whose lower end must be above 0
R_CONFIDENCE = 0.95

_COLUMNS = ("age", "predicted_age", "fold")


def baseline_predictions(age: npt.ArrayLike, fold: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The mean-age predictor, out of fold: each scan gets the mean age of the other folds.

    Parameters
    ----------
    age
        Chronological age of each scan (years), shape ``(n,)``.
    fold
        Test fold of each scan, shape ``(n,)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``, years. With a single fold there are no other folds and every scan
        gets the mean age of all scans (in sample, which flatters the baseline slightly).
    """
    a = np.asarray(age, dtype=float)
    f = np.asarray(fold)
    out = np.full(len(a), float(a.mean()) if len(a) else math.nan)
    levels = np.unique(f)
    if len(levels) < 2:
        return out
    for k in levels:
        test = f == k
        out[test] = a[~test].mean()
    return out


def pearson_ci(r: float, n: int, level: float = R_CONFIDENCE) -> tuple[float, float]:
    """Confidence interval of a Pearson correlation (Fisher z; NaN with ``n`` < 4 or ``r`` NaN)."""
    if n < 4 or not math.isfinite(r):
        return (math.nan, math.nan)
    r = min(max(r, -0.999999), 0.999999)
    half = NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(n - 3)
    z = math.atanh(r)
    return (math.tanh(z - half), math.tanh(z + half))


def informative(metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a model learned age (see the module docstring), and why.

    Parameters
    ----------
    metrics
        ``{"overall": {"n", "mae", "pearson_r"}, "baseline_mae": ...}``, as in
        ``metrics.json`` or :func:`prediction_metrics`.

    Returns
    -------
    tuple of (bool, str)
        The verdict and one sentence giving the evidence, e.g. ``"out-of-fold MAE 10.24 y is
        1.00 × the mean-age baseline's 10.21 y (needs < 0.95×); Pearson r -0.05, 95% CI
        [-0.25, 0.15] (needs > 0)"``.
    """
    overall = metrics.get("overall") or {}
    mae = _float(overall.get("mae"))
    r = _float(overall.get("pearson_r"))
    n = int(overall.get("n") or 0)
    base = _float(metrics.get("baseline_mae"))
    ratio = mae / base if base > 0 else math.nan
    low, high = pearson_ci(r, n)
    mae_ok = math.isfinite(ratio) and ratio < MAX_MAE_RATIO
    r_ok = math.isfinite(low) and low > 0
    ci = f"95% CI [{low:.2f}, {high:.2f}]" if math.isfinite(low) else "no CI"
    reason = (
        f"out-of-fold MAE {mae:.2f} y is {ratio:.2f} × the mean-age baseline's {base:.2f} y "
        f"({'<' if mae_ok else 'not <'} {MAX_MAE_RATIO:g}×); Pearson r {r:.2f}, {ci} ({'>' if r_ok else 'not >'} 0)"
    )
    return mae_ok and r_ok, reason


def prediction_metrics(preds: pd.DataFrame) -> dict[str, Any]:
    """Accuracy of out-of-fold predictions beside the mean-age baseline (``metrics.json``).

    Parameters
    ----------
    preds
        One row per scan with ``age``, ``predicted_age`` and ``fold``.

    Returns
    -------
    dict
        ``overall`` and ``folds.<k>`` (:func:`bodyage.folds.regression_metrics`: ``n``,
        ``mae``, ``rmse``, ``r2``, ``pearson_r``), ``baseline_mae`` (the mean-age predictor
        out of fold, :func:`baseline_predictions`), ``mae_baseline_ratio``, ``pearson_r_ci``
        (95 %, Fisher z), ``informative`` and ``informative_reason`` (:func:`informative`).
        Nothing about the bias-corrected predictions: they use the true age.

    Raises
    ------
    InputError
        If a column is missing.
    """
    missing = [c for c in _COLUMNS if c not in preds.columns]
    if missing:
        raise InputError(f"predictions: missing column(s) {', '.join(missing)}")
    age = preds["age"].to_numpy(float)
    out: dict[str, Any] = {"overall": regression_metrics(age, preds["predicted_age"]), "folds": {}}
    for k, g in preds.groupby("fold"):
        out["folds"][str(k)] = regression_metrics(g["age"], g["predicted_age"])
    base = float(np.abs(baseline_predictions(age, preds["fold"]) - age).mean()) if len(age) else math.nan
    out["baseline_mae"] = base
    out["mae_baseline_ratio"] = out["overall"]["mae"] / base if base > 0 else math.nan
    out["pearson_r_ci"] = list(pearson_ci(out["overall"]["pearson_r"], out["overall"]["n"]))
    out["informative"], out["informative_reason"] = informative(out)
    return out


def accuracy_text(metrics: Mapping[str, Any]) -> str:
    """``"out-of-fold MAE 2.40 years (mean-age baseline 9.21), r 0.960"``."""
    overall = metrics.get("overall") or {}
    text = f"out-of-fold MAE {_float(overall.get('mae')):.2f} years"
    if "baseline_mae" in metrics:
        text += f" (mean-age baseline {_float(metrics['baseline_mae']):.2f})"
    return text + f", r {_float(overall.get('pearson_r')):.3f}"


def uninformative_note(metrics: Mapping[str, Any]) -> str:
    """A sentence for every output that rests on the age gap; ``""`` for an informative model."""
    ok, reason = informative(metrics)
    if ok:
        return ""
    return (
        f"Uninformative age model: {reason}. The age-gap analyses rest on a model that has not "
        "shown it learned age; do not read its gap as biological ageing."
    )


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
