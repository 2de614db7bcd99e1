"""Benjamini–Hochberg false discovery rate control."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def benjamini_hochberg(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return Benjamini–Hochberg adjusted p-values (q-values) of ``p``.

    ``q_i = min_{j: p_j >= p_i} min(1, m p_j / rank_j)`` over the ``m`` finite p-values;
    a missing p-value (NaN) gets a missing q-value and does not count in ``m``. Rejecting
    every hypothesis with ``q <= alpha`` controls the false discovery rate at ``alpha``
    (independent or positively dependent tests).

    Parameters
    ----------
    p
        p-values, any shape.

    Returns
    -------
    numpy.ndarray
        q-values, same shape as ``p``.
    """
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    out = np.full(flat.shape, np.nan)
    ok = np.isfinite(flat)
    m = int(ok.sum())
    if m == 0:
        return out.reshape(arr.shape)
    pv = flat[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    out[ok] = q
    return out.reshape(arr.shape)
