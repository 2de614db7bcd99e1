"""Resampling onto the model grid: area averaging, consistent with the grid's affine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bodyage.preprocess import area_weights, grid_affine, resample_image, robust_scale


def supersampled_box_mean(a: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Naive area averaging: repeat every voxel to a common multiple, then take block means."""
    fine = a
    common = [math.lcm(i, o) for i, o in zip(a.shape, grid, strict=True)]
    for ax, (i, c) in enumerate(zip(a.shape, common, strict=True)):
        fine = np.repeat(fine, c // i, axis=ax)
    for ax, (o, c) in enumerate(zip(grid, common, strict=True)):
        shape = list(fine.shape)
        shape[ax : ax + 1] = [o, c // o]
        fine = fine.reshape(shape).mean(axis=ax + 1)
    return fine


@pytest.mark.parametrize("grid", [(3, 2, 4), (4, 5, 3), (7, 5, 9), (2, 2, 2)])
def test_resample_is_the_area_average(grid: tuple[int, int, int]) -> None:
    a = np.random.default_rng(0).random((7, 5, 9)).astype(np.float32)
    out = resample_image(a, grid)
    assert out.shape == grid and out.dtype == np.float32
    np.testing.assert_allclose(out, supersampled_box_mean(a.astype(np.float64), grid), rtol=1e-5, atol=1e-6)


def test_integer_factors_are_block_means() -> None:
    a = np.random.default_rng(1).random((8, 6, 12)).astype(np.float32)
    expected = a.reshape(4, 2, 3, 2, 4, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(resample_image(a, (4, 3, 4)), expected, rtol=1e-6)


def test_resampling_keeps_the_mean_signal() -> None:
    a = np.random.default_rng(2).random((40, 31, 57)).astype(np.float32) * 300
    out = resample_image(a, (6, 5, 8))
    assert out.mean() == pytest.approx(a.mean(), rel=1e-5)


def test_area_weights_are_centred_where_grid_affine_puts_the_voxel() -> None:
    n_in, n_out = 370, 53
    w = area_weights(n_in, n_out)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    centres = w.astype(np.float64) @ np.arange(n_in)  # in input voxel-centre coordinates
    aff = grid_affine(np.eye(4), (n_in, 10, 10), (n_out, 10, 10))
    expected = aff[0, 0] * np.arange(n_out) + aff[0, 3]
    np.testing.assert_allclose(centres, expected, atol=5e-3)  # float32 weights


def test_robust_scale_ignores_air_and_refuses_nothing() -> None:
    a = np.zeros((20, 20, 20), np.float32)
    a[5:15, 5:15, 5:15] = np.random.default_rng(3).uniform(100, 200, (10, 10, 10))
    s = robust_scale(a, 99.0, 0.05)
    assert 190 < s <= 200  # the 99th percentile of the body, not of the mostly empty field of view
    b = a.copy()
    b[0, 0, 0] = np.nan
    assert robust_scale(b, 99.0, 0.05) == pytest.approx(s)
    assert robust_scale(np.zeros((4, 4, 4), np.float32), 99.0, 0.05) == 0.0


def test_robust_scale_on_a_large_volume_matches_the_exact_percentiles() -> None:
    rng = np.random.default_rng(4)
    a = np.zeros((224, 174, 370), np.float32)
    a[30:190, 20:150, :] = rng.gamma(4.0, 50.0, (160, 130, 370)).astype(np.float32)  # a body in air
    flat = a.ravel()
    top = np.percentile(flat, 99.9)
    exact = float(np.percentile(flat[flat > 0.05 * top], 99.0))
    assert robust_scale(a, 99.0, 0.05) == pytest.approx(exact, rel=5e-3)  # measured 0.15%
