"""Scan model: the pixel grid mapped to specimen coordinates.

A scanned instrument (SEM/STEM) visits pixel ``(row r, column c)`` at time ``t`` and the beam then
sits at specimen position ``(X[r, c], Y[r, c])``.  Distortions are returned as these coordinate maps
rather than as a warped image, so that the specimen (image *and* labels) is evaluated at exactly the
distorted positions: labels stay exact.

Components (all draws happen in :meth:`ScanModel.sample`, independently per axis; a component whose
amplitude is 0 draws nothing, so the basic model's draws and bytes are unchanged):

- field offset (uniform in the specimen extent);
- **linear drift** over the frame, ``drift · t`` with ``t = (r·W + c)/(H·W)`` the frame fraction;
- **random-walk drift**: a Brownian path per axis sampled at line starts (std ``drift_walk_px`` at
  the end of the frame) and interpolated linearly along each line;
- **line jitter**: a fast-scan (x) offset per line (flyback settling), white, std
  ``line_jitter_px``;
- **mains interference**: ``A_x sin(2π f t_abs + φ_x)`` in x and ``A_y sin(2π f t_abs + φ_y)`` in y,
  ``t_abs = r · line_time + c · dwell`` (s), ``line_time = W · dwell + flyback``: the phase
  advances by ``2π f · line_time`` from one line to the next, as on a real instrument; φ_x, φ_y
  drawn per frame;
- **scan nonlinearity**: ``x += A_f exp(−c/λ_f)`` (the fast scan settling at each line start) and
  ``y += A_s exp(−r/λ_s)`` (the slow scan at the frame start), instrument constants (|A| < λ keeps
  the scan monotonic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = ["ScanModel", "ScanParams", "scan_coordinates", "mains_phase_step"]


def mains_phase_step(frequency_hz: float, line_time_s: float) -> float:
    """Phase advance of the mains interference from one line to the next, rad (mod 2π)."""
    return float(math.fmod(2.0 * math.pi * frequency_hz * line_time_s, 2.0 * math.pi))


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
    walk : (ndarray (H+1,), ndarray (H+1,)) or None
        Random-walk drift positions ``(x, y)`` at the start of each line (and the frame end), px.
    mains_amplitude : (float, float)
        Mains displacement amplitudes ``(A_x, A_y)``, px (0: no mains interference).
    mains_phase : (float, float)
        Phases ``(φ_x, φ_y)`` at the first pixel, rad.
    mains_frequency_hz, dwell_time_s, line_time_s : float
        Mains frequency and the scan timing that sets the phase of every pixel.
    fast_nonlinearity, slow_nonlinearity : (float, float)
        ``(amplitude px, decay length px)`` of the fast-/slow-scan nonlinearity.
    """

    offset: tuple[float, float]
    drift: tuple[float, float]
    line_jitter: np.ndarray
    walk: tuple[np.ndarray, np.ndarray] | None = None
    mains_amplitude: tuple[float, float] = (0.0, 0.0)
    mains_phase: tuple[float, float] = (0.0, 0.0)
    mains_frequency_hz: float = 0.0
    dwell_time_s: float = 0.0
    line_time_s: float = 0.0
    fast_nonlinearity: tuple[float, float] = (0.0, 1.0)
    slow_nonlinearity: tuple[float, float] = (0.0, 1.0)

    @property
    def has_mains(self) -> bool:
        return any(a != 0 for a in self.mains_amplitude)

    def to_dict(self) -> dict:
        """JSON-ready parameters (the optional components only when they are used)."""
        d = {
            "offset_px": list(self.offset),
            "drift_px_per_frame": list(self.drift),
            "line_jitter_px": self.line_jitter.tolist(),
        }
        if self.walk is not None:
            d["drift_walk_px"] = {"x": self.walk[0].tolist(), "y": self.walk[1].tolist()}
        if self.has_mains:
            d["mains"] = {
                "amplitude_px": list(self.mains_amplitude), "phase_rad": list(self.mains_phase),
                "frequency_hz": self.mains_frequency_hz, "dwell_time_s": self.dwell_time_s,
                "line_time_s": self.line_time_s,
            }
        if self.fast_nonlinearity[0] != 0:
            d["fast_nonlinearity_px"] = list(self.fast_nonlinearity)
        if self.slow_nonlinearity[0] != 0:
            d["slow_nonlinearity_px"] = list(self.slow_nonlinearity)
        return d


@dataclass(frozen=True)
class ScanModel:
    """Scan model.

    Parameters
    ----------
    shape : (H, W)
        Image size in px.
    drift_px : float
        Standard deviation of the linear drift per axis, px per frame (each axis drawn
        independently).
    line_jitter_px : float
        Standard deviation of the per-line fast-scan offset, px.
    field_extent : (Lx, Ly) or None
        Range for the random field offset in px (the specimen size); ``None`` → offset (0, 0).
    drift_walk_px : float
        Standard deviation per axis of the random-walk drift at the end of the frame, px.
    mains_amplitude_px : (float, float)
        Mains interference amplitude in x and y, px.
    mains_frequency_hz : float
        Mains frequency (50 or 60 Hz).
    dwell_time_s : float or None
        Pixel dwell time (s); needed for mains interference.
    flyback_s : float
        Flyback time added to each line: ``line_time = W · dwell + flyback``.
    fast_nonlinearity, slow_nonlinearity : (amplitude px, decay px)
        Scan nonlinearity at line start / frame start (see the module docstring).
    """

    shape: tuple[int, int]
    drift_px: float = 0.0
    line_jitter_px: float = 0.0
    field_extent: tuple[float, float] | None = None
    drift_walk_px: float = 0.0
    mains_amplitude_px: tuple[float, float] = (0.0, 0.0)
    mains_frequency_hz: float = 50.0
    dwell_time_s: float | None = None
    flyback_s: float = 0.0
    fast_nonlinearity: tuple[float, float] = (0.0, 1.0)
    slow_nonlinearity: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.drift_px < 0 or self.line_jitter_px < 0 or self.drift_walk_px < 0:
            raise ValueError("drift_px, line_jitter_px and drift_walk_px must be >= 0")
        if any(a != 0 for a in self.mains_amplitude_px):
            if self.dwell_time_s is None or self.dwell_time_s <= 0:
                raise ValueError("mains interference needs dwell_time_s > 0 (the pixel dwell time)")
            if self.mains_frequency_hz <= 0 or self.flyback_s < 0:
                raise ValueError("need mains_frequency_hz > 0 and flyback_s >= 0")
        for name in ("fast_nonlinearity", "slow_nonlinearity"):
            amp, lam = getattr(self, name)
            if lam <= 0 or abs(amp) >= lam:
                raise ValueError(f"{name} needs decay > 0 and |amplitude| < decay (a monotonic "
                                 f"scan), got {(amp, lam)}")

    @property
    def line_time_s(self) -> float:
        """Line time ``W · dwell + flyback`` (s); 0 when no dwell time is set."""
        if self.dwell_time_s is None:
            return 0.0
        return int(self.shape[1]) * float(self.dwell_time_s) + float(self.flyback_s)

    def sample(self, rng: np.random.Generator) -> ScanParams:
        """Draw offset, drift and jitter (and the optional components) for one frame."""
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
        extra: dict = {}
        if self.drift_walk_px > 0:
            step = self.drift_walk_px / math.sqrt(h)
            wx = np.concatenate([[0.0], np.cumsum(rng.normal(0.0, step, h))])
            wy = np.concatenate([[0.0], np.cumsum(rng.normal(0.0, step, h))])
            extra["walk"] = (wx, wy)
        if any(a != 0 for a in self.mains_amplitude_px):
            extra.update(
                mains_amplitude=(float(self.mains_amplitude_px[0]),
                                 float(self.mains_amplitude_px[1])),
                mains_phase=(float(rng.uniform(0.0, 2 * math.pi)),
                             float(rng.uniform(0.0, 2 * math.pi))),
                mains_frequency_hz=float(self.mains_frequency_hz),
                dwell_time_s=float(self.dwell_time_s), line_time_s=self.line_time_s,
            )
        if self.fast_nonlinearity[0] != 0:
            extra["fast_nonlinearity"] = tuple(float(v) for v in self.fast_nonlinearity)
        if self.slow_nonlinearity[0] != 0:
            extra["slow_nonlinearity"] = tuple(float(v) for v in self.slow_nonlinearity)
        return ScanParams(offset=offset, drift=drift, line_jitter=jitter, **extra)

    def apply(self, params: ScanParams) -> tuple[np.ndarray, np.ndarray]:
        """Coordinate maps of the frame; see :func:`scan_coordinates`."""
        return scan_coordinates(self.shape, params)


@njit(parallel=True, cache=True)
def _linear_scan_kernel(x0, y0, dx, dy, jitter, x, y):
    """Offset, linear drift and line jitter: ``x = ((x0 + c) + dx·t) + jitter[r]``,
    ``y = (y0 + r) + dy·t``, ``t = (r·W + c)/(H·W)``, in this order of operations (the bytes of
    the NumPy expression of the same formula; no fused multiply-add)."""
    h, w = x.shape
    n = float(h * w)
    for r in prange(h):
        jr = jitter[r]
        fr = float(r)
        for c in range(w):
            t = float(r * w + c) / n
            x[r, c] = ((x0 + float(c)) + dx * t) + jr
            y[r, c] = (y0 + fr) + dy * t


def scan_coordinates(shape: tuple[int, int], params: ScanParams) -> tuple[np.ndarray, np.ndarray]:
    """Specimen coordinates of every pixel.

    ``X[r, c] = x0 + c + dx · t + jitter[r]``, ``Y[r, c] = y0 + r + dy · t`` with the acquisition
    time ``t = (r · W + c) / (H · W)`` in units of the frame time (raster order, flyback neglected),
    plus the optional components of :class:`ScanParams` (random walk, mains, nonlinearity).

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
    x = np.empty((h, w))
    y = np.empty((h, w))
    jitter = np.ascontiguousarray(params.line_jitter, np.float64)
    _linear_scan_kernel(float(params.offset[0]), float(params.offset[1]), float(params.drift[0]),
                        float(params.drift[1]), jitter, x, y)
    if params.walk is not None:
        wx, wy = params.walk
        if wx.shape != (h + 1,) or wy.shape != (h + 1,):
            raise ValueError(f"walk arrays must have shape ({h + 1},)")
        f = np.arange(w, dtype=np.float64)[None, :] / w
        x = x + (wx[:-1, None] * (1.0 - f) + wx[1:, None] * f)
        y = y + (wy[:-1, None] * (1.0 - f) + wy[1:, None] * f)
    if params.has_mains:
        t_abs = (np.arange(h, dtype=np.float64)[:, None] * params.line_time_s
                 + np.arange(w, dtype=np.float64)[None, :] * params.dwell_time_s)
        ph = 2.0 * math.pi * params.mains_frequency_hz * t_abs
        ax, ay = params.mains_amplitude
        if ax != 0:
            x = x + ax * np.sin(ph + params.mains_phase[0])
        if ay != 0:
            y = y + ay * np.sin(ph + params.mains_phase[1])
    amp, lam = params.fast_nonlinearity
    if amp != 0:
        x = x + amp * np.exp(-np.arange(w, dtype=np.float64) / lam)[None, :]
    amp, lam = params.slow_nonlinearity
    if amp != 0:
        y = y + amp * np.exp(-np.arange(h, dtype=np.float64) / lam)[:, None]
    return x, y
