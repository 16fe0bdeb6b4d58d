"""SEM contrast of a grain specimen: channelling contrast and boundary grooves.

Electron channelling (or orientation contrast in backscatter/secondary imaging) gives every grain
its own brightness; thermal or etch grooves darken a narrow band along the grain boundaries.
The expected signal at a specimen point with grain id ``g`` and boundary distance ``d`` (px) is

    s = I_g · (1 − depth · exp(−d² / (2 σ²))),   σ = width / (2 √(2 ln 2))   (width = FWHM, px)

with per-grain intensities ``I_g`` drawn once per specimen.  Labels come from the same ``g`` and
``d``: ``boundary = d < label_width / 2`` (a band of total width ``label_width`` centred on the
boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = ["ChannellingContrast", "ChannellingParams", "groove_signal", "boundary_label",
           "FWHM_TO_SIGMA"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@njit(parallel=True, cache=True)
def _groove_kernel(gid, dist, intensity, sigma, depth, out):
    n = gid.shape[0]
    inv = 0.5 / (sigma * sigma) if sigma > 0.0 else 0.0
    for i in prange(n):
        d = dist[i]
        v = intensity[gid[i]]
        if sigma > 0.0 and depth > 0.0:
            v *= 1.0 - depth * math.exp(-d * d * inv)
        out[i] = v


def groove_signal(
    grain_id: np.ndarray, distance: np.ndarray, intensity: np.ndarray, width_px: float, depth: float
) -> np.ndarray:
    """Expected SEM signal from grain ids and boundary distances.

    Parameters
    ----------
    grain_id : ndarray (H, W) int32
    distance : ndarray (H, W) float
        Distance to the nearest boundary in px.
    intensity : ndarray (n_grains,) float
        Per-grain relative yield (≥ 0).
    width_px : float
        Groove FWHM in px (0 → no groove).
    depth : float
        Fractional signal loss at the boundary, 0–1.

    Returns
    -------
    ndarray (H, W) float32
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"groove depth must be within [0, 1], got {depth}")
    if width_px < 0:
        raise ValueError(f"groove width must be >= 0 px, got {width_px}")
    g = np.ascontiguousarray(grain_id, dtype=np.int32).ravel()
    d = np.ascontiguousarray(distance, dtype=np.float32).ravel()
    if g.size and (g.min() < 0 or g.max() >= intensity.shape[0]):
        raise ValueError("grain ids out of range of the intensity table")
    out = np.empty(g.shape[0], dtype=np.float32)
    _groove_kernel(g, d, np.ascontiguousarray(intensity, dtype=np.float64),
                   float(width_px) * FWHM_TO_SIGMA, float(depth), out)
    return out.reshape(np.shape(grain_id))


def boundary_label(distance: np.ndarray, width_px: float) -> np.ndarray:
    """Boundary mask: pixels whose exact boundary distance is below ``width_px / 2``.

    Parameters
    ----------
    distance : ndarray, float, px
    width_px : float
        Total band width in px.

    Returns
    -------
    ndarray uint8 (0/1), shape of ``distance``
    """
    return (np.asarray(distance) < 0.5 * width_px).astype(np.uint8)


@dataclass(frozen=True)
class ChannellingParams:
    """Drawn contrast parameters of one frame: groove FWHM (px) and depth (0–1)."""

    groove_width_px: float
    groove_depth: float

    def to_dict(self) -> dict:
        return {"groove_width_px": self.groove_width_px, "groove_depth": self.groove_depth}


@dataclass(frozen=True)
class ChannellingContrast:
    """SEM channelling contrast stage.

    Parameters
    ----------
    intensity : (low, high)
        Range of per-grain relative yields, drawn uniformly per grain and specimen.
    groove_width_px : (low, high)
        Range of the groove FWHM in px, drawn per frame.
    groove_depth : (low, high)
        Range of the groove depth, drawn per frame.
    """

    intensity: tuple[float, float] = (0.25, 1.0)
    groove_width_px: tuple[float, float] = (1.0, 4.0)
    groove_depth: tuple[float, float] = (0.2, 0.6)

    def sample_grains(self, rng: np.random.Generator, n_grains: int) -> np.ndarray:
        """Per-grain intensities, shape (n_grains,), float64 (a specimen property)."""
        return rng.uniform(self.intensity[0], self.intensity[1], n_grains)

    def sample(self, rng: np.random.Generator) -> ChannellingParams:
        return ChannellingParams(
            groove_width_px=float(rng.uniform(*self.groove_width_px)),
            groove_depth=float(rng.uniform(*self.groove_depth)),
        )

    def reach_px(self) -> float:
        """Boundary distance beyond which the groove changes the signal by < 1e-4 of itself (px)."""
        sigma = self.groove_width_px[1] * FWHM_TO_SIGMA
        return max(sigma * math.sqrt(2 * math.log(1e4)), 1e-3)

    def apply(self, grain_id: np.ndarray, distance: np.ndarray, intensity: np.ndarray,
              params: ChannellingParams) -> np.ndarray:
        """Expected signal (H, W) float32."""
        return groove_signal(grain_id, distance, intensity, params.groove_width_px,
                             params.groove_depth)
