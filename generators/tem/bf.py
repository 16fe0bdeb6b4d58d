"""Mesoscale bright-field TEM: projected thickness → phase object → abTEM CTF → intensity.

Physics (phase-object approximation; see ../shared/PHYSICS.md):

- phase ``φ = σ(E) · (V_p · t_p + V_s · t_s)``, rad; σ the interaction constant (abTEM's
  ``energy2sigma``, rad/(V·Å): 7.29e-4 at 200 kV, 6.53e-4 at 300 kV), V the mean inner
  potentials (V), t the projected thicknesses of particles and support (Å);
- amplitude ``A = exp(−g · t_p / (2 λ_p) − t_s / (2 λ_s))``: the *intensity* transmitted inside
  the objective aperture falls as ``exp(−t/λ)`` with an effective (aperture-limited) mean free
  path λ (Å) — electrons scattered beyond the aperture are lost (mass-thickness contrast); the
  optional field ``g = 1 + texture · screen`` (≥ 0) mottles the particles' absorption like the
  diffraction contrast of real crystalline particles;
- the amorphous support is a continuous film of mean thickness ``t_s`` with thickness
  fluctuations ``δt`` = filtered Gaussian noise of spectrum ``S(k) ∝ (1 + (2π ξ k)²)^(−α/2)``
  (α = 3: an exponential autocorrelation of length ξ, the Ornstein–Zernike/Lorentzian form), rms
  ``roughness · t_s`` (thickness-scaled) — a random phase (and weak amplitude) screen;
- the exit wave ``ψ = A exp(iφ)`` is imaged through abTEM's :class:`abtem.CTF` (defocus, Cs,
  focal spread, beam convergence, objective aperture; abTEM's sign convention: positive defocus
  is *underfocus*, which gives the bright Fresnel fringe outside a dark particle).  The CTF array
  is evaluated by abTEM once per parameter set and applied with one FFT pair
  (``I = |IFFT(FFT(ψ) · CTF)|²``), which equals ``abtem.Waves(ψ).apply_ctf(ctf).intensity()`` to
  float32 round-off (tested) at about half the cost (bench/tem_bf.py measures both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sfft

__all__ = ["interaction_constant", "wavelength", "transmission", "phase_shift", "support_screen",
           "ctf_kernel", "apply_ctf", "max_edge_phase_step", "particle_motion_blur", "BFImaging", "BFImagingParams"]


def interaction_constant(voltage_kv: float) -> float:
    """Interaction constant σ in rad/(V·Å) at ``voltage_kv`` (abTEM's ``energy2sigma``)."""
    from abtem.core.energy import energy2sigma

    if not voltage_kv > 0:
        raise ValueError(f"voltage must be > 0 kV, got {voltage_kv}")
    return float(energy2sigma(float(voltage_kv) * 1e3))


def wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å (abTEM's ``energy2wavelength``)."""
    from abtem.core.energy import energy2wavelength

    if not voltage_kv > 0:
        raise ValueError(f"voltage must be > 0 kV, got {voltage_kv}")
    return float(energy2wavelength(float(voltage_kv) * 1e3))


def phase_shift(thickness_a: np.ndarray, mip_v: float, sigma: float) -> np.ndarray:
    """Phase ``σ · V_mip · t`` (rad) of a thickness map ``t`` (Å)."""
    return sigma * float(mip_v) * np.asarray(thickness_a, dtype=np.float64)


def transmission(t_particle_a: np.ndarray, t_support_a: np.ndarray, *, sigma: float,
                 mip_particle_v: float, mip_support_v: float, mfp_particle_a: float,
                 mfp_support_a: float,
                 particle_absorption: np.ndarray | None = None) -> np.ndarray:
    """Exit wave ``A · exp(iφ)`` (complex64, shape of the inputs) of the phase object.

    Computed in float32 (relative error ~1e-7 per rad of phase; the phase of a 50 nm gold
    particle is ~10 rad).

    Parameters
    ----------
    t_particle_a, t_support_a : ndarray (H, W)
        Projected thickness of particles and support, Å.
    sigma : float
        Interaction constant, rad/(V·Å).
    mip_particle_v, mip_support_v : float
        Mean inner potentials, V.
    mfp_particle_a, mfp_support_a : float
        Effective (aperture-limited) mean free paths for the intensity, Å (> 0).
    particle_absorption : ndarray (H, W), optional
        Factor (≥ 0) on the particles' absorption ``t_p / λ_p`` per pixel: the diffraction
        contrast of crystalline particles (orientation, strain, defects) scatters locally more or
        less beyond the aperture.  It changes the amplitude only, not the phase.
    """
    if not (mfp_particle_a > 0 and mfp_support_a > 0):
        raise ValueError("mean free paths must be > 0 Å")
    tp = np.asarray(t_particle_a, dtype=np.float32)
    ts = np.asarray(t_support_a, dtype=np.float32)
    phi = np.float32(sigma * mip_particle_v) * tp + np.float32(sigma * mip_support_v) * ts
    absorb_p = np.float32(-0.5 / mfp_particle_a) * tp
    if particle_absorption is not None:
        absorb_p *= np.asarray(particle_absorption, dtype=np.float32)
    amp = np.exp(absorb_p + np.float32(-0.5 / mfp_support_a) * ts)
    out = np.empty(phi.shape, dtype=np.complex64)
    out.real = amp * np.cos(phi)
    out.imag = amp * np.sin(phi)
    return out


def particle_motion_blur(t_particle_a: np.ndarray, absorption: np.ndarray | None,
                         sigma_px: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Particles that move during the exposure, seen through their time-averaged thickness.

    In in-situ (heated) TEM the particles jiggle on the support during one exposure while the
    film stays put.  The projected particle thickness is averaged over an isotropic Gaussian
    displacement of rms ``sigma_px`` per axis (``t ⊛ g``); the absorption factor is averaged with
    the same weight (``(t·a) ⊛ g / (t ⊛ g)``).  Averaging the thickness instead of the exit-wave
    intensities is an approximation (exact in the weak-object limit); the support is untouched, so
    the film keeps its speckle while particle edges soften.  Labels stay the geometry at the mean
    position.

    Parameters
    ----------
    t_particle_a : ndarray (H, W)
        Projected particle thickness, Å.
    absorption : ndarray (H, W) or None
        Per-pixel factor on the particles' absorption (see :func:`transmission`).
    sigma_px : float
        Rms displacement per axis, px (≥ 0; 0 returns the inputs).

    Returns
    -------
    (t_blurred, absorption_blurred) : ndarrays (H, W) float32 (absorption None if given None)
    """
    from scipy import ndimage

    if not sigma_px >= 0:
        raise ValueError(f"motion blur sigma must be >= 0 px, got {sigma_px}")
    if sigma_px == 0:
        return t_particle_a, absorption
    t = np.asarray(t_particle_a, dtype=np.float32)
    tb = ndimage.gaussian_filter(t, sigma_px, mode="nearest")
    if absorption is None:
        return tb, None
    ta = ndimage.gaussian_filter(t * np.asarray(absorption, dtype=np.float32), sigma_px,
                                 mode="nearest")
    ab = np.ones_like(tb)
    np.divide(ta, tb, out=ab, where=tb > 1e-6)
    return tb, ab


def max_edge_phase_step(radius_px: float, pixel_size_a: float, mip_v: float,
                        sigma: float) -> float:
    """Phase step (rad) across the outermost pixel of a sphere of ``radius_px``.

    ``σ V · 2 sqrt(R² − (R − 1)²)`` px → Å: the steepest phase step the grid must hold.  At π
    or more the sampled ``exp(iφ)`` aliases (its local frequency passes Nyquist): the pixel is
    too coarse for the particle's phase.
    """
    r = float(radius_px)
    chord = 2.0 * math.sqrt(max(r * r - (r - 1.0) ** 2, 0.0)) * pixel_size_a
    return sigma * mip_v * chord


def support_screen(shape: tuple[int, int], correlation_px: float, alpha: float,
                   key: int) -> np.ndarray:
    """Unit-variance Gaussian random field with spectrum ``(1 + (2π ξ k)²)^(−α/2)``.

    Parameters
    ----------
    shape : (H, W)
    correlation_px : float
        ξ, px (> 0).
    alpha : float
        Spectral exponent (> 0); 3 gives an exponential autocorrelation in 2-D.
    key : int
        Seed of the white noise (``SeedSequence(key)``).

    Returns
    -------
    ndarray (H, W) float64, mean 0 and standard deviation 1 (normalised exactly).
    """
    if not (correlation_px > 0 and alpha > 0):
        raise ValueError(f"need correlation_px > 0 and alpha > 0, got {correlation_px}, {alpha}")
    h, w = int(shape[0]), int(shape[1])
    white = np.random.default_rng(np.random.SeedSequence(int(key))).standard_normal((h, w))
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    filt = (1.0 + (2.0 * math.pi * correlation_px) ** 2 * (kx * kx + ky * ky)) ** (-alpha / 4.0)
    field = sfft.irfft2(sfft.rfft2(white) * filt, s=(h, w))
    field -= field.mean()
    sd = field.std()
    return field / sd if sd > 0 else field


@lru_cache(maxsize=8)
def _ctf_kernel_cached(shape: tuple[int, int], sampling_a: float, voltage_kv: float,
                       defocus_a: float, cs_a: float, focal_spread_a: float,
                       convergence_mrad: float, aperture_mrad: float) -> np.ndarray:
    import abtem

    ctf = abtem.CTF(semiangle_cutoff=aperture_mrad, focal_spread=focal_spread_a,
                    angular_spread=convergence_mrad, defocus=defocus_a, Cs=cs_a,
                    energy=voltage_kv * 1e3, gpts=shape, sampling=sampling_a)
    kernel = np.asarray(ctf._evaluate_kernel(), dtype=np.complex64)
    kernel.setflags(write=False)
    return kernel


def ctf_kernel(shape: tuple[int, int], sampling_a: float, voltage_kv: float, defocus_a: float,
               cs_a: float = 0.0, focal_spread_a: float = 0.0, convergence_mrad: float = 0.0,
               aperture_mrad: float = math.inf) -> np.ndarray:
    """abTEM's CTF (with partial-coherence envelopes and aperture) on the FFT grid of ``shape``.

    Parameters
    ----------
    shape : (H, W), px
    sampling_a : float
        Pixel size, Å.
    voltage_kv : float
    defocus_a : float
        abTEM defocus (= −C10), Å; positive is underfocus.
    cs_a : float
        Spherical aberration C30, Å.
    focal_spread_a : float
        abTEM ``focal_spread`` (1/e width of the focal spread), Å.
    convergence_mrad : float
        abTEM ``angular_spread`` (beam convergence, standard deviation), mrad.
    aperture_mrad : float
        Objective aperture semi-angle, mrad (``inf``: none).

    Returns
    -------
    ndarray (H, W) complex64, read-only, unshifted (``numpy.fft.fft2`` order).
    """
    return _ctf_kernel_cached((int(shape[0]), int(shape[1])), float(sampling_a),
                              float(voltage_kv), float(defocus_a), float(cs_a),
                              float(focal_spread_a), float(convergence_mrad),
                              float(aperture_mrad))


def apply_ctf(wave: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Image intensity ``|IFFT(FFT(ψ) · CTF)|²`` (float32, shape of ``wave``)."""
    psi = np.asarray(wave, dtype=np.complex64)
    if psi.shape != kernel.shape:
        raise ValueError(f"wave shape {psi.shape} != CTF shape {kernel.shape}")
    f = sfft.fft2(psi, workers=-1)
    f *= kernel
    g = sfft.ifft2(f, workers=-1, overwrite_x=True)
    return (g.real * g.real + g.imag * g.imag).astype(np.float32, copy=False)


@dataclass(frozen=True)
class BFImagingParams:
    """Drawn imaging parameters of one frame (abTEM conventions and units)."""

    defocus_a: float
    cs_a: float
    focal_spread_a: float
    convergence_mrad: float
    aperture_mrad: float

    def to_dict(self) -> dict:
        return {"defocus_a": self.defocus_a, "cs_a": self.cs_a,
                "focal_spread_a": self.focal_spread_a, "convergence_mrad": self.convergence_mrad,
                "aperture_mrad": None if math.isinf(self.aperture_mrad) else self.aperture_mrad}


@dataclass(frozen=True)
class BFImaging:
    """Objective-lens stage: draws the defocus, images an exit wave with abTEM's CTF.

    Parameters
    ----------
    voltage_kv : float
    pixel_size_a : float
        Å per px.
    defocus_nm : (float, float)
        Range of the abTEM defocus (positive: underfocus), nm, drawn uniformly per frame.
    cs_mm : float
    focal_spread_nm : float
        abTEM focal spread (1/e width), nm.
    convergence_mrad : float
    aperture_mrad : float
        Objective aperture semi-angle, mrad (``inf``: none).
    """

    voltage_kv: float
    pixel_size_a: float
    defocus_nm: tuple[float, float] = (500.0, 1500.0)
    cs_mm: float = 1.2
    focal_spread_nm: float = 3.0
    convergence_mrad: float = 0.1
    aperture_mrad: float = math.inf

    def sample(self, rng: np.random.Generator) -> BFImagingParams:
        return BFImagingParams(defocus_a=float(rng.uniform(*self.defocus_nm)) * 10.0,
                               cs_a=self.cs_mm * 1e7, focal_spread_a=self.focal_spread_nm * 10.0,
                               convergence_mrad=self.convergence_mrad,
                               aperture_mrad=self.aperture_mrad)

    def apply(self, wave: np.ndarray, params: BFImagingParams) -> np.ndarray:
        """Intensity (float32, shape of ``wave``; 1 = unscattered vacuum beam)."""
        k = ctf_kernel(wave.shape, self.pixel_size_a, self.voltage_kv, params.defocus_a,
                       params.cs_a, params.focal_spread_a, params.convergence_mrad,
                       params.aperture_mrad)
        return apply_ctf(wave, k)
