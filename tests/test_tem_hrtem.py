"""HRTEM via abTEM: equality with a direct abTEM call, Thon rings, dose, flat memory."""

import math

import numpy as np
import pytest

from generators.tem.atoms import SpecimenSpec
from generators.tem.hrtem import HRTEMImaging, ctf_zeros, exit_wave
from tests.test_tem_atomic import RECIPE, make_pipe


def test_image_equals_direct_abtem_call():
    import abtem

    pipe = make_pipe()
    for i in (0, 1):  # two draws from one exit wave
        signal, _labels, _geo, params, _rng = pipe.render(i)
        atoms = pipe.specimen_of(pipe.specimen_id(i)).atoms.to_ase()
        f = params["binning"]
        h, w = pipe.image_shape
        im = params["imaging"]
        # the same physics written directly against abTEM's public API (lazy, then computed)
        pot = abtem.Potential(atoms, gpts=(w * f, h * f), slice_thickness=2.0,
                              projection="infinite", parametrization="lobato")
        exit_ = abtem.PlaneWave(energy=300e3).multislice(pot)
        ctf = abtem.CTF(defocus=im["defocus_a"], Cs=im["cs_a"],
                        focal_spread=im["focal_spread_a"], angular_spread=im["convergence_mrad"],
                        energy=300e3)
        direct = np.asarray(exit_.apply_ctf(ctf).intensity().compute().array, np.float64)
        direct = direct.reshape(w, f, h, f).mean(axis=(1, 3)).T
        assert f == 2 and abs(params["sampling_a"] - 0.25) < 1e-12
        assert signal.shape == direct.shape == (h, w)
        np.testing.assert_allclose(signal, direct, rtol=0, atol=2e-4)
        assert signal.std() > 0.01  # there is contrast to compare


def test_thon_ring_zeros_at_analytic_frequencies():
    """Amorphous carbon, weak phase object: PSD ∝ sin²χ → minima where |χ(k)| = nπ."""
    L, s, n = 204.8, 0.4, 512
    spec = SpecimenSpec(extent_a=(L, L), diameter_a=(1, 2), particles=(0, 0),
                        support_thickness_a=(10.0, 10.0))
    atoms = spec.sample(np.random.default_rng(0)).to_ase()
    wave = exit_wave(atoms, (n, n), 300.0, 2.0)
    df, cs = 2000.0, 1.2e7  # Å: 200 nm underfocus, Cs 1.2 mm
    lens = HRTEMImaging(300.0, (s, s), 1, (df, df), (cs, cs))
    img = lens.apply(wave, lens.sample(np.random.default_rng(0))).astype(np.float64)
    psd = np.abs(np.fft.fft2(img - img.mean())) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, s), np.fft.fftfreq(n, s)))
    dk = 0.5 / L
    b = np.round(k / dk).astype(int).ravel()
    prof = np.bincount(b, psd.ravel()) / np.maximum(np.bincount(b), 1)
    expected = ctf_zeros(300.0, df, cs, 5)
    # the analytic formula, written out here: π λ (−Δf) k² + ½ π Cs λ³ k⁴ = −nπ
    lam = 12.2643 / math.sqrt(300e3 * (1 + 0.978476e-6 * 300e3))
    chi = math.pi * lam * (-df) * expected ** 2 + 0.5 * math.pi * cs * lam ** 3 * expected ** 4
    np.testing.assert_allclose(chi, -np.pi * np.arange(1, 6), rtol=1e-3)
    for kz in expected:
        lo, hi = int(0.9 * kz / dk), int(1.1 * kz / dk)
        j = lo + int(np.argmin(prof[lo:hi]))
        y0, y1, y2 = np.log(prof[j - 1:j + 2])
        k_min = (j + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)) * dk  # parabolic refinement
        assert abs(k_min - kz) / kz < 0.02, (kz, k_min)


def _fixed_dose_pipe(dose):
    text = RECIPE.replace("dose_e_per_a2: [1000, 1000]", f"dose_e_per_a2: [{dose}, {dose}]")
    return make_pipe(text)


def test_mean_counts_follow_dose():
    means = {}
    for dose in (200.0, 2000.0):
        pipe = _fixed_dose_pipe(dose)
        s = pipe.generate(0)
        signal, *_ = pipe.render(0)
        d = pipe.instrument.detector
        e = (s.image.astype(np.float64) - d.offset) / d.gain          # electrons per pixel
        px_dose = dose * pipe.pixel_size_a ** 2
        assert abs(s.params["detector"]["dose_e_per_px"] - px_dose) < 1e-9
        expect = px_dose * signal.mean()   # the camera PSF keeps the mean
        sigma = math.sqrt(expect / signal.size) + 0.5 / d.gain      # Poisson + fixed pattern
        assert abs(e.mean() - expect) < 5 * sigma, (dose, e.mean(), expect)
        means[dose] = e.mean()
    assert abs(means[2000.0] / means[200.0] - 10.0) < 0.1


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def test_memory_flat_over_many_specimens():
    """Each sample a new specimen (new atoms, new exit wave): RSS after 40 more samples stays
    within 40 MB of the RSS after a warm-up of 10 (tolerance for allocator noise)."""
    text = RECIPE.replace("samples: 4", "samples: 60").replace("specimens: 2", "specimens: 60")
    pipe = make_pipe(text)
    for i in range(10):
        pipe.generate(i)
    before = _rss_mb()
    for i in range(10, 50):
        pipe.generate(i)
    after = _rss_mb()
    assert after - before < 40.0, (before, after)


@pytest.mark.parametrize("focal_spread, aperture", [(42.4, math.inf), (0.0, 15.0), (20.0, 25.0)])
def test_band_limited_ctf_equals_abtem_apply_ctf(focal_spread, aperture):
    """The CTF evaluated only inside the band limit (envelope < 1e-7 / aperture outside) gives
    abTEM's full-grid ``apply_ctf(...).intensity()``."""
    import abtem

    spec = SpecimenSpec(extent_a=(25.6, 25.6), diameter_a=(8, 10), particles=(1, 1),
                        support_thickness_a=(5.0, 5.0))
    atoms = spec.sample(np.random.default_rng(3)).to_ase()
    wave = exit_wave(atoms, (256, 256), 300.0, 2.0)
    lens = HRTEMImaging(300.0, (0.1, 0.1), 1, (150.0, 150.0), (1e6, 1e6),
                        focal_spread_a=focal_spread, convergence_mrad=0.3, aperture_mrad=aperture)
    assert lens.band_limit() * 25.6 * 2 < 0.5 * 256  # the crop is real: < half the grid
    p = lens.sample(np.random.default_rng(0))
    ours = lens.apply(wave, p)
    ctf = abtem.CTF(defocus=150.0, Cs=1e6, focal_spread=focal_spread, angular_spread=0.3,
                    semiangle_cutoff=aperture, energy=300e3)
    ref = abtem.Waves(wave, energy=300e3, sampling=0.1).apply_ctf(ctf).intensity().compute()
    ref = np.asarray(ref.array, np.float64).T
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert ref.std() > 1e-3


def test_fft_backend_is_a_checked_choice():
    """NumPy FFT by default (bit-identical across processes); FFTW only on request."""
    import abtem

    from generators.tem.hrtem import abtem_config

    with abtem_config():
        assert abtem.config.get("fft") == "numpy"
    with abtem_config("fftw"):
        assert abtem.config.get("fft") == "fftw"
    with pytest.raises(ValueError, match="fft must be"):
        abtem_config("cufft")
