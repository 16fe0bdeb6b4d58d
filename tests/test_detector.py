"""Detector model against references: SciPy's Poisson pmf, the Poisson–Gaussian moments."""

import numba
import numpy as np
import pytest
from scipy import stats

from generators.detector import Detector, detect


@pytest.mark.parametrize("lam", [0.2, 3.0, 9.99, 10.0, 45.0, 800.0])
def test_shot_noise_is_poisson(lam):
    """Chi-square goodness of fit of the counts against scipy.stats.poisson (gain 1, no readout)."""
    x = detect(np.ones((256, 256)), dose=lam, gain=1.0, readout_sigma=0.0, offset=0.0,
               bit_depth=16, noise_key=99).ravel().astype(np.int64)
    k = np.arange(x.max() + 2)
    obs = np.bincount(x, minlength=k.size).astype(float)
    exp = stats.poisson.pmf(k, lam) * x.size
    keep = exp > 5
    # pool the tails into the kept bins' complement
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = keep.sum() - 1
    assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)


@pytest.mark.parametrize("dose,gain,readout,offset,signal", [
    (100.0, 2.0, 3.0, 100.0, 0.5),
    (20.0, 8.0, 10.0, 500.0, 0.9),
    (1000.0, 0.5, 1.5, 50.0, 0.3),
])
def test_poisson_gaussian_moments(dose, gain, readout, offset, signal):
    """mean = g·d·s + o; var = g²·d·s + σ_r² + 1/12 (rounding)."""
    n = 512 * 512
    v = detect(np.full((512, 512), signal), dose=dose, gain=gain, readout_sigma=readout,
               offset=offset, bit_depth=16, noise_key=7).astype(np.float64)
    mean_ref = gain * dose * signal + offset
    var_ref = gain**2 * dose * signal + readout**2 + 1 / 12
    assert abs(v.mean() - mean_ref) < 4 * np.sqrt(var_ref / n)
    # standard error of a sample variance ≈ var·sqrt(2/n) (near-Gaussian counts)
    assert abs(v.var() - var_ref) < 5 * var_ref * np.sqrt(2 / n) + 0.01 * var_ref


def test_photon_transfer_slope_is_gain():
    """var − σ_r² against mean − o over several signal levels has slope g (photon transfer)."""
    g, r, o = 3.0, 4.0, 200.0
    sig = np.repeat(np.linspace(0.1, 1.0, 8)[:, None], 64 * 512, axis=1).reshape(8 * 64, 512)
    v = detect(sig, dose=150.0, gain=g, readout_sigma=r, offset=o, bit_depth=16,
               noise_key=1).astype(float).reshape(8, -1)
    slope = np.polyfit(v.mean(1) - o, v.var(1) - r**2, 1)[0]
    assert abs(slope - g) / g < 0.03


def test_saturation_and_quantisation():
    v = detect(np.array([[0.0, 1.0, 50.0]]), dose=100.0, gain=10.0, readout_sigma=0.0,
               offset=0.0, bit_depth=8, noise_key=3)
    assert v.dtype == np.uint16
    assert v[0, 0] == 0 and v[0, 2] == 255  # clipped at 2**8 - 1
    assert v.max() <= 255


def test_same_key_same_bytes_any_threads():
    sig = np.random.default_rng(0).uniform(0, 1, (300, 200))
    kw = dict(dose=80.0, gain=2.0, readout_sigma=3.0, offset=10.0, bit_depth=16, noise_key=42)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = detect(sig, **kw)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = detect(sig, **kw)
    finally:
        numba.set_num_threads(old)
    assert a.tobytes() == b.tobytes()
    c = detect(sig, **{**kw, "noise_key": 43})
    assert not np.array_equal(a, c)


def test_stage_draws_dose_in_range(rng):
    det = Detector(gain=2.0, readout_sigma=1.0, offset=0.0, bit_depth=16, dose=(50.0, 200.0))
    doses = [det.sample(rng).dose for _ in range(200)]
    assert min(doses) >= 50 and max(doses) <= 200
    # log-uniform: median near the geometric mean (100)
    assert 80 < np.median(doses) < 125


@pytest.mark.parametrize("kw", [dict(dose=-1.0), dict(gain=0.0), dict(bit_depth=17)])
def test_bad_detector_input(kw):
    base = dict(dose=10.0, gain=1.0, readout_sigma=0.0, offset=0.0, bit_depth=16, noise_key=1)
    with pytest.raises(ValueError):
        detect(np.ones((4, 4)), **{**base, **kw})
    with pytest.raises(ValueError):
        detect(-np.ones((4, 4)), **base)


@pytest.mark.parametrize("shape", [(64, 80), (7, 40)])
@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.77, 1.2, 1.6])
def test_numba_gaussian_psf_is_scipy_bit_for_bit(shape, sigma):
    """The parallel float32 probe blur (applied just before the detector) gives the bytes of
    ``scipy.ndimage.gaussian_filter(mode='reflect', truncate=4)``, for any thread count."""
    import numba
    from scipy import ndimage

    from generators.optics import gaussian_psf

    x = np.random.default_rng(3).uniform(0.0, 1.0, shape).astype(np.float32)
    ref = ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=4.0)
    old = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            out = gaussian_psf(x, sigma)
            assert out.dtype == np.float32 and out.tobytes() == ref.tobytes()
    finally:
        numba.set_num_threads(old)
    # float64 input and images smaller than the kernel still go through SciPy unchanged
    x64 = x.astype(np.float64)
    assert gaussian_psf(x64, sigma).tobytes() == ndimage.gaussian_filter(
        x64, sigma, mode="reflect", truncate=4.0).tobytes()


def test_float32_signal_gives_the_bytes_of_its_float64_copy():
    """float32 signals are read without conversion; each value widens exactly, so same counts."""
    s32 = np.random.default_rng(4).uniform(0.0, 1.0, (33, 47)).astype(np.float32)
    kw = dict(dose=80.0, gain=3.0, readout_sigma=5.0, offset=100.0, bit_depth=12, noise_key=99)
    assert detect(s32, **kw).tobytes() == detect(s32.astype(np.float64), **kw).tobytes()
