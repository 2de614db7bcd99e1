"""The oracle: how well age can be predicted from the planted quantities themselves.

``oracle_mae`` is the floor no image model can beat: the MAE of the best predictor of
chronological age we can build from the true planted per-region quantities (fat
fractions, water-signal factors, volume factors, texture coefficients of variation and
shape stretches of the regions with an ``ageing`` entry, age-independent ``nuisance``
variation included: the image shows both). Three predictors are fitted on a large fresh
sample of the scenario and evaluated on a second one; the smallest MAE is the oracle:

``ols``
    Linear regression of age on the planted quantities.
``ols_log``
    The same on logit fat fractions and log water and volume factors (the scale the
    age-independent variation is drawn on).
``bayes``
    Each quantity is inverted to an age-scale estimate of its region's biological age;
    they are combined by generalised least squares with the empirical covariance of their
    errors (shared deviation, regional deviations, phenotype accelerations), and the
    posterior median of age under the scenario's uniform age prior is taken (optimal
    for absolute error when the errors are Gaussian).

``region_information[r]`` is how much the oracle MAE rises when region ``r``'s quantities
are withheld (0 for regions without planted ageing): what the region uniquely tells about
age, the reference every attribution method is scored against. Common random numbers
make these differences precise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from bodyage.scenario import Scenario
from bodyage.simulate.planted import (
    TEXTURE_BASE_CV,
    biological_ages,
    draw_subjects,
    nuisance_sd,
    planted_features,
    planted_parameters,
    scaled_nuisance,
)

Array = npt.NDArray[np.float64]

#: size of each of the two fresh samples (fit, evaluate)
ORACLE_SAMPLE = 100_000


@dataclass(frozen=True)
class OracleResult:
    """The oracle's MAE, per estimator, and each region's information."""

    oracle_mae: float
    estimator: str
    mae_by_estimator: dict[str, float]
    region_information: dict[str, float] = field(default_factory=dict)
    n_fit: int = ORACLE_SAMPLE
    n_eval: int = ORACLE_SAMPLE

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "oracle_mae": self.oracle_mae,
            "estimator": self.estimator,
            "mae_by_estimator": self.mae_by_estimator,
            "n_fit": self.n_fit,
            "n_eval": self.n_eval,
        }


def _sample(
    scenario: Scenario, regions: Sequence[str], n: int, rng: np.random.Generator, nuis_sd: Array
) -> tuple[Array, Array, list[str]]:
    draws = draw_subjects(scenario, n, regions, rng)
    bio = biological_ages(scenario, draws.age, draws, regions)
    # only the planted regions carry features: compute their parameters alone
    planted = [r for r in regions if r in set(scenario.planted_regions)]
    cols = [list(regions).index(r) for r in planted]
    nuis = scaled_nuisance(draws, nuis_sd, cols=cols)
    params = planted_parameters(scenario, bio[:, cols], draws.phenotypes, planted, nuis)
    x, names = planted_features(scenario, params, planted)
    return draws.age, x, names


def _log_scale(scenario: Scenario, x: Array) -> Array:
    """Planted quantities on the scale their age-independent variation is drawn on."""
    out = x.copy()
    for j, a in enumerate(scenario.ageing):
        if a.effect == "fat_fraction":
            out[:, j] = np.log(x[:, j] / (1.0 - x[:, j]))
        elif a.effect in ("water_signal", "volume"):
            out[:, j] = np.log(x[:, j])
    return out


def _ols_mae(x_fit: Array, y_fit: Array, x_eval: Array, y_eval: Array) -> float:
    a_fit = np.column_stack([np.ones(len(y_fit)), x_fit])
    a_eval = np.column_stack([np.ones(len(y_eval)), x_eval])
    coef, *_ = np.linalg.lstsq(a_fit, y_fit, rcond=None)
    return float(np.mean(np.abs(a_eval @ coef - y_eval)))


def _age_scale(scenario: Scenario, x: Array, cols: Sequence[int]) -> tuple[Array, list[int]]:
    """Invert planted quantities to age-scale estimates of their region's biological age."""
    from bodyage.simulate.tissue import tissue_of

    out, kept = [], []
    for j in cols:
        a = scenario.ageing[j]
        if a.per_year == 0:
            continue
        base = {"fat_fraction": tissue_of(a.region).ff, "texture": TEXTURE_BASE_CV}.get(a.effect, 1.0)
        out.append((x[:, j] - base) / a.per_year + scenario.age.min)
        kept.append(j)
    if not out:
        return np.zeros((x.shape[0], 0)), kept
    return np.stack(out, axis=1), kept


def _bayes_mae(scenario: Scenario, est_fit: Array, y_fit: Array, est_eval: Array, y_eval: Array) -> float:
    from scipy.special import ndtr, ndtri

    lo, hi = scenario.age.min, scenario.age.max
    if est_fit.shape[1] == 0:
        return float(np.mean(np.abs(np.median(y_fit) - y_eval)))
    err = est_fit - y_fit[:, None]
    mu = err.mean(axis=0)
    cov = np.atleast_2d(np.cov(err, rowvar=False))
    ones = np.ones(est_fit.shape[1])
    prec_ones = np.linalg.solve(cov + 1e-9 * np.eye(len(ones)), ones)
    v = 1.0 / float(ones @ prec_ones)
    w = prec_ones * v
    m = (est_eval - mu) @ w
    s = np.sqrt(v)
    f_lo = ndtr((lo - m) / s)
    f_hi = ndtr((hi - m) / s)
    mid = np.clip((f_lo + f_hi) / 2.0, 1e-12, 1 - 1e-12)
    median = np.clip(m + s * ndtri(mid), lo, hi)
    return float(np.mean(np.abs(median - y_eval)))


def compute_oracle(
    scenario: Scenario, regions: Sequence[str], *, n: int = ORACLE_SAMPLE, seed: int | None = None
) -> OracleResult:
    """Fit and evaluate the oracle predictors on two fresh samples of ``scenario``.

    Parameters
    ----------
    scenario
        The scenario as run.
    regions
        All region names of the label table (the information of unplanted ones is 0).
    n
        Size of each fresh sample.
    seed
        Seed of the fresh samples (default: derived from the scenario's seed, so the
        oracle is reproducible and independent of the cohort's own draws).
    """
    base = np.random.SeedSequence([scenario.seed if seed is None else seed, 0x0AC1E])
    rng_fit, rng_eval = (np.random.default_rng(s) for s in base.spawn(2))
    nuis_sd = nuisance_sd(scenario, regions)
    y_fit, x_fit, names = _sample(scenario, regions, n, rng_fit, nuis_sd)
    y_eval, x_eval, _ = _sample(scenario, regions, n, rng_eval, nuis_sd)
    l_fit, l_eval = _log_scale(scenario, x_fit), _log_scale(scenario, x_eval)

    def evaluate(cols: list[int]) -> dict[str, float]:
        ols = _ols_mae(x_fit[:, cols], y_fit, x_eval[:, cols], y_eval)
        ols_log = _ols_mae(l_fit[:, cols], y_fit, l_eval[:, cols], y_eval)
        est_fit, kept = _age_scale(scenario, x_fit, cols)
        est_eval, _ = _age_scale(scenario, x_eval, kept)
        bayes = _bayes_mae(scenario, est_fit, y_fit, est_eval, y_eval)
        return {"ols": ols, "ols_log": ols_log, "bayes": bayes}

    all_cols = list(range(len(names)))
    full = evaluate(all_cols)
    best = min(full, key=lambda k: full[k])
    oracle = full[best]
    info: dict[str, float] = {r: 0.0 for r in regions}
    for region in dict.fromkeys(names):
        cols = [j for j in all_cols if names[j] != region]
        without = evaluate(cols)
        info[region] = float(min(without.values()) - oracle)
    return OracleResult(
        oracle_mae=float(oracle),
        estimator=best,
        mae_by_estimator={k: float(v) for k, v in full.items()},
        region_information=info,
        n_fit=n,
        n_eval=n,
    )
