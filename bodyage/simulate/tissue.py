"""Dixon intensities of the phantom's tissues.

Each region has a proton density ``pd`` (relative) and a fat fraction ``ff`` (the fat
fraction at the scenario's youngest age, before planted ageing). A voxel's signals are

    water = S · pd · (1 − ff) · water_signal        fat = S · pd · ff

with ``S`` = :data:`SIGNAL_SCALE` (scanner-like values in the hundreds, as in UK Biobank
NIfTIs) and ``water_signal`` the planted relative change of the water channel. The images
are blurred slightly (partial volume), scaled per site and channel, and get Rician noise
with standard deviation ``noise_sd · S``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: nominal maximum intensity (pure fat / pure water at proton density 1)
SIGNAL_SCALE = 1000.0


@dataclass(frozen=True)
class Tissue:
    """Proton density (relative) and fat fraction at the youngest age of a region."""

    pd: float
    ff: float


TISSUES: dict[str, Tissue] = {
    "spleen": Tissue(0.85, 0.01),
    "kidney": Tissue(0.88, 0.01),
    "gallbladder": Tissue(0.95, 0.0),
    "liver": Tissue(0.72, 0.04),
    "stomach": Tissue(0.55, 0.05),
    "pancreas": Tissue(0.70, 0.05),
    "adrenal_gland": Tissue(0.70, 0.10),
    "lung": Tissue(0.08, 0.0),
    "esophagus": Tissue(0.60, 0.05),
    "small_bowel": Tissue(0.62, 0.06),
    "duodenum": Tissue(0.60, 0.05),
    "colon": Tissue(0.45, 0.10),
    "urinary_bladder": Tissue(1.0, 0.0),
    "prostate": Tissue(0.80, 0.02),
    "sacrum": Tissue(0.60, 0.50),
    "vertebrae": Tissue(0.60, 0.40),
    "intervertebral_discs": Tissue(0.92, 0.0),
    "spinal_cord": Tissue(0.70, 0.0),
    "brain": Tissue(0.80, 0.0),
    "heart": Tissue(0.70, 0.02),
    "aorta": Tissue(0.55, 0.0),
    "inferior_vena_cava": Tissue(0.60, 0.0),
    "portal_vein_and_splenic_vein": Tissue(0.60, 0.0),
    "iliac_artery": Tissue(0.55, 0.0),
    "iliac_vena": Tissue(0.60, 0.0),
    "humerus": Tissue(0.55, 0.70),
    "scapula": Tissue(0.45, 0.50),
    "clavicula": Tissue(0.45, 0.55),
    "femur": Tissue(0.60, 0.75),
    "hip": Tissue(0.55, 0.55),
    "gluteus_maximus": Tissue(0.80, 0.06),
    "gluteus_medius": Tissue(0.80, 0.05),
    "gluteus_minimus": Tissue(0.80, 0.05),
    "autochthon": Tissue(0.80, 0.06),
    "iliopsoas": Tissue(0.80, 0.03),
    "subcutaneous_fat": Tissue(1.0, 0.92),
    "torso_fat": Tissue(0.95, 0.88),
    "skeletal_muscle": Tissue(0.80, 0.05),
    # unlabelled tissue (mask value 0)
    "mediastinum": Tissue(0.50, 0.30),
    "csf": Tissue(1.0, 0.0),
    "airway": Tissue(0.02, 0.0),
}

_DEFAULT = Tissue(0.70, 0.05)


def tissue_of(region: str) -> Tissue:
    """Return the tissue of a region (left/right share one entry)."""
    if region in TISSUES:
        return TISSUES[region]
    for suffix in ("_left", "_right"):
        if region.endswith(suffix) and region[: -len(suffix)] in TISSUES:
            return TISSUES[region[: -len(suffix)]]
    return _DEFAULT


def dixon_images(
    internal: npt.NDArray[np.integer],
    pd: Mapping[int, float],
    ff: Mapping[int, float],
    water_signal: Mapping[int, float],
    *,
    channel_scale: tuple[float, float],
    noise_sd: float,
    rng: np.random.Generator,
    blur_voxels: float = 0.5,
    texture: Mapping[int, npt.NDArray[np.float64]] | None = None,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    """Render water and fat images from a map of internal label ids.

    Parameters
    ----------
    internal
        Integer label map (0 = air).
    pd, ff, water_signal
        Per internal id: proton density, fat fraction, water-signal factor.
    channel_scale
        Site scaling of the (water, fat) channels.
    noise_sd
        Rician noise sd relative to :data:`SIGNAL_SCALE`.
    rng
        Random generator for the noise.
    blur_voxels
        Gaussian blur (sd in voxels) before noise: partial volume at tissue borders.
    texture
        Per internal id: the fat fraction of each of its voxels (in ``internal == id``
        order; :func:`texture_fat_fraction`), replacing ``ff`` there.

    Returns
    -------
    water, fat
        int16 arrays, the grid of ``internal``.
    """
    from scipy.ndimage import gaussian_filter

    n = int(internal.max()) + 1
    lut_w = np.zeros(n, dtype=np.float32)
    lut_f = np.zeros(n, dtype=np.float32)
    for i in range(1, n):
        if i in pd:
            lut_w[i] = SIGNAL_SCALE * pd[i] * (1.0 - ff[i]) * water_signal.get(i, 1.0)
            lut_f[i] = SIGNAL_SCALE * pd[i] * ff[i]
    imgs = [lut_w[internal], lut_f[internal]]
    for i, mod in (texture or {}).items():
        sel = internal == i
        ffv = mod
        imgs[0][sel] = SIGNAL_SCALE * pd[i] * (1.0 - ffv) * water_signal.get(i, 1.0)
        imgs[1][sel] = SIGNAL_SCALE * pd[i] * ffv
    out = []
    for base, scale in zip(imgs, channel_scale, strict=True):
        img = base * np.float32(scale)
        if blur_voxels > 0:
            img = gaussian_filter(img, blur_voxels, mode="constant")
        if noise_sd > 0:
            sigma = np.float32(noise_sd * SIGNAL_SCALE)
            re = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
            im = rng.standard_normal(img.shape, dtype=np.float32) * sigma
            img = np.sqrt(re * re + im * im)
        out.append(np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16))
    return out[0], out[1]


#: smoothing (Gaussian sd, mm) of the texture field: patches of about 4 cm, visible on a 16 mm grid
TEXTURE_SMOOTH_MM = 16.0
#: the texture field is clipped to this many SDs
TEXTURE_CLIP = 2.4


def texture_fat_fraction(ff: float, sigma: float, g: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Voxel fat fractions of a textured region: patches around ``ff`` whose mean is ``ff``.

    ``ff · exp(sigma · g)``, normalised to mean ``ff`` (fatty patches in lean tissue: right
    skewed, never negative); for ``ff > 0.5`` the same on ``1 − ff``. Voxels are clipped to
    the fat-fraction limits and the mean restored by a shift.
    """
    m = np.exp(sigma * g)
    m = m / m.mean()
    v = ff * m if ff <= 0.5 else 1.0 - (1.0 - ff) * m
    v = np.clip(v, 0.002, 0.98)
    return np.asarray(np.clip(v + (ff - v.mean()), 0.002, 0.98), dtype=float)


def texture_field(
    sel: npt.NDArray[np.bool_], spacing: tuple[float, float, float], rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """A smooth random field on the voxels of ``sel`` (``np.nonzero`` order): mean 0, SD 1.

    White noise on the region's bounding box (plus a margin) is smoothed by a Gaussian of
    :data:`TEXTURE_SMOOTH_MM`, standardised over the region, clipped to
    ±:data:`TEXTURE_CLIP` and centred again, so the region's mean is exactly unchanged.
    """
    from scipy.ndimage import gaussian_filter

    idx = np.nonzero(sel)
    if len(idx[0]) < 2:
        return np.zeros(len(idx[0]))
    sigma = [TEXTURE_SMOOTH_MM / s for s in spacing]
    lo = [max(0, int(i.min()) - int(3 * sg)) for i, sg in zip(idx, sigma, strict=True)]
    hi = [min(n, int(i.max()) + int(3 * sg) + 1) for i, sg, n in zip(idx, sigma, sel.shape, strict=True)]
    noise = rng.standard_normal(tuple(b - a for a, b in zip(lo, hi, strict=True)))
    field = gaussian_filter(noise, sigma, mode="reflect")
    g = field[tuple(i - a for i, a in zip(idx, lo, strict=True))]
    g = (g - g.mean()) / max(float(g.std()), 1e-12)
    g = np.clip(g, -TEXTURE_CLIP, TEXTURE_CLIP)
    return np.asarray(g - g.mean(), dtype=float)
