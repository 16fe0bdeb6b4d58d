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

from generators._periodic import min_image

__all__ = ["ChannellingContrast", "ChannellingParams", "groove_signal", "boundary_label",
           "shaded_signal", "FWHM_TO_SIGMA"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_BLOCK = 4096  # pixels per parallel chunk of the signal kernels
#: exponent below which a groove leaves its factor exactly 1: ``depth · exp(a) < 2^-54`` for
#: ``a < -40`` and ``depth ≤ 1``, so ``1 − depth · exp(a)`` rounds to 1.0 in float64 (ties to
#: even) and the exp can be skipped without changing a bit
_NEGLIGIBLE_EXP = -40.0


@njit(cache=True, inline="always")
def _groove_one_minus(depth, a):
    """``1 − depth · exp(a)`` (float64), bit for bit, without the exp where it cannot matter
    (``a < _NEGLIGIBLE_EXP``, ``0 ≤ depth ≤ 1``; the groove kernels check the depth)."""
    if a < _NEGLIGIBLE_EXP:
        return 1.0
    return 1.0 - depth * math.exp(a)


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


def _groove_inputs(grain_id, distance, intensity, width_px: float, depth: float):
    """Checked, flattened (grain ids int32, distances float32) for the groove kernels."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"groove depth must be within [0, 1], got {depth}")
    if width_px < 0:
        raise ValueError(f"groove width must be >= 0 px, got {width_px}")
    g = np.ascontiguousarray(grain_id, dtype=np.int32).ravel()
    d = np.ascontiguousarray(distance, dtype=np.float32).ravel()
    if g.size and (g.min() < 0 or g.max() >= intensity.shape[0]):
        raise ValueError("grain ids out of range of the intensity table")
    return g, d


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
    g, d = _groove_inputs(grain_id, distance, intensity, width_px, depth)
    out = np.empty(g.shape[0], dtype=np.float32)
    _groove_kernel(g, d, np.ascontiguousarray(intensity, dtype=np.float64),
                   float(width_px) * FWHM_TO_SIGMA, float(depth), out)
    return out.reshape(np.shape(grain_id))


@njit(parallel=True, cache=True)
def _shaded_kernel(gid, dist, intensity, sigma, depth, use_twin, tdist, tsigma, tdepth,
                   use_sub, sid, sdist, sdelta, ssigma, sdepth, use_grad, xs, ys, ggid, gorig,
                   gslope, lx, ly, periodic, out):
    """:func:`_groove_kernel` times the optional twin-groove, sub-grain and gradient factors, in
    one pass with the arithmetic (and float32 roundings) of the separate kernels and of the
    float32 products ``signal · (f_twin · f_sub · f_grad)`` taken in that order."""
    n = gid.shape[0]
    inv = 0.5 / (sigma * sigma) if sigma > 0.0 else 0.0
    tinv = 0.5 / (tsigma * tsigma) if tsigma > 0.0 else 0.0
    sinv = 0.5 / (ssigma * ssigma) if ssigma > 0.0 else 0.0
    groove = sigma > 0.0 and depth > 0.0
    nblk = (n + _BLOCK - 1) // _BLOCK
    for blk in prange(nblk):
        # the groove factor of the previous pixel is reused when its distance repeats (every
        # pixel at the distance cap): the same expression of the same value, so the same bits
        last_d = np.float32(np.nan)
        last_f = 1.0
        for i in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            d = dist[i]
            v = intensity[gid[i]]
            if groove:
                if d != last_d:
                    last_f = _groove_one_minus(depth, -d * d * inv)
                    last_d = d
                v *= last_f
            sig = np.float32(v)
            _shaded_factors(i, sig, use_twin, tdist, tinv, tsigma, tdepth, use_sub, sid, sdist,
                            sdelta, ssigma, sdepth, sinv, use_grad, xs, ys, ggid, gorig, gslope,
                            lx, ly, periodic, out)


@njit(cache=True, inline="always")
def _shaded_factors(i, sig, use_twin, tdist, tinv, tsigma, tdepth, use_sub, sid, sdist, sdelta,
                    ssigma, sdepth, sinv, use_grad, xs, ys, ggid, gorig, gslope, lx, ly, periodic,
                    out):
    """``out[i] = sig · (f_twin · f_sub · f_grad)`` (float32, absent factors left out)."""
    have = False
    f = np.float32(1.0)
    if use_twin:
        td = tdist[i]
        f = np.float32(_groove_one_minus(tdepth, -td * td * tinv) if tsigma > 0.0 else 1.0)
        have = True
    if use_sub:
        w = 1.0 + sdelta[sid[i]]
        if ssigma > 0.0 and sdepth > 0.0:
            sd = sdist[i]
            w *= _groove_one_minus(sdepth, -sd * sd * sinv)
        fs = np.float32(w)
        f = f * fs if have else fs
        have = True
    if use_grad:
        g = ggid[i]
        dx = xs[i] - gorig[g, 0]
        dy = ys[i] - gorig[g, 1]
        if periodic:
            dx = min_image(dx, lx)
            dy = min_image(dy, ly)
        fg = np.float32(max(1.0 + gslope[g, 0] * dx + gslope[g, 1] * dy, 0.0))
        f = f * fg if have else fg
        have = True
    out[i] = sig * f if have else sig


def _flat(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype).ravel()


def shaded_signal(grain_id: np.ndarray, distance: np.ndarray, intensity: np.ndarray,
                  width_px: float, depth: float, *, twin=None, subgrains=None, gradient=None
                  ) -> np.ndarray:
    """:func:`groove_signal` times the optional multiplicative factors, in one pass.

    Bit for bit ``groove_signal(...) * (f_twin * f_sub * f_grad)`` (float32 products in that
    order, absent factors left out) with ``f_twin`` = ``twins.twin_groove_factor``, ``f_sub`` =
    ``substructure.subgrain_factor`` and ``f_grad`` = ``GradientField.factor``.

    Parameters
    ----------
    grain_id, distance, intensity, width_px, depth
        As in :func:`groove_signal` (``grain_id`` may index a longer table, e.g. twin yields).
    twin : (distance, width_px, depth), optional
        Twin-edge distance (px, shape of ``grain_id``), groove FWHM (px) and depth (0–1).
    subgrains : (subgrain_id, distance, delta, width_px, depth), optional
        Sub-grain ids, sub-boundary distance (px), per-sub-grain ``δ``, groove FWHM, depth.
    gradient : (x, y, grain_id, origins, slope, (Lx, Ly), periodic), optional
        Specimen coordinates (px), parent grain ids, seeds (n, 2) px, slopes (n, 2) per px.

    Returns
    -------
    ndarray (H, W) float32
    """
    shape = np.shape(grain_id)
    g, d = _groove_inputs(grain_id, distance, intensity, width_px, depth)
    n = g.shape[0]
    f32 = np.zeros(1, np.float32)
    i32 = np.zeros(1, np.int32)
    f64 = np.zeros(1)
    f64_2 = np.zeros((1, 2))
    td, tw, tdp = f32, 0.0, 0.0
    if twin is not None:
        td, tw, tdp = twin
        if not 0.0 <= tdp <= 1.0:
            raise ValueError(f"twin groove depth must be within [0, 1], got {tdp}")
        if not tw >= 0:
            raise ValueError(f"twin groove width must be >= 0 px, got {tw}")
        td = _flat(td, np.float32)
        if td.shape[0] != n:
            raise ValueError("twin distance must have the shape of grain_id")
    sid, sd, sdl, sw, sdp = i32, f32, f64, 0.0, 0.0
    if subgrains is not None:
        sid, sd, sdl, sw, sdp = subgrains
        if not 0.0 <= sdp <= 1.0:
            raise ValueError(f"sub-grain groove depth must be within [0, 1], got {sdp}")
        if not sw >= 0:
            raise ValueError(f"sub-grain groove width must be >= 0 px, got {sw}")
        sid = _flat(sid, np.int32)
        sd = _flat(sd, np.float32)
        sdl = np.ascontiguousarray(sdl, dtype=np.float64)
        if sid.shape[0] != n or sd.shape[0] != n:
            raise ValueError("sub-grain ids and distance must have the shape of grain_id")
        if sid.size and (sid.min() < 0 or sid.max() >= sdl.shape[0]):
            raise ValueError("sub-grain ids out of range of the delta table")
    xs, ys, gg, go, gs, lx, ly, per = f64, f64, i32, f64_2, f64_2, 1.0, 1.0, False
    if gradient is not None:
        xs, ys, gg, go, gs, (lx, ly), per = gradient
        xs = _flat(xs, np.float64)
        ys = _flat(ys, np.float64)
        gg = _flat(gg, np.int32)
        go = np.ascontiguousarray(go, dtype=np.float64)
        gs = np.ascontiguousarray(gs, dtype=np.float64)
        if xs.shape[0] != n or ys.shape[0] != n or gg.shape[0] != n:
            raise ValueError("gradient coordinates and grain ids must have the shape of grain_id")
        if gg.size and (gg.min() < 0 or gg.max() >= gs.shape[0]):
            raise ValueError(f"grain ids must lie in [0, {gs.shape[0]})")
    out = np.empty(n, dtype=np.float32)
    _shaded_kernel(g, d, np.ascontiguousarray(intensity, dtype=np.float64),
                   float(width_px) * FWHM_TO_SIGMA, float(depth),
                   twin is not None, td, float(tw) * FWHM_TO_SIGMA, float(tdp),
                   subgrains is not None, sid, sd, sdl, float(sw) * FWHM_TO_SIGMA, float(sdp),
                   gradient is not None, xs, ys, gg, go, gs, float(lx), float(ly), bool(per), out)
    return out.reshape(shape)


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
