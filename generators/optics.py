"""Optics: the probe point-spread function and vignetting.

A Gaussian probe of standard deviation σ (px) blurs the expected signal by convolution
(:func:`scipy.ndimage.gaussian_filter`, reflecting edges).  Optionally the PSF has a Lorentzian tail
(:class:`LorentzianTailPSF`: scintillator/camera MTFs, beam tails).  Vignetting is a smooth
low-order multiplicative field (:class:`Vignetting`).  Both act on the signal only; labels are the
specimen truth and are never blurred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from scipy import ndimage

__all__ = ["GaussianPSF", "PSFParams", "gaussian_psf", "psf_otf", "lorentzian_psf",
           "LorentzianTailPSF", "TailedPSFParams", "Vignetting", "VignettingParams",
           "vignetting_field", "vignetting_basis", "VIGNETTING_TERMS", "psf_following_scan"]


def gaussian_psf(signal: np.ndarray, sigma_px: float) -> np.ndarray:
    """Convolve ``signal`` (H, W) with a normalised Gaussian of σ = ``sigma_px`` px.

    Returns an array of the same shape and dtype (float32 stays float32); σ = 0 returns a copy.
    """
    if sigma_px < 0:
        raise ValueError(f"PSF sigma must be >= 0 px, got {sigma_px}")
    if sigma_px == 0:
        return np.array(signal, copy=True)
    radius = int(4.0 * float(sigma_px) + 0.5)
    x = np.asarray(signal)
    if x.ndim == 2 and x.dtype == np.float32 and min(x.shape) > radius:
        return _gaussian_filter_float32(x, sigma_px, radius)
    return ndimage.gaussian_filter(signal, sigma_px, mode="reflect", truncate=4.0)


def _gaussian_weights(sigma_px: float, radius: int) -> np.ndarray:
    """The taps of ``scipy.ndimage``'s Gaussian (same expression, so the same doubles)."""
    xs = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma_px * sigma_px) * xs**2)
    return phi / phi.sum()


_ROWS = 16  # rows per parallel chunk of the separable filters


@njit(cache=True, inline="always")
def _reflect(i, n):
    """'reflect' (half-sample symmetric) index for -n <= i < 2n."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@njit(parallel=True, cache=True)
def _correlate_rows(src, fw, radius, out):
    """Symmetric correlation along axis 0 (reflect), accumulated in double as scipy does:
    ``o = s[0]·w[0]``, then ``o += (s[-j] + s[+j])·w[j]`` for ``j = radius … 1``."""
    h, w = src.shape
    for blk in prange((h + _ROWS - 1) // _ROWS):
        acc = np.empty(w)  # one buffer per block of rows (allocations per row cost)
        for r in range(blk * _ROWS, min(h, (blk + 1) * _ROWS)):
            w0 = fw[radius]
            for c in range(w):
                acc[c] = np.float64(src[r, c]) * w0
            for j in range(radius, 0, -1):
                a = src[_reflect(r - j, h)]
                b = src[_reflect(r + j, h)]
                wj = fw[radius - j]
                for c in range(w):
                    acc[c] += (np.float64(a[c]) + np.float64(b[c])) * wj
            for c in range(w):
                out[r, c] = np.float32(acc[c])


@njit(parallel=True, cache=True)
def _correlate_cols(src, fw, radius, out):
    """The same along axis 1 (each line padded by reflection into a double buffer); the taps
    are the outer loop so the inner loop runs along the line (vectorised), with every pixel's
    sum taken in the same order as before."""
    h, w = src.shape
    for blk in prange((h + _ROWS - 1) // _ROWS):
        buf = np.empty(w + 2 * radius)  # buffers per block of rows, not per row
        acc = np.empty(w)
        for r in range(blk * _ROWS, min(h, (blk + 1) * _ROWS)):
            # the line, then its reflected margins (-radius <= c < 0, w <= c < w + radius):
            # the copy of the line has no index test and vectorises
            for c in range(w):
                buf[c + radius] = np.float64(src[r, c])
            for c in range(-radius, 0):
                buf[c + radius] = np.float64(src[r, _reflect(c, w)])
            for c in range(w, w + radius):
                buf[c + radius] = np.float64(src[r, _reflect(c, w)])
            w0 = fw[radius]
            for c in range(w):
                acc[c] = buf[c + radius] * w0
            for j in range(radius, 0, -1):
                wj = fw[radius - j]
                lo = buf[radius - j:radius - j + w]
                hi = buf[radius + j:radius + j + w]
                for c in range(w):
                    acc[c] += (lo[c] + hi[c]) * wj
            for c in range(w):
                out[r, c] = np.float32(acc[c])


def _gaussian_filter_float32(x: np.ndarray, sigma_px: float, radius: int) -> np.ndarray:
    """``ndimage.gaussian_filter(x, σ, mode='reflect', truncate=4)`` for float32 (H, W), in
    parallel: the same taps, order of operations and float32 rounding after each axis, so the
    same bytes (tested against SciPy)."""
    fw = _gaussian_weights(float(sigma_px), radius)
    tmp = np.empty(x.shape, dtype=np.float32)
    _correlate_rows(np.ascontiguousarray(x), fw, radius, tmp)
    out = np.empty(x.shape, dtype=np.float32)
    _correlate_cols(tmp, fw, radius, out)
    return out


@dataclass(frozen=True)
class PSFParams:
    """Drawn PSF of one frame (σ in px)."""

    sigma_px: float

    def to_dict(self) -> dict:
        return {"psf_sigma_px": self.sigma_px}


@dataclass(frozen=True)
class GaussianPSF:
    """Gaussian probe stage; σ drawn uniformly in ``sigma_px`` (px) per frame."""

    sigma_px: tuple[float, float] = (0.6, 1.2)

    def sample(self, rng: np.random.Generator) -> PSFParams:
        return PSFParams(sigma_px=float(rng.uniform(*self.sigma_px)))

    def apply(self, signal: np.ndarray, params: PSFParams,
              row_shift_px: np.ndarray | None = None) -> np.ndarray:
        """Blurred signal; with ``row_shift_px`` the blur follows the scan lines
        (:func:`psf_following_scan`), else it blurs the recorded grid (the basic model)."""
        if row_shift_px is not None:
            return psf_following_scan(signal, row_shift_px, params.sigma_px)
        return gaussian_psf(signal, params.sigma_px)


# --------------------------------------------------------------------------------------------
# Lorentzian-tailed PSF
# --------------------------------------------------------------------------------------------

def psf_otf(shape: tuple[int, int], sigma_px: float, tail_fraction: float = 0.0,
            tail_gamma_px: float = 1.0) -> np.ndarray:
    """Optical transfer function on the ``numpy.fft.rfft2`` grid of ``shape``.

    ``OTF(k) = (1 − η) exp(−2π² σ² |k|²) + η exp(−2π γ |k|)`` (k in cycles/px): the Fourier
    transform of ``(1 − η) · Gaussian(σ) + η · C_γ`` with the 2-D Cauchy ("Lorentzian") kernel
    ``C_γ(r) = γ / (2π (r² + γ²)^{3/2})``, whose line-spread function is the 1-D Lorentzian
    ``γ / (π (x² + γ²))`` and whose tail falls as r⁻³.  ``OTF(0) = 1``: the discrete kernel sums
    to 1.
    """
    h, w = int(shape[0]), int(shape[1])
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    k2 = kx * kx + ky * ky
    otf = np.exp(-2.0 * np.pi**2 * sigma_px**2 * k2)
    if tail_fraction > 0:
        otf = (1.0 - tail_fraction) * otf + tail_fraction * np.exp(
            -2.0 * np.pi * tail_gamma_px * np.sqrt(k2))
    return otf


def lorentzian_psf(signal: np.ndarray, sigma_px: float, tail_fraction: float,
                   tail_gamma_px: float) -> np.ndarray:
    """Convolve ``signal`` with the Lorentzian-tailed PSF of :func:`psf_otf`.

    The image is padded by reflection (by up to half its size each side) and convolved by FFT; the
    kernel is normalised (a constant image stays constant).  ``tail_fraction = 0`` is the Gaussian
    PSF of :func:`gaussian_psf` (up to the boundary treatment).  Returns float32 for float32 input,
    else float64.
    """
    if sigma_px < 0 or tail_gamma_px <= 0 or not 0 <= tail_fraction <= 1:
        raise ValueError(f"need sigma_px >= 0, tail_gamma_px > 0, 0 <= tail_fraction <= 1; got "
                         f"{sigma_px}, {tail_gamma_px}, {tail_fraction}")
    from scipy import fft as sfft

    x = np.asarray(signal)
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    h, w = x.shape
    reach = 4.0 * sigma_px + 16.0 * tail_gamma_px * (tail_fraction > 0)
    py = min(int(np.ceil(reach)), h - 1)
    px = min(int(np.ceil(reach)), w - 1)
    hp = sfft.next_fast_len(h + 2 * py, real=True)
    wp = sfft.next_fast_len(w + 2 * px, real=True)
    padded = np.pad(x.astype(np.float64), ((py, hp - h - py), (px, wp - w - px)),
                    mode="symmetric")
    spec = sfft.rfft2(padded, workers=-1)
    spec *= psf_otf((hp, wp), sigma_px, tail_fraction, tail_gamma_px)
    out = sfft.irfft2(spec, s=(hp, wp), workers=-1)[py:py + h, px:px + w]
    return np.ascontiguousarray(out, dtype=dtype)


@dataclass(frozen=True)
class TailedPSFParams:
    """Drawn PSF of one frame: Gaussian σ, Lorentzian tail fraction η and half-width γ (px)."""

    sigma_px: float
    tail_fraction: float
    tail_gamma_px: float

    def to_dict(self) -> dict:
        return {"psf_sigma_px": self.sigma_px, "psf_tail_fraction": self.tail_fraction,
                "psf_tail_gamma_px": self.tail_gamma_px}


@dataclass(frozen=True)
class LorentzianTailPSF:
    """Gaussian core plus a Lorentzian tail (see :func:`psf_otf`); each parameter drawn uniformly
    in its range per frame (σ first, as :class:`GaussianPSF` draws it)."""

    sigma_px: tuple[float, float] = (0.6, 1.2)
    tail_fraction: tuple[float, float] = (0.1, 0.1)
    tail_gamma_px: tuple[float, float] = (2.0, 2.0)

    def sample(self, rng: np.random.Generator) -> TailedPSFParams:
        return TailedPSFParams(sigma_px=float(rng.uniform(*self.sigma_px)),
                               tail_fraction=float(rng.uniform(*self.tail_fraction)),
                               tail_gamma_px=float(rng.uniform(*self.tail_gamma_px)))

    def apply(self, signal: np.ndarray, params: TailedPSFParams,
              row_shift_px: np.ndarray | None = None) -> np.ndarray:
        if row_shift_px is not None:
            return psf_following_scan(signal, row_shift_px, params.sigma_px,
                                      params.tail_fraction, params.tail_gamma_px)
        return lorentzian_psf(signal, params.sigma_px, params.tail_fraction, params.tail_gamma_px)


# --------------------------------------------------------------------------------------------
# Vignetting
# --------------------------------------------------------------------------------------------

VIGNETTING_TERMS = ("x", "y", "xx", "xy", "yy")


def vignetting_basis(shape: tuple[int, int]) -> np.ndarray:
    """The five low-order terms of the vignetting field, shape (5, H, W).

    With normalised pixel-centre coordinates ``u`` (columns) and ``v`` (rows) spanning [−1, 1]:
    ``u, v, u² − ū², u·v, v² − v̄²`` (centred, so each term averages to zero over the frame and the
    field's mean is exactly 1: vignetting redistributes the dose, it does not change it).
    """
    h, w = int(shape[0]), int(shape[1])
    u = (np.arange(w) + 0.5) / w * 2.0 - 1.0
    v = (np.arange(h) + 0.5) / h * 2.0 - 1.0
    uu = u * u - np.mean(u * u)
    vv = v * v - np.mean(v * v)
    b = np.empty((5, h, w))
    b[0] = u[None, :]
    b[1] = v[:, None]
    b[2] = uu[None, :]
    b[3] = v[:, None] * u[None, :]
    b[4] = vv[:, None]
    return b


def vignetting_field(shape: tuple[int, int], coefficients) -> np.ndarray:
    """Multiplicative field ``1 + Σ c_t · term_t`` (see :func:`vignetting_basis`), float64 (H, W).

    ``coefficients``: a mapping with keys among ``x, y, xx, xy, yy`` or a sequence of five values.
    A centre-bright radial fall-off to ``1 − f`` at the edge centres is ``xx = yy = −f``.
    """
    c = _vignetting_coeffs(coefficients)
    return 1.0 + np.tensordot(c, vignetting_basis(shape), axes=1)


def _vignetting_coeffs(coefficients) -> np.ndarray:
    if isinstance(coefficients, dict):
        unknown = set(coefficients) - set(VIGNETTING_TERMS)
        if unknown:
            raise ValueError(f"unknown vignetting terms {sorted(unknown)}; use {VIGNETTING_TERMS}")
        return np.array([float(coefficients.get(t, 0.0)) for t in VIGNETTING_TERMS])
    c = np.asarray(coefficients, dtype=np.float64)
    if c.shape != (5,):
        raise ValueError(f"vignetting needs 5 coefficients {VIGNETTING_TERMS}, got shape {c.shape}")
    return c


@dataclass(frozen=True)
class VignettingParams:
    """The vignetting coefficients applied to a frame (an instrument constant, no draw)."""

    coefficients: tuple[float, float, float, float, float]

    def to_dict(self) -> dict:
        return {"vignetting": dict(zip(VIGNETTING_TERMS, self.coefficients))}


@dataclass(frozen=True)
class Vignetting:
    """Smooth low-order multiplicative field on the expected signal (:func:`vignetting_field`)."""

    coefficients: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def active(self) -> bool:
        return any(c != 0 for c in self.coefficients)

    def sample(self, rng: np.random.Generator) -> VignettingParams:  # noqa: ARG002 - no draw
        return VignettingParams(tuple(float(c) for c in self.coefficients))

    def apply(self, signal: np.ndarray, params: VignettingParams) -> np.ndarray:
        if not any(params.coefficients):
            return signal
        f = vignetting_field(np.shape(signal), params.coefficients)
        out = np.asarray(signal) * f
        np.maximum(out, 0.0, out=out)
        return out.astype(np.asarray(signal).dtype, copy=False)


# --------------------------------------------------------------------------------------------
# PSF in specimen space under per-line displacements
# --------------------------------------------------------------------------------------------

def psf_following_scan(signal: np.ndarray, row_shift_px: np.ndarray, sigma_px: float,
                       tail_fraction: float = 0.0, tail_gamma_px: float = 1.0) -> np.ndarray:
    """Blur with the probe PSF in *specimen* space when each line is displaced along x.

    A scanned probe blurs the specimen around the position it is sent to, so when line ``r`` is
    displaced by ``s_r`` px (line jitter, mains, drift), the blurred signal moves with the line.
    Blurring the recorded image instead (:func:`gaussian_psf`) also averages the neighbouring
    lines' displacements and hides most of the per-line jitter.  Here output line ``r`` sums its
    neighbours ``r + m`` re-aligned to it, exactly in the mixed (k_x, row) domain:

        out_r(k_x) = Σ_m K(k_x, m) · exp(2πi k_x (s_r − s_{r+m})) · in_{r+m}(k_x)

    with ``K(k_x, m)`` the PSF's transfer function along x and its profile along y.  The phase
    factorises, so this is: shift every line back by ``−s_r`` (a phase ramp in k_x), apply the 2-D
    PSF (a sampled Gaussian along y times ``exp(−2π²σ²k_x²)``; with a Lorentzian tail the OTF of
    :func:`psf_otf` by FFT along y), and shift every line forward again.  Lines are padded by
    reflection along x, rows beyond the frame are reflected.  With all shifts zero this is the
    ordinary 2-D convolution (up to boundary treatment).

    Parameters
    ----------
    signal : ndarray (H, W)
    row_shift_px : ndarray (H,)
        Mean x displacement of every line, px (only differences between lines matter).
    sigma_px, tail_fraction, tail_gamma_px : float
        PSF (see :func:`psf_otf`).

    Returns
    -------
    ndarray (H, W), float32 for float32 input, else float64.
    """
    from scipy import fft as sfft

    x = np.asarray(signal)
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    h, w = x.shape
    s = np.asarray(row_shift_px, dtype=np.float64)
    if s.shape != (h,):
        raise ValueError(f"row_shift_px must have shape ({h},), got {s.shape}")
    if sigma_px < 0 or tail_gamma_px <= 0 or not 0 <= tail_fraction <= 1:
        raise ValueError("need sigma_px >= 0, tail_gamma_px > 0, 0 <= tail_fraction <= 1")
    if sigma_px == 0 and tail_fraction == 0:
        return np.array(x, dtype=dtype, copy=True)
    tail = tail_fraction > 0
    reach = 4.0 * sigma_px + (16.0 * tail_gamma_px if tail else 0.0)
    s = s - float(np.mean(s))
    pad = min(int(np.ceil(reach + np.max(np.abs(s), initial=0.0))) + 2, w - 1)
    wp = sfft.next_fast_len(w + 2 * pad, real=True)
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, wp - w - pad)), mode="symmetric")
    kx = np.fft.rfftfreq(wp)
    ramp = np.exp(2j * np.pi * kx[None, :] * s[:, None])
    g = sfft.rfft(xp, axis=1, workers=-1) * np.conj(ramp)  # lines re-aligned (un-shifted)
    if not tail:
        g *= np.exp(-2.0 * np.pi**2 * sigma_px**2 * kx**2)[None, :]
        if sigma_px > 0:
            g = (ndimage.gaussian_filter1d(g.real, sigma_px, axis=0, mode="reflect", truncate=4.0)
                 + 1j * ndimage.gaussian_filter1d(g.imag, sigma_px, axis=0, mode="reflect",
                                                  truncate=4.0))
    else:
        py = min(int(np.ceil(reach)), h - 1)
        hp = sfft.next_fast_len(h + 2 * py)
        gp = np.pad(g, ((py, hp - h - py), (0, 0)), mode="symmetric")
        ky = np.fft.fftfreq(hp)[:, None]
        k = np.sqrt(kx[None, :] ** 2 + ky**2)
        otf = ((1.0 - tail_fraction) * np.exp(-2.0 * np.pi**2 * sigma_px**2 * k**2)
               + tail_fraction * np.exp(-2.0 * np.pi * tail_gamma_px * k))
        gp = sfft.ifft(sfft.fft(gp, axis=0, workers=-1) * otf, axis=0, workers=-1)
        g = gp[py:py + h]
    res = sfft.irfft(g * ramp, n=wp, axis=1, workers=-1)[:, pad:pad + w]
    return np.ascontiguousarray(res, dtype=dtype)
