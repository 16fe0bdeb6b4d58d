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


# --- exactness of the samplers in generators/_rng.py (Ziggurat normal, inversion/PTRS Poisson) ---

def _poisson_chi2_p(x: np.ndarray, lam: float) -> float:
    """p-value of a chi-square fit of integer samples to scipy.stats.poisson(lam), tails pooled."""
    lo, hi = int(stats.poisson.ppf(1e-7, lam)), int(stats.poisson.isf(1e-7, lam)) + 1
    edges = np.arange(lo, hi + 1)
    obs = np.bincount(np.clip(x - lo, 0, None), minlength=hi - lo + 1)[: hi - lo + 1].astype(float)
    obs[0] = np.sum(x <= lo)
    obs[-1] = np.sum(x >= hi)
    p = stats.poisson.pmf(edges, lam)
    p[0] = stats.poisson.cdf(lo, lam)
    p[-1] = stats.poisson.sf(hi - 1, lam)
    exp = p * x.size
    # merge bins with few expected counts into their neighbour (keeps every sample)
    o_m, e_m, o_acc, e_acc = [], [], 0.0, 0.0
    for o, e in zip(obs, exp):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 5:
            o_m.append(o_acc)
            e_m.append(e_acc)
            o_acc = e_acc = 0.0
    o_m[-1] += o_acc
    e_m[-1] += e_acc
    o_m, e_m = np.array(o_m), np.array(e_m)
    chi2 = ((o_m - e_m) ** 2 / e_m).sum()
    return stats.chi2.sf(chi2, o_m.size - 1)


@pytest.mark.parametrize("lam", [0.3, 2.0, 9.9, 10.0, 10.1, 30.0, 300.0, 3000.0])
def test_detector_poisson_chi_square_against_scipy(lam):
    """The kernel's shot noise (gain 1, no readout) against scipy.stats.poisson, 2¹⁸ samples.

    Half the pixels have λ, half 1.37·λ in a checkerboard, so every pixel's λ differs from its
    neighbour's: the PTRS fast acceptance, exact log test and further attempts and the inversion
    are all exercised; each half is fitted on its own."""
    checker = (np.add.outer(np.arange(512), np.arange(1024)) % 2).astype(bool)
    sig = np.where(checker, 1.37, 1.0)
    x = detect(sig, dose=lam, gain=1.0, readout_sigma=0.0, offset=0.0, bit_depth=16,
               noise_key=20240601).astype(np.int64)
    assert _poisson_chi2_p(x[~checker], lam) > 1e-3
    assert _poisson_chi2_p(x[checker], 1.37 * lam) > 1e-3
    for part, l in ((x[~checker], lam), (x[checker], 1.37 * lam)):
        n = part.size
        assert abs(part.mean() - l) < 5 * np.sqrt(l / n)
        assert abs(part.var() / l - 1) < 5 * np.sqrt(2 / n) + 5 / np.sqrt(n * l)


@pytest.mark.parametrize("lam", [0.3, 9.9, 10.0, 300.0, 3000.0])
def test_poisson_row_sampler_on_a_long_row_against_scipy(lam):
    """generators._rng.poisson_row on one row of 2·10⁵ items (large item numbers) against SciPy."""
    from generators._rng import fill_poisson

    x = fill_poisson(777, lam, 200_000)
    assert _poisson_chi2_p(x, lam) > 1e-3


@pytest.mark.parametrize("row", [True, False])
def test_ziggurat_normal_against_scipy(row):
    """KS, equiprobable-bin chi-square, moments and the tail beyond the base layer (R ≈ 3.654,
    sampled by the separate tail algorithm) of 2·10⁶ Ziggurat normals against scipy.stats.norm:
    the kernel's row sampler (normal_row) and the sequential one it restarts with (normal)."""
    from generators._rng import _ZIG_R, fill_normal, fill_normal_sequential

    n = 2_000_000
    z = (fill_normal if row else fill_normal_sequential)(12345, n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    nb = 400  # equiprobable bins: sensitive to a wrong layer of the Ziggurat table
    cut = stats.norm.ppf(np.arange(1, nb) / nb)
    obs = np.bincount(np.searchsorted(cut, z), minlength=nb)
    chi2 = ((obs - n / nb) ** 2 / (n / nb)).sum()
    assert stats.chi2.sf(chi2, nb - 1) > 1e-3
    se = 1 / np.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * np.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24) * se
    # tail: count beyond ±R is Binomial(n, 2·Φ(−R)); the tail's shape: P(|z| > R + 1 | |z| > R)
    tail = np.abs(z)[np.abs(z) > _ZIG_R]
    p_tail = 2 * stats.norm.sf(_ZIG_R)
    assert abs(tail.size - n * p_tail) < 5 * np.sqrt(n * p_tail)
    assert stats.kstest(tail, lambda t: 1 - stats.norm.sf(t) / stats.norm.sf(_ZIG_R)).pvalue > 1e-3


def test_readout_noise_is_gaussian_against_scipy():
    """signal 0 (no shot noise): value = round(o + σ z); chi-square of the counts against the discretised normal."""
    sig, o = 40.0, 1000.0
    v = detect(np.zeros((512, 512)), dose=10.0, gain=1.0, readout_sigma=sig, offset=o,
               bit_depth=16, noise_key=5).ravel().astype(np.int64)
    lo, hi = int(o - 5 * sig), int(o + 5 * sig)
    m = np.arange(lo, hi + 1)
    p = stats.norm.cdf(m + 0.5, o, sig) - stats.norm.cdf(m - 0.5, o, sig)
    p[0] = stats.norm.cdf(lo + 0.5, o, sig)
    p[-1] = stats.norm.sf(hi - 0.5, o, sig)
    obs = np.bincount(np.clip(v, lo, hi) - lo, minlength=m.size)
    exp = p * v.size
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert stats.chi2.sf(chi2, m.size - 1) > 1e-3


@pytest.mark.parametrize("extra", [dict(), dict(lag_px=2.0, saturation=3000.0)])
def test_detector_bytes_same_for_1_and_2_threads(extra):
    """Mixed λ (below 10, PTRS, repeats, zero) with readout: identical bytes for 1 and 2 threads."""
    rng = np.random.default_rng(8)
    sig = rng.uniform(0.0, 1.0, (257, 301))
    sig[:40] = 0.05  # λ < 10 and runs of equal λ
    sig[40:60] = 0.0
    kw = dict(dose=150.0, gain=4.0, readout_sigma=6.0, offset=200.0, bit_depth=16,
              noise_key=31337, **extra)
    old = numba.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            outs.append(detect(sig, **kw).tobytes())
    finally:
        numba.set_num_threads(old)
    assert outs[0] == outs[1]


def test_ziggurat_tables_match_their_definition():
    """Every layer of the table has area V, and the layers stack up to the curve at x = 0."""
    from generators._rng import _ZIG_F, _ZIG_R, _ZIG_V, _ZIG_W

    x = _ZIG_W * 2.0**53  # right edges x_i (layer 0: width of the base rectangle)
    f = lambda t: np.exp(-0.5 * t * t)  # noqa: E731
    assert np.allclose(x[1:] * (_ZIG_F[:-1] - _ZIG_F[1:]), _ZIG_V, rtol=1e-9, atol=0)
    assert np.allclose(_ZIG_F[1:], f(x[1:]), rtol=1e-12)
    # base layer: rectangle up to R plus the tail of the density exp(-x²/2) (unnormalised)
    tail = np.sqrt(2 * np.pi) * stats.norm.sf(_ZIG_R)
    assert np.isclose(_ZIG_R * f(_ZIG_R) + tail, _ZIG_V, rtol=1e-6)
    assert x[1] * (1 - f(x[1])) == pytest.approx(_ZIG_V, rel=1e-9)
