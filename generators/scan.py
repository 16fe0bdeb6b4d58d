"""Scan model: the pixel grid mapped to specimen coordinates.

A scanned instrument (SEM/STEM) visits pixel ``(row r, column c)`` at time ``t`` and the beam then
sits at specimen position ``(X[r, c], Y[r, c])``.  Distortions are returned as these coordinate maps
rather than as a warped image, so that the specimen (image *and* labels) is evaluated at exactly the
distorted positions: labels stay exact.

This module has the basic model of the foundation: a field offset, linear drift during the frame
and per-line jitter of the fast-scan start (flyback).  All draws happen in :meth:`ScanModel.sample`,
with independent draws per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScanModel", "ScanParams", "scan_coordinates"]


@dataclass(frozen=True)
class ScanParams:
    """Drawn scan parameters of one frame.

    Attributes
    ----------
    offset : (float, float)
        Specimen position ``(x, y)`` of pixel (0, 0) in px.
    drift : (float, float)
        Linear drift ``(dx, dy)`` accumulated over the whole frame, px per frame.
    line_jitter : ndarray, shape (H,), float64
        Fast-scan (x) offset of each line in px.
    """

    offset: tuple[float, float]
    drift: tuple[float, float]
    line_jitter: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready parameters."""
        return {
            "offset_px": list(self.offset),
            "drift_px_per_frame": list(self.drift),
            "line_jitter_px": self.line_jitter.tolist(),
        }


@dataclass(frozen=True)
class ScanModel:
    """Basic scan model.

    Parameters
    ----------
    shape : (H, W)
        Image size in px.
    drift_px : float
        Standard deviation of the drift per axis, px per frame (each axis drawn independently).
    line_jitter_px : float
        Standard deviation of the per-line fast-scan offset, px.
    field_extent : (Lx, Ly) or None
        Range for the random field offset in px (the specimen size); ``None`` → offset (0, 0).
    """

    shape: tuple[int, int]
    drift_px: float = 0.0
    line_jitter_px: float = 0.0
    field_extent: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.drift_px < 0 or self.line_jitter_px < 0:
            raise ValueError("drift_px and line_jitter_px must be >= 0")

    def sample(self, rng: np.random.Generator) -> ScanParams:
        """Draw offset, drift and jitter for one frame."""
        h = int(self.shape[0])
        if self.field_extent is None:
            offset = (0.0, 0.0)
        else:
            offset = (
                float(rng.uniform(0.0, self.field_extent[0])),
                float(rng.uniform(0.0, self.field_extent[1])),
            )
        drift = (float(rng.normal(0.0, self.drift_px)), float(rng.normal(0.0, self.drift_px)))
        if self.line_jitter_px > 0:
            jitter = rng.normal(0.0, self.line_jitter_px, h)
        else:
            jitter = np.zeros(h)
        return ScanParams(offset=offset, drift=drift, line_jitter=jitter)

    def apply(self, params: ScanParams) -> tuple[np.ndarray, np.ndarray]:
        """Coordinate maps of the frame; see :func:`scan_coordinates`."""
        return scan_coordinates(self.shape, params)


def scan_coordinates(shape: tuple[int, int], params: ScanParams) -> tuple[np.ndarray, np.ndarray]:
    """Specimen coordinates of every pixel.

    ``X[r, c] = x0 + c + dx · t + jitter[r]``, ``Y[r, c] = y0 + r + dy · t`` with the acquisition
    time ``t = (r · W + c) / (H · W)`` in units of the frame time (raster order, flyback neglected).

    Parameters
    ----------
    shape : (H, W)
    params : ScanParams

    Returns
    -------
    X, Y : ndarray, shape (H, W), float64
        Specimen coordinates in px.
    """
    h, w = int(shape[0]), int(shape[1])
    if params.line_jitter.shape != (h,):
        raise ValueError(f"line_jitter must have shape ({h},), got {params.line_jitter.shape}")
    t = (np.arange(h)[:, None] * w + np.arange(w)[None, :]) / float(h * w)
    x = params.offset[0] + np.arange(w, dtype=np.float64)[None, :] + params.drift[0] * t
    x = x + params.line_jitter[:, None]
    y = params.offset[1] + np.arange(h, dtype=np.float64)[:, None] + params.drift[1] * t
    return x, y
