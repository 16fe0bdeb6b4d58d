"""Optics: the probe point-spread function.

A Gaussian probe of standard deviation σ (px) blurs the expected signal by convolution
(:func:`scipy.ndimage.gaussian_filter`, reflecting edges).  The blur acts on the signal only; labels
are the specimen truth and are never blurred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["GaussianPSF", "PSFParams", "gaussian_psf"]


def gaussian_psf(signal: np.ndarray, sigma_px: float) -> np.ndarray:
    """Convolve ``signal`` (H, W) with a normalised Gaussian of σ = ``sigma_px`` px.

    Returns an array of the same shape and dtype (float32 stays float32); σ = 0 returns a copy.
    """
    if sigma_px < 0:
        raise ValueError(f"PSF sigma must be >= 0 px, got {sigma_px}")
    if sigma_px == 0:
        return np.array(signal, copy=True)
    return ndimage.gaussian_filter(signal, sigma_px, mode="reflect", truncate=4.0)


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

    def apply(self, signal: np.ndarray, params: PSFParams) -> np.ndarray:
        return gaussian_psf(signal, params.sigma_px)
