"""Grain-size control: Laguerre weights that give every cell a requested area.

Target areas ``T_i`` (px²) are drawn from a lognormal distribution (median ``m``, log-standard
deviation ``σ``) and rescaled so that they sum to the specimen area ``Lx · Ly`` (the cells tile
the specimen).  The power weights are then found by a damped Newton iteration on ``A(w) = T`` with the exact
cell areas (polygons of :func:`generators.substructure.cell_polygons`) and the sparse Hessian
``∂A_i/∂w_j = −ℓ_ij / (2 d_ij)`` (shared edge length over seed distance); see
:func:`fit_laguerre_weights`.  Seeds are not moved, so a cell keeps its seed's index.

Units: px, px².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from generators.substructure import cell_polygons
from generators.voronoi import Tessellation

__all__ = ["lognormal_targets", "fit_laguerre_weights", "GrainSizeControl"]


def lognormal_targets(rng: np.random.Generator, n: int, total_area: float, sigma: float
                      ) -> np.ndarray:
    """``n`` lognormal cell areas with log-std ``sigma``, rescaled to sum to ``total_area``.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int (≥ 1)
    total_area : float, px²
    sigma : float (≥ 0)

    Returns
    -------
    ndarray (n,) float64, px²
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    a = rng.lognormal(0.0, sigma, n)
    return a * (float(total_area) / a.sum())


def _areas_and_hessian(tess: Tessellation):
    """Exact cell areas and the sparse Hessian ``∂A_i/∂w_j`` (px² per px²) of a tessellation.

    ``∂A_i/∂w_j = −ℓ_ij / (2 d_ij)`` for neighbours (``ℓ``: shared edge length, ``d``: seed
    distance, minimum image), and ``∂A_i/∂w_i = −Σ_j ∂A_i/∂w_j`` (areas sum to the specimen).
    """
    cells = cell_polygons(tess)
    n = cells.n_cells
    v = cells.vertices
    counts = np.diff(cells.start)
    owner = np.repeat(np.arange(n), counts)
    idx = np.arange(v.shape[0])
    nxt = idx + 1
    full = counts > 0
    nxt[cells.start[1:][full] - 1] = cells.start[:-1][full]
    # shoelace per cell (the polygons are convex and counter-clockwise)
    cross = v[:, 0] * v[nxt, 1] - v[nxt, 0] * v[:, 1]
    areas = np.where(counts >= 3, 0.5 * np.abs(np.bincount(owner, cross, minlength=n)), 0.0)
    nb = cells.edge_neighbour.astype(np.int64)
    keep = (nb >= 0) & (nb != owner) & (counts[owner] >= 3)
    ln = np.hypot(*(v[nxt] - v).T)[keep]
    i, j = owner[keep], nb[keep]
    d = tess.seeds[j] - tess.seeds[i]
    if tess.periodic:
        lx, ly = tess.extent
        d[:, 0] -= lx * np.round(d[:, 0] / lx)
        d[:, 1] -= ly * np.round(d[:, 1] / ly)
    c = ln / (2.0 * np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-12))
    off = sparse.coo_matrix((c, (i, j)), shape=(n, n)).tocsr()
    off = -0.5 * (off + off.T)  # each shared edge is listed by both cells
    diag = -np.asarray(off.sum(axis=1)).ravel()
    return areas, (off + sparse.diags(diag)).tocsc()


def fit_laguerre_weights(tess: Tessellation, targets: np.ndarray, *, tolerance: float = 0.01,
                         max_iterations: int = 50) -> tuple[Tessellation, dict]:
    """Damped Newton iteration of the power weights until the cell areas match ``targets``.

    The areas are the gradient of the concave semi-discrete optimal-transport functional of the
    weights, so Newton's method on ``A(w) = T`` with a sparse Hessian (:func:`_areas_and_hessian`)
    and step halving until no cell empties and the error falls converges quadratically
    (Kitagawa, Mérigot & Thibert 2019).  Seeds are not moved.

    Parameters
    ----------
    tess : Tessellation
        Seeds (kept) and start weights.
    targets : ndarray (n_seeds,), px², summing to the specimen area
    tolerance : float
        Largest relative area error ``|A_i − T_i| / T_i`` at which the iteration stops.
    max_iterations : int

    Returns
    -------
    tessellation : Tessellation with the fitted weights
    info : dict
        ``iterations``, ``max_rel_error``, ``rms_rel_error`` (JSON-ready).
    """
    t = np.asarray(targets, dtype=np.float64)
    n = tess.n_seeds
    if t.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {t.shape}")
    if np.any(t <= 0):
        raise ValueError("target areas must be > 0 px^2")
    w = np.zeros(n) if tess.weights is None else np.array(tess.weights, dtype=np.float64)
    cur = tess
    areas, hess = _areas_and_hessian(cur)
    err = float(np.abs((areas - t) / t).max())
    it = 0
    for it in range(1, max_iterations + 1):
        if err < tolerance or n == 1:
            break
        # ground the Laplacian-like Hessian: weights are defined up to a constant
        h = hess[1:, 1:]
        dw = np.zeros(n)
        dw[1:] = spsolve(h, (t - areas)[1:])
        if not np.all(np.isfinite(dw)):
            break
        lam = 1.0
        rms = float(np.sqrt(np.mean(((areas - t) / t) ** 2)))
        while lam > 1e-4:
            wn = w + lam * dw
            trial = Tessellation(tess.seeds, tess.extent, weights=wn - wn.max(),
                                 periodic=tess.periodic)
            a2, h2 = _areas_and_hessian(trial)
            r2 = float(np.sqrt(np.mean(((a2 - t) / t) ** 2)))
            if a2.min() > 0 and r2 < rms:
                break
            lam *= 0.5
        else:
            break
        w, cur, areas, hess = wn - wn.max(), trial, a2, h2
        err = float(np.abs((areas - t) / t).max())
    rel = (areas - t) / t
    return cur, {"iterations": it, "max_rel_error": float(np.abs(rel).max()),
                 "rms_rel_error": float(np.sqrt(np.mean(rel**2)))}


@dataclass(frozen=True)
class GrainSizeControl:
    """Specimen feature: lognormal grain areas by fitted Laguerre weights.

    Parameters
    ----------
    sigma : float
        Log-standard deviation of the grain areas.
    median_area_px : float or None
        Median grain area in px²; sets the number of grains ``n = Lx Ly / (m e^{σ²/2})``
        (``None``: keep the specimen's number of grains).
    tolerance : float
        Largest relative area error accepted by the weight iteration.
    """

    sigma: float = 0.5
    median_area_px: float | None = None
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.sigma <= 2:
            raise ValueError(f"sizes.sigma must be within [0, 2], got {self.sigma}")
        if self.median_area_px is not None and not self.median_area_px > 0:
            raise ValueError(f"sizes.median_area_px must be > 0 px^2, got {self.median_area_px}")

    def n_grains(self, extent: tuple[float, float]) -> int | None:
        """Number of grains implied by ``median_area_px`` (None without it)."""
        if self.median_area_px is None:
            return None
        mean = self.median_area_px * math.exp(0.5 * self.sigma**2)
        return max(1, int(round(extent[0] * extent[1] / mean)))

    def apply(self, rng: np.random.Generator, tess: Tessellation) -> tuple[Tessellation, dict]:
        """Draw target areas and fit the weights; returns the new tessellation and parameters."""
        lx, ly = tess.extent
        targets = lognormal_targets(rng, tess.n_seeds, lx * ly, self.sigma)
        out, info = fit_laguerre_weights(tess, targets, tolerance=self.tolerance)
        info["target_median_px"] = float(np.median(targets))
        return out, info
