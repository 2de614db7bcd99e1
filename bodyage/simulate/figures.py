"""Look-at-me figures of simulated scans: coronal and sagittal mid-slices per channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def phantom_figures(root: Path, cohort: pd.DataFrame) -> list[Path]:
    """Write ``figures/phantom_young.png`` and ``figures/phantom_old.png``.

    The youngest and the oldest first-visit scans are shown: coronal (radiological
    convention: the subject's right on the viewer's left) and sagittal mid-slices of the
    water and fat channels, and the label map with a distinct colour per region.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bodyage.volumes import load_volume

    first = cohort[cohort["visit"] == 0]
    picks = {"young": int(np.argmin(first["age"].to_numpy())), "old": int(np.argmax(first["age"].to_numpy()))}
    out_dir = root / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.15, 1.0, size=(256, 3))
    colours[0] = 0.0
    for tag, idx in picks.items():
        row = first.iloc[idx]
        vols = {c: load_volume(root / row[c]) for c in ("water", "fat", "mask")}
        spacing = vols["water"].spacing
        nx, ny, _ = vols["water"].shape
        fig, axes = plt.subplots(1, 6, figsize=(15, 5.6), gridspec_kw={"width_ratios": [nx, ny] * 3})
        for k, channel in enumerate(("water", "fat", "mask")):
            data = np.asarray(vols[channel].data)
            cor = data[::-1, ny // 2, :].T  # x flipped: subject's right on the viewer's left
            sag = data[nx // 2, :, :].T
            for j, (img, aspect) in enumerate(((cor, spacing[2] / spacing[0]), (sag, spacing[2] / spacing[1]))):
                ax = axes[2 * k + j]
                if channel == "mask":
                    ax.imshow(colours[img.astype(int) % 256], origin="lower", aspect=aspect, interpolation="nearest")
                else:
                    ax.imshow(img, origin="lower", cmap="gray", aspect=aspect, vmin=0, vmax=np.percentile(data, 99.5))
                ax.set_title(f"{channel} · {'coronal' if j == 0 else 'sagittal'}", fontsize=10)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[2 * k].text(1, img.shape[0] - 3, "R", color="yellow", fontsize=9, va="top")
            axes[2 * k + 1].text(1, img.shape[0] - 3, "P", color="yellow", fontsize=9, va="top")
        fig.suptitle(f"Simulated scan, {tag}: age {row['age']:.1f} y, sex {row['sex']}, {row['site']}", fontsize=12)
        fig.tight_layout()
        path = out_dir / f"phantom_{tag}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
