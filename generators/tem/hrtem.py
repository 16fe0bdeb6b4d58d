"""HRTEM through abTEM: exit wave by plane-wave multislice, then objective-lens CTF and intensity.

The exit wave of a specimen is computed once (:func:`exit_wave`, the expensive part) and reused for
K draws of defocus, Cs, partial coherence and dose (:class:`HRTEMImaging`).  Array orders: abTEM
keeps waves as ``(Nx, Ny)``; :meth:`HRTEMImaging.apply` returns images ``(H, W) = (Ny/f, Nx/f)``,
binned by the integer factor ``f`` (simulation grid points per image pixel, mean over f × f).

CTF sign convention (abTEM): ``χ(k) = π λ C10 k² + ½ π Cs λ³ k⁴`` with ``C10 = −defocus``
(positive defocus = underfocus); the wave is multiplied by ``exp(−iχ)``.  Partial coherence is
abTEM's quasi-coherent envelopes: ``focal_spread`` is the 1/e width (Å) = √2 σ, ``angular_spread``
the beam convergence (mrad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["abtem_config", "exit_wave", "HRTEMImaging", "HRTEMParams", "wavelength_a",
           "antialias_cutoff_mrad", "bin_image", "ctf_zeros"]

#: abTEM settings used throughout: eager NumPy on the CPU, no progress bars, and NumPy's FFT
#: (pocketfft): deterministic, so a dataset is bit-identical whatever the number of worker
#: processes.  abTEM's default FFTW with FFTW_MEASURE plans is ~2.4x faster for the 1024² multislice
#: here but picks its plan by timing, so two processes differ at float32 round-off (~1e-7 relative)
#: and flip a Poisson draw in roughly every few 256² images; FFTW_ESTIMATE plans were 8x slower.
ABTEM_SETTINGS = {"device": "cpu", "dask.lazy": False, "diagnostics.progress_bar": False, "fft": "numpy"}


def abtem_config(fft: str = "numpy"):
    """Context manager applying :data:`ABTEM_SETTINGS`; ``fft="fftw"`` opts into abTEM's FFTW
    (faster, but not bit-identical across processes)."""
    import abtem

    if fft not in ("numpy", "fftw"):
        raise ValueError(f"fft must be 'numpy' or 'fftw', got {fft!r}")
    return abtem.config.set({**ABTEM_SETTINGS, "fft": fft})


def wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength, Å."""
    from abtem.core.energy import energy2wavelength

    return float(energy2wavelength(voltage_kv * 1e3))


def antialias_cutoff_mrad(voltage_kv: float, sampling_a: float) -> float:
    """abTEM's antialiasing aperture: ``(2/3) · λ / (2 s)`` in mrad."""
    import abtem

    frac = float(abtem.config.get("antialias.cutoff"))
    return 1e3 * frac * wavelength_a(voltage_kv) / (2.0 * sampling_a)


def exit_wave(atoms, gpts: tuple[int, int], voltage_kv: float, slice_thickness_a: float,
              parametrization: str = "lobato", fft: str = "numpy") -> np.ndarray:
    """Plane-wave exit wave of ``atoms`` (an :class:`ase.Atoms` with the cell as the extent).

    Returns
    -------
    ndarray (Nx, Ny) complex64, abTEM order (x first); the incident wave has modulus 1.
    ``fft``: "numpy" (deterministic) or "fftw" (see :func:`abtem_config`).
    """
    import abtem

    with abtem_config(fft):
        pot = abtem.Potential(atoms, gpts=tuple(int(g) for g in gpts),
                              slice_thickness=slice_thickness_a, projection="infinite",
                              parametrization=parametrization)
        waves = abtem.PlaneWave(energy=voltage_kv * 1e3).multislice(pot)
        arr = np.asarray(waves.compute().array).copy()
        del waves, pot
    return arr


def bin_image(image_xy: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor × factor`` blocks of an abTEM-ordered image ``(Nx, Ny)``; returns
    ``(Ny/f, Nx/f)`` (rows = y)."""
    nx, ny = image_xy.shape
    if nx % factor or ny % factor:
        raise ValueError(f"grid {image_xy.shape} is not a multiple of the binning {factor}")
    b = image_xy.reshape(nx // factor, factor, ny // factor, factor).mean(axis=(1, 3))
    return np.ascontiguousarray(b.T)


def ctf_zeros(voltage_kv: float, defocus_a: float, cs_a: float, n_max: int) -> np.ndarray:
    """Spatial frequencies (1/Å) where ``|χ(k)| = nπ``, n = 1..n_max (abTEM's χ, see module doc),
    for the branch where χ falls from 0 (underfocus, |χ| rising monotonically over the range)."""
    lam = wavelength_a(voltage_kv)
    ks = []
    for n in range(1, n_max + 1):
        # π λ (−Δf) k² + ½ π Cs λ³ k⁴ = −nπ  →  a u² + b u + c = 0, u = k²
        a, b, c = 0.5 * cs_a * lam ** 3, -lam * defocus_a, float(n)
        if a == 0:
            ks.append(math.sqrt(-c / b))
        else:
            disc = b * b - 4 * a * c
            if disc < 0:
                raise ValueError(f"|chi| does not reach {n} pi on the underfocus branch")
            ks.append(math.sqrt((-b - math.sqrt(disc)) / (2 * a)))
    return np.array(ks)


@dataclass(frozen=True)
class HRTEMParams:
    """One draw of the objective lens: defocus and Cs (Å), focal spread (1/e width, Å),
    convergence (mrad), objective aperture (mrad, inf: none)."""

    defocus_a: float
    cs_a: float
    focal_spread_a: float
    convergence_mrad: float
    aperture_mrad: float

    def to_dict(self) -> dict:
        return {"defocus_a": self.defocus_a, "cs_a": self.cs_a,
                "focal_spread_a": self.focal_spread_a, "convergence_mrad": self.convergence_mrad,
                "aperture_mrad": None if math.isinf(self.aperture_mrad) else self.aperture_mrad}

    def ctf(self, voltage_kv: float):
        """The abTEM :class:`~abtem.CTF` of this draw."""
        import abtem

        return abtem.CTF(semiangle_cutoff=self.aperture_mrad, focal_spread=self.focal_spread_a,
                         angular_spread=self.convergence_mrad, defocus=self.defocus_a,
                         Cs=self.cs_a, energy=voltage_kv * 1e3)


@dataclass(frozen=True)
class HRTEMImaging:
    """Objective lens stage.

    Parameters
    ----------
    voltage_kv : float
    sampling_a : (sx, sy), simulation sampling, Å
    factor : int, simulation points per image pixel (binning)
    defocus_a : (low, high), Å, uniform per draw
    cs_a : (low, high), Å
    focal_spread_a : 1/e width, Å
    convergence_mrad : float
    aperture_mrad : float (inf: none)
    """

    voltage_kv: float
    sampling_a: tuple[float, float]
    factor: int
    defocus_a: tuple[float, float]
    cs_a: tuple[float, float]
    focal_spread_a: float = 0.0
    convergence_mrad: float = 0.0
    aperture_mrad: float = math.inf

    def sample(self, rng: np.random.Generator) -> HRTEMParams:
        return HRTEMParams(defocus_a=float(rng.uniform(*self.defocus_a)),
                           cs_a=float(rng.uniform(*self.cs_a)),
                           focal_spread_a=float(self.focal_spread_a),
                           convergence_mrad=float(self.convergence_mrad),
                           aperture_mrad=float(self.aperture_mrad))

    def band_limit(self) -> float:
        """Spatial frequency (1/Å) beyond which this lens transmits nothing that matters: the
        objective aperture (+2 % for abTEM's soft edge) or where abTEM's temporal envelope
        ``exp(−(½ π Δ α² / λ)²)`` falls below 1e-7 (inf: coherent and no aperture)."""
        lam = wavelength_a(self.voltage_kv)
        k = math.inf
        if math.isfinite(self.aperture_mrad):
            k = 1.02 * self.aperture_mrad * 1e-3 / lam
        if self.focal_spread_a > 0:
            alpha = math.sqrt(2.0 * lam * math.sqrt(math.log(1e7))
                              / (math.pi * self.focal_spread_a))
            k = min(k, alpha / lam)
        return k

    def spectrum(self, wave_xy: np.ndarray) -> np.ndarray:
        """FFT of the exit wave (complex64, abTEM order): computed once, reused by every draw."""
        from scipy import fft as sfft

        return sfft.fft2(np.asarray(wave_xy, np.complex64), workers=-1)

    def _crop_indices(self, n: int, extent: float, k_max: float) -> np.ndarray:
        half = int(math.ceil(k_max * extent)) + 2 if math.isfinite(k_max) else n
        if 2 * half >= n:
            return np.arange(n)
        return np.concatenate([np.arange(half), np.arange(n - half, n)])

    def apply_spectrum(self, spectrum: np.ndarray, params: HRTEMParams) -> np.ndarray:
        """Image ``(H, W)`` float32 from the exit-wave spectrum (see :meth:`apply`).

        abTEM evaluates the CTF (:class:`abtem.CTF`, envelopes and aperture included) on the
        frequencies inside :meth:`band_limit` only — the same values as on the full grid, at a
        fraction of the cost; outside, the transfer is < 1e-7 and set to 0.
        """
        from scipy import fft as sfft

        nx, ny = spectrum.shape
        lx, ly = nx * self.sampling_a[0], ny * self.sampling_a[1]
        k_max = self.band_limit()
        ix = self._crop_indices(nx, lx, k_max)
        iy = self._crop_indices(ny, ly, k_max)
        with abtem_config():
            ctf = params.ctf(self.voltage_kv)
            ctf.grid.gpts = (len(ix), len(iy))
            ctf.grid.extent = (lx, ly)
            kernel = np.asarray(ctf._evaluate_kernel(), np.complex64)
        out = np.zeros_like(spectrum)
        sel = np.ix_(ix, iy)
        out[sel] = spectrum[sel] * kernel
        psi = sfft.ifft2(out, workers=-1, overwrite_x=True)
        inten = psi.real.astype(np.float64) ** 2 + psi.imag.astype(np.float64) ** 2
        return bin_image(inten, self.factor).astype(np.float32)

    def apply(self, wave_xy: np.ndarray, params: HRTEMParams) -> np.ndarray:
        """Image intensity ``(H, W)`` float32 (incident intensity = 1) of the exit wave:
        ``|IFFT(FFT(ψ) · CTF)|²`` binned f × f — what ``abtem.Waves(ψ).apply_ctf(ctf)
        .intensity()`` gives, binned."""
        return self.apply_spectrum(self.spectrum(wave_xy), params)
