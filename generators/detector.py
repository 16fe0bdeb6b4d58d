"""Detector: expected signal → recorded counts.

For a pixel with relative signal ``s`` (≥ 0, dimensionless yield) and dose ``d`` (e⁻/pixel):

    n_e    ~ Poisson(d · s)                 electrons (shot noise)
    counts =  g · n_e + N(0, σ_r²) + o       g: gain (counts/e⁻), σ_r: readout (counts), o: offset
    value  =  clip(round(counts), 0, 2^bits − 1)   quantisation and saturation

so ``E[value] = g·d·s + o`` and ``Var[value] = g²·d·s + σ_r²`` (+1/12 from rounding) below
saturation (the photon-transfer relation ``var = g·(mean − o) + σ_r²``).

The kernel is parallel over rows with one SplitMix64 random stream per row
(:mod:`generators._rng`), so the result depends only on the drawn ``noise_key``, never on the number
of threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from generators._rng import normal_pair, poisson, stream_start

__all__ = ["Detector", "DetectorParams", "detect"]


@dataclass(frozen=True)
class DetectorParams:
    """Drawn detector parameters of one frame.

    Attributes
    ----------
    dose : float
        Electrons per pixel at signal 1 (e⁻/pixel).
    noise_key : int
        64-bit key of the frame's noise streams.
    """

    dose: float
    noise_key: int

    def to_dict(self) -> dict:
        """JSON-ready parameters."""
        return {"dose_e_per_px": self.dose, "noise_key": self.noise_key}


@njit(parallel=True, cache=True)
def _detect_kernel(signal, dose, gain, readout, offset, vmax, key, out):
    h, w = signal.shape
    for r in prange(h):
        st = stream_start(key, r)
        z1 = 0.0
        for c in range(w):
            lam = dose * signal[r, c]
            ne, st = poisson(st, lam)
            v = gain * ne + offset
            if readout > 0.0:
                if c % 2 == 0:  # normals come in pairs
                    z0, z1, st = normal_pair(st)
                    v += readout * z0
                else:
                    v += readout * z1
            v = np.floor(v + 0.5)
            if v < 0.0:
                v = 0.0
            elif v > vmax:
                v = vmax
            out[r, c] = np.uint16(v)


def detect(
    signal: np.ndarray,
    *,
    dose: float,
    gain: float,
    readout_sigma: float,
    offset: float,
    bit_depth: int,
    noise_key: int,
) -> np.ndarray:
    """Record ``signal`` with the Poisson–Gaussian detector model.

    Parameters
    ----------
    signal : ndarray, shape (H, W), float
        Expected relative signal per pixel (≥ 0; 1 = full yield).
    dose : float
        e⁻/pixel at signal 1.
    gain : float
        counts per e⁻.
    readout_sigma : float
        Readout noise standard deviation in counts.
    offset : float
        Dark offset in counts.
    bit_depth : int
        1–16; values saturate at ``2**bit_depth − 1``.
    noise_key : int
        Key of the random streams (draw it with ``rng.integers(2**63)``).

    Returns
    -------
    ndarray, shape (H, W), uint16
        Recorded counts.
    """
    if signal.ndim != 2:
        raise ValueError(f"signal must be 2-D (H, W), got shape {signal.shape}")
    if dose < 0 or gain <= 0 or readout_sigma < 0:
        raise ValueError(
            f"need dose >= 0, gain > 0, readout_sigma >= 0; got {dose}, {gain}, {readout_sigma}"
        )
    if not 1 <= bit_depth <= 16:
        raise ValueError(f"bit_depth must be 1..16, got {bit_depth}")
    sig = np.ascontiguousarray(signal, dtype=np.float64)
    if np.any(sig < 0) or not np.all(np.isfinite(sig)):
        raise ValueError("signal must be finite and >= 0")
    out = np.empty(sig.shape, dtype=np.uint16)
    _detect_kernel(
        sig, float(dose), float(gain), float(readout_sigma), float(offset),
        float(2**bit_depth - 1), np.uint64(noise_key), out,
    )
    return out


@dataclass(frozen=True)
class Detector:
    """Detector stage: draws the dose and the noise key, then records.

    Parameters
    ----------
    gain : float
        counts per e⁻.
    readout_sigma : float
        counts.
    offset : float
        counts.
    bit_depth : int
    dose : (float, float)
        Range of the dose in e⁻/pixel; drawn log-uniformly per frame.
    """

    gain: float
    readout_sigma: float
    offset: float
    bit_depth: int
    dose: tuple[float, float]

    def sample(self, rng: np.random.Generator) -> DetectorParams:
        """Draw dose (log-uniform in the range) and noise key."""
        lo, hi = float(self.dose[0]), float(self.dose[1])
        dose = lo if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return DetectorParams(dose=dose, noise_key=int(rng.integers(0, 2**63 - 1)))

    def apply(self, signal: np.ndarray, params: DetectorParams) -> np.ndarray:
        """Recorded uint16 counts, shape of ``signal``."""
        return detect(
            signal, dose=params.dose, gain=self.gain, readout_sigma=self.readout_sigma,
            offset=self.offset, bit_depth=self.bit_depth, noise_key=params.noise_key,
        )
