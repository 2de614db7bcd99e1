"""Figures of ``bodyage attribute``: cohort summaries and per-scan maps for people.

Cohort figures (``RUN/figures/``, PDF and PNG):

- ``attribution_regions_<method>``: each region's share of the importance (percent of the
  total over regions), the mean over the fold models (each explains its own test scans)
  with the min–max over folds, or over training runs with ``--runs``, as the interval (the
  model's variance, which dominates; not per-scan standard errors), and behind it the null
  models' bands of the same share (``attribution_nulls.csv``); regions sorted, coloured by
  kind (organ, muscle, fat, bone, vessel, ...), those above every null's band in bold;
- ``attribution_slices_<method>``: mean attribution mass per axial slice along the body
  with a 95% band, the youngest and oldest age tertiles overlaid, and the z-extent of
  each region drawn alongside, so a reader sees which body level drives the prediction.

Per-scan maps (``RUN/attribute/maps/``, written for ``--save-maps N`` scans): one NIfTI
per scan and method on the image's own grid and affine (RAS+ orientation, as the images
are read), loadable over the image in ITK-SNAP or 3D Slicer, and one PNG per scan with a
coronal and a sagittal slice, the attribution overlaid and the region contours drawn.
They are named and titled ``map_000``, ``map_001``, ... (ids never appear in a figure);
``maps.csv`` beside them says which scan each is.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.attribution import METHODS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bodyage.attribute_inputs import AttributeConfig, RunInputs

MAPS_DIR = "attribute/maps"
#: which scan each anonymous map is (the only place its id is written)
MAP_INDEX = "maps.csv"
KIND_COLOURS: dict[str, str] = {
    "organ": "#1b9e77",
    "muscle": "#d95f02",
    "fat": "#e6ab02",
    "bone": "#7570b3",
    "vessel": "#e7298a",
    "nervous": "#66a61e",
    "other": "#666666",
}


def _save(fig: Any, folder: Path, stem: str, exts: tuple[str, ...] = ("pdf", "png")) -> list[Path]:
    from bodyage.atomic import write_with

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in exts:
        path = folder / f"{stem}.{ext}"
        write_with(path, partial(fig.savefig, format=ext, dpi=130, bbox_inches="tight"))
        out.append(path)
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: how the ablation baselines are named in titles and texts: ``shift`` (the option value,
#: kept for compatibility) is the *mean-signal* ablation; mirrored in :mod:`analysis._typing`
BASELINE_NAMES: dict[str, str] = {"shift": "mean-signal", "mean": "mean-fill", "erase": "erase", "blur": "blur"}


def baseline_label(method: str, baseline: str) -> str:
    """``mean-signal ablation`` for ``ablation`` with ``shift``; ``shapley (mean-signal baseline)`` for others."""
    name = BASELINE_NAMES.get(baseline, baseline)
    return f"{name} ablation" if method == "ablation" else f"{method} ({name} baseline)"


def _importance_values(attributions: pd.DataFrame, method: str, measure: str) -> Any:
    """Per-scan importance of one method's regions, grouped by region (``abs_mass``: ``|mass|``; ``|density|``)."""
    sub = attributions[attributions["method"] == method]
    vals = sub["mass"].abs() if measure == "abs_mass" else sub[measure]
    if measure == "density":
        vals = vals.abs()
    return vals.groupby(sub["region"])


def region_figure(
    attributions: pd.DataFrame,
    method: str,
    measure: str,
    folder: Path,
    *,
    baseline: str | None = None,
    bands: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
) -> list[Path]:
    """Region importance as a share of the model's total, with its interval and the null bands behind it.

    The bars are each region's part of the total importance over the regions
    (:mod:`bodyage.attribute_stability`'s ``share``), in percent, sorted and coloured by
    kind; the whiskers are the min–max over the fold models (each explains its own test
    scans, so they show how much a re-trained model moves a region) or, with ``runs``,
    over the training runs. Behind each bar, every null model's band of the same share
    (:func:`bodyage.nulls.draw_null_bands`): the part of the total a region takes in models
    that learned nothing about age. Regions above the share band of every null (the
    recovery's ``clears_nulls``) are written in bold. Shares, not raw values, because a
    null model's output barely moves: its raw importance is below every trained region
    for its scale alone. Without nulls the figure says none was run.

    Parameters
    ----------
    attributions
        ``attributions.parquet``.
    method, measure
        The method and its ranking measure.
    folder
        Where the PDF and PNG go.
    baseline
        The ablation baseline, named in the title of region methods.
    bands
        ``attribution_nulls.csv`` (``None``: no null was run).
    runs
        ``attribution_stability_runs.csv``'s rows of this method (``--runs``), or ``None``.
    """
    plt = _plt()
    sub = attributions[attributions["method"] == method]
    n_regions = len(runs) if runs is not None and len(runs) else int(sub["region"].nunique())
    fig, ax = plt.subplots(figsize=(6.5, max(3.5, 0.17 * n_regions + 1.6)))
    draw_region_importance(ax, attributions, method, measure, baseline=baseline, bands=bands, runs=runs)
    out = _save(fig, folder, f"attribution_regions_{method}")
    plt.close(fig)
    return out


def draw_region_importance(
    ax: Any,
    attributions: pd.DataFrame,
    method: str,
    measure: str,
    *,
    baseline: str | None = None,
    bands: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
) -> None:
    """Draw :func:`region_figure`'s chart on ``ax`` (same parameters, no files)."""
    from bodyage.attribute_stability import fold_stability
    from bodyage.nulls import draw_null_bands
    from bodyage.regions import display_name, region_kind

    plt = _plt()
    if runs is not None and len(runs):
        stats = runs.set_index("region")
        n_units = int(stats["n_runs"].max())
        bars = f"mean over {n_units} training runs"
        interval = f"min–max over {n_units} training runs" if n_units > 1 else "one run: no interval"
    else:
        table, summary = fold_stability(attributions, method, measure)
        stats = table.set_index("region")
        n_units = int(summary["n_folds"])
        bars = f"mean over {n_units} fold models" if n_units > 1 else "one fold model"
        interval = f"min–max over {n_units} fold models" if n_units > 1 else "one fold model: no interval"
    stats = stats.sort_values("share")
    share = stats["share"] * 100
    regions = [str(r) for r in stats.index]
    colours = [KIND_COLOURS.get(region_kind(r), "#666666") for r in regions]
    err = None
    if n_units > 1:
        lo = (share - stats["share_min"] * 100).clip(lower=0).fillna(0)
        hi = (stats["share_max"] * 100 - share).clip(lower=0).fillna(0)
        err = np.vstack([lo.to_numpy(), hi.to_numpy()])
    y = np.arange(len(stats))
    ax.barh(y, share, height=0.75, xerr=err, color=colours, alpha=0.55, ecolor="#333333", error_kw={"lw": 0.8})
    ax.set_yticks(y, [display_name(r) for r in regions], fontsize=6.5)
    null_labels: list[str] = []
    if bands is not None and len(bands):
        null_labels = draw_null_bands(ax, bands, method, regions, scale=100.0)
    if null_labels:
        mine = bands[bands["method"] == method] if bands is not None else pd.DataFrame()
        clears = mine.groupby("region")["above_share_band"].all()
        for tick, region in zip(ax.get_yticklabels(), regions, strict=True):
            if bool(clears.get(region, False)):
                tick.set_fontweight("bold")
        nulls_text = "lines and dots: null models; bold: above every null's band"
    elif bands is not None and len(bands):
        nulls_text = f"no null model was run for {method}"
    else:
        nulls_text = "no null model was run (attribute --no-nulls): not compared with a null"
    ax.set_xlabel(f"% of the total over regions\n(importance: {measure_label(method, measure)})", fontsize=8)
    what = baseline_label(method, baseline) if baseline and METHODS[method].level == "region" else method
    ax.set_title(
        f"{what}: each region's share of the importance\nbars: {bars}; whiskers: {interval}\n{nulls_text}",
        fontsize=8.5,
    )
    order = list(KIND_COLOURS)
    kinds = sorted({region_kind(r) for r in regions}, key=lambda k: order.index(k) if k in order else len(order))
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLOURS.get(k, "#666666"), alpha=0.55) for k in kinds]
    labels = list(kinds)
    line_handles, line_labels = ax.get_legend_handles_labels()
    ax.legend(handles + line_handles, labels + line_labels, fontsize=6, loc="lower right")
    ax.set_ylim(-0.7, len(stats) - 0.3)
    ax.grid(axis="x", alpha=0.3)


def measure_label(method: str, measure: str) -> str:
    """Axis label of a ranking measure; voxel ``|mass|`` is named a size-weighted total."""
    if METHODS[method].level == "region":
        return "mean |change in predicted age| (years)" if measure == "abs_mass" else f"mean {measure}"
    labels = {
        "abs_mass": "size-weighted total: mean |mass| (years x voxels)",
        "abs_density": "mean |map| per voxel (years; intensive)",
        "density": "mean |signed map| per voxel (years)",
        "share": "share of the body's |map|",
        "enrichment": "share of |map| / share of volume",
    }
    return labels.get(measure, f"mean {measure.replace('_', ' ')}")


def region_importance(attributions: pd.DataFrame, method: str, measure: str) -> pd.Series:
    """Mean importance per region of one method (``abs_mass``: mean ``|mass|``), largest first."""
    return _importance_values(attributions, method, measure).mean().dropna().sort_values(ascending=False)


def slice_figure(
    slices: pd.DataFrame,
    ages: pd.Series,
    extents: pd.DataFrame,
    method: str,
    folder: Path,
    importance: pd.Series | None = None,
    top: int = 12,
) -> list[Path]:
    """Mean mass per axial slice (95% band), young vs old tertiles, and regions' z-extents.

    Only the ``top`` most important regions get an extent bar (the first ``top`` of
    ``extents`` when ``importance`` is None): 53 labelled bars side by side cannot be read.
    """
    from bodyage.regions import display_name, region_kind

    plt = _plt()
    sub = slices[slices["method"] == method].copy()
    sub["key"] = sub["subject_id"].astype(str) + "_" + sub["visit"].astype(str)
    wide = sub.pivot_table(index="key", columns="z_mm", values="mass")
    z = wide.columns.to_numpy(dtype=float)
    age = ages.reindex(wide.index)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(7.5, 6.0), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    m = wide.mean()
    se: pd.Series = wide.std(ddof=1) / np.sqrt(wide.count())
    ax.plot(m, z, color="black", lw=1.4, label="all scans")
    ax.fill_betweenx(z, m - 1.96 * se, m + 1.96 * se, color="grey", alpha=0.3, lw=0)
    lo, hi = age.quantile([1 / 3, 2 / 3])
    for sel, name, col in ((age <= lo, "youngest third", "#1f78b4"), (age >= hi, "oldest third", "#e31a1c")):
        if sel.any():
            ax.plot(wide[sel.to_numpy()].mean(), z, color=col, lw=1.1, label=name)
    ax.axvline(0, color="#999999", lw=0.7)
    ax.invert_yaxis()
    ax.set_ylabel("distance from the top of the field of view (mm)")
    ax.set_xlabel("attribution mass per slice (years)")
    ax.legend(fontsize=7)
    ax.set_title(f"{method}: where along the body", fontsize=9)
    if importance is not None:
        keep = [r for r in importance.index if r in extents.index][:top]
        what = f"z-extent of the {len(keep)} most important regions"
    else:
        keep = list(extents.index)[:top]
        what = "region z-extents"
    ext = extents.loc[keep].sort_values("z_mid")
    for i, (region, row) in enumerate(ext.iterrows()):
        colour = KIND_COLOURS.get(region_kind(str(region)), "#666666")
        ax2.plot([i, i], [row["z_min"], row["z_max"]], lw=5, color=colour, solid_capstyle="butt")
        ax2.text(i + 0.3, row["z_min"], display_name(str(region)), rotation=90, fontsize=7, va="top", ha="left")
    ax2.set_xlim(-0.7, max(len(ext), 1) + 0.3)
    ax2.set_xticks([])
    ax2.set_xlabel(f"{what}\n(median over scans, coloured by kind)", fontsize=8)
    out = _save(fig, folder, f"attribution_slices_{method}")
    plt.close(fig)
    return out


def region_extents(inputs: RunInputs, scan_ids: list[str], max_scans: int = 50) -> pd.DataFrame:
    """Median z-extent (mm from the top) of every region over up to ``max_scans`` scans."""
    from bodyage.attribute_explain import z_positions

    names = dict(inputs.labels.names) if inputs.labels is not None else {}
    rows = []
    for sid in scan_ids[:max_scans]:
        cs = inputs.cache.scans[sid]
        mask = np.asarray(cs.load_mask())
        z = z_positions(cs.affine, mask.shape[-1])
        present = np.zeros((max(names, default=0) + 1, mask.shape[-1]), dtype=bool)
        lab = mask.reshape(-1, mask.shape[-1])
        cols = np.broadcast_to(np.arange(mask.shape[-1]), lab.shape)
        ok = lab < present.shape[0]
        present[lab[ok], cols[ok]] = True
        for i, name in names.items():
            hit = np.nonzero(present[i])[0]
            if len(hit):
                rows.append({"region": name, "z_min": z[hit].min(), "z_max": z[hit].max()})
    if not rows:
        return pd.DataFrame(columns=["z_min", "z_max", "z_mid"])
    ext = pd.DataFrame(rows).groupby("region").median()
    ext["z_mid"] = (ext["z_min"] + ext["z_max"]) / 2
    return ext


def cohort_figures(
    run: Path,
    attributions: pd.DataFrame,
    slices: pd.DataFrame,
    inputs: RunInputs,
    recovery: dict[str, Any],
    baseline: str | None = None,
) -> list[Path]:
    """Write the cohort figures of every method to ``RUN/figures`` (``baseline``: that of the region methods)."""
    from bodyage.attribute_stability import RUN_STABILITY
    from bodyage.nulls import NULL_BANDS

    folder = run / "figures"
    out: list[Path] = []
    measures = recovery.get("importance_measure", {})
    # written by this attribute run (a run without nulls removes an earlier one)
    bands = pd.read_csv(run / NULL_BANDS) if (run / NULL_BANDS).is_file() else None
    # --runs of this attribute run only: the recovery records them, an old file may be stale
    with_runs = [m for m, e in recovery.get("methods", {}).items() if isinstance(e, dict) and "run_stability" in e]
    runs = pd.read_csv(run / RUN_STABILITY) if with_runs and (run / RUN_STABILITY).is_file() else None
    for method in pd.unique(attributions["method"]):
        m = str(method)
        mine = runs[runs["method"] == m] if runs is not None and m in with_runs else None
        out += region_figure(
            attributions, m, measures.get(m, "abs_mass"), folder, baseline=baseline, bands=bands, runs=mine
        )
    if len(slices):
        preds = inputs.predictions
        ages = pd.Series(preds["age"].to_numpy(float), index=preds["scan_id"].to_numpy())
        scan_ids = list(dict.fromkeys(slices["subject_id"].astype(str) + "_" + slices["visit"].astype(str)))
        extents = region_extents(inputs, scan_ids)
        for method in pd.unique(slices["method"]):
            imp = region_importance(attributions, str(method), measures.get(method, "abs_mass"))
            out += slice_figure(slices, ages, extents, str(method), folder, importance=imp)
    return out


# ----------------------------------------------------------------------------- maps


def _to_image_grid(arr: npt.NDArray[np.float64], shape: tuple[int, ...], order: int) -> npt.NDArray[np.float64]:
    from scipy import ndimage

    factors = [o / i for o, i in zip(shape, arr.shape, strict=True)]
    return np.asarray(ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=True))


def save_maps(
    run: Path,
    inputs: RunInputs,
    rows: pd.DataFrame,
    cfg: AttributeConfig,
    *,
    layer: str,
    n_labels: int,
    device: torch.device,
    means: torch.Tensor | None,
) -> list[Path]:
    """NIfTI (image grid and affine) and PNG maps of the scans in ``rows``, every method.

    Voxel methods are upsampled linearly from the model grid to the image grid; region
    methods are painted onto the regions (nearest neighbour), the background (label 0,
    which no table reports) left NaN: transparent in the figure. Maps are named and titled
    by an anonymous index (``map_000``, ...), never by scan id; ``maps.csv`` next to them
    says which scan each one is.
    """
    import nibabel as nib
    import torch

    from bodyage.atomic import write_with
    from bodyage.attribute_explain import explain_batch
    from bodyage.train import load_fold_model
    from bodyage.volumes import load_volume

    plt = _plt()
    folder = run / MAPS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    names = {str(sid): f"map_{i:03d}" for i, sid in enumerate(rows["scan_id"])}
    index = pd.DataFrame(
        {
            "map": list(names.values()),
            "scan_id": list(names),
            "subject_id": rows["subject_id"].to_numpy(),
            "visit": rows["visit"].to_numpy(),
            "fold": rows["fold"].to_numpy(),
        }
    )
    write_with(folder / MAP_INDEX, partial(index.to_csv, index=False))
    out.append(folder / MAP_INDEX)
    for k, sub in rows.groupby("fold"):
        model, hp = load_fold_model(inputs.model_files[int(str(k))], device=device)
        for _, row in sub.iterrows():
            sid = str(row["scan_id"])
            name = names[sid]
            cs = inputs.cache.scans[sid]
            x = torch.from_numpy(np.asarray(cs.load(), dtype=np.float32))[None].to(device)
            lab = torch.from_numpy(np.asarray(cs.load_mask(), dtype=np.int64))[None].to(device)
            res = explain_batch(
                model,
                x,
                lab,
                list(cfg.methods),
                cfg=cfg,
                layer=layer,
                n_labels=n_labels,
                age_sd=float(hp["age_sd"]),
                means=means,
            )
            cohort_row = inputs.study.cohort.set_index("scan_id").loc[sid]
            img = load_volume(inputs.study.path(cohort_row[inputs.study.channels[0]]))
            shape = tuple(int(s) for s in img.shape)
            labels_img = _to_image_grid(lab[0].cpu().numpy().astype(float), shape, 0).astype(np.int64)
            fig, axes = plt.subplots(len(res), 2, figsize=(6.0, 4.2 * len(res)), squeeze=False)
            for j, (m, r) in enumerate(res.items()):
                if r.maps is not None:
                    grid_map = r.maps[0].double().cpu().numpy()
                    amap = _to_image_grid(grid_map, shape, 1)
                else:
                    vals = np.asarray(r.region_values, dtype=float)[0].copy()
                    vals[0] = np.nan  # the background is no region: no table reports it
                    amap = vals[np.clip(labels_img, 0, len(vals) - 1)]
                nifti = nib.Nifti1Image(amap.astype(np.float32), img.affine)
                nifti.header["descrip"] = f"bodyage attribute {m} years"[:79].encode()
                path = folder / f"{name}_{m}.nii.gz"
                write_with(path, partial(nib.save, nifti))
                out.append(path)
                _panel(axes[j], np.asarray(img.data, dtype=float), amap, labels_img, f"{name} {m}")
            out += _save(fig, folder, name, exts=("png",))
            plt.close(fig)
    return out


def _panel(
    axes: Any, image: npt.NDArray[np.float64], amap: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], title: str
) -> None:
    """Coronal (through the middle) and sagittal slices: image, signed overlay, region contours."""
    finite = np.abs(amap[np.isfinite(amap)])
    lim = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    cy, cx = image.shape[1] // 2, image.shape[0] // 2
    views = (
        ("coronal", image[:, cy, :], amap[:, cy, :], labels[:, cy, :]),
        ("sagittal", image[cx, :, :], amap[cx, :, :], labels[cx, :, :]),
    )
    for ax, (name, im, am, lb) in zip(axes, views, strict=True):
        ax.imshow(im.T, cmap="gray", origin="lower", aspect="equal")
        ov = ax.imshow(am.T, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.55, origin="lower", aspect="equal")
        ax.contour(lb.T, levels=np.unique(lb)[1:] - 0.5, colors="white", linewidths=0.3, origin="lower")
        ax.set_title(f"{title} ({name})", fontsize=7)
        ax.axis("off")
    axes[-1].figure.colorbar(ov, ax=list(axes), fraction=0.03, label="years")
