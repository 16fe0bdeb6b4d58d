"""The complete detector, scan and optics stages against references (issue 3).

Mains phase advance per line, random-walk and mains draws independent per axis, scan
nonlinearity, detector lag (kernel sums to 1, variance and correlation of lagged shot noise),
fixed-pattern statistics, saturation, the Lorentzian-tailed PSF (normalised, Lorentzian line-spread
function), vignetting (mean 1) and the PSF that follows the scan lines.
"""

import math

import numpy as np
import pytest

from generators.detector import (Detector, apply_lag, detect, fixed_pattern, lag_coefficient,
                                 lag_kernel, lag_variance_factor)
from generators.optics import (GaussianPSF, PSFParams, gaussian_psf, lorentzian_psf, psf_otf,
                               psf_following_scan, vignetting_field)
from generators.scan import ScanModel, ScanParams, mains_phase_step, scan_coordinates


# ---------------------------------------------------------------- scan

def _mains_params(h, w, amp=(0.7, 0.3), phase=(0.4, 1.9), f=50.0, dwell=2e-6, lt=1.5e-3):
    return ScanParams(offset=(0.0, 0.0), drift=(0.0, 0.0), line_jitter=np.zeros(h),
                      mains_amplitude=amp, mains_phase=phase, mains_frequency_hz=f,
                      dwell_time_s=dwell, line_time_s=lt)


def test_mains_phase_advances_by_2pi_f_line_time_per_line():
    h, w = 40, 32
    f, dwell, lt = 50.0, 2e-6, 1.5e-3
    p = _mains_params(h, w, f=f, dwell=dwell, lt=lt)
    x, y = scan_coordinates((h, w), p)
    dx = x - np.arange(w)[None, :]
    dy = y - np.arange(h)[:, None]
    r = np.arange(h)[:, None]
    c = np.arange(w)[None, :]
    phase = 2 * np.pi * f * (r * lt + c * dwell)
    np.testing.assert_allclose(dx, 0.7 * np.sin(phase + 0.4), atol=1e-12)
    np.testing.assert_allclose(dy, 0.3 * np.sin(phase + 1.9), atol=1e-12)
    # first pixel of consecutive lines: the phase step is 2π f · line_time (mod 2π)
    step = mains_phase_step(f, lt)
    assert step == pytest.approx(math.fmod(2 * math.pi * f * lt, 2 * math.pi))
    z = np.exp(1j * (2 * np.pi * f * np.arange(h) * lt + 0.4))
    np.testing.assert_allclose(np.angle(z[1:] / z[:-1]), np.angle(np.exp(1j * step)), atol=1e-12)


def test_line_time_is_width_times_dwell_plus_flyback():
    m = ScanModel(shape=(16, 100), dwell_time_s=1e-6, flyback_s=3e-4,
                  mains_amplitude_px=(0.5, 0.0), mains_frequency_hz=60.0)
    assert m.line_time_s == pytest.approx(100e-6 + 3e-4)
    p = m.sample(np.random.default_rng(0))
    assert p.line_time_s == pytest.approx(m.line_time_s) and p.mains_frequency_hz == 60.0
    with pytest.raises(ValueError, match="dwell"):
        ScanModel(shape=(8, 8), mains_amplitude_px=(0.5, 0.0))


def test_optional_draws_are_independent_per_axis(rng):
    m = ScanModel(shape=(64, 32), drift_walk_px=2.0, mains_amplitude_px=(0.5, 0.5),
                  dwell_time_s=1e-6, flyback_s=1e-4)
    ps = [m.sample(rng) for _ in range(1500)]
    wx = np.array([p.walk[0][-1] for p in ps])
    wy = np.array([p.walk[1][-1] for p in ps])
    assert abs(np.corrcoef(wx, wy)[0, 1]) < 0.1
    assert abs(wx.std() - 2.0) < 0.15 and abs(wy.std() - 2.0) < 0.15
    px = np.array([p.mains_phase[0] for p in ps])
    py = np.array([p.mains_phase[1] for p in ps])
    # uniform phases, independent: the circular correlation vanishes
    assert abs(np.mean(np.exp(1j * px))) < 0.08 and abs(np.mean(np.exp(1j * (px - py)))) < 0.08
    assert all(p.walk[0][0] == 0.0 for p in ps[:5])


def test_basic_scan_draws_are_unchanged():
    """Components left at 0 draw nothing: the foundation's draws (and bytes) are kept."""
    m = ScanModel(shape=(12, 9), drift_px=1.0, line_jitter_px=0.5, field_extent=(50.0, 40.0))
    r1 = np.random.default_rng(3)
    p = m.sample(r1)
    r2 = np.random.default_rng(3)
    ref_off = (r2.uniform(0, 50.0), r2.uniform(0, 40.0))
    ref_drift = (r2.normal(0, 1.0), r2.normal(0, 1.0))
    ref_jit = r2.normal(0, 0.5, 12)
    assert p.offset == ref_off and p.drift == ref_drift
    assert np.array_equal(p.line_jitter, ref_jit)
    assert r1.integers(1 << 62) == r2.integers(1 << 62)  # same stream position afterwards
    assert set(p.to_dict()) == {"offset_px", "drift_px_per_frame", "line_jitter_px"}


def test_scan_nonlinearity_and_walk_are_coordinate_maps():
    h, w = 10, 50
    wx = np.linspace(0, 2, h + 1)
    p = ScanParams(offset=(0.0, 0.0), drift=(0.0, 0.0), line_jitter=np.zeros(h),
                   walk=(wx, np.zeros(h + 1)), fast_nonlinearity=(3.0, 10.0),
                   slow_nonlinearity=(-1.0, 4.0))
    x, y = scan_coordinates((h, w), p)
    c = np.arange(w)
    f = c / w
    walk = wx[:-1, None] * (1 - f) + wx[1:, None] * f
    expect_x = c[None, :] + 3.0 * np.exp(-c / 10.0)[None, :] + walk
    np.testing.assert_allclose(x, expect_x, atol=1e-12)
    expect_dy = np.broadcast_to(-np.exp(-np.arange(h) / 4.0)[:, None], x.shape)
    np.testing.assert_allclose(y - np.arange(h)[:, None], expect_dy, atol=1e-12)
    assert np.all(np.diff(x, axis=1) > 0)  # |A| < λ: a monotonic scan
    with pytest.raises(ValueError, match="monotonic"):
        ScanModel(shape=(8, 8), fast_nonlinearity=(5.0, 5.0))


# ---------------------------------------------------------------- detector

def test_lag_kernel_sums_to_one_and_filter_matches_it():
    for tau in (0.3, 1.0, 4.0):
        k = lag_kernel(tau, 4000)
        assert k.sum() == pytest.approx(1.0, abs=1e-12)
        a = lag_coefficient(tau)
        assert k[1] / k[0] == pytest.approx(a) and k[0] == pytest.approx(1 - a)
        # the IIR filter is the convolution with the kernel (after the steady start)
        x = np.zeros((1, 60))
        x[0, 20] = 1.0
        y = apply_lag(x, tau)
        np.testing.assert_allclose(y[0, 20:], k[:40], atol=1e-12)
        assert lag_variance_factor(tau) == pytest.approx((1 - a) / (1 + a))
    assert np.array_equal(lag_kernel(0.0, 3), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(apply_lag(np.full((3, 9), 7.0), 2.0), 7.0)


def test_detector_lag_reduces_and_correlates_shot_noise():
    """Lag on the electrons: var = g²λ(1−a)/(1+a) + σ_r², lag-1 autocorrelation a·S/(S+R)."""
    g, lam, rd, tau = 3.0, 80.0, 4.0, 1.5
    a = lag_coefficient(tau)
    v = detect(np.ones((512, 512)), dose=lam, gain=g, readout_sigma=rd, offset=100.0,
               bit_depth=16, noise_key=11, lag_px=tau).astype(float)[:, 16:]
    shot = g * g * lam * (1 - a) / (1 + a)
    assert v.mean() == pytest.approx(g * lam + 100.0, rel=2e-3)
    assert v.var() == pytest.approx(shot + rd * rd + 1 / 12, rel=0.02)
    d = v - v.mean()
    rho1 = np.mean(d[:, 1:] * d[:, :-1]) / d.var()
    assert rho1 == pytest.approx(a * shot / (shot + rd * rd + 1 / 12), abs=0.01)
    rho_y = np.mean(d[1:] * d[:-1]) / d.var()
    assert abs(rho_y) < 0.01  # lag acts along the fast scan only


def test_complete_kernel_is_the_basic_one_when_off():
    sig = np.random.default_rng(0).uniform(0, 1, (64, 48))
    kw = dict(dose=50.0, gain=2.0, readout_sigma=3.0, offset=10.0, bit_depth=16, noise_key=5)
    a = detect(sig, **kw)
    b = detect(sig, **kw, row_offsets=np.zeros(64), col_offsets=np.zeros(48), lag_px=0.0)
    assert a.tobytes() == b.tobytes()
    d = Detector(gain=2.0, readout_sigma=3.0, offset=10.0, bit_depth=16, dose=(50.0, 50.0))
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    p = d.sample(r1)
    assert p.pattern_key is None and set(p.to_dict()) == {"dose_e_per_px", "noise_key"}
    assert p.noise_key == int(r2.integers(0, 2**63 - 1))


def test_fixed_pattern_statistics():
    rows, cols = fixed_pattern((4000, 3000), 2.0, 0.5, key=123)
    assert rows.std() == pytest.approx(2.0, rel=0.05) and cols.std() == pytest.approx(0.5, rel=0.05)
    r2, c2 = fixed_pattern((4000, 3000), 2.0, 0.5, key=123)
    assert np.array_equal(rows, r2) and np.array_equal(cols, c2)
    r3, _ = fixed_pattern((4000, 3000), 2.0, 0.5, key=124)
    assert abs(np.corrcoef(rows, r3)[0, 1]) < 0.05
    # independent streams per axis: the same key does not give the same numbers to both axes
    rr, cc = fixed_pattern((3000, 3000), 1.0, 1.0, key=7)
    assert abs(np.corrcoef(rr, cc)[0, 1]) < 0.06
    # through the detector: column means of a dark frame carry the column pattern
    det = Detector(gain=1.0, readout_sigma=2.0, offset=100.0, bit_depth=16, dose=(1.0, 1.0),
                   row_sigma=0.0, col_sigma=3.0, pattern_seed=42)
    rng = np.random.default_rng(0)
    p1, p2 = det.sample(rng), det.sample(rng)
    assert p1.pattern_key == p2.pattern_key == 42  # a pattern fixed for the instrument
    f1 = det.apply(np.zeros((400, 300)), p1).astype(float)
    f2 = det.apply(np.zeros((400, 300)), p2).astype(float)
    cm1, cm2 = f1.mean(0) - f1.mean(), f2.mean(0) - f2.mean()
    assert np.corrcoef(cm1, cm2)[0, 1] > 0.95
    assert cm1.std() == pytest.approx(3.0, rel=0.15)


def test_saturation_below_full_scale():
    v = detect(np.full((8, 8), 1.0), dose=1000.0, gain=10.0, readout_sigma=0.0, offset=0.0,
               bit_depth=16, noise_key=1, saturation=5000.0)
    assert v.max() == 5000
    with pytest.raises(ValueError):
        detect(np.ones((4, 4)), dose=1.0, gain=1.0, readout_sigma=0.0, offset=0.0, bit_depth=16,
               noise_key=1, saturation=0.0)


# ---------------------------------------------------------------- optics

def test_lorentzian_psf_is_normalised_with_a_lorentzian_line_spread():
    n = 512
    # (a core wide enough not to alias at Nyquist: the discrete kernel is band-limited)
    otf = psf_otf((n, n), 1.5, 0.3, 3.0)
    kern = np.fft.irfft2(otf, s=(n, n))
    assert kern.sum() == pytest.approx(1.0, abs=1e-12)
    # line-spread function (sum over y) = (1-η)·Gaussian + η·Lorentzian γ/(π(x²+γ²))
    lsf = np.fft.fftshift(kern.sum(0))
    x = np.arange(n) - n // 2
    ref = 0.7 * np.exp(-x**2 / (2 * 1.5**2)) / (math.sqrt(2 * math.pi) * 1.5) \
        + 0.3 * 3.0 / (math.pi * (x**2 + 3.0**2))
    sel = np.abs(x) < 40
    np.testing.assert_allclose(lsf[sel], ref[sel], atol=1e-4)
    assert lsf.max() > 0.15
    const = np.full((64, 80), 3.0, dtype=np.float32)
    out = lorentzian_psf(const, 0.8, 0.3, 2.5)
    assert out.dtype == np.float32 and np.allclose(out, 3.0, atol=1e-5)


def test_vignetting_field_mean_one_and_shape():
    f = vignetting_field((64, 96), {"xx": -0.2, "yy": -0.2})
    assert f.mean() == pytest.approx(1.0, abs=1e-12)
    assert f[32, 48] > f[32, 0] and f[32, 48] > f[0, 48]
    # centre minus edge-centre along x = 0.2 · (u² at the edge) ≈ 0.2
    assert f[32, 47] - f[32, 0] == pytest.approx(0.2 * (1 - 1 / 96) ** 2, abs=0.01)
    g = vignetting_field((10, 10), [0.1, 0, 0, 0, 0])
    assert g[:, -1].mean() > g[:, 0].mean()


def test_psf_following_scan():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (128, 140))
    np.testing.assert_allclose(psf_following_scan(a, np.zeros(128), 1.0), gaussian_psf(a, 1.0),
                               atol=2e-3)
    # a vertical edge whose lines are shifted: the blurred edge moves with each line
    h, w = 64, 64
    shift = rng.normal(0, 1.0, h)
    xx = np.arange(w)[None, :] + shift[:, None]
    edge = (xx > 32.0).astype(float)
    follow = psf_following_scan(edge, shift, 1.0)
    grid = gaussian_psf(edge, 1.0)

    def crossing(img):
        return np.array([np.interp(0.5, row[20:45], np.arange(20, 45)) for row in img])

    true_pos = 32.0 - shift  # where c + shift = 32
    err_follow = np.abs(crossing(follow) - true_pos)[4:-4]
    err_grid = np.abs(crossing(grid) - true_pos)[4:-4]
    assert err_follow.max() < 0.55 and err_grid.mean() > 2 * err_follow.mean()
    stage = GaussianPSF((1.0, 1.0))
    np.testing.assert_allclose(stage.apply(edge, PSFParams(1.0), row_shift_px=shift), follow)


def test_complete_kernel_is_thread_count_independent(thread_runs):
    sig = np.random.default_rng(2).uniform(0, 1, (200, 150))
    rows, cols = fixed_pattern(sig.shape, 1.0, 2.0, key=3)
    kw = dict(dose=60.0, gain=2.0, readout_sigma=3.0, offset=50.0, bit_depth=16, noise_key=8,
              row_offsets=rows, col_offsets=cols, lag_px=0.8, saturation=400.0)
    runs = thread_runs(lambda: detect(sig, **kw))
    a, b = runs[0], runs[-1]
    assert a.tobytes() == b.tobytes() and a.max() <= 400
