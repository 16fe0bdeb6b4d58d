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
