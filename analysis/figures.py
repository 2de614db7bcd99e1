"""Figures of the statistics (vector PDF + PNG): forest plot, heatmap, scatter, comparison.

Figures are drawn with matplotlib's object API on their own :class:`~matplotlib.figure.Figure`
(no pyplot state, no global settings changed). Scatter points are rasterised inside the
vector PDF, so a 40,000-point scatter stays a small file with vector axes and text. No
figure shows participant ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.latex import stars
from analysis.regionmodels import WHOLE_BODY
from bodyage.region_names import display_name

#: resolution of the PNG copies
PNG_DPI = 200


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure with constrained layout, made without pyplot (no global state).

    Parameters
    ----------
    width : float
        Width in inches.
    height : float
        Height in inches.

    Returns
    -------
    matplotlib.figure.Figure
        The empty figure.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Any, out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """Save ``fig`` as ``<stem>.pdf`` and ``<stem>.png`` (atomically); return the paths."""
    from bodyage.atomic import write_with

    out = Path(out_dir)
    return [
        write_with(out / f"{stem}.pdf", lambda tmp: fig.savefig(tmp, format="pdf")),
        write_with(out / f"{stem}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=PNG_DPI)),
    ]


def forest_plot(res: pd.DataFrame, out_dir: str | os.PathLike[str], stem: str = "phenotype_forest") -> list[Path]:
    """Forest plot of phenotype effects on the corrected age gap (separate and joint models).

    Parameters
    ----------
    res
        Output of :func:`analysis.phenotypes.phenotype_models`.
    """
    sep = res[res["model"] == "separate"].reset_index(drop=True)
    joint = res[res["model"] == "joint"].set_index("phenotype")
    n = len(sep)
    fig = new_figure(6.4, 1.0 + 0.45 * n)
    ax = fig.add_subplot()
    y = np.arange(n)[::-1].astype(float)
    offset = 0.15 if not joint.empty else 0.0
    ax.errorbar(
        sep["estimate"],
        y + offset,
        xerr=[sep["estimate"] - sep["ci_low"], sep["ci_high"] - sep["estimate"]],
        fmt="o",
        color="#1f4e79",
        ecolor="#1f4e79",
        capsize=3,
        label="separate models",
    )
    if not joint.empty:
        j = joint.loc[sep["phenotype"]]
        ax.errorbar(
            j["estimate"],
            y - offset,
            xerr=[j["estimate"] - j["ci_low"], j["ci_high"] - j["estimate"]],
            fmt="s",
            mfc="white",
            color="#c55a11",
            ecolor="#c55a11",
            capsize=3,
            label="joint model",
        )
    ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
    labels = [f"{p} ({per})" for p, per in zip(sep["phenotype"], sep["per"], strict=True)]
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, n - 0.3)
    for yi, q in zip(y, sep["q"], strict=True):
        mark = stars(q)
        if mark:
            ax.annotate(
                mark,
                (1.0, yi + offset),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
            )
    ax.set_xlabel("Effect on the corrected age gap (years; 95% CI)")
    ax.set_title("Phenotype effects on the age gap", fontsize=11)
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(axis="x", color="0.9")
    return save(fig, out_dir, stem)


def region_heatmap(
    res: pd.DataFrame,
    method: str,
    out_dir: str | os.PathLike[str],
    *,
    regions: Sequence[str] = (),
    stem: str | None = None,
) -> list[Path]:
    """Heatmap of region × phenotype effects (partial correlations) with q-value stars.

    Parameters
    ----------
    res
        Output of :func:`analysis.regionmodels.region_models`.
    method
        The attribution method to show.
    regions
        Row order (label order); regions not listed follow alphabetically.
    """
    from matplotlib import colormaps

    sub = res[(res["method"] == method) & (res["region"] != WHOLE_BODY)]
    metric = str(sub["metric"].iloc[0])
    phenos = list(dict.fromkeys(sub["phenotype"]))
    present = list(dict.fromkeys(sub["region"]))
    order = [r for r in regions if r in present] + sorted(set(present) - set(regions))
    r_mat = sub.pivot(index="region", columns="phenotype", values="partial_r").reindex(index=order, columns=phenos)
    q_mat = sub.pivot(index="region", columns="phenotype", values="q").reindex(index=order, columns=phenos)
    values = r_mat.to_numpy(float)
    finite = np.abs(values[np.isfinite(values)])
    lim = max(float(finite.max()) if finite.size else 0.1, 0.05)
    # 0.13 in (9.4 pt) per row: 53 regions at 7 pt stay readable when LaTeX fits the
    # figure to a page (at 0.2 in per row it was shrunk to about 4 pt)
    fig = new_figure(2.3 + 0.6 * len(phenos), 1.6 + 0.13 * len(order))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    for i in range(len(order)):
        for j in range(len(phenos)):
            mark = stars(q_mat.iat[i, j])
            if mark:
                colour = "white" if abs(values[i, j]) > 0.6 * lim else "black"
                ax.text(j, i, mark, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(phenos)), phenos, rotation=30, ha="right")
    ax.set_yticks(range(len(order)), [display_name(r) for r in order], fontsize=7 if len(order) > 25 else 8)
    ax.set_xlabel("Phenotype")
    ax.set_title(f"{method} ({metric}): region effects", fontsize=10)
    bar = fig.colorbar(im, ax=ax, shrink=min(1.0, 8.0 / max(len(order), 1)) if len(order) > 8 else 1.0)
    bar.set_label("Partial correlation with phenotype\n(given covariates)", fontsize=8)
    fig.supxlabel("* q<0.05  ** q<0.01  *** q<0.001 (Benjamini-Hochberg); grey: not estimable", fontsize=7, color="0.3")
    return save(fig, out_dir, stem or f"region_heatmap_{method}")


def age_scatter(scans: pd.DataFrame, out_dir: str | os.PathLike[str], stem: str = "age_scatter") -> list[Path]:
    """Predicted vs chronological age by site, and the corrected gap vs age.

    Parameters
    ----------
    scans
        :attr:`analysis.agegap.GapCorrectionResult.scans`.
    """
    from matplotlib import colormaps

    fig = new_figure(10.0, 4.4)
    ax1, ax2 = fig.subplots(1, 2)
    sites = sorted(pd.unique(scans["site"].astype(str)))
    colours = colormaps["tab10"] if len(sites) <= 10 else None
    size = 6 if len(scans) < 2000 else 2
    alpha = 0.7 if len(scans) < 2000 else 0.3
    # one scatter in a shuffled order, so no site is hidden under the ones drawn after it
    order = np.random.default_rng(0).permutation(len(scans))
    site_of = scans["site"].astype(str).to_numpy()[order]
    if colours is not None:
        colour = np.array([colours(sites.index(s)) for s in site_of])
    else:
        colour = np.tile(np.array([[0.12, 0.31, 0.47, 1.0]]), (len(order), 1))
    age = scans["age"].to_numpy()[order]
    ax1.scatter(age, scans["predicted_age"].to_numpy()[order], s=size, alpha=alpha, c=colour, rasterized=True, lw=0)
    ax2.scatter(age, scans["gap"].to_numpy()[order], s=size, alpha=alpha, c=colour, rasterized=True, lw=0)
    if colours is not None:
        for k, site in enumerate(sites):
            ax1.scatter([], [], s=12, color=colours(k), label=site)
    lo = float(min(scans["age"].min(), scans["predicted_age"].min()))
    hi = float(max(scans["age"].max(), scans["predicted_age"].max()))
    ax1.plot([lo, hi], [lo, hi], color="0.3", lw=1, ls="--", label="identity")
    ax1.set_xlabel("Chronological age (years)")
    ax1.set_ylabel("Predicted age (years)")
    ax1.set_title("Out-of-fold predictions by site", fontsize=10)
    ax1.legend(fontsize=7, frameon=False, title="site" if colours else None, title_fontsize=7)
    ax2.axhline(0.0, color="0.3", lw=1, ls="--")
    ax2.set_xlabel("Chronological age (years)")
    ax2.set_ylabel("Corrected age gap (years)")
    ax2.set_title("Bias-corrected age gap", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(color="0.92")
        ax.set_axisbelow(True)
    return save(fig, out_dir, stem)


def comparison_plot(
    tests: pd.DataFrame, out_dir: str | os.PathLike[str], *, title: str, stem: str = "comparison_effects", top: int = 20
) -> list[Path]:
    """Hedges' g (95% CI) of the age gaps and of the regions with the smallest q.

    Parameters
    ----------
    tests
        :attr:`analysis.compare.ComparisonResult.tests`.
    title
        Figure title (the two filters).
    top
        Regions shown (smallest q first).
    """
    gaps = tests[tests["region"] == ""]
    regions = tests[(tests["region"] != "") & tests["hedges_g"].notna()].sort_values(["q", "p"]).head(top)
    view = pd.concat([gaps, regions], ignore_index=True)
    names = [
        o if r == "" else f"{display_name(r)} ({m})"
        for o, r, m in zip(view["outcome"], view["region"], view["method"], strict=True)
    ]
    n = len(view)
    fig = new_figure(6.8, 1.2 + 0.32 * n)
    ax = fig.add_subplot()
    y = np.arange(n)[::-1].astype(float)
    sig = (view["q"] < 0.05).to_numpy()
    for mask, colour in ((~sig, "0.45"), (sig, "#c00000")):
        part = view[mask]
        ax.errorbar(
            part["hedges_g"],
            y[mask],
            xerr=[part["hedges_g"] - part["g_ci_low"], part["g_ci_high"] - part["hedges_g"]],
            fmt="o",
            color=colour,
            capsize=2,
            ms=4,
        )
    ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
    if len(gaps) and len(regions):
        ax.axhline(y[len(gaps) - 1] - 0.5, color="0.8", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("Hedges' g, cohort minus reference (95% CI); red: q < 0.05")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", color="0.92")
    return save(fig, out_dir, stem)
