"""Annealing twins: straight, parallel-sided lamellae crossing a grain.

A twinned grain ``g`` carries a family of parallel lamellae: lines along the direction
``(cos θ_g, sin θ_g)`` (θ: rad from +x towards +y), with unit normal ``n_g = (−sin θ_g, cos θ_g)``.
With ``t = n_g · (x − o_g)`` the position across the lamellae (``o_g``: the grain's seed, minimum
image on a periodic specimen, so the pattern is continuous inside the grain) and
``r = (t − φ_g) mod s_g`` (``s_g``: period, px; ``φ_g``: offset), a point lies in a lamella when
``r < w_g`` (``w_g``: lamella width, px, ``w_g < s_g``).  The lamella edges are the lines
``r = 0`` and ``r = w_g``, so the exact distance to the nearest twin boundary is

    d_t = min(r, w − r)          inside a lamella,
    d_t = min(r − w, s − r)      outside,

evaluated only inside the grain (the twin boundaries end at the grain boundary).  Labels:
``twin = 1`` inside a lamella, ``twin_boundary = d_t < width / 2`` (a band centred on each
lamella edge).  SEM contrast: a lamella has its own channelling yield ``I_t,g`` (drawn per grain)
and a faint groove ``1 − depth · exp(−d_t² / (2 σ²))`` marks the twin edges.

Units: px, rad.  Pixels are independent (``prange``): results do not depend on thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from generators._periodic import jt_norm, min_image

__all__ = ["AnnealingTwins", "TwinSet", "TwinParams", "twin_groove_factor", "FWHM_TO_SIGMA"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@njit(cache=True, inline="always")
def _lamella(x, y, g, ox, oy, nx, ny, period, width, offset, lx, ly, periodic):
    """(inside 0/1, distance to the nearest lamella face) of point (x, y) in grain g, specimen px."""
    dx = x - ox[g]
    dy = y - oy[g]
    if periodic:
        dx = min_image(dx, lx)
        dy = min_image(dy, ly)
    t = nx[g] * dx + ny[g] * dy - offset[g]
    s = period[g]
    r = t - s * math.floor(t / s)
    w = width[g]
    if r < w:
        return 1, min(r, w - r)
    return 0, min(r - w, s - r)


@njit(parallel=True, cache=True)
def _twin_kernel(xs, ys, gid, twinned, ox, oy, nx, ny, period, width, offset, lx, ly, periodic,
                 cap, inside, dist):
    n = xs.shape[0]
    for i in prange(n):
        g = gid[i]
        if not twinned[g]:
            inside[i] = 0
            dist[i] = cap
            continue
        inside[i], d = _lamella(xs[i], ys[i], g, ox, oy, nx, ny, period, width, offset, lx, ly, periodic)
        dist[i] = min(d, cap)


@njit(parallel=True, cache=True)
def _twin_warped_kernel(xs, ys, gid, twinned, ox, oy, nx, ny, period, width, offset, lx, ly,
                        periodic, cap_q, jac, cap, inside, dist):
    """:func:`_twin_kernel` (specimen-space distance, float32, capped at ``cap_q``) followed in
    the same pass by the image-space distance ``d / |Jᵀ n|`` (capped at ``cap``) with the
    lamella normal ``n = (nx, ny)`` of the pixel's grain: the arithmetic of ``_twin_kernel`` then
    ``warp._const_normal_distance_kernel``, so the same bits."""
    n = xs.shape[0]
    for i in prange(n):
        g = gid[i]
        if not twinned[g]:
            inside[i] = 0
            dq = np.float32(cap_q)
        else:
            inside[i], d = _lamella(xs[i], ys[i], g, ox, oy, nx, ny, period, width, offset, lx, ly,
                                    periodic)
            dq = np.float32(min(d, cap_q))
        if not dq < cap_q:
            dist[i] = cap
            continue
        nxv = nx[g]
        nyv = ny[g]
        sc = jt_norm(jac, i, nxv, nyv)
        dist[i] = np.float32(min(dq / max(sc, 1e-12), cap))


@njit(parallel=True, cache=True)
def _groove_kernel(dist, sigma, depth, out):
    inv = 0.5 / (sigma * sigma) if sigma > 0.0 else 0.0
    for i in prange(dist.shape[0]):
        d = dist[i]
        out[i] = 1.0 - depth * math.exp(-d * d * inv) if sigma > 0.0 else 1.0


def twin_groove_factor(distance: np.ndarray, width_px: float, depth: float) -> np.ndarray:
    """Groove factor ``1 − depth · exp(−d² / (2 σ²))`` (σ from the FWHM ``width_px``), float32."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"twin groove depth must be within [0, 1], got {depth}")
    if not width_px >= 0:
        raise ValueError(f"twin groove width must be >= 0 px, got {width_px}")
    d = np.ascontiguousarray(distance, dtype=np.float32).ravel()
    out = np.empty(d.shape[0], dtype=np.float32)
    _groove_kernel(d, float(width_px) * FWHM_TO_SIGMA, float(depth), out)
    return out.reshape(np.shape(distance))


@dataclass(frozen=True, eq=False)
class TwinSet:
    """Drawn twins of one specimen (frozen).

    Attributes
    ----------
    twinned : ndarray (n_grains,) bool
    angle : ndarray (n_grains,) float64, rad, lamella direction
    period : ndarray (n_grains,) float64, px
    width : ndarray (n_grains,) float64, px
    offset : ndarray (n_grains,) float64, px
    intensity : ndarray (n_grains,) float64, relative yield inside lamellae
    origins : ndarray (n_grains, 2) float64, px (grain seeds; the lamella frame)
    extent : (Lx, Ly)
    periodic : bool
    """

    twinned: np.ndarray
    angle: np.ndarray
    period: np.ndarray
    width: np.ndarray
    offset: np.ndarray
    intensity: np.ndarray
    origins: np.ndarray
    extent: tuple[float, float]
    periodic: bool

    @property
    def normals(self) -> np.ndarray:
        """Unit normals ``(−sin θ, cos θ)`` of the lamella edges, (n_grains, 2)."""
        return np.c_[-np.sin(self.angle), np.cos(self.angle)]

    def label(self, x: np.ndarray, y: np.ndarray, grain_id: np.ndarray,
              max_distance: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """Twin mask and exact distance to the nearest lamella edge of the pixel's grain.

        Parameters
        ----------
        x, y : ndarray, specimen coordinates, px
        grain_id : ndarray int, shape of ``x``
        max_distance : float, cap (px); untwinned grains return the cap

        Returns
        -------
        inside : ndarray uint8 (0/1), shape of ``x``
        distance : ndarray float32, px
        """
        x, y, g = self._points(x, y, grain_id)
        if not max_distance > 0:
            raise ValueError(f"max_distance must be > 0 px, got {max_distance}")
        inside = np.empty(g.size, dtype=np.uint8)
        dist = np.empty(g.size, dtype=np.float32)
        nv = self.normals
        lx, ly = self.extent
        _twin_kernel(np.ascontiguousarray(x.ravel()), np.ascontiguousarray(y.ravel()), g,
                     self.twinned, np.ascontiguousarray(self.origins[:, 0]),
                     np.ascontiguousarray(self.origins[:, 1]), np.ascontiguousarray(nv[:, 0]),
                     np.ascontiguousarray(nv[:, 1]), self.period, self.width, self.offset,
                     float(lx), float(ly), bool(self.periodic), float(max_distance), inside, dist)
        return inside.reshape(x.shape), dist.reshape(x.shape)

    def _points(self, x, y, grain_id) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked float64 coordinates and flat int64 grain ids."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        g = np.ascontiguousarray(grain_id, dtype=np.int64).ravel()
        if x.shape != y.shape or g.size != x.size:
            raise ValueError("x, y and grain_id must have the same shape")
        n = self.twinned.shape[0]
        if g.size and (g.min() < 0 or g.max() >= n):
            raise ValueError(f"grain ids must lie in [0, {n})")
        return x, y, g

    def label_warped(self, x: np.ndarray, y: np.ndarray, grain_id: np.ndarray,
                     jacobian: np.ndarray, max_distance_q: float, max_distance: float
                     ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`label` at warped specimen coordinates with the distance taken to image space.

        Same result (bit for bit) as ``label(x, y, grain_id, max_distance_q)`` followed by
        ``warp.image_space_distance_const(d, grain_id, self.normals, jacobian, max_distance_q,
        max_distance)``, in one pass.

        Parameters
        ----------
        x, y : ndarray, specimen coordinates, px
        grain_id : ndarray int, shape of ``x``
        jacobian : ndarray, shape ``x.shape + (2, 2)``, of the map image → specimen
        max_distance_q, max_distance : float, px (specimen-space and image-space caps)

        Returns
        -------
        inside : ndarray uint8 (0/1), shape of ``x``
        distance : ndarray float32, image-space px
        """
        x, y, g = self._points(x, y, grain_id)
        if not (max_distance_q > 0 and max_distance > 0):
            raise ValueError(f"max distances must be > 0 px, got {max_distance_q}, "
                             f"{max_distance}")
        jac = np.ascontiguousarray(np.asarray(jacobian, dtype=np.float64).reshape(-1, 4))
        if jac.shape[0] != g.size:
            raise ValueError("jacobian must have shape x.shape + (2, 2)")
        inside = np.empty(g.size, dtype=np.uint8)
        dist = np.empty(g.size, dtype=np.float32)
        nv = self.normals
        lx, ly = self.extent
        _twin_warped_kernel(np.ascontiguousarray(x.ravel()), np.ascontiguousarray(y.ravel()), g,
                            self.twinned, np.ascontiguousarray(self.origins[:, 0]),
                            np.ascontiguousarray(self.origins[:, 1]),
                            np.ascontiguousarray(nv[:, 0]), np.ascontiguousarray(nv[:, 1]),
                            self.period, self.width, self.offset, float(lx), float(ly),
                            bool(self.periodic), float(max_distance_q), jac,
                            float(max_distance), inside, dist)
        return inside.reshape(x.shape), dist.reshape(x.shape)

    def to_dict(self) -> dict:
        return {"n_twinned": int(self.twinned.sum())}


@dataclass(frozen=True)
class TwinParams:
    """Per-frame draws: twin groove FWHM (px) and depth (0–1)."""

    groove_width_px: float
    groove_depth: float

    def to_dict(self) -> dict:
        return {"groove_width_px": self.groove_width_px, "groove_depth": self.groove_depth}


@dataclass(frozen=True)
class AnnealingTwins:
    """Twin stage.

    Parameters
    ----------
    probability : float
        Chance that a grain is twinned (0–1).
    spacing_px : (low, high)
        Lamella period in px, drawn per grain.
    width_px : (low, high)
        Lamella width in px, drawn per grain (capped at 0.8 × the period).
    intensity : (low, high)
        Relative yield inside lamellae, drawn per grain.
    groove_width_px, groove_depth : (low, high)
        Faint groove at the lamella edges (FWHM px, depth 0–1), drawn per frame.
    """

    probability: float = 0.3
    spacing_px: tuple[float, float] = (15.0, 40.0)
    width_px: tuple[float, float] = (3.0, 10.0)
    intensity: tuple[float, float] = (0.25, 1.0)
    groove_width_px: tuple[float, float] = (0.5, 1.5)
    groove_depth: tuple[float, float] = (0.02, 0.1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"twins.probability must be within [0, 1], got {self.probability}")
        for name, r, lo, hi in (("spacing_px", self.spacing_px, 1e-9, math.inf),
                                ("width_px", self.width_px, 1e-9, math.inf),
                                ("intensity", self.intensity, 0.0, math.inf),
                                ("groove_width_px", self.groove_width_px, 0.0, math.inf),
                                ("groove_depth", self.groove_depth, 0.0, 1.0)):
            if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
                raise ValueError(f"twins.{name} must be a (low, high) range within "
                                 f"[{lo:g}, {hi:g}], got {r}")

    def sample_specimen(self, rng: np.random.Generator, origins: np.ndarray,
                        extent: tuple[float, float], periodic: bool) -> TwinSet:
        """Draw the twins of a specimen with grains seeded at ``origins`` (n, 2) px."""
        n = int(origins.shape[0])
        u = rng.random((6, n))
        twinned = u[0] < self.probability
        angle = math.pi * u[1]
        period = self.spacing_px[0] + u[2] * (self.spacing_px[1] - self.spacing_px[0])
        width = self.width_px[0] + u[3] * (self.width_px[1] - self.width_px[0])
        width = np.minimum(width, 0.8 * period)
        offset = period * u[4]
        intensity = self.intensity[0] + u[5] * (self.intensity[1] - self.intensity[0])
        return TwinSet(twinned=twinned, angle=angle, period=period, width=width, offset=offset,
                       intensity=intensity, origins=np.ascontiguousarray(origins, dtype=np.float64),
                       extent=(float(extent[0]), float(extent[1])), periodic=bool(periodic))

    def sample(self, rng: np.random.Generator) -> TwinParams:
        return TwinParams(groove_width_px=float(rng.uniform(*self.groove_width_px)),
                          groove_depth=float(rng.uniform(*self.groove_depth)))

    def reach_px(self) -> float:
        """Twin-edge distance beyond which the groove changes the signal by < 1e-4 (px)."""
        sigma = self.groove_width_px[1] * FWHM_TO_SIGMA
        return max(sigma * math.sqrt(2 * math.log(1e4)), 1e-3)
