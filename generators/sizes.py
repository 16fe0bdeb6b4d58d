"""Grain-size control: Laguerre weights that give every cell a requested area.

Target areas ``T_i`` (px²) are drawn from a lognormal distribution (median ``m``, log-standard
deviation ``σ``) and rescaled so that they sum to the specimen area ``Lx · Ly`` (the cells tile
the specimen; on a bounded, non-periodic specimen the areas are those of the cells clipped to it).  The power weights are then found by a damped Newton iteration on ``A(w) = T`` with the exact
cell areas (polygons of :func:`generators.substructure.cell_polygons`) and the sparse Hessian
``∂A_i/∂w_j = −ℓ_ij / (2 d_ij)`` (shared edge length over seed distance); see
:func:`fit_laguerre_weights`.  Seeds are not moved, so a cell keeps its seed's index.

Units: px, px².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import sparse

from generators.substructure import _clip, cell_polygons, cell_polygons_of
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


@njit(cache=True, inline="always")
def _position(lst_j, cnt, i, j):
    """Where ``j`` stands in row ``i`` of the neighbour lists, -1 if absent."""
    for q in range(cnt[i]):
        if lst_j[i, q] == j:
            return q
    return -1


@njit(cache=True)
def _areas_kernel(v, start):
    """Cell areas (n,) px² by the shoelace sums over each cell's vertices (cells with fewer than
    three vertices: 0)."""
    n = start.shape[0] - 1
    areas = np.zeros(n)
    for i in range(n):
        a = start[i]
        b = start[i + 1]
        if b - a < 3:
            continue
        acc = 0.0
        for e in range(a, b):
            f = e + 1 if e + 1 < b else a
            acc += v[e, 0] * v[f, 1] - v[f, 0] * v[e, 1]
        areas[i] = 0.5 * abs(acc)
    return areas


@njit(cache=True)
def _areas_hessian_kernel(v, nb, start, seeds, lx, ly, periodic):
    """Cell areas (:func:`_areas_kernel`) and the CSC arrays (indptr, indices, data) of the
    symmetric Hessian."""
    n = start.shape[0] - 1
    areas = _areas_kernel(v, start)
    width = 1
    for i in range(n):
        width = max(width, start[i + 1] - start[i])
    # per cell: its distinct neighbours and Σ ℓ / (2 d) over the edges it lists with each
    lst_j = np.full((n, width), -1, dtype=np.int64)
    lst_c = np.zeros((n, width))
    cnt = np.zeros(n, dtype=np.int64)
    for i in range(n):
        a = start[i]
        b = start[i + 1]
        if b - a < 3:
            continue
        for e in range(a, b):
            f = e + 1 if e + 1 < b else a
            j = nb[e]
            if j < 0 or j == i:
                continue
            ln = math.hypot(v[f, 0] - v[e, 0], v[f, 1] - v[e, 1])
            dx = seeds[j, 0] - seeds[i, 0]
            dy = seeds[j, 1] - seeds[i, 1]
            if periodic:
                dx -= lx * round(dx / lx)
                dy -= ly * round(dy / ly)
            c = ln / (2.0 * max(math.hypot(dx, dy), 1e-12))
            k = 0
            while k < cnt[i] and lst_j[i, k] != j:
                k += 1
            if k == cnt[i]:
                lst_j[i, k] = j
                cnt[i] += 1
            lst_c[i, k] += c
    # symmetric off-diagonal −(c_ij + c_ji) / 2 over the union of both lists; diagonal −Σ row
    # neighbours j that list i while i does not list j (only for inexact input): add them
    extra = np.zeros(n, dtype=np.int64)
    for j in range(n):
        for k in range(cnt[j]):
            i = lst_j[j, k]
            if _position(lst_j, cnt, i, j) < 0:
                extra[i] += 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):  # column i: the listed neighbours, the one-sided ones, the diagonal
        indptr[i + 1] = indptr[i] + cnt[i] + 1 + extra[i]
    indices = np.empty(indptr[n], dtype=np.int64)
    data = np.zeros(indptr[n])
    fill = indptr[:-1].copy()
    for i in range(n):
        for k in range(cnt[i]):
            j = lst_j[i, k]
            q = _position(lst_j, cnt, j, i)
            cji = lst_c[j, q] if q >= 0 else 0.0
            indices[fill[i]] = j
            data[fill[i]] = -0.5 * (lst_c[i, k] + cji)
            fill[i] += 1
    for j in range(n):  # the one-sided listings
        for k in range(cnt[j]):
            i = lst_j[j, k]
            if _position(lst_j, cnt, i, j) < 0:
                indices[fill[i]] = j
                data[fill[i]] = -0.5 * lst_c[j, k]
                fill[i] += 1
    for i in range(n):
        a = indptr[i]
        b = fill[i]
        sm = 0.0
        for t in range(a, b):
            sm += data[t]
        indices[b] = i
        data[b] = -sm
        # sort the column's row indices (insertion sort: a handful of entries)
        for t in range(a + 1, b + 1):
            ki = indices[t]
            kd = data[t]
            u = t - 1
            while u >= a and indices[u] > ki:
                indices[u + 1] = indices[u]
                data[u + 1] = data[u]
                u -= 1
            indices[u + 1] = ki
            data[u + 1] = kd
    return areas, indptr, indices, data


@njit(cache=True)
def _box_clip_kernel(v, nb, start, lx, ly):
    """The convex cells (CSR: vertices ``v``, edge neighbours ``nb``, offsets ``start``) clipped
    to the specimen ``[0, Lx] × [0, Ly]``: new edges along the box get neighbour ``-1``;
    ``(v, nb, start)`` of the clipped cells (a cell outside the box: no vertices)."""
    n = start.shape[0] - 1
    width = 4
    for i in range(n):
        width = max(width, start[i + 1] - start[i])
    cap = width + 5
    qx = np.empty((2, cap))
    qy = np.empty((2, cap))
    qe = np.empty((2, cap), dtype=np.int32)
    ov = np.empty((start[n] + 4 * n, 2))
    onb = np.empty(start[n] + 4 * n, dtype=np.int64)
    ostart = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        a = start[i]
        m = start[i + 1] - a
        for e in range(m):
            qx[0, e] = v[a + e, 0]
            qy[0, e] = v[a + e, 1]
            qe[0, e] = nb[a + e]
        r = 0
        if m >= 3:  # x ≥ 0, x ≤ Lx, y ≥ 0, y ≤ Ly as a x + b y ≤ c
            m = _clip(qx, qy, qe, r, m, -1.0, 0.0, 0.0, -1)
            r = 1 - r
            m = _clip(qx, qy, qe, r, m, 1.0, 0.0, lx, -1)
            r = 1 - r
            m = _clip(qx, qy, qe, r, m, 0.0, -1.0, 0.0, -1)
            r = 1 - r
            m = _clip(qx, qy, qe, r, m, 0.0, 1.0, ly, -1)
            r = 1 - r
        else:
            m = 0
        o = ostart[i]
        for e in range(m):
            ov[o + e, 0] = qx[r, e]
            ov[o + e, 1] = qy[r, e]
            onb[o + e] = qe[r, e]
        ostart[i + 1] = o + m
    return ov[:ostart[n]].copy(), onb[:ostart[n]].copy(), ostart


def _fit_cells(cells, extent, periodic: bool) -> tuple:
    """``(vertices, edge neighbours int64, start int64)`` of the cells whose areas the fit
    matches: the cells themselves on a periodic specimen; on a bounded one, the cells clipped to
    the specimen (the polygons reach a margin ``max(Lx, Ly)`` beyond it, where no grain is seen,
    and the target areas sum to ``Lx · Ly``)."""
    v = np.ascontiguousarray(cells.vertices)
    nb = cells.edge_neighbour.astype(np.int64)
    start = cells.start.astype(np.int64)
    if periodic:
        return v, nb, start
    return _box_clip_kernel(v, nb, start, float(extent[0]), float(extent[1]))


def _kernel_inputs(cells, seeds: np.ndarray, extent, periodic: bool) -> tuple:
    lx, ly = extent
    return (*_fit_cells(cells, extent, periodic), np.ascontiguousarray(seeds, dtype=np.float64),
            float(lx), float(ly), bool(periodic))


def _areas_and_hessian(tess: Tessellation, cells=None):
    """Exact cell areas and the sparse Hessian ``∂A_i/∂w_j`` (px² per px²) of a tessellation.

    ``∂A_i/∂w_j = −ℓ_ij / (2 d_ij)`` for neighbours (``ℓ``: shared edge length, ``d``: seed
    distance, minimum image; the mean of both cells' listings of the edge), and
    ``∂A_i/∂w_i = −Σ_j ∂A_i/∂w_j`` (areas sum to the specimen).  One Numba pass builds the
    symmetric CSC matrix.  ``cells``: the tessellation's :func:`cell_polygons` if computed.
    On a bounded specimen both are those of the cells clipped to it (:func:`_fit_cells`).
    """
    if cells is None:
        cells = cell_polygons(tess)
    n = cells.n_cells
    areas, indptr, indices, data = _areas_hessian_kernel(
        *_kernel_inputs(cells, tess.seeds, tess.extent, tess.periodic))
    hess = sparse.csc_matrix((data, indices, indptr), shape=(n, n))
    return areas, hess, cells


@njit(cache=True)
def _ground_kernel(indptr, indices, data):
    """CSC arrays ``(indptr, indices, data)`` of the matrix without its first row and column,
    entries in their order (what ``hess[1:, 1:].tocsc()`` gives)."""
    n = indptr.shape[0] - 1
    m = 0
    for t in range(indptr[1], indptr[n]):
        if indices[t] != 0:
            m += 1
    ip = np.zeros(max(n, 1), dtype=np.int32)
    ix = np.empty(m, dtype=np.int32)
    dd = np.empty(m)
    k = 0
    for c in range(1, n):
        for t in range(indptr[c], indptr[c + 1]):
            if indices[t] != 0:
                ix[k] = indices[t] - 1
                dd[k] = data[t]
                k += 1
        ip[c] = k
    return ip, ix, dd


#: relative residual at which the conjugate-gradient solve of a Newton step stops (an inexact Newton
#: step, Dembo, Eisenstat & Steihaug 1982: the iteration still converges, and measured on the
#: pipeline's specimens (420 cells, σ 0.5) it takes as many steps as exact solves, 4.1 per specimen)
NEWTON_RTOL = 1e-2


@njit(cache=True)
def _pcg_kernel(indptr, indices, data, b, rtol, max_iter):
    """``x`` with ``‖A x − b‖ ≤ rtol ‖b‖`` for a symmetric positive definite CSC matrix ``A``:
    conjugate gradients with the Jacobi (diagonal) preconditioner, serial (deterministic bits).

    Returns ``(x, iterations)``; stops early (returning the iterate) after ``max_iter``
    iterations or on a breakdown (``pᵀ A p ≤ 0``: the matrix is not positive definite)."""
    n = b.shape[0]
    dinv = np.ones(n)
    for j in range(n):
        for t in range(indptr[j], indptr[j + 1]):
            if indices[t] == j and data[t] > 0.0:
                dinv[j] = 1.0 / data[t]
    x = np.zeros(n)
    r = b.copy()
    z = r * dinv
    p = z.copy()
    q = np.empty(n)
    rz = 0.0
    bb = 0.0
    for i in range(n):
        rz += r[i] * z[i]
        bb += b[i] * b[i]
    tol2 = rtol * rtol * bb
    it = 0
    while it < max_iter and bb > 0.0:
        it += 1
        q[:] = 0.0
        for j in range(n):  # q = A p (A symmetric: its CSC columns are its rows)
            pj = p[j]
            for t in range(indptr[j], indptr[j + 1]):
                q[indices[t]] += data[t] * pj
        pq = 0.0
        for i in range(n):
            pq += p[i] * q[i]
        if not pq > 0.0:
            break
        a = rz / pq
        rr = 0.0
        for i in range(n):
            x[i] += a * p[i]
            r[i] -= a * q[i]
            rr += r[i] * r[i]
        if rr <= tol2:
            break
        rzn = 0.0
        for i in range(n):
            z[i] = r[i] * dinv[i]
            rzn += r[i] * z[i]
        beta = rzn / rz
        rz = rzn
        for i in range(n):
            p[i] = z[i] + beta * p[i]
    return x, it


def _areas_of(seeds: np.ndarray, weights: np.ndarray | None, extent: tuple[float, float],
              periodic: bool, hint=None):
    """Areas (n,) px² and the cells, from the arrays of a tessellation (a trial of the fit:
    its Hessian only where the trial is accepted and the iteration goes on; ``hint``: the
    current cells, whose neighbours the polygon search clips first)."""
    cells = cell_polygons_of(seeds, weights, extent, periodic, hint=hint)
    v, _, start = _fit_cells(cells, extent, periodic)
    return _areas_kernel(v, start), cells


def _grounded(cells, seeds: np.ndarray, extent: tuple[float, float], periodic: bool):
    """The grounded Hessian's CSC arrays (first row and column dropped: the weights are defined
    up to a constant) of ``cells`` (:func:`_areas_and_hessian` without the full matrix)."""
    _, indptr, indices, data = _areas_hessian_kernel(
        *_kernel_inputs(cells, seeds, extent, periodic))
    return _ground_kernel(indptr, indices, data)


def _areas_and_grounded(seeds: np.ndarray, weights: np.ndarray | None,
                        extent: tuple[float, float], periodic: bool):
    """Areas (n,) px², the grounded Hessian's CSC arrays and the cells, from the arrays of a
    tessellation (:func:`_areas_of` and :func:`_grounded`)."""
    areas, cells = _areas_of(seeds, weights, extent, periodic)
    return areas, _grounded(cells, seeds, extent, periodic), cells


def fit_laguerre_weights(tess: Tessellation, targets: np.ndarray, *, tolerance: float = 0.01,
                         max_iterations: int = 50, return_polygons: bool = False
                         ) -> tuple[Tessellation, dict] | tuple[Tessellation, dict, object]:
    """Damped Newton iteration of the power weights until the cell areas match ``targets``.

    The areas are the gradient of the concave semi-discrete optimal-transport functional of the
    weights, so Newton's method on ``A(w) = T`` with a sparse Hessian (:func:`_areas_and_hessian`)
    and step halving until no cell empties and the error falls converges (Kitagawa, Mérigot &
    Thibert 2019).  Each step is solved inexactly, by Jacobi-preconditioned conjugate gradients
    on the grounded Hessian to a relative residual :data:`NEWTON_RTOL` (:func:`_pcg_kernel`;
    the same number of steps as a sparse LU solve on the pipeline's specimens, 1.4× faster fit).
    Seeds are not moved.  Trial weights are evaluated from the seed and weight arrays
    (:func:`_areas_of`: areas only, each trial's cells clipped with the current cells'
    neighbours first; the Hessian, :func:`_grounded`, for accepted weights that need another
    step); a tessellation is built for the result only.

    Parameters
    ----------
    tess : Tessellation
        Seeds (kept) and start weights (equal weights instead where they leave a cell empty).
    targets : ndarray (n_seeds,), px², summing to the specimen area
    tolerance : float
        Largest relative area error ``|A_i − T_i| / T_i`` at which the iteration stops.
    max_iterations : int
    return_polygons : bool
        Also return the fitted tessellation's :class:`~generators.substructure.CellPolygons`
        (computed by the iteration anyway).

    Returns
    -------
    tessellation : Tessellation with the fitted weights
    info : dict
        ``iterations``, ``max_rel_error``, ``rms_rel_error`` (JSON-ready).
    polygons : CellPolygons, only with ``return_polygons``
    """
    t = np.asarray(targets, dtype=np.float64)
    n = tess.n_seeds
    if t.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {t.shape}")
    if np.any(t <= 0):
        raise ValueError("target areas must be > 0 px^2")
    w = np.zeros(n) if tess.weights is None else np.array(tess.weights, dtype=np.float64)
    seeds, ext, per = tess.seeds, tess.extent, bool(tess.periodic)
    fitted = None  # the accepted weights (shifted to max 0), None while none was accepted
    areas, cells = _areas_of(seeds, tess.weights, ext, per)
    if tess.weights is not None and n > 1 and not areas.min() > 0:
        # start weights with empty cells (e.g. lognormal weights): the Hessian is singular
        # there, so start from the Voronoi cells (equal weights: none empty)
        w = np.zeros(n)
        fitted = w
        areas, cells = _areas_of(seeds, None, ext, per)
    ground = None  # the Hessian of the current weights, built when a Newton step needs it
    err = float(np.abs((areas - t) / t).max())
    it = 0
    for it in range(1, max_iterations + 1):
        if err < tolerance or n == 1:
            break
        if ground is None:
            ground = _grounded(cells, seeds, ext, per)
        # the grounded Laplacian-like Hessian (weights are defined up to a constant): SPD
        dw = np.zeros(n)
        dw[1:] = _pcg_kernel(ground[0], ground[1], ground[2], (t - areas)[1:], NEWTON_RTOL,
                             10 * n)[0]
        if not np.all(np.isfinite(dw)):
            break
        lam = 1.0
        rms = float(np.sqrt(np.mean(((areas - t) / t) ** 2)))
        while lam > 1e-4:
            wn = w + lam * dw
            trial_w = wn - wn.max()
            a2, c2 = _areas_of(seeds, trial_w, ext, per, hint=cells)
            r2 = float(np.sqrt(np.mean(((a2 - t) / t) ** 2)))
            if a2.min() > 0 and r2 < rms:
                break
            lam *= 0.5
        else:
            break
        w, fitted, areas, ground, cells = trial_w, trial_w, a2, None, c2
        err = float(np.abs((areas - t) / t).max())
    cur = tess if fitted is None else Tessellation(
        seeds, ext, weights=fitted, periodic=tess.periodic, seeds_per_cell=tess.seeds_per_cell,
        tile_divisor=tess.tile_divisor)
    rel = (areas - t) / t
    info = {"iterations": it, "max_rel_error": float(np.abs(rel).max()),
            "rms_rel_error": float(np.sqrt(np.mean(rel**2)))}
    return (cur, info, cells) if return_polygons else (cur, info)


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
    #: tile size (mean spacing / this) of the fitted tessellation's labelling acceleration lists
    #: (:class:`~generators.voronoi.Tessellation`; labels do not depend on it, bit for bit).
    #: Laguerre weights make the lists dear to build at the default 4.  Measured at 256² px,
    #: ~550 cells, one thread, build + 4 frames (the recipe default per specimen): distance cap
    #: 8.3 px (the default groove) 16.8 ms at 2, 14.9 at 1.5, 14.4 at 1, 15.1 at 0.85; cap
    #: 14.7 px (that groove with warp and elongation) 23.1 ms at 2, 19.7 at 1.5, 17.8 at 1,
    #: 18.2 at 0.75.  Smaller tiles only pay off from ~16 frames per specimen.
    tile_divisor: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.sigma <= 2:
            raise ValueError(f"sizes.sigma must be within [0, 2], got {self.sigma}")
        if self.median_area_px is not None and not self.median_area_px > 0:
            raise ValueError(f"sizes.median_area_px must be > 0 px^2, got {self.median_area_px}")
        if not self.tile_divisor > 0:
            raise ValueError(f"sizes.tile_divisor must be > 0, got {self.tile_divisor}")

    def n_grains(self, extent: tuple[float, float]) -> int | None:
        """Number of grains implied by ``median_area_px`` (None without it)."""
        if self.median_area_px is None:
            return None
        mean = self.median_area_px * math.exp(0.5 * self.sigma**2)
        return max(1, int(round(extent[0] * extent[1] / mean)))

    def apply(self, rng: np.random.Generator, tess: Tessellation) -> tuple[Tessellation, dict]:
        """Draw target areas and fit the weights; returns the new tessellation and parameters."""
        out, info, _ = self.apply_with_polygons(rng, tess)
        return out, info

    def apply_with_polygons(self, rng: np.random.Generator, tess: Tessellation):
        """:meth:`apply`, also returning the fitted cells' polygons (``CellPolygons``)."""
        lx, ly = tess.extent
        targets = lognormal_targets(rng, tess.n_seeds, lx * ly, self.sigma)
        out, info, cells = fit_laguerre_weights(tess, targets, tolerance=self.tolerance,
                                                return_polygons=True)
        out = Tessellation(out.seeds, out.extent, weights=out.weights, periodic=out.periodic,
                           seeds_per_cell=out.seeds_per_cell, tile_divisor=self.tile_divisor)
        info["target_median_px"] = float(np.median(targets))
        return out, info, cells
