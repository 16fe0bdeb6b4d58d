"""Detector: expected signal → recorded counts.

For a pixel with relative signal ``s`` (≥ 0, dimensionless yield) and dose ``d`` (e⁻/pixel):

    n_e    ~ Poisson(d · s)                 electrons (shot noise)
    counts =  g · n_e + N(0, σ_r²) + o       g: gain (counts/e⁻), σ_r: readout (counts), o: offset
    value  =  clip(round(counts), 0, 2^bits − 1)   quantisation and saturation

so ``E[value] = g·d·s + o`` and ``Var[value] = g²·d·s + σ_r²`` (+1/12 from rounding) below
saturation (the photon-transfer relation ``var = g·(mean − o) + σ_r²``).

Optional parts of the complete model (all off by default, which reproduces the basic model above
bit for bit):

- **saturation** below full scale: ``value = clip(…, 0, min(saturation, 2^bits − 1))``;
- **fixed-pattern offsets**: ``counts += row_offset[r] + col_offset[c]`` (drawn from a key with
  independent streams for rows and columns, see :func:`fixed_pattern`);
- **detector lag** along the fast-scan direction (scintillator afterglow / amplifier bandwidth of an
  SEM detector): the electron signal of a line passes a causal exponential filter of time constant
  ``τ`` pixels before the readout noise is added,

      y[c] = a · y[c−1] + (1 − a) · n_e[c],   a = exp(−1/τ),   y[−1] = d · s[r, 0],

  i.e. a convolution with the kernel ``h[k] = (1 − a) aᵏ`` (k ≥ 0, Σ h = 1, :func:`lag_kernel`).
  The mean is smeared along x; the shot noise gets the autocorrelation ``aᵏ`` along x and its
  variance shrinks by ``(1 − a)/(1 + a)`` (so a photon-transfer slope measures ``g (1−a)/(1+a)``;
  ``twin calibrate`` corrects for it).

The kernel is parallel over rows with one SplitMix64 random stream per row
(:mod:`generators._rng`), so the result depends only on the drawn ``noise_key``, never on the number
of threads.  Shot noise is an exact Poisson sampler (inversion below λ = 10, Hörmann's PTRS from
10 on) and readout noise an exact Gaussian (Ziggurat); both read the row's stream counter-based
(fixed numbers per pixel), so that a pass over a row is branch-free and vectorises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from generators._rng import normal_row, poisson_row, stream_start, substream

__all__ = ["Detector", "DetectorParams", "detect", "fixed_pattern", "lag_kernel", "apply_lag",
           "lag_coefficient", "lag_variance_factor"]


@dataclass(frozen=True)
class DetectorParams:
    """Drawn detector parameters of one frame.

    Attributes
    ----------
    dose : float
        Electrons per pixel at signal 1 (e⁻/pixel).
    noise_key : int
        64-bit key of the frame's noise streams.
    pattern_key : int or None
        Key of the fixed-pattern row/column offsets (None: no fixed pattern).
    """

    dose: float
    noise_key: int
    pattern_key: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready parameters (keys of the optional parts only when they are used)."""
        d = {"dose_e_per_px": self.dose, "noise_key": self.noise_key}
        if self.pattern_key is not None:
            d["pattern_key"] = self.pattern_key
        return d


#: Block of a row's stream (generators._rng.substream) where the readout normals start; the Poisson
#: rounds use blocks 0, 1, 2, … (a handful), the normals' rare continuations blocks above this one.
_NORMAL_BLOCK = 1 << 31


@njit(parallel=True, cache=True, error_model="numpy")
def _detect_full_kernel(signal, dose, gain, readout, offset, vmax, key, row_off, col_off, lag_a,
                        out):
    # One row = one counter-based random stream (generators._rng): the row's Poisson deviates
    # (poisson_row: blocks 0, 1, …), then its readout normals (normal_row: from block 2³¹).  Each
    # pass over a row is branch-free where it can be, so that it vectorises.  Zero offsets and
    # lag_a = 0 give the basic Poisson–Gaussian model (the offsets add exact zeros).
    h, w = signal.shape
    b = 1.0 - lag_a
    rows_per_block = 16  # row buffers allocated once per block of rows, not per row
    for blk in prange((h + rows_per_block - 1) // rows_per_block):
        lam = np.empty(w, dtype=np.float64)
        ne = np.empty(w, dtype=np.float64)
        z = np.zeros(w, dtype=np.float64)  # stays 0 without readout noise
        scratch = np.empty(w, dtype=np.int64)
        for r in range(blk * rows_per_block, min(h, (blk + 1) * rows_per_block)):
            _detect_row(signal, r, dose, gain, readout, offset, vmax, key, row_off, col_off,
                        lag_a, b, lam, ne, z, scratch, out)


@njit(cache=True, inline="always", error_model="numpy")
def _detect_row(signal, r, dose, gain, readout, offset, vmax, key, row_off, col_off, lag_a, b,
                lam, ne, z, scratch, out):
    """Row ``r`` of :func:`_detect_full_kernel` (its own stream; buffers of length W)."""
    w = signal.shape[1]
    start = stream_start(key, r)
    for c in range(w):
        lam[c] = dose * signal[r, c]
    poisson_row(start, lam, ne, scratch)
    if lag_a > 0.0:
        y = lam[0]
        for c in range(w):
            y = lag_a * y + b * ne[c]
            ne[c] = y
    if readout > 0.0:
        normal_row(substream(start, _NORMAL_BLOCK), z, scratch)
    o_r = offset + row_off[r]
    for c in range(w):
        v = math.floor(gain * ne[c] + (o_r + col_off[c]) + readout * z[c] + 0.5)
        out[r, c] = np.uint16(min(max(v, 0.0), vmax))


def lag_coefficient(lag_px: float) -> float:
    """Pole ``a = exp(−1/τ)`` of the exponential lag filter (0 for τ = 0)."""
    if lag_px < 0:
        raise ValueError(f"lag_px must be >= 0, got {lag_px}")
    return 0.0 if lag_px == 0 else math.exp(-1.0 / float(lag_px))


def lag_variance_factor(lag_px: float) -> float:
    """Variance of white noise after the lag filter, relative to before: ``(1 − a)/(1 + a)``."""
    a = lag_coefficient(lag_px)
    return (1.0 - a) / (1.0 + a)


def lag_kernel(lag_px: float, n: int) -> np.ndarray:
    """First ``n`` taps ``h[k] = (1 − a) aᵏ`` of the lag filter (Σ over all k is 1).

    τ = 0 gives the identity ``[1, 0, 0, …]``.
    """
    a = lag_coefficient(lag_px)
    k = np.arange(int(n), dtype=np.float64)
    if a == 0.0:
        return (k == 0).astype(np.float64)
    return (1.0 - a) * a**k


def apply_lag(signal: np.ndarray, lag_px: float) -> np.ndarray:
    """Deterministic lag along the fast-scan axis (rows, left → right), steady state at line start.

    ``y[c] = a·y[c−1] + (1 − a)·x[c]`` with ``y[−1] = x[0]``: a constant line is unchanged.
    Returns float64 of the shape of ``signal``.
    """
    from scipy.signal import lfilter

    x = np.asarray(signal, dtype=np.float64)
    a = lag_coefficient(lag_px)
    if a == 0.0:
        return x.copy()
    zi = a * x[..., :1]
    y, _ = lfilter([1.0 - a], [1.0, -a], x, axis=-1, zi=zi)
    return y


def fixed_pattern(shape: tuple[int, int], row_sigma: float, col_sigma: float,
                  key: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-pattern offsets: ``(row_offsets (H,), col_offsets (W,))`` in counts.

    Rows and columns draw from independent streams of ``key`` (``SeedSequence(key,
    spawn_key=(0,))`` and ``(1,)``); each offset is ``N(0, σ²)`` with its axis's σ.
    """
    h, w = int(shape[0]), int(shape[1])
    rr = np.random.default_rng(np.random.SeedSequence(int(key), spawn_key=(0,)))
    rc = np.random.default_rng(np.random.SeedSequence(int(key), spawn_key=(1,)))
    rows = rr.normal(0.0, float(row_sigma), h) if row_sigma > 0 else np.zeros(h)
    cols = rc.normal(0.0, float(col_sigma), w) if col_sigma > 0 else np.zeros(w)
    return rows, cols


def detect(
    signal: np.ndarray,
    *,
    dose: float,
    gain: float,
    readout_sigma: float,
    offset: float,
    bit_depth: int,
    noise_key: int,
    saturation: float | None = None,
    row_offsets: np.ndarray | None = None,
    col_offsets: np.ndarray | None = None,
    lag_px: float = 0.0,
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
    saturation : float, optional
        Saturation level in counts (below full scale); ``None``: ``2**bit_depth − 1``.
    row_offsets, col_offsets : ndarray (H,), (W,), optional
        Fixed-pattern offsets in counts added to every pixel of a row / column.
    lag_px : float
        Time constant of the detector lag along the fast-scan axis, in pixels (0: none).

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
    # float32 is read as is (each value is widened exactly to float64 in the kernel)
    sig = np.ascontiguousarray(signal, dtype=np.float32 if signal.dtype == np.float32
                               else np.float64)
    lo, hi = (float(sig.min()), float(sig.max())) if sig.size else (0.0, 0.0)
    if not (lo >= 0.0 and hi < math.inf):  # (min and max propagate NaN)
        raise ValueError("signal must be finite and >= 0")
    vmax = float(2**bit_depth - 1)
    if saturation is not None:
        if not saturation > 0:
            raise ValueError(f"saturation must be > 0 counts, got {saturation}")
        vmax = min(vmax, float(np.floor(saturation)))
    out = np.empty(sig.shape, dtype=np.uint16)
    h, w = sig.shape
    rows = np.zeros(h) if row_offsets is None else np.ascontiguousarray(row_offsets, np.float64)
    cols = np.zeros(w) if col_offsets is None else np.ascontiguousarray(col_offsets, np.float64)
    if rows.shape != (h,) or cols.shape != (w,):
        raise ValueError(f"row_offsets/col_offsets must have shapes ({h},)/({w},), "
                         f"got {rows.shape}/{cols.shape}")
    _detect_full_kernel(
        sig, float(dose), float(gain), float(readout_sigma), float(offset), vmax,
        np.uint64(noise_key), rows, cols, lag_coefficient(lag_px), out,
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
    saturation : float or None
        Saturation level in counts (None: full scale ``2**bit_depth − 1``).
    row_sigma, col_sigma : float
        Standard deviations of the fixed-pattern row and column offsets, counts (0: none).
    pattern_seed : int or None
        Key of a pattern fixed for the instrument (the same offsets in every frame); ``None``
        draws a new pattern key per frame.
    lag_px : float
        Detector lag time constant along the fast-scan axis, px (0: none).

    The optional parts default to "off", which gives the basic model's bytes and draws.
    """

    gain: float
    readout_sigma: float
    offset: float
    bit_depth: int
    dose: tuple[float, float]
    saturation: float | None = None
    row_sigma: float = 0.0
    col_sigma: float = 0.0
    pattern_seed: int | None = None
    lag_px: float = 0.0

    def __post_init__(self) -> None:
        if self.row_sigma < 0 or self.col_sigma < 0 or self.lag_px < 0:
            raise ValueError("row_sigma, col_sigma and lag_px must be >= 0")

    @property
    def has_pattern(self) -> bool:
        return self.row_sigma > 0 or self.col_sigma > 0

    def sample(self, rng: np.random.Generator) -> DetectorParams:
        """Draw dose (log-uniform in the range), noise key and (if used) the pattern key."""
        lo, hi = float(self.dose[0]), float(self.dose[1])
        dose = lo if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        noise_key = int(rng.integers(0, 2**63 - 1))
        pattern_key = None
        if self.has_pattern:
            pattern_key = (int(self.pattern_seed) if self.pattern_seed is not None
                           else int(rng.integers(0, 2**63 - 1)))
        return DetectorParams(dose=dose, noise_key=noise_key, pattern_key=pattern_key)

    def apply(self, signal: np.ndarray, params: DetectorParams) -> np.ndarray:
        """Recorded uint16 counts, shape of ``signal``."""
        rows = cols = None
        if self.has_pattern and params.pattern_key is not None:
            rows, cols = fixed_pattern(np.shape(signal), self.row_sigma, self.col_sigma,
                                       params.pattern_key)
        return detect(
            signal, dose=params.dose, gain=self.gain, readout_sigma=self.readout_sigma,
            offset=self.offset, bit_depth=self.bit_depth, noise_key=params.noise_key,
            saturation=self.saturation, row_offsets=rows, col_offsets=cols, lag_px=self.lag_px,
        )
