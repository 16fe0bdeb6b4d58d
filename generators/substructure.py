"""Grain interiors: exact cell polygons, sub-grains (low-angle boundaries) and orientation gradients.

**Cell polygons.**  :func:`cell_polygons` turns a :class:`~generators.voronoi.Tessellation` into
one convex polygon per seed by clipping a box with the radical half-planes
``π_p(u) ≤ π_q(u)`` of neighbouring seeds (and, for periodic specimens, of periodic images,
including the seed's own).  Candidates are visited ring by ring on a bucket grid (about six
seeds per grid cell; lines that cannot reach the polygon are skipped) or, for the rare cell that
does not finish there, nearest first from a k-d tree; the clipping stops once a certificate
proves that no unvisited seed can cut the polygon: with weights shifted to ``w ≤ 0`` a seed at
distance ``≥ D`` has its radical line at distance ``≥ (D² + w_p) / (2D)`` from ``p``, so the
polygon is final when that bound exceeds its farthest vertex.  Every edge carries the index of the
neighbour seed whose radical line it lies on (``-1``: the clip box of a non-periodic specimen).
A periodic cell lies inside ``p ± L/2`` (bisectors with its own images), so its polygon is given
in the frame of the seed: a point ``x`` is brought to it by the minimum image ``p + [x − p]``.

**Sub-grains.**  Sub-seeds are drawn uniformly over the specimen (a Poisson number, a mean of
``subgrains_per_grain`` per grain) and each is assigned to the grain containing it.  A point of
grain ``g`` belongs to the nearest sub-seed among those of ``g``; sub-grain ``i`` is therefore the
convex polygon ``C_i ∩ P_g`` (``C_i``: the Voronoi cell of sub-seed ``i`` among the sub-seeds of
``g``, ``P_g``: the grain), so sub-grains never cross grain boundaries.  (On a periodic specimen
distances are taken in the frame of the grain's polygon; this equals the minimum-image nearest
sub-seed whenever a grain is smaller than about half the specimen.)  The low-angle boundaries
are the edges of these polygons that lie on sub-seed bisectors.  A segment from a point of
sub-grain ``i`` to any sub-boundary point stays in the convex ``P_g`` and must leave ``C_i ∩ P_g``
through one of its bisector edges, so the exact distance to the nearest sub-grain boundary inside
the grain is the distance to the bisector edges of the point's own sub-grain polygon — what
:meth:`SubgrainStructure.label` returns (``inf`` in a grain with one sub-grain).  A grain without
sub-seeds is one sub-grain (with no seed).  Signal: each sub-grain's intensity is its parent's
times ``(1 + δ_i)`` and a faint groove darkens the sub-boundaries,

    factor = (1 + δ_i) · (1 − depth · exp(−d_sub² / (2 σ²))),   σ = FWHM / (2 √(2 ln 2)).

**Orientation gradients.**  A lattice rotation across a grain gives a smooth change of channelling
yield.  Each grain gets a gradient vector ``G_g`` (relative intensity per px, uniform direction,
magnitude ``amplitude / spacing`` with ``spacing = sqrt(area / n_grains)``), and the signal is
multiplied by ``max(1 + G_g · (x − p_g), 0)`` with ``x − p_g`` the (minimum-image) position relative
to the grain's seed — linear in the specimen coordinates, evaluated at the same coordinates as the
labels.

Per-pixel kernels work on independent pixels, or (sub-grain labels, for row coherence) on
fixed-size runs of consecutive pixels, in ``prange``: results do not depend on the thread count.  Units: px of the specimen (nominal pixel grid), intensities relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange
from scipy.spatial import cKDTree

from generators._periodic import nearest_period
from generators.voronoi import Tessellation

__all__ = [
    "CellPolygons",
    "cell_polygons",
    "cell_polygons_of",
    "Subgrains",
    "SubgrainStructure",
    "SubgrainParams",
    "build_subgrains",
    "subgrain_factor",
    "OrientationGradients",
    "GradientField",
    "FWHM_TO_SIGMA",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _check_range(name: str, r, lo: float = 0.0, hi: float = math.inf) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must be a (low, high) range within [{lo}, {hi}], got {r}")


def _coords(x: np.ndarray, y: np.ndarray, grain_id: np.ndarray | None = None):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    xs = np.ascontiguousarray(x.ravel())
    ys = np.ascontiguousarray(y.ravel())
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("coordinates must be finite")
    if grain_id is None:
        return x.shape, xs, ys
    g = np.asarray(grain_id)
    if g.shape != x.shape:
        raise ValueError(f"grain_id must have the shape of x {x.shape}, got {g.shape}")
    return x.shape, xs, ys, np.ascontiguousarray(g.ravel(), dtype=np.int32)


# --------------------------------------------------------------------------------------------
# convex polygon clipping
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _clip(qx, qy, qe, r, nv, a, b, c, lab):
    """Clip the convex polygon in row ``r`` of the two-row buffers ``qx, qy, qe`` to
    ``a x + b y ≤ c``, writing it into row ``1 − r``; edge ``i`` runs from vertex i to i+1 with
    label ``qe[r, i]``; the new edge along the line gets ``lab``.  Returns the new vertex count.
    (Two fixed rows and a row index instead of swapping two arrays: numba reference-counts
    array variables reassigned in a loop on every iteration, atomically, which cost the ring
    kernel more than its arithmetic.)"""
    o = 1 - r
    m = 0
    for i in range(nv):
        j = i + 1 if i + 1 < nv else 0
        fi = a * qx[r, i] + b * qy[r, i] - c
        fj = a * qx[r, j] + b * qy[r, j] - c
        if fi <= 0.0:
            qx[o, m] = qx[r, i]
            qy[o, m] = qy[r, i]
            qe[o, m] = qe[r, i]
            m += 1
            if fj > 0.0:  # leaving: the exit point starts the new edge
                t = fi / (fi - fj)
                qx[o, m] = qx[r, i] + t * (qx[r, j] - qx[r, i])
                qy[o, m] = qy[r, i] + t * (qy[r, j] - qy[r, i])
                qe[o, m] = lab
                m += 1
        elif fj <= 0.0:  # entering: the entry point continues edge i
            t = fi / (fi - fj)
            qx[o, m] = qx[r, i] + t * (qx[r, j] - qx[r, i])
            qy[o, m] = qy[r, i] + t * (qy[r, j] - qy[r, i])
            qe[o, m] = qe[r, i]
            m += 1
    return m


@njit(cache=True, inline="always")
def _certified(d, wp, qx, qy, r, n):
    """No seed at distance ≥ d (weight ≤ 0) can cut the polygon (row ``r``, vertices relative
    to the seed)."""
    if n == 0 or d == np.inf:
        return True
    if not d > 0.0:
        return False
    rmax = 0.0
    for v in range(n):
        rmax = max(rmax, math.sqrt(qx[r, v] * qx[r, v] + qy[r, v] * qy[r, v]))
    return (d * d + wp) / (2.0 * d) >= rmax


@njit(cache=True, inline="always")
def _certified_r2(d, wp, rmax2, n):
    """:func:`_certified` from the polygon's largest squared vertex distance ``rmax2`` (as
    :func:`_rmax2` computes it): ``sqrt`` is correctly rounded and monotone, so ``sqrt(max r²)``
    is ``max sqrt(r²)`` bit for bit."""
    if n == 0 or d == np.inf:
        return True
    if not d > 0.0:
        return False
    return (d * d + wp) / (2.0 * d) >= math.sqrt(rmax2)


@njit(cache=True, inline="always")
def _start_box(box, i, qx, qy, qe):
    """Write the box of seed ``i`` (x0, y0, x1, y1, seed-relative) as the 4-gon to clip (row 0
    of the two-row buffers)."""
    qx[0, 0] = box[i, 0]
    qy[0, 0] = box[i, 1]
    qx[0, 1] = box[i, 2]
    qy[0, 1] = box[i, 1]
    qx[0, 2] = box[i, 2]
    qy[0, 2] = box[i, 3]
    qx[0, 3] = box[i, 0]
    qy[0, 3] = box[i, 3]
    for e in range(4):
        qe[0, e] = -1


@njit(parallel=True, cache=True)
def _cells_kernel(px, py, pw, todo, cx, cy, cw, cid, cd, dbound, box, cap, vx, vy, ve, nv, ok):
    """Power cells of seeds ``todo[t]`` (candidate rows ``t``, sorted by distance): clip the box
    until the certificate holds (``ok[t]``) or the candidates run out."""
    k_all = cx.shape[1]
    for t in prange(todo.shape[0]):
        i = todo[t]
        qx = np.empty((2, cap))
        qy = np.empty((2, cap))
        qe = np.empty((2, cap), dtype=np.int32)
        # polygon in coordinates relative to the seed, in row r of the buffers
        _start_box(box, i, qx, qy, qe)
        r = 0
        n = 4
        done = False
        for k in range(k_all):
            if _certified(cd[t, k], pw[i], qx, qy, r, n):
                done = True
                break
            ex = cx[t, k] - px[i]
            ey = cy[t, k] - py[i]
            sep2 = ex * ex + ey * ey
            if sep2 == 0.0:
                continue  # the seed itself (or an exact duplicate: no radical line)
            # π_p(u) ≤ π_q(u)  ⇔  2 u·e ≤ |e|² − w_q + w_p   (u relative to p)
            n = _clip(qx, qy, qe, r, n, 2.0 * ex, 2.0 * ey, sep2 - cw[t, k] + pw[i], cid[t, k])
            r = 1 - r
        if not done:
            done = _certified(dbound[t], pw[i], qx, qy, r, n)
        ok[t] = done
        nv[t] = n
        for v in range(n):
            vx[t, v] = qx[r, v] + px[i]
            vy[t, v] = qy[r, v] + py[i]
            ve[t, v] = qe[r, v]


@njit(cache=True, inline="always")
def _rmax2(qx, qy, row, n):
    """Squared distance of the farthest vertex (row ``row``, vertices relative to the seed)."""
    r = 0.0
    for v in range(n):
        r = max(r, qx[row, v] * qx[row, v] + qy[row, v] * qy[row, v])
    return r


@njit(cache=True, inline="always")
def _wrap_index(j, n):
    """``(j mod n, j // n)`` without an integer division for at most one period out."""
    if 0 <= j < n:
        return j, 0
    if n <= j < 2 * n:
        return j - n, 1
    if -n <= j < 0:
        return j + n, -1
    g = j % n
    return g, (j - g) // n


#: cells per parallel task of the cell kernels (one set of clip buffers per task, not per cell;
#: every cell is clipped on its own, so the constant changes no result)
_CELL_TASK = 32


@njit(parallel=True, cache=True)
def _cells_ring_kernel(px, py, pw, gx, gy, gw, gid, gstart, nx, ny, hx, hy, lx, ly, periodic,
                       box, cap, hstart, hnb, vx, vy, ve, nv, ok):
    """Power cells of all seeds by a ring search on a bucket grid (``gx, gy, gw, gid``: seeds
    sorted by grid cell, ``gstart``: CSR offsets): clip the box with the seeds (and periodic
    images) of rings 0, 1, ... of grid cells around the seed's cell until the certificate holds
    for ring ``k`` (unvisited seeds lie outside the square of rings ``< k``).  Lines that cannot cut
    the polygon (radical line beyond its farthest vertex) are skipped.  ``ok[i]`` is False when
    the vertex buffer (``cap``) or the ring limit ran out: such cells are redone elsewhere.

    Hint (``hstart.shape[0] == n + 1``): the box is first clipped with the seeds ``hnb[hstart[i]
    : hstart[i + 1]]`` (``< 0`` or ``i``: none), e.g. the cell's neighbours in a nearby
    tessellation, at the images the ring search takes for them; every such line is a true
    constraint, so the certified polygon is the same cell (vertices from another clip order: other
    rounding), found with most ring seeds missing the already small polygon.  The ring search
    skips the hinted lines themselves (the same ``e``, bit for bit)."""
    n = px.shape[0]
    hinted = hstart.shape[0] == n + 1
    hmin = min(hx, hy)
    kmax = int(math.ceil(4.0 * max(lx, ly) / hmin)) + 2
    for task in prange((n + _CELL_TASK - 1) // _CELL_TASK):
        qx = np.empty((2, cap))  # one set of buffers per task (each cell starts afresh)
        qy = np.empty((2, cap))
        qe = np.empty((2, cap), dtype=np.int32)
        lex = np.empty(cap)  # the hinted lines' e of the cell
        ley = np.empty(cap)
        for i in range(task * _CELL_TASK, min(n, (task + 1) * _CELL_TASK)):
            _start_box(box, i, qx, qy, qe)
            r = 0  # the polygon's row in the buffers
            m = 4
            cx = min(max(int(math.floor(px[i] / hx)), 0), nx - 1)
            cy = min(max(int(math.floor(py[i] / hy)), 0), ny - 1)
            rmax2 = _rmax2(qx, qy, r, m)
            done = False
            full = False
            nh = 0
            if hinted:
                for e in range(hstart[i], hstart[i + 1]):
                    j = hnb[e]
                    if j < 0 or j == i or nh >= cap or m + 1 >= cap:
                        continue
                    shx = 0.0
                    shy = 0.0
                    if periodic:  # the image the ring search visits next to the seed
                        shx = float(nearest_period(px[i] - px[j], lx)) * lx
                        shy = float(nearest_period(py[i] - py[j], ly)) * ly
                    ex = px[j] + shx - px[i]
                    ey = py[j] + shy - py[i]
                    sep2 = ex * ex + ey * ey
                    if sep2 == 0.0:
                        continue
                    lex[nh] = ex
                    ley[nh] = ey
                    nh += 1
                    m = _clip(qx, qy, qe, r, m, 2.0 * ex, 2.0 * ey, sep2 - pw[j] + pw[i], j)
                    r = 1 - r
                rmax2 = _rmax2(qx, qy, r, m)
            for k in range(kmax):
                # unvisited seeds lie outside the square of rings < k around the seed's grid cell
                dk = min(min(px[i] - (cx - k + 1) * hx, (cx + k) * hx - px[i]),
                         min(py[i] - (cy - k + 1) * hy, (cy + k) * hy - py[i]))
                if k >= 1 and _certified_r2(dk, pw[i], rmax2, m):
                    done = True
                    break
                if not periodic and k > max(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)):
                    done = True  # every seed visited
                    break
                for jy in range(cy - k, cy + k + 1):
                    edge_row = jy == cy - k or jy == cy + k
                    step = 1 if (edge_row or k == 0) else 2 * k
                    for jx in range(cx - k, cx + k + 1, step):
                        if periodic:
                            wx, sx_ = _wrap_index(jx, nx)
                            wy, sy_ = _wrap_index(jy, ny)
                            shx = sx_ * lx
                            shy = sy_ * ly
                        else:
                            if jx < 0 or jx >= nx or jy < 0 or jy >= ny:
                                continue
                            wx = jx
                            wy = jy
                            shx = 0.0
                            shy = 0.0
                        c = wy * nx + wx
                        for t in range(gstart[c], gstart[c + 1]):
                            ex = gx[t] + shx - px[i]
                            ey = gy[t] + shy - py[i]
                            sep2 = ex * ex + ey * ey
                            if sep2 == 0.0:
                                continue  # the seed itself (or an exact duplicate)
                            rhs = sep2 - gw[t] + pw[i]
                            if rhs > 0.0 and rhs * rhs >= 4.0 * sep2 * rmax2:
                                continue  # the radical line misses the polygon's circumdisc
                            cut = False
                            for u in range(m):  # ... or misses the polygon: no copy
                                if 2.0 * ex * qx[r, u] + 2.0 * ey * qy[r, u] - rhs > 0.0:
                                    cut = True
                                    break
                            if not cut:
                                continue
                            for u in range(nh):  # a hinted line: applied (a rounding cut)
                                if lex[u] == ex and ley[u] == ey:
                                    cut = False
                                    break
                            if not cut:
                                continue
                            if m + 1 >= cap:
                                full = True
                                break
                            m = _clip(qx, qy, qe, r, m, 2.0 * ex, 2.0 * ey, rhs, gid[t])
                            r = 1 - r
                            rmax2 = _rmax2(qx, qy, r, m)
                        if full:
                            break
                    if full:
                        break
                if full:
                    break
            ok[i] = done and not full
            nv[i] = m
            if ok[i]:
                for v in range(m):
                    vx[i, v] = qx[r, v] + px[i]
                    vy[i, v] = qy[r, v] + py[i]
                    ve[i, v] = qe[r, v]


@dataclass(frozen=True, eq=False)
class CellPolygons:
    """Convex cell polygons of a tessellation (CSR layout).

    Attributes
    ----------
    vertices : ndarray (M, 2) float64
        Vertices ``(x, y)`` in px, counter-clockwise, cell ``i`` owning rows
        ``start[i]:start[i+1]``; periodic cells in the frame of their seed (may stick out of
        ``[0, L)``).
    edge_neighbour : ndarray (M,) int32
        Edge from vertex ``v`` to the next vertex of its cell lies on the radical line with this
        seed (a periodic image of it); ``-1`` on the clip box of a non-periodic specimen.
    start : ndarray (n + 1,) int64
    origins : ndarray (n, 2) float64
        The seeds: the frame of each cell (minimum image of a point relative to its seed).
    extent : (Lx, Ly)
    periodic : bool
    """

    vertices: np.ndarray
    edge_neighbour: np.ndarray
    start: np.ndarray
    origins: np.ndarray
    extent: tuple[float, float]
    periodic: bool

    @property
    def n_cells(self) -> int:
        return int(self.start.shape[0] - 1)

    def polygon(self, i: int) -> np.ndarray:
        """Vertices of cell ``i``, shape (k, 2), px."""
        return self.vertices[self.start[i]:self.start[i + 1]]

    def areas(self) -> np.ndarray:
        """Cell areas (n,) in px² (shoelace formula)."""
        out = np.zeros(self.n_cells)
        for i in range(self.n_cells):
            v = self.polygon(i)
            if len(v) >= 3:
                x, y = v[:, 0], v[:, 1]
                out[i] = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        return out

    def to_frame(self, i: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bring points into the frame of cells ``i`` (minimum image relative to the seed)."""
        if not self.periodic:
            return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        lx, ly = self.extent
        dx = np.asarray(x, dtype=np.float64) - self.origins[i, 0]
        dy = np.asarray(y, dtype=np.float64) - self.origins[i, 1]
        return (self.origins[i, 0] + dx - lx * np.round(dx / lx),
                self.origins[i, 1] + dy - ly * np.round(dy / ly))


def _ring_cells(seeds: np.ndarray, w: np.ndarray, extent: tuple[float, float], periodic: bool,
                cap: int = 48, hint: CellPolygons | None = None):
    """Cells certified by :func:`_cells_ring_kernel`: (cells, counts, vx, vy, ve) rows
    (``hint``: polygons of the same seeds whose neighbours are clipped first)."""
    n = seeds.shape[0]
    lx, ly = extent
    h = math.sqrt(lx * ly * 6.0 / n)  # about six seeds per grid cell (measured fastest)
    nx = max(1, int(round(lx / h)))
    ny = max(1, int(round(ly / h)))
    hx, hy = lx / nx, ly / ny
    cell = (np.clip(np.floor(seeds[:, 1] / hy), 0, ny - 1).astype(np.int64) * nx
            + np.clip(np.floor(seeds[:, 0] / hx), 0, nx - 1).astype(np.int64))
    order = np.argsort(cell, kind="stable")
    gstart = np.zeros(nx * ny + 1, dtype=np.int64)
    gstart[1:] = np.cumsum(np.bincount(cell, minlength=nx * ny))
    if periodic:
        box = np.tile(np.array([-lx, -ly, lx, ly], dtype=np.float64), (n, 1))
    else:
        mrg = max(lx, ly)
        box = np.ascontiguousarray(np.c_[-mrg - seeds[:, 0], -mrg - seeds[:, 1],
                                         lx + mrg - seeds[:, 0], ly + mrg - seeds[:, 1]])
    if hint is not None and hint.start.shape[0] == n + 1:
        hstart = hint.start.astype(np.int64)
        hnb = np.ascontiguousarray(hint.edge_neighbour, dtype=np.int32)
    else:
        hstart = np.zeros(1, dtype=np.int64)
        hnb = np.zeros(0, dtype=np.int32)
    vx = np.empty((n, cap))  # rows written up to nv for the certified cells only
    vy = np.empty((n, cap))
    ve = np.empty((n, cap), dtype=np.int32)
    nv = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=np.bool_)
    _cells_ring_kernel(np.ascontiguousarray(seeds[:, 0]), np.ascontiguousarray(seeds[:, 1]),
                       np.ascontiguousarray(w, dtype=np.float64),
                       np.ascontiguousarray(seeds[order, 0]), np.ascontiguousarray(seeds[order, 1]),
                       np.ascontiguousarray(w[order], dtype=np.float64), order.astype(np.int32),
                       gstart, nx, ny, hx, hy, float(lx), float(ly), bool(periodic), box, cap,
                       hstart, hnb, vx, vy, ve, nv, ok)
    if ok.all():  # the usual case: no copies
        return np.arange(n), nv, vx, vy, ve
    return np.flatnonzero(ok), nv[ok], vx[ok], vy[ok], ve[ok]


@njit(cache=True)
def _pack_rows(start, cells, nvs, vx, vy, ve, verts, edges):
    """Copy the first ``nvs[r]`` vertices of each row ``r`` to cell ``cells[r]``'s CSR slot."""
    for r in range(cells.shape[0]):
        a = start[cells[r]]
        for v in range(nvs[r]):
            verts[a + v, 0] = vx[r, v]
            verts[a + v, 1] = vy[r, v]
            edges[a + v] = ve[r, v]


def _assemble(n, rounds, seeds, extent, periodic) -> CellPolygons:
    """CSR assembly of the per-pass rows (each cell certified in one pass)."""
    counts = np.zeros(n, dtype=np.int64)
    for cells, nvs, _, _, _ in rounds:
        counts[cells] = nvs
    start = np.zeros(n + 1, dtype=np.int64)
    start[1:] = np.cumsum(counts)
    verts = np.empty((int(start[-1]), 2))
    edges = np.empty(int(start[-1]), dtype=np.int32)
    for cells, nvs, vx, vy, ve in rounds:
        _pack_rows(start, np.ascontiguousarray(cells, dtype=np.int64),
                   np.ascontiguousarray(nvs, dtype=np.int64), vx, vy, ve, verts, edges)
    return CellPolygons(vertices=verts, edge_neighbour=edges, start=start,
                        origins=seeds.copy(), extent=(float(extent[0]), float(extent[1])),
                        periodic=bool(periodic))


def cell_polygons(tess: Tessellation, first_candidates: int = 16, ring_search: bool = True
                  ) -> CellPolygons:
    """Exact convex polygons of every cell of ``tess`` (see module docstring).

    Parameters
    ----------
    tess : Tessellation
    first_candidates : int
        Neighbours tried first per cell by the k-d-tree search (doubled for cells whose
        certificate fails; a speed knob).
    ring_search : bool
        First try every cell by a ring search on a bucket grid (:func:`_cells_ring_kernel`; the
        fast path, no k-d-tree queries); cells it cannot finish go to the k-d-tree search.

    Returns
    -------
    CellPolygons
        Non-periodic specimens are clipped to the box ``[−M, Lx + M] × [−M, Ly + M]``,
        ``M = max(Lx, Ly)`` (edges labelled ``-1``); empty Laguerre cells have no vertices.
    """
    return cell_polygons_of(tess.seeds, tess.weights, tess.extent, tess.periodic,
                            first_candidates=first_candidates, ring_search=ring_search)


def cell_polygons_of(seeds: np.ndarray, weights: np.ndarray | None,
                     extent: tuple[float, float], periodic: bool, first_candidates: int = 16,
                     ring_search: bool = True, hint: CellPolygons | None = None) -> CellPolygons:
    """:func:`cell_polygons` from a tessellation's arrays, without building one (the same
    polygons, bit for bit).

    Parameters
    ----------
    seeds : ndarray (n, 2) float64, C-contiguous, px, inside ``[0, Lx) × [0, Ly)``
    weights : ndarray (n,) float64 or None, power weights (px²)
    extent : (Lx, Ly), px
    periodic : bool
    first_candidates, ring_search
        As in :func:`cell_polygons`.
    hint : CellPolygons, optional
        Polygons of the same seeds with other weights (e.g. the previous step of a weight fit):
        the ring search clips each cell with its neighbours there first (the same cells, found
        faster when the neighbours change little; vertex bits may differ from a search without).

    Returns
    -------
    CellPolygons
    """
    if first_candidates < 1:
        raise ValueError(f"first_candidates must be >= 1, got {first_candidates}")
    n = seeds.shape[0]
    lx, ly = extent
    w = np.zeros(n) if weights is None else weights - weights.max()
    periodic = bool(periodic)
    m_img = 1 if periodic else 0
    rounds = []  # (cells, vertex counts, vx, vy, ve) of the certified rows of each pass
    todo = np.arange(n)
    if ring_search:
        rounds.append(_ring_cells(seeds, w, (lx, ly), periodic, hint=hint))
        if rounds[-1][0].size == n:  # the usual case: every cell certified
            todo = todo[:0]
        else:
            todo = np.setdiff1d(todo, rounds[-1][0])
    while todo.size:
        shifts = np.array([(a * lx, b * ly) for a in range(-m_img, m_img + 1)
                           for b in range(-m_img, m_img + 1)])
        pts = (seeds[None, :, :] + shifts[:, None, :]).reshape(-1, 2)
        pid = np.tile(np.arange(n, dtype=np.int32), len(shifts))
        pw = np.tile(w, len(shifts))
        tree = cKDTree(pts)
        total = pts.shape[0]
        # unvisited points outside the replicas lie at least this far from any seed in [0, L)
        beyond = m_img * min(lx, ly) if periodic else np.inf
        if periodic:
            half = np.array([lx, ly])  # the cell lies in p ± L/2; start from p ± L
            box = np.tile(np.r_[-half, half], (n, 1))
        else:
            mrg = max(lx, ly)
            box = np.c_[-mrg - seeds[:, 0], -mrg - seeds[:, 1],
                        lx + mrg - seeds[:, 0], ly + mrg - seeds[:, 1]]
        k = min(first_candidates + 1, total)
        while todo.size:
            kk = min(k + 1, total)
            dist, idx = tree.query(seeds[todo], k=kk)
            dist = np.atleast_2d(dist).reshape(len(todo), kk)
            idx = np.atleast_2d(idx).reshape(len(todo), kk)
            use = min(k, total)
            dbound = dist[:, use] if use < kk else np.full(len(todo), beyond)
            dbound = np.ascontiguousarray(np.minimum(dbound, beyond))
            sel = idx[:, :use]
            cap = 4 + use + 1
            nt = len(todo)
            vx = np.zeros((nt, cap))
            vy = np.zeros((nt, cap))
            ve = np.zeros((nt, cap), dtype=np.int32)
            nv = np.zeros(nt, dtype=np.int64)
            ok = np.zeros(nt, dtype=np.bool_)
            _cells_kernel(seeds[:, 0].copy(), seeds[:, 1].copy(), w, todo.astype(np.int64),
                          np.ascontiguousarray(pts[sel, 0]), np.ascontiguousarray(pts[sel, 1]),
                          np.ascontiguousarray(pw[sel]), np.ascontiguousarray(pid[sel]),
                          np.ascontiguousarray(dist[:, :use]), dbound, box, cap, vx, vy, ve, nv, ok)
            rounds.append((todo[ok], nv[ok], vx[ok], vy[ok], ve[ok]))
            todo = todo[~ok]
            if use >= total:
                break
            k = min(2 * k, total)
        if todo.size == 0:
            break
        m_img += 1  # periodic only: more images needed (very few or very unequal cells)
        if not periodic or m_img > 8:
            raise ValueError("could not certify the cell polygons (degenerate tessellation)")
    return _assemble(n, rounds, seeds, (lx, ly), periodic)


# --------------------------------------------------------------------------------------------
# sub-grains
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _subcells_kernel(sub_xy, sub_parent, gstart, cvx, cvy, cstart, cap, vx, vy, ve, nv):
    """Polygon ``C_i ∩ P_g`` of every sub-seed ``i`` (edge label: the other sub-seed, or −1)."""
    m = sub_xy.shape[0]
    for task in prange((m + _CELL_TASK - 1) // _CELL_TASK):
        qx = np.empty((2, cap))  # one set of buffers per task (each polygon starts afresh)
        qy = np.empty((2, cap))
        qe = np.empty((2, cap), dtype=np.int32)
        for i in range(task * _CELL_TASK, min(m, (task + 1) * _CELL_TASK)):
            g = sub_parent[i]
            a0 = cstart[g]
            n = cstart[g + 1] - a0
            r = 0  # the polygon's row in the buffers
            sx = sub_xy[i, 0]
            sy = sub_xy[i, 1]
            for v in range(n):
                qx[0, v] = cvx[a0 + v] - sx
                qy[0, v] = cvy[a0 + v] - sy
                qe[0, v] = -1
            rmax2 = _rmax2(qx, qy, r, n)
            for q in range(gstart[g], gstart[g + 1]):
                if q == i or n == 0:
                    continue
                ex = sub_xy[q, 0] - sx
                ey = sub_xy[q, 1] - sy
                sep2 = ex * ex + ey * ey
                if sep2 == 0.0:
                    continue
                # a bisector beyond the polygon's circumdisc (with a margin far above rounding)
                # leaves every vertex inside: _clip would copy the polygon unchanged
                if sep2 * sep2 >= 4.0 * sep2 * rmax2 * (1.0 + 1e-9):
                    continue
                n = _clip(qx, qy, qe, r, n, 2.0 * ex, 2.0 * ey, sep2, q)
                r = 1 - r
                rmax2 = _rmax2(qx, qy, r, n)
            nv[i] = n
            for v in range(n):
                vx[i, v] = qx[r, v] + sx
                vy[i, v] = qy[r, v] + sy
                ve[i, v] = qe[r, v]


@njit(cache=True)
def _bisector_segments(vx, vy, ve, nv):
    """The bisector edges (label ``≥ 0``) of the sub-cell rows (vertices ``vx, vy``, edge labels
    ``ve``, counts ``nv``), grouped by row in polygon order: segments (S, 4) ``x0, y0, x1, y1``
    px, the other sub-seed of each (S,) int64 and the CSR offsets (m + 1,) int64."""
    m = nv.shape[0]
    sstart = np.zeros(m + 1, dtype=np.int64)
    for i in range(m):
        c = 0
        for v in range(nv[i]):
            if ve[i, v] >= 0:
                c += 1
        sstart[i + 1] = sstart[i] + c
    seg = np.empty((sstart[m], 4))
    seg_nb = np.empty(sstart[m], dtype=np.int64)
    for i in range(m):
        k = sstart[i]
        n = nv[i]
        for v in range(n):
            if ve[i, v] < 0:
                continue
            w = v + 1 if v + 1 < n else 0
            seg[k, 0] = vx[i, v]
            seg[k, 1] = vy[i, v]
            seg[k, 2] = vx[i, w]
            seg[k, 3] = vy[i, w]
            seg_nb[k] = ve[i, v]
            k += 1
    return seg, seg_nb, sstart


@njit(cache=True, inline="always")
def _seg_dist2(x, y, x0, y0, ex, ey, inv_l2):
    """Squared distance from (x, y) to the segment from (x0, y0) along (ex, ey) (``inv_l2``:
    ``1 / |e|²``, 0 for a point segment)."""
    t = min(max(((x - x0) * ex + (y - y0) * ey) * inv_l2, 0.0), 1.0)
    dx = x - (x0 + t * ex)
    dy = y - (y0 + t * ey)
    return dx * dx + dy * dy


def _segment_rows(seg: np.ndarray) -> np.ndarray:
    """Segments (S, 4) ``x0, y0, x1, y1`` as rows ``x0, y0, ex, ey, 1/|e|²`` (S, 5) for
    :func:`_seg_dist2` (``1/|e|²`` = 0 for a point segment)."""
    out = np.empty((seg.shape[0], 5))
    out[:, :2] = seg[:, :2]
    out[:, 2:4] = seg[:, 2:4] - seg[:, :2]
    l2 = out[:, 2] ** 2 + out[:, 3] ** 2
    out[:, 4] = np.divide(1.0, l2, out=np.zeros_like(l2), where=l2 > 0)
    return out


_CHUNK = 128  # pixels labelled in sequence (row coherence); fixed, so any thread count agrees


@njit(parallel=True, cache=True)
def _sub_label_kernel(xs, ys, gid, ox, oy, lx, ly, periodic, gstart, sx, sy, whole_id,
                      seg, seg_nb, sstart, cap, out_id, out_d):
    """Nearest sub-seed of the point's grain and distance to that sub-grain's bisector edges.

    Consecutive pixels mostly share a sub-grain: the previous pixel's sub-seed is kept when it
    is strictly nearer than every sub-seed across its polygon's bisector edges (which then proves
    it the nearest of the grain; its edge distances are taken in the same loop, in edge order);
    otherwise all sub-seeds of the grain are compared."""
    n = xs.shape[0]
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        prev_g = -1
        prev_b = -1
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            g = gid[i]
            x = xs[i]
            y = ys[i]
            if periodic:  # minimum image relative to the grain's seed: the frame of its polygon
                dx = x - ox[g]
                dy = y - oy[g]
                x = ox[g] + dx - lx * nearest_period(dx, lx)
                y = oy[g] + dy - ly * nearest_period(dy, ly)
            a = gstart[g]
            b = gstart[g + 1]
            if b == a:
                out_id[i] = whole_id[g]
                out_d[i] = cap
                prev_g = -1
                continue
            bi = -1
            d2 = np.inf
            if g == prev_g:  # the keep test and the kept sub-seed's edge distances in one loop
                dx = x - sx[prev_b]
                dy = y - sy[prev_b]
                best = dx * dx + dy * dy
                keep = True
                for s in range(sstart[prev_b], sstart[prev_b + 1]):
                    q = seg_nb[s]
                    dx = x - sx[q]
                    dy = y - sy[q]
                    keep = keep and best < dx * dx + dy * dy
                    v = _seg_dist2(x, y, seg[s, 0], seg[s, 1], seg[s, 2], seg[s, 3], seg[s, 4])
                    if v < d2:
                        d2 = v
                if keep:
                    bi = prev_b
            if bi < 0:
                best = np.inf
                bi = a
                for q in range(a, b):
                    dx = x - sx[q]
                    dy = y - sy[q]
                    dd = dx * dx + dy * dy
                    if dd < best:
                        best = dd
                        bi = q
                d2 = np.inf
                for s in range(sstart[bi], sstart[bi + 1]):
                    v = _seg_dist2(x, y, seg[s, 0], seg[s, 1], seg[s, 2], seg[s, 3], seg[s, 4])
                    if v < d2:
                        d2 = v
            out_id[i] = bi
            out_d[i] = min(math.sqrt(d2), cap)
            prev_g = g
            prev_b = bi


@dataclass(frozen=True, eq=False)
class SubgrainStructure:
    """Drawn sub-grains of one specimen (frozen; a specimen property).

    Sub-grain ids: ``0 … n_seeded − 1`` are the sub-seeds (sorted by parent grain, grain ``g``
    owning ``grain_start[g]:grain_start[g+1]``); a grain without sub-seeds is one sub-grain with
    id ``n_seeded + g``.

    Attributes
    ----------
    seeds : ndarray (n_seeded, 2) float64
        Sub-seed positions in px, in the frame of their parent cell.
    parent : ndarray (n_subgrains,) int32
        Parent grain of every sub-grain id.
    delta : ndarray (n_subgrains,) float64
        Relative intensity change ``δ`` of every sub-grain (0 for undivided grains).
    grain_start : ndarray (n_grains + 1,) int64
    segments : ndarray (S, 4) float64
        Sub-boundary segments ``(x0, y0, x1, y1)`` in px, sub-seed ``i`` owning rows
        ``segment_start[i]:segment_start[i+1]`` (the bisector edges of its polygon).
    segment_start : ndarray (n_seeded + 1,) int64
    segment_neighbour : ndarray (S,) int64
        The other sub-seed of each segment's bisector.
    polygons : CellPolygons
        The parent grains.
    params : dict
        Drawn specimen parameters (JSON-ready).
    """

    seeds: np.ndarray
    parent: np.ndarray
    delta: np.ndarray
    grain_start: np.ndarray
    segments: np.ndarray
    segment_start: np.ndarray
    segment_neighbour: np.ndarray
    polygons: CellPolygons
    params: dict = field(default_factory=dict)
    _rows: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def _segment_rows(self) -> np.ndarray:
        """:attr:`segments` as the label kernel's rows (:func:`_segment_rows`), built once."""
        if self._rows is None:
            object.__setattr__(self, "_rows", _segment_rows(self.segments))
        return self._rows

    @property
    def n_seeded(self) -> int:
        """Number of sub-seeds (seeded sub-grains)."""
        return int(self.seeds.shape[0])

    def to_dict(self) -> dict:
        """Drawn specimen parameters (JSON-ready)."""
        return dict(self.params)

    @property
    def n_subgrains(self) -> int:
        """Number of sub-grain ids (sub-seeds plus one whole-grain id per grain)."""
        return int(self.parent.shape[0])

    def label(self, x: np.ndarray, y: np.ndarray, grain_id: np.ndarray,
              max_distance: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """Sub-grain id and exact distance to the nearest sub-grain boundary inside the grain.

        Parameters
        ----------
        x, y : ndarray, any shape, float
            Specimen coordinates in px (the same ones the grains were labelled at).
        grain_id : ndarray, int, shape of ``x``
            Parent grain ids from ``Tessellation.label`` at these coordinates.
        max_distance : float
            Cap on the returned distance in px (``inf``: uncapped; grains with one sub-grain
            return the cap).

        Returns
        -------
        subgrain_id : ndarray int32, shape of ``x``
        distance : ndarray float32, shape of ``x``, px
        """
        if not (max_distance > 0):
            raise ValueError(f"max_distance must be > 0 px, got {max_distance}")
        shape, xs, ys, g = _coords(x, y, grain_id)
        ng = self.polygons.n_cells
        if g.size and (g.min() < 0 or g.max() >= ng):
            raise ValueError(f"grain ids must lie in [0, {ng}), got [{g.min()}, {g.max()}]")
        lx, ly = self.polygons.extent
        whole = np.arange(ng, dtype=np.int64) + self.n_seeded
        out_id = np.empty(xs.shape[0], dtype=np.int32)
        out_d = np.empty(xs.shape[0], dtype=np.float32)
        o = self.polygons.origins
        _sub_label_kernel(xs, ys, g, np.ascontiguousarray(o[:, 0]), np.ascontiguousarray(o[:, 1]),
                          lx, ly, self.polygons.periodic, self.grain_start,
                          np.ascontiguousarray(self.seeds[:, 0]),
                          np.ascontiguousarray(self.seeds[:, 1]), whole, self._segment_rows(),
                          self.segment_neighbour, self.segment_start,
                          float(max_distance), out_id, out_d)
        return out_id.reshape(shape), out_d.reshape(shape)


def build_subgrains(tess: Tessellation, sub_seeds: np.ndarray, delta: np.ndarray | None = None,
                    polygons: CellPolygons | None = None, params: dict | None = None,
                    label_cap: float = np.inf, parent: np.ndarray | None = None
                    ) -> SubgrainStructure:
    """Sub-grain structure from given sub-seed positions (the deterministic half of sampling).

    Parameters
    ----------
    tess : Tessellation
        The grains.
    sub_seeds : ndarray (m, 2) float64
        Sub-seed positions in px inside ``[0, Lx) × [0, Ly)``; each goes to the grain containing it.
    delta : ndarray (m,), optional
        Relative intensity change of each sub-seed's sub-grain (default 0).
    polygons : CellPolygons, optional
        ``cell_polygons(tess)`` if already computed.
    params : dict, optional
        Stored with the structure.
    label_cap : float
        ``max_distance`` of the ``tess.label`` call that finds the parents (px; the ids do not
        depend on it): pass the cap the frames are labelled with to share its cached tile lists.
    parent : ndarray (m,) int, optional
        The grains of the sub-seeds if already known (``tess.label``'s ids; then no call).

    Returns
    -------
    SubgrainStructure
    """
    sub = np.asarray(sub_seeds, dtype=np.float64).reshape(-1, 2)
    lx, ly = tess.extent
    if sub.size and (np.any(sub < 0) or np.any(sub[:, 0] >= lx) or np.any(sub[:, 1] >= ly)
                     or not np.all(np.isfinite(sub))):
        raise ValueError("sub-seeds must lie inside [0, Lx) x [0, Ly)")
    m = sub.shape[0]
    dl = np.zeros(m) if delta is None else np.asarray(delta, dtype=np.float64)
    if dl.shape != (m,):
        raise ValueError(f"delta must have shape ({m},), got {dl.shape}")
    cells = cell_polygons(tess) if polygons is None else polygons
    n = tess.n_seeds
    if parent is not None:
        parent = np.asarray(parent, dtype=np.int32).reshape(-1)
        if parent.shape != (m,):
            raise ValueError(f"parent must have shape ({m},), got {parent.shape}")
    else:
        parent = (tess.label(sub[:, 0], sub[:, 1], max_distance=label_cap)[0].astype(np.int32)
                  if m else np.zeros(0, np.int32))
    order = np.argsort(parent, kind="stable")
    sub, parent, dl = sub[order], parent[order], dl[order]
    fx, fy = cells.to_frame(parent, sub[:, 0], sub[:, 1])
    sub = np.ascontiguousarray(np.c_[fx, fy]) if m else np.zeros((0, 2))
    gstart = np.zeros(n + 1, dtype=np.int64)
    gstart[1:] = np.cumsum(np.bincount(parent, minlength=n))
    kmax = int(np.diff(gstart).max()) if n else 0
    cmax = int(np.diff(cells.start).max()) if n else 0
    cap = cmax + kmax + 1
    vx = np.empty((m, cap))  # rows written up to nv
    vy = np.empty((m, cap))
    ve = np.empty((m, cap), dtype=np.int32)
    nv = np.zeros(m, dtype=np.int64)
    if m:
        _subcells_kernel(sub, parent, gstart, np.ascontiguousarray(cells.vertices[:, 0]),
                         np.ascontiguousarray(cells.vertices[:, 1]), cells.start, cap, vx, vy, ve, nv)
    seg, seg_nb, sstart = _bisector_segments(vx, vy, ve, nv)
    whole_parent = np.arange(n, dtype=np.int32)
    return SubgrainStructure(
        seeds=sub, parent=np.r_[parent, whole_parent].astype(np.int32),
        delta=np.r_[dl, np.zeros(n)], grain_start=gstart, segments=seg, segment_start=sstart,
        segment_neighbour=seg_nb, polygons=cells, params=dict(params or {}),
    )


@njit(parallel=True, cache=True)
def _factor_kernel(sid, dist, delta, sigma, depth, out):
    n = sid.shape[0]
    inv = 0.5 / (sigma * sigma) if sigma > 0.0 else 0.0
    for i in prange(n):
        v = 1.0 + delta[sid[i]]
        if sigma > 0.0 and depth > 0.0:
            d = dist[i]
            v *= 1.0 - depth * math.exp(-d * d * inv)
        out[i] = v


def subgrain_factor(subgrain_id: np.ndarray, distance: np.ndarray, delta: np.ndarray,
                    width_px: float, depth: float) -> np.ndarray:
    """Multiplicative sub-grain signal factor ``(1 + δ_i)(1 − depth · exp(−d² / 2σ²))``.

    Parameters
    ----------
    subgrain_id : ndarray int, any shape
    distance : ndarray float, px, shape of ``subgrain_id``
        Distance to the nearest sub-grain boundary (``inf``: none).
    delta : ndarray (n_subgrains,) float
    width_px : float
        Groove FWHM in px (0: no groove).
    depth : float
        Fractional signal loss on the sub-boundary, 0–1.

    Returns
    -------
    ndarray float32, shape of ``subgrain_id``
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"sub-grain groove depth must be within [0, 1], got {depth}")
    if not width_px >= 0:
        raise ValueError(f"sub-grain groove width must be >= 0 px, got {width_px}")
    s = np.ascontiguousarray(subgrain_id, dtype=np.int32).ravel()
    d = np.ascontiguousarray(distance, dtype=np.float32).ravel()
    if d.shape != s.shape:
        raise ValueError("subgrain_id and distance must have the same shape")
    dl = np.ascontiguousarray(delta, dtype=np.float64)
    if s.size and (s.min() < 0 or s.max() >= dl.shape[0]):
        raise ValueError("sub-grain ids out of range of the delta table")
    out = np.empty(s.shape[0], dtype=np.float32)
    _factor_kernel(s, d, dl, float(width_px) * FWHM_TO_SIGMA, float(depth), out)
    return out.reshape(np.shape(subgrain_id))


@dataclass(frozen=True)
class SubgrainParams:
    """Per-frame draws: sub-boundary groove FWHM (px) and depth (0–1)."""

    groove_width_px: float
    groove_depth: float

    def to_dict(self) -> dict:
        return {"groove_width_px": self.groove_width_px, "groove_depth": self.groove_depth}


@dataclass(frozen=True)
class Subgrains:
    """Sub-grain (low-angle boundary) stage.

    Parameters
    ----------
    subgrains_per_grain : (low, high)
        Mean number of sub-seeds per grain, drawn uniformly per specimen (> 0); the count of
        sub-seeds is Poisson with mean ``value × n_grains``, spread uniformly over the specimen.
    grain_fraction : float
        Fraction of grains that are subdivided (each grain independently; others stay whole).
    intensity_delta : (low, high)
        Amplitude ``a`` drawn per specimen; each sub-grain's ``δ ~ U(−a, a)`` (relative to the
        parent grain's intensity).
    groove_width_px : (low, high)
        Sub-boundary groove FWHM in px, drawn per frame.
    groove_depth : (low, high)
        Sub-boundary groove depth (0–1), drawn per frame.
    """

    subgrains_per_grain: tuple[float, float] = (3.0, 10.0)
    grain_fraction: float = 1.0
    intensity_delta: tuple[float, float] = (0.01, 0.05)
    groove_width_px: tuple[float, float] = (0.5, 2.0)
    groove_depth: tuple[float, float] = (0.02, 0.1)

    def __post_init__(self) -> None:
        _check_range("subgrains.subgrains_per_grain", self.subgrains_per_grain, 0.0, 1e4)
        if not self.subgrains_per_grain[0] > 0:
            raise ValueError(f"subgrains.subgrains_per_grain must be > 0, got "
                             f"{self.subgrains_per_grain}")
        if not 0.0 <= self.grain_fraction <= 1.0:
            raise ValueError(f"subgrains.grain_fraction must be within [0, 1], got "
                             f"{self.grain_fraction}")
        _check_range("subgrains.intensity_delta", self.intensity_delta, 0.0, 1.0)
        _check_range("subgrains.groove_width_px", self.groove_width_px, 0.0, 1e3)
        _check_range("subgrains.groove_depth", self.groove_depth, 0.0, 1.0)

    def sample_specimen(self, rng: np.random.Generator, tess: Tessellation,
                        polygons: CellPolygons | None = None, label_cap: float = np.inf,
                        grain_of=None) -> SubgrainStructure:
        """Draw the sub-grains of a specimen (sub-seeds, subdivided grains, intensity deltas);
        ``label_cap``: see :func:`build_subgrains` (results do not depend on it);
        ``grain_of``: optional ``(x, y) → grain ids`` giving ``tess.label``'s ids (used instead
        of it, e.g. without its tile lists)."""
        n = tess.n_seeds
        lx, ly = tess.extent
        per_grain = float(rng.uniform(*self.subgrains_per_grain))
        amp = float(rng.uniform(*self.intensity_delta))
        m = int(rng.poisson(per_grain * n))
        sub = rng.random((m, 2)) * np.array([lx, ly])
        divided = rng.random(n) < self.grain_fraction
        delta = rng.uniform(-amp, amp, m)
        if not m:
            parent = np.zeros(0, np.int32)
        elif grain_of is not None:
            parent = np.asarray(grain_of(sub[:, 0], sub[:, 1]), dtype=np.int32)
        else:
            parent = tess.label(sub[:, 0], sub[:, 1], max_distance=label_cap)[0]
        keep = divided[parent]
        params = {"subgrains_per_grain": per_grain, "intensity_delta": amp,
                  "n_subgrain_seeds": int(keep.sum()), "n_divided_grains": int(divided.sum())}
        return build_subgrains(tess, sub[keep], delta[keep], polygons=polygons, params=params,
                               label_cap=label_cap, parent=parent[keep])

    def sample(self, rng: np.random.Generator) -> SubgrainParams:
        """Per-frame groove draws."""
        return SubgrainParams(groove_width_px=float(rng.uniform(*self.groove_width_px)),
                              groove_depth=float(rng.uniform(*self.groove_depth)))

    def apply(self, signal: np.ndarray, subgrain_id: np.ndarray, distance: np.ndarray,
              structure: SubgrainStructure, params: SubgrainParams) -> np.ndarray:
        """``signal × subgrain_factor`` (float32, shape of ``signal``)."""
        f = subgrain_factor(subgrain_id, distance, structure.delta, params.groove_width_px,
                            params.groove_depth)
        return (np.asarray(signal, dtype=np.float32) * f).astype(np.float32)


# --------------------------------------------------------------------------------------------
# orientation gradients
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _gradient_kernel(xs, ys, gid, origins, slope, lx, ly, periodic, out):
    n = xs.shape[0]
    for i in prange(n):
        g = gid[i]
        dx = xs[i] - origins[g, 0]
        dy = ys[i] - origins[g, 1]
        if periodic:
            dx -= lx * round(dx / lx)
            dy -= ly * round(dy / ly)
        out[i] = max(1.0 + slope[g, 0] * dx + slope[g, 1] * dy, 0.0)


@dataclass(frozen=True, eq=False)
class GradientField:
    """Drawn per-grain intensity gradients (frozen; a specimen property).

    Attributes
    ----------
    slope : ndarray (n_grains, 2) float64
        Gradient ``G_g`` of the relative intensity, per px.
    origins : ndarray (n_grains, 2) float64
        Grain seeds in px (where the factor is 1).
    extent : (Lx, Ly)
    periodic : bool
    params : dict
    """

    slope: np.ndarray
    origins: np.ndarray
    extent: tuple[float, float]
    periodic: bool
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Drawn specimen parameters (JSON-ready)."""
        return dict(self.params)

    def factor(self, x: np.ndarray, y: np.ndarray, grain_id: np.ndarray) -> np.ndarray:
        """Multiplicative factor ``max(1 + G_g · (x − p_g), 0)`` (float32, shape of ``x``)."""
        shape, xs, ys, g = _coords(x, y, grain_id)
        n = self.slope.shape[0]
        if g.size and (g.min() < 0 or g.max() >= n):
            raise ValueError(f"grain ids must lie in [0, {n}), got [{g.min()}, {g.max()}]")
        out = np.empty(xs.shape[0], dtype=np.float32)
        lx, ly = self.extent
        _gradient_kernel(xs, ys, g, self.origins, self.slope, lx, ly, self.periodic, out)
        return out.reshape(shape)


@dataclass(frozen=True)
class OrientationGradients:
    """Smooth intensity gradients inside grains (lattice rotation → channelling change).

    Parameters
    ----------
    amplitude : (low, high)
        Relative intensity change across one mean grain spacing, drawn uniformly per grain
        (direction uniform); slope magnitude = amplitude / spacing, per px.
    """

    amplitude: tuple[float, float] = (0.0, 0.15)

    def __post_init__(self) -> None:
        _check_range("gradients.amplitude", self.amplitude, 0.0, 10.0)

    def sample_specimen(self, rng: np.random.Generator, tess: Tessellation) -> GradientField:
        """Draw one gradient vector per grain."""
        n = tess.n_seeds
        lx, ly = tess.extent
        spacing = math.sqrt(lx * ly / n)
        amp = rng.uniform(self.amplitude[0], self.amplitude[1], n)
        theta = rng.uniform(0.0, 2.0 * math.pi, n)
        slope = np.c_[np.cos(theta), np.sin(theta)] * (amp / spacing)[:, None]
        return GradientField(slope=slope, origins=tess.seeds.copy(), extent=(lx, ly),
                             periodic=bool(tess.periodic),
                             params={"mean_amplitude": float(amp.mean()), "spacing_px": spacing})

    def apply(self, signal: np.ndarray, x: np.ndarray, y: np.ndarray, grain_id: np.ndarray,
              gradient: GradientField) -> np.ndarray:
        """``signal × gradient.factor`` (float32, shape of ``signal``)."""
        return (np.asarray(signal, dtype=np.float32) * gradient.factor(x, y, grain_id)
                ).astype(np.float32)
