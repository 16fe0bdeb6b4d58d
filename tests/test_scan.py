"""Scan model: coordinate maps and their independence per axis."""

import numpy as np

from generators.scan import ScanModel, ScanParams, scan_coordinates


def test_undistorted_scan_is_the_pixel_grid():
    p = ScanParams(offset=(5.0, 7.0), drift=(0.0, 0.0), line_jitter=np.zeros(4))
    x, y = scan_coordinates((4, 6), p)
    assert np.array_equal(x, 5.0 + np.tile(np.arange(6.0), (4, 1)))
    assert np.array_equal(y, 7.0 + np.tile(np.arange(4.0)[:, None], (1, 6)))


def test_drift_is_linear_in_acquisition_time_and_jitter_shifts_lines():
    h, w = 8, 10
    jit = np.linspace(-1, 1, h)
    p = ScanParams(offset=(0.0, 0.0), drift=(3.0, -2.0), line_jitter=jit)
    x, y = scan_coordinates((h, w), p)
    t = (np.arange(h)[:, None] * w + np.arange(w)) / (h * w)
    np.testing.assert_allclose(x - np.arange(w) - jit[:, None], 3.0 * t)
    np.testing.assert_allclose(y - np.arange(h)[:, None], -2.0 * t)


def test_draws_are_independent_per_axis(rng):
    m = ScanModel(shape=(16, 16), drift_px=2.0, line_jitter_px=0.5, field_extent=(100.0, 50.0))
    ps = [m.sample(rng) for _ in range(2000)]
    dx = np.array([p.drift[0] for p in ps])
    dy = np.array([p.drift[1] for p in ps])
    assert abs(np.corrcoef(dx, dy)[0, 1]) < 0.1
    assert abs(dx.std() - 2.0) < 0.15 and abs(dy.std() - 2.0) < 0.15
    ox = np.array([p.offset[0] for p in ps])
    oy = np.array([p.offset[1] for p in ps])
    assert ox.max() <= 100 and oy.max() <= 50 and abs(np.corrcoef(ox, oy)[0, 1]) < 0.1
    j = np.stack([p.line_jitter for p in ps])
    assert abs(j.std() - 0.5) < 0.02


def _numpy_linear_scan(h, w, p):
    """The basic scan model as a plain NumPy expression (reference for the Numba kernel)."""
    t = (np.arange(h)[:, None] * w + np.arange(w)[None, :]) / float(h * w)
    x = p.offset[0] + np.arange(w, dtype=np.float64)[None, :] + p.drift[0] * t
    x = x + p.line_jitter[:, None]
    y = p.offset[1] + np.arange(h, dtype=np.float64)[:, None] + p.drift[1] * t
    return x, y


def test_linear_scan_kernel_matches_numpy_bit_for_bit(rng, thread_runs):
    """Offset + drift + jitter: the same bytes as the NumPy formula, for any thread count."""
    h, w = 37, 53
    m = ScanModel(shape=(h, w), drift_px=2.5, line_jitter_px=0.3, field_extent=(900.0, 700.0))
    p = m.sample(rng)
    ref = _numpy_linear_scan(h, w, p)
    for x, y in thread_runs(lambda: scan_coordinates((h, w), p)):
        assert x.tobytes() == ref[0].tobytes() and y.tobytes() == ref[1].tobytes()


def test_optional_components_add_to_the_linear_scan(rng):
    """Random walk and nonlinearity are added on top of the linear part (checked against NumPy)."""
    h, w = 12, 20
    m = ScanModel(shape=(h, w), drift_px=1.0, line_jitter_px=0.2, field_extent=(300.0, 300.0),
                  drift_walk_px=0.8, fast_nonlinearity=(0.5, 3.0), slow_nonlinearity=(-0.4, 2.0))
    p = m.sample(rng)
    x, y = scan_coordinates((h, w), p)
    rx, ry = _numpy_linear_scan(h, w, p)
    f = np.arange(w)[None, :] / w
    wx, wy = p.walk
    rx = rx + (wx[:-1, None] * (1 - f) + wx[1:, None] * f) + 0.5 * np.exp(-np.arange(w) / 3.0)
    ry = ry + (wy[:-1, None] * (1 - f) + wy[1:, None] * f) - 0.4 * np.exp(
        -np.arange(h)[:, None] / 2.0)
    np.testing.assert_allclose(x, rx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, ry, rtol=0, atol=1e-12)
