"""Voronoi and Laguerre (power) tessellations evaluated at arbitrary specimen coordinates.

A tessellation is a set of seeds ``p_i`` (Å-free: specimen coordinates in *pixels of the nominal
grid*, i.e. the units of the image raster before scan distortion) with optional power weights
``w_i`` (px²).  A point ``x`` belongs to the seed with the smallest power distance
``π_i(x) = |x − p_i|² − w_i`` (plain Voronoi when all weights are equal).  Cells are convex
polygons, so the distance from an interior point to its cell boundary is exactly the smallest
distance to the radical lines with all other seeds,

    d(x) = min_{q ≠ 1} (π_q(x) − π_1(x)) / (2 |p_q − p_1|),

which is what :func:`label_points` returns.  (The distance to the bisector of the *second nearest*
seed alone is only an upper bound: near a triple junction another seed's line can be closer.)

Acceleration: seeds are binned into a uniform grid of about two seeds per cell; each point visits
rings of cells around its own cell until a lower bound on the distance of all unvisited seeds proves
that neither the nearest seed nor the boundary distance can change.  With weights normalised to
``w ≤ 0`` the bounds are ``π_q ≥ r²`` and ``(π_q − π_1)/(2|p_q − p_1|) ≥ (r² − π_1)/(2(r + d_1))``
for a seed at distance ``≥ r``.  The search is exact; ``max_distance`` caps the boundary distance
(distances at or above the cap are returned as the cap) and so bounds the search.

Fast path for a finite cap (the pipeline's case): the specimen is cut into small square tiles and,
once per tessellation and cap, every tile gets its candidate seeds (all that can be nearest in the
tile or have a radical line within the cap of it), its *owners* (the candidates that can be nearest
somewhere in the closed tile, a tested superset) and, per owner, its radical lines as affine
functions of the point sorted by their minimum over the tile.  A point then costs one power distance
per owner of its tile (1.7 on average) and the few lines that can still be closer than the best
found.  Tiles are built lazily, the first time a point falls in them: a frame sees a quarter of
the recipe's specimen (``specimen_scale: 2``), and its four frames together about two thirds.  A
tile's lists depend on the tile alone, so the labels do not depend on what was built before.

Points are independent, so the parallel loop gives identical results for any thread count.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
from numba import get_num_threads, njit, prange

__all__ = [
    "Tessellation",
    "poisson_seeds",
    "hardcore_seeds",
    "lognormal_weights",
    "label_points",
]


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def poisson_seeds(rng: np.random.Generator, n: int, extent: tuple[float, float]) -> np.ndarray:
    """Draw ``n`` seeds uniformly in ``[0, Lx) × [0, Ly)`` (a binomial/Poisson point process).

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int
        Number of seeds (≥ 1).
    extent : (Lx, Ly)
        Specimen size in px.

    Returns
    -------
    ndarray, shape (n, 2), float64
        Seed positions ``(x, y)`` in px.
    """
    if n < 1:
        raise ValueError(f"number of seeds must be >= 1, got {n}")
    lx, ly = float(extent[0]), float(extent[1])
    return rng.random((n, 2)) * np.array([lx, ly])


@njit(cache=True)
def _rsa(cand, n, lx, ly, dmin, periodic):
    cell = dmin / math.sqrt(2.0)  # at most one accepted seed per cell
    nx = max(1, int(lx / cell))
    ny = max(1, int(ly / cell))
    hx = lx / nx
    hy = ly / ny
    grid = -np.ones((ny, nx), dtype=np.int64)
    out = np.empty((n, 2))
    m = 0
    reach_x = int(math.ceil(dmin / hx))
    reach_y = int(math.ceil(dmin / hy))
    d2 = dmin * dmin
    for c in range(cand.shape[0]):
        if m == n:
            break
        x = cand[c, 0]
        y = cand[c, 1]
        cx = min(int(x / hx), nx - 1)
        cy = min(int(y / hy), ny - 1)
        ok = True
        for jy in range(cy - reach_y, cy + reach_y + 1):
            if not ok:
                break
            if periodic:
                gy = jy % ny
            elif jy < 0 or jy >= ny:
                continue
            else:
                gy = jy
            for jx in range(cx - reach_x, cx + reach_x + 1):
                if periodic:
                    gx = jx % nx
                elif jx < 0 or jx >= nx:
                    continue
                else:
                    gx = jx
                k = grid[gy, gx]
                if k < 0:
                    continue
                dx = out[k, 0] - x
                dy = out[k, 1] - y
                if periodic:
                    dx -= lx * round(dx / lx)
                    dy -= ly * round(dy / ly)
                if dx * dx + dy * dy < d2:
                    ok = False
                    break
        if ok:
            out[m, 0] = x
            out[m, 1] = y
            grid[cy, cx] = m
            m += 1
    return out[:m]


def hardcore_seeds(
    rng: np.random.Generator,
    n: int,
    extent: tuple[float, float],
    min_distance: float,
    *,
    periodic: bool = True,
    attempts_per_seed: int = 50,
) -> np.ndarray:
    """Draw ``n`` seeds no closer than ``min_distance`` (random sequential adsorption).

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int
        Number of seeds.
    extent : (Lx, Ly)
        Specimen size in px.
    min_distance : float
        Hard-core distance in px (measured with the minimum image when ``periodic``).
    periodic : bool
        Whether the specimen wraps around.
    attempts_per_seed : int
        Candidates drawn per requested seed before giving up.

    Returns
    -------
    ndarray, shape (n, 2), float64

    Raises
    ------
    ValueError
        If ``n`` seeds cannot be placed: the covered fraction ``n π d² / (4 Lx Ly)`` approaches the
        RSA jamming limit (≈ 0.547).
    """
    if min_distance <= 0:
        raise ValueError(f"min_distance must be > 0 px, got {min_distance}")
    lx, ly = float(extent[0]), float(extent[1])
    cand = rng.random((n * attempts_per_seed, 2)) * np.array([lx, ly])
    out = _rsa(cand, n, lx, ly, float(min_distance), bool(periodic))
    if out.shape[0] < n:
        frac = n * math.pi * min_distance**2 / (4 * lx * ly)
        raise ValueError(
            f"could place only {out.shape[0]} of {n} seeds with min_distance={min_distance:g} px "
            f"(disc coverage {frac:.2f}; random sequential adsorption jams near 0.547): "
            "lower min_distance or the number of grains"
        )
    return out


def lognormal_weights(
    rng: np.random.Generator, n: int, mean_spacing: float, sigma: float
) -> np.ndarray:
    """Laguerre power weights ``w_i = (0.5 · s · r_i)²`` with ``r_i ~ LogNormal(0, sigma)``.

    Larger weights give larger cells; ``sigma = 0`` gives plain Voronoi.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int
    mean_spacing : float
        Mean seed spacing ``s`` in px (``sqrt(area / n)``).
    sigma : float
        Log-standard deviation of the radii.

    Returns
    -------
    ndarray, shape (n,), float64, px²
    """
    r = rng.lognormal(0.0, sigma, n)
    return (0.5 * mean_spacing * r) ** 2


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _build_grid(seeds, nx, ny, hx, hy):
    n = seeds.shape[0]
    cell_of = np.empty(n, dtype=np.int64)
    counts = np.zeros(nx * ny + 1, dtype=np.int64)
    for i in range(n):
        cx = min(max(int(math.floor(seeds[i, 0] / hx)), 0), nx - 1)
        cy = min(max(int(math.floor(seeds[i, 1] / hy)), 0), ny - 1)
        c = cy * nx + cx
        cell_of[i] = c
        counts[c + 1] += 1
    start = np.cumsum(counts)
    fill = start[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):  # stable: seeds keep their index order inside a cell
        c = cell_of[i]
        order[fill[c]] = i
        fill[c] += 1
    return start, order


@njit(cache=True, inline="always")
def _wrap_cell(j, n):
    """``(j mod n, j // n)`` for a cell index, without an integer division in the usual case of
    at most one period out (the tile and ring scans call this for every cell they visit)."""
    if 0 <= j < n:
        return j, 0
    if n <= j < 2 * n:
        return j - n, 1
    if -n <= j < 0:
        return j + n, -1
    g = j % n
    return g, (j - g) // n


@njit(cache=True, inline="always")
def _ring_bounds(k, cx, cy, jy):
    """x-range of ring k on row jy (full row on the top/bottom edge, two cells otherwise)."""
    if jy == cy - k or jy == cy + k:
        return cx - k, cx + k, 1
    return cx - k, cx + k, 2 * k if k > 0 else 1


@njit(cache=True)
def _visit_ring(k, cx, cy, x, y, sx, sy, sw, start, nx, ny, lx, ly, periodic, radical,
                best, bid, bx, by, bd):
    """Visit the seeds (and periodic images) of ring ``k`` of grid cells around ``(cx, cy)``.

    ``radical=False``: update the nearest seed (``best`` power distance, index ``bid`` at
    ``(bx, by)``).  ``radical=True``: update ``bd``, the smallest distance to a radical line
    between the nearest seed and another one.
    """
    for jy in range(cy - k, cy + k + 1):
        x0, x1, step = _ring_bounds(k, cx, cy, jy)
        if periodic:
            gy, wy = _wrap_cell(jy, ny)
            shy = ly * wy
        elif jy < 0 or jy >= ny:
            continue
        else:
            gy = jy
            shy = 0.0
        jx = x0
        while jx <= x1:
            if periodic:
                gx, wx = _wrap_cell(jx, nx)
                shx = lx * wx
            else:
                gx = jx
                shx = 0.0
            if periodic or 0 <= jx < nx:
                c = gy * nx + gx
                for t in range(start[c], start[c + 1]):
                    px = sx[t] + shx
                    py = sy[t] + shy
                    dx = x - px
                    dy = y - py
                    p = dx * dx + dy * dy - sw[t]
                    if not radical:
                        if p < best:
                            best = p
                            bid = t
                            bx = px
                            by = py
                        continue
                    ex = px - bx
                    ey = py - by
                    sep2 = ex * ex + ey * ey
                    if sep2 == 0.0:
                        continue  # the nearest seed itself (or an exact duplicate)
                    dist = (p - best) / (2.0 * math.sqrt(sep2))
                    if dist < bd:
                        bd = dist
            jx += step
    return best, bid, bx, by, bd


@njit(cache=True)
def _label_one(x, y, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap):
    """Nearest seed id and capped boundary distance of one point (see module docstring)."""
    if periodic:
        x = x - lx * math.floor(x / lx)
        y = y - ly * math.floor(y / ly)
    cx = int(math.floor(x / hx))
    cy = int(math.floor(y / hy))
    fx = x - cx * hx
    fy = y - cy * hy
    m = max(min(min(fx, hx - fx), min(fy, hy - fy)), 0.0)
    hmin = min(hx, hy)
    # rings needed to cover the whole grid (non-periodic)
    kmax = max(max(max(cx, nx - 1 - cx), max(cy, ny - 1 - cy)), 0)
    # pass 1: nearest seed in power distance; unvisited seeds lie beyond lb = k·h + m
    best, bid, bx, by, bd = np.inf, -1, 0.0, 0.0, cap
    k = 0
    while True:
        best, bid, bx, by, bd = _visit_ring(k, cx, cy, x, y, sx, sy, sw, start, nx, ny, lx, ly,
                                            periodic, False, best, bid, bx, by, bd)
        lb = k * hmin + m
        if (bid >= 0 and lb * lb >= best) or ((not periodic) and k >= kmax):
            break
        k += 1
    d1 = math.sqrt((x - bx) ** 2 + (y - by) ** 2)
    # pass 2: distance to the nearest radical line
    k = 0
    while True:
        best, bid, bx, by, bd = _visit_ring(k, cx, cy, x, y, sx, sy, sw, start, nx, ny, lx, ly,
                                            periodic, True, best, bid, bx, by, bd)
        lb = k * hmin + m
        if (lb * lb >= best and (lb * lb - best) >= 2.0 * (lb + d1) * bd) or (
            (not periodic) and k >= kmax
        ):
            break
        k += 1
    return sid[bid], max(bd, 0.0)


@njit(parallel=True, cache=True)
def _label_kernel(xs, ys, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap, gid, dist):
    n = xs.shape[0]
    for i in prange(n):
        g, d = _label_one(xs[i], ys[i], sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap)
        gid[i] = g
        dist[i] = d


# --------------------------------------------------------------------------------------------
# tile candidate lists (the fast path for a finite distance cap)
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _rect_dist(px, py, x0, y0, x1, y1):
    dx = max(max(x0 - px, px - x1), 0.0)
    dy = max(max(y0 - py, py - y1), 0.0)
    return math.sqrt(dx * dx + dy * dy)


@njit(cache=True, inline="always")
def _may_matter(dcs, w, u, cap):
    """Whether a seed at (hair-low) distance ``dcs`` from a tile, weight ``w ≤ 0``, can be nearest
    somewhere in the tile or have a radical line closer than ``cap`` to a point of the tile whose
    nearest seed ``o`` has ``π_o ≤ u`` (``u``: the tile's upper bound of the nearest power
    distance).  Conservative (margins keep doubtful seeds), so dropping the others changes no
    label: with ``a = |x − q| ≥ dcs`` and ``b = |x − o| ≤ B = √u`` the line distance is
    ``d ≥ (a² − w − u) / (2 (a + B)) = g(a)``, whose minimum over ``a ≥ dcs`` is ``g(dcs)`` where
    ``g`` increases (``a² + 2aB ≥ −w − u``), else ``a* = √(B² − w − u) − B`` (``g(a*) = a*``)."""
    um = u + 1e-6 * (1.0 + abs(u))
    if dcs * dcs - w <= um:
        return True  # may be nearest
    b = math.sqrt(max(um, 0.0)) * (1.0 + 1e-9) + 1e-9
    c = -w - um
    if c <= 0.0 or dcs * dcs + 2.0 * dcs * b >= c:
        lb = (dcs * dcs + c) / (2.0 * (dcs + b))
    else:
        lb = math.sqrt(b * b + c) - b
    return lb < cap * (1.0 + 1e-6) + 1e-6


@njit(cache=True, inline="always")
def _grid_window(x0, y0, x1, y1, radius, hx, hy, nx, ny, periodic):
    """Grid cells ``jx0..jx1``, ``jy0..jy1`` (inclusive; beyond the grid for periodic images,
    else clipped to it) that hold every seed within ``radius`` of the rectangle
    ``[x0, x1] × [y0, y1]`` (grid cells ``hx × hy``, ``nx × ny`` of them)."""
    jx0 = int(math.floor((x0 - radius) / hx))
    jx1 = int(math.floor((x1 + radius) / hx))
    jy0 = int(math.floor((y0 - radius) / hy))
    jy1 = int(math.floor((y1 + radius) / hy))
    if not periodic:
        jx0 = max(jx0, 0)
        jy0 = max(jy0, 0)
        jx1 = min(jx1, nx - 1)
        jy1 = min(jy1, ny - 1)
    return jx0, jx1, jy0, jy1


@njit(cache=True)
def _tile_scan(sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic,
               x0, y0, x1, y1, radius, fill, out_xyw, out_id, out_dc, pos, u=np.inf, cap=0.0):
    """Visit every seed (and periodic image) within ``radius`` of the rectangle; count or store.
    The grid cells of a window row that lie in one period are consecutive in the seed arrays
    (cell-major order): each such run is one loop, in the order of its cells (so the same
    candidates in the same order as cell by cell, with fewer loop exits to mispredict).
    With a finite ``u`` (the tile's nearest-power bound) seeds that :func:`_may_matter` rules
    out are skipped (Laguerre weights: the radius is set by the largest weight)."""
    prune = u < np.inf
    jx0, jx1, jy0, jy1 = _grid_window(x0, y0, x1, y1, radius, hx, hy, nx, ny, periodic)
    count = 0
    for jy in range(jy0, jy1 + 1):
        gy, wy = _wrap_cell(jy, ny)
        shy = ly * wy
        jx = jx0
        while jx <= jx1:  # runs of cells in one period: their seeds are consecutive
            gx, wx = _wrap_cell(jx, nx)
            shx = lx * wx
            c = gy * nx + gx
            last = min(jx1, jx + nx - 1 - gx)
            ta = start[c]
            tb = start[c + last - jx + 1]
            jx = last + 1
            if fill and not prune:  # store every seed, keep it by counting it: no branch
                for t in range(ta, tb):
                    px = sx[t] + shx
                    py = sy[t] + shy
                    dc = _rect_dist(px, py, x0, y0, x1, y1)
                    out_xyw[pos + count, 0] = px
                    out_xyw[pos + count, 1] = py
                    out_xyw[pos + count, 2] = sw[t]
                    out_id[pos + count] = sid[t]
                    out_dc[pos + count] = max(dc - 1e-9 * (1.0 + dc), 0.0)
                    count += 1 if dc < radius else 0
                continue
            for t in range(ta, tb):
                px = sx[t] + shx
                py = sy[t] + shy
                dc = _rect_dist(px, py, x0, y0, x1, y1)
                if dc < radius:
                    if prune and not _may_matter(max(dc - 1e-9 * (1.0 + dc), 0.0), sw[t], u,
                                                 cap):
                        continue
                    if fill:
                        out_xyw[pos + count, 0] = px
                        out_xyw[pos + count, 1] = py
                        out_xyw[pos + count, 2] = sw[t]
                        out_id[pos + count] = sid[t]
                        # a hair below the true distance so that rounding never ends a search early
                        out_dc[pos + count] = max(dc - 1e-9 * (1.0 + dc), 0.0)
                    count += 1
    return count


@njit(cache=True)
def _tile_upper_bound(sx, sy, sw, start, nx, ny, hx, hy, lx, ly, periodic, x0, y0, x1, y1):
    """U = min_q max_corner π_q: an upper bound of the nearest power distance over the tile."""
    radius = max(hx, hy)
    while True:
        jx0, jx1, jy0, jy1 = _grid_window(x0, y0, x1, y1, radius, hx, hy, nx, ny, periodic)
        u = np.inf
        for jy in range(jy0, jy1 + 1):
            gy, wy = _wrap_cell(jy, ny)
            shy = ly * wy
            jx = jx0
            while jx <= jx1:  # runs of cells in one period (as in _tile_scan)
                gx, wx = _wrap_cell(jx, nx)
                shx = lx * wx
                c = gy * nx + gx
                last = min(jx1, jx + nx - 1 - gx)
                ta = start[c]
                tb = start[c + last - jx + 1]
                jx = last + 1
                for t in range(ta, tb):
                    px = sx[t] + shx
                    py = sy[t] + shy
                    ax = max(abs(px - x0), abs(px - x1))
                    ay = max(abs(py - y0), abs(py - y1))
                    v = ax * ax + ay * ay - sw[t]
                    if v < u:
                        u = v
        if u < np.inf:
            return u
        radius *= 2.0


@njit(cache=True)
def _sort_candidates(xyw, ids, dc, a, b):
    """Stable in-place insertion sort of candidates ``a..b-1`` by ``dc`` (lists are short;
    no allocation, so the parallel tile build does not contend on the allocator)."""
    for i in range(a + 1, b):
        d = dc[i]
        x0 = xyw[i, 0]
        x1 = xyw[i, 1]
        x2 = xyw[i, 2]
        g = ids[i]
        j = i - 1
        while j >= a and dc[j] > d:
            dc[j + 1] = dc[j]
            xyw[j + 1, 0] = xyw[j, 0]
            xyw[j + 1, 1] = xyw[j, 1]
            xyw[j + 1, 2] = xyw[j, 2]
            ids[j + 1] = ids[j]
            j -= 1
        dc[j + 1] = d
        xyw[j + 1, 0] = x0
        xyw[j + 1, 1] = x1
        xyw[j + 1, 2] = x2
        ids[j + 1] = g


@njit(cache=True)
def _sort_lines(lines, a, b):
    """Stable in-place insertion sort of lines ``a..b-1`` (rows ``[lmin, ax, ay, c]``) by lmin."""
    for i in range(a + 1, b):
        l0 = lines[i, 0]
        l1 = lines[i, 1]
        l2 = lines[i, 2]
        l3 = lines[i, 3]
        j = i - 1
        while j >= a and lines[j, 0] > l0:
            lines[j + 1, 0] = lines[j, 0]
            lines[j + 1, 1] = lines[j, 1]
            lines[j + 1, 2] = lines[j, 2]
            lines[j + 1, 3] = lines[j, 3]
            j -= 1
        lines[j + 1, 0] = l0
        lines[j + 1, 1] = l1
        lines[j + 1, 2] = l2
        lines[j + 1, 3] = l3


@njit(parallel=True, cache=True)
def _build_tiles(sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap, tnx, tny, tiles,
                 xyw, ids, dc):
    """Candidate lists of the tiles ``tiles`` (ids ``ty·tnx + tx``): tile ``m`` of the list
    has ``tcount[m]`` candidates from slot ``tstart[m]``, sorted by distance to the tile.
    ``xyw``, ``ids``, ``dc``: scratch arrays, used if long enough (else new ones); returns
    ``(tstart, tcount, xyw, ids, dc)``."""
    thx = lx / tnx
    thy = ly / tny
    nt = tiles.shape[0]
    radius = np.empty(nt)
    ubound = np.empty(nt)
    # plain Voronoi (all w = 0): every seed within the radius may matter, no pruning
    weighted = False
    for t in range(sw.shape[0]):
        if sw[t] < 0.0:
            weighted = True
            break
    counts = np.zeros(nt + 1, dtype=np.int64)
    for m in prange(nt):  # tiles are independent: any thread count gives the same lists
        k = tiles[m]
        ty = k // tnx
        tx = k - ty * tnx
        x0 = tx * thx
        y0 = ty * thy
        x1 = x0 + thx
        y1 = y0 + thy
        u = _tile_upper_bound(sx, sy, sw, start, nx, ny, hx, hy, lx, ly, periodic, x0, y0, x1, y1)
        # every seed that can be nearest, or whose radical line can lie closer than cap
        r = 2.0 * cap + math.sqrt(max(u, 0.0)) + 1e-9 * (1.0 + cap)
        radius[m] = r
        ubound[m] = u if weighted else np.inf
        # a slot for every seed of the grid cells the scan visits (a bound, so one scan fills)
        counts[m + 1] = _window_seeds(start, nx, ny, hx, hy, periodic, x0, y0, x1, y1, r)
    tstart = np.cumsum(counts)
    mm = tstart[-1]
    if xyw.shape[0] < mm:  # fresh memory is page-faulted in: reuse the caller's scratch
        xyw = np.empty((mm + mm // 4, 3))
    if ids.shape[0] < mm:
        ids = np.empty(mm + mm // 4, dtype=np.int32)
    if dc.shape[0] < mm:
        dc = np.empty(mm + mm // 4)
    tcount = np.empty(nt, dtype=np.int64)
    for m in prange(nt):
        k = tiles[m]
        ty = k // tnx
        tx = k - ty * tnx
        x0 = tx * thx
        y0 = ty * thy
        c = _tile_scan(sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic,
                       x0, y0, x0 + thx, y0 + thy, radius[m], True, xyw, ids, dc, tstart[m],
                       ubound[m], cap)
        tcount[m] = c
        _sort_candidates(xyw, ids, dc, tstart[m], tstart[m] + c)
    return tstart, tcount, xyw, ids, dc


@njit(cache=True)
def _window_seeds(start, nx, ny, hx, hy, periodic, x0, y0, x1, y1, radius):
    """Number of seeds (with periodic images) in the grid cells :func:`_tile_scan` visits for
    this rectangle and radius: a bound on the candidates it finds."""
    jx0, jx1, jy0, jy1 = _grid_window(x0, y0, x1, y1, radius, hx, hy, nx, ny, periodic)
    count = 0
    for jy in range(jy0, jy1 + 1):
        gy, _ = _wrap_cell(jy, ny)
        jx = jx0
        while jx <= jx1:  # runs of cells in one period (as in _tile_scan)
            gx, _ = _wrap_cell(jx, nx)
            c = gy * nx + gx
            last = min(jx1, jx + nx - 1 - gx)
            count += start[c + last - jx + 1] - start[c]
            jx = last + 1
    return count


@njit(cache=True, inline="always")
def _tile_u(a, b, xyw, x0, y0, x1, y1):
    """U: an upper bound of the nearest power distance anywhere in the tile (with a margin).  A
    candidate whose power distance exceeds U over the whole tile (``dc² − w > U``, ``dc`` a hair
    low) is never nearest there."""
    u = np.inf
    for t in range(a, b):
        ax = max(abs(xyw[t, 0] - x0), abs(xyw[t, 0] - x1))
        ay = max(abs(xyw[t, 1] - y0), abs(xyw[t, 1] - y1))
        u = min(u, ax * ax + ay * ay - xyw[t, 2])
    return u + 1e-9 * (1.0 + abs(u))


@njit(cache=True)
def _tile_owner_lines(a, b, xyw, dc, x0, y0, x1, y1, cap, fill, oxyw, oid, ids, lcount, lines,
                      opos, lpos):
    """Owners of one closed tile and, per owner, its radical lines (affine in the point).

    The candidates ``a..b-1`` (sorted by distance to the tile) hold every seed that can be nearest
    anywhere in the tile and every seed whose radical line with the nearest can lie closer than
    ``cap``.  A candidate ``q`` is an *owner* unless some other candidate ``p`` has a smaller power
    distance at all four corners (``π_q − π_p`` is affine, so then everywhere in the tile) with a
    margin: owners are a superset of the seeds nearest somewhere in the tile, in candidate order.
    For owner ``o`` the boundary distance of a point ``x`` it owns is
    ``min_q (π_q(x) − π_o(x)) / (2 |q − o|) = min_q (a_q · x + c_q)``; lines that stay at or beyond
    ``cap`` over the whole tile (minimum at a corner) are dropped, the rest stored with that
    minimum (``lmin``, a hair low: a lower bound of the line's distance over the tile, see
    :func:`_tile_point`) and sorted by it; a line is stored as the row ``[lmin, a_x, a_y, c]`` (one cache line holds two).
    Returns (number of owners, number of lines); ``fill`` writes them at ``opos`` / ``lpos``.
    """
    u = _tile_u(a, b, xyw, x0, y0, x1, y1)
    no = 0
    nl = 0
    for q in range(a, b):
        if dc[q] * dc[q] - xyw[q, 2] > u:
            continue
        owner = True
        for p in range(a, b):
            if p == q:
                continue
            lo = np.inf
            scale = 0.0
            for corner in range(4):
                cx = x0 if corner % 2 == 0 else x1
                cy = y0 if corner < 2 else y1
                dqx = cx - xyw[q, 0]
                dqy = cy - xyw[q, 1]
                dpx = cx - xyw[p, 0]
                dpy = cy - xyw[p, 1]
                pq = dqx * dqx + dqy * dqy - xyw[q, 2]
                pp = dpx * dpx + dpy * dpy - xyw[p, 2]
                lo = min(lo, pq - pp)
                scale = max(scale, abs(pq) + abs(pp))
            if lo > 1e-9 * (1.0 + scale):  # p beats q everywhere in the tile
                owner = False
                break
        if not owner:
            continue
        px = xyw[q, 0]
        py = xyw[q, 1]
        n = 0
        for t in range(a, b):
            ex = xyw[t, 0] - px
            ey = xyw[t, 1] - py
            sep = math.sqrt(ex * ex + ey * ey)
            if t == q or sep == 0.0:
                continue
            ax = -ex / sep
            ay = -ey / sep
            c = (xyw[t, 0] ** 2 + xyw[t, 1] ** 2 - px * px - py * py - xyw[t, 2] + xyw[q, 2]) / (
                2.0 * sep)
            m = min(min(ax * x0 + ay * y0, ax * x1 + ay * y0),
                    min(ax * x0 + ay * y1, ax * x1 + ay * y1)) + c
            if m >= cap:
                continue
            if fill:
                j = lpos + nl + n
                lines[j, 0] = m - 1e-9 * (1.0 + abs(m) + abs(c))
                lines[j, 1] = ax
                lines[j, 2] = ay
                lines[j, 3] = c
            n += 1
        if fill:
            j = opos + no
            oxyw[j, 0] = px
            oxyw[j, 1] = py
            oxyw[j, 2] = xyw[q, 2]
            oid[j] = ids[q]
            lcount[j] = n
            _sort_lines(lines, lpos + nl, lpos + nl + n)
        no += 1
        nl += n
    return no, nl


@njit(parallel=True, cache=True)
def _build_owners(tiles, tstart, tcount, xyw, ids, dc, tnx, tny, lx, ly, cap, s_xyw, s_id,
                  s_lc, s_lines):
    """Owners of the tiles ``tiles`` and per owner its lines, each tile computed into slots
    sized by a cheap bound (owners ≤ candidates within U, lines ≤ owners × (candidates − 1));
    :func:`_pack_owners` packs them.  ``s_xyw``, ``s_id``, ``s_lc``, ``s_lines``: scratch
    slot arrays, used if long enough.  Returns (owners per tile, lines per tile, owner slot
    starts, line slot starts, slot xyw, slot ids, slot line counts, slot lines)."""
    thx = lx / tnx
    thy = ly / tny
    nt = tiles.shape[0]
    cap_o = np.zeros(nt + 1, dtype=np.int64)
    cap_l = np.zeros(nt + 1, dtype=np.int64)
    for m in prange(nt):
        k = tiles[m]
        ty = k // tnx
        tx = k - ty * tnx
        a = tstart[m]
        b = a + tcount[m]
        u = _tile_u(a, b, xyw, tx * thx, ty * thy, (tx + 1) * thx, (ty + 1) * thy)
        nu = 0
        for q in range(a, b):
            if not dc[q] * dc[q] - xyw[q, 2] > u:
                nu += 1
        cap_o[m + 1] = nu
        cap_l[m + 1] = nu * max(b - a - 1, 0)
    co = np.cumsum(cap_o)
    cl = np.cumsum(cap_l)
    no = co[-1]
    if s_xyw.shape[0] < no:
        s_xyw = np.empty((no + no // 4, 3))
    if s_id.shape[0] < no:
        s_id = np.empty(no + no // 4, dtype=np.int32)
    if s_lc.shape[0] < no:
        s_lc = np.empty(no + no // 4, dtype=np.int64)
    if s_lines.shape[0] < cl[-1]:
        s_lines = np.empty((cl[-1] + cl[-1] // 4, 4))
    ocount = np.zeros(nt, dtype=np.int64)
    tlines = np.zeros(nt, dtype=np.int64)
    for m in prange(nt):
        k = tiles[m]
        ty = k // tnx
        tx = k - ty * tnx
        no, nl = _tile_owner_lines(tstart[m], tstart[m] + tcount[m], xyw, dc, tx * thx, ty * thy,
                                   (tx + 1) * thx, (ty + 1) * thy, cap, True, s_xyw, s_id, ids,
                                   s_lc, s_lines, co[m], cl[m])
        ocount[m] = no
        tlines[m] = nl
    return ocount, tlines, co, cl, s_xyw, s_id, s_lc, s_lines


@njit(parallel=True, cache=True)
def _pack_owners(tiles, ocount, tlines, co, cl, s_xyw, s_id, s_lc, s_lines, o0, l0,
                 trange, oxyw, oid, lrange, lines):
    """Append the owners and lines of :func:`_build_owners` to the pools from positions
    ``o0`` / ``l0`` and point ``trange[k]`` (owner range of tile k) at them.  A tile's owners
    are consecutive, in candidate order, and so are their lines (``lrange``: owner → range)."""
    nt = tiles.shape[0]
    ostart = np.empty(nt, dtype=np.int64)
    lst = np.empty(nt, dtype=np.int64)
    po = o0
    pl = l0
    for m in range(nt):
        ostart[m] = po
        lst[m] = pl
        po += ocount[m]
        pl += tlines[m]
    for m in prange(nt):
        k = tiles[m]
        lpos = lst[m]
        for q in range(ocount[m]):
            src = co[m] + q
            dst = ostart[m] + q
            oxyw[dst, 0] = s_xyw[src, 0]
            oxyw[dst, 1] = s_xyw[src, 1]
            oxyw[dst, 2] = s_xyw[src, 2]
            oid[dst] = s_id[src]
            lrange[dst, 0] = lpos
            lpos += s_lc[src]
            lrange[dst, 1] = lpos
        for q in range(tlines[m]):
            src = cl[m] + q
            dst = lst[m] + q
            lines[dst, 0] = s_lines[src, 0]
            lines[dst, 1] = s_lines[src, 1]
            lines[dst, 2] = s_lines[src, 2]
            lines[dst, 3] = s_lines[src, 3]
        trange[k, 0] = ostart[m]
        trange[k, 1] = ostart[m] + ocount[m]


@njit(cache=True, inline="always")
def _wrap(x, lx):
    """``x − lx·floor(x/lx)``: ``x`` itself inside ``[0, lx)``, one addition/subtraction (no
    division) one period out, where the quotient's floor is ±1 and ``x − lx`` is exact.  May return
    ``lx`` itself after rounding (``x`` a hair below 0), as the formula does; callers clamp the
    tile index."""
    if x < lx:
        if x >= 0.0:
            return x
        if x >= -lx:
            return x + lx
    elif x < 2.0 * lx:
        return x - lx
    return x - lx * math.floor(x / lx)


@njit(cache=True, inline="always")
def _tile_point(x, y, inv_thx, inv_thy, tnx, tny, cap, trange, oxyw, oid, lrange, lines):
    """Grain id, capped boundary distance and tile of one (wrapped) point from the tile lists;
    a tile not built yet has the sentinel owner 0 (id ``-2``, no lines).

    Every line of the owner is evaluated, without stopping at the first whose stored minimum
    ``lmin`` reaches the best distance so far: the lines beyond it (sorted by ``lmin``) are never
    strictly closer (``lmin`` is a lower bound of the line's distance over the closed tile, with
    a margin of ~1e-9 relative that covers rounding and the tile index of points an ulp outside),
    so ``d < bd`` keeps the same value, signed zeros included, and the data-dependent loop exit
    (~1.5-2 lines per owner) cost more than the lines it skipped (2.6 -> 2.35 ms per 512² frame).
    """
    tx = min(int(x * inv_thx), tnx - 1)
    ty = min(int(y * inv_thy), tny - 1)
    k = ty * tnx + tx
    a = trange[k, 0]
    b = trange[k, 1]
    j = a
    nb = b - a
    if nb <= 2:  # one or two owners (~85 % of tiles), by selects: no branch on the count
        t1 = a + (nb >> 1)  # (a again for one owner: then p1 == p0 and j stays a)
        dx = x - oxyw[a, 0]
        dy = y - oxyw[a, 1]
        p0 = dx * dx + dy * dy - oxyw[a, 2]
        dx = x - oxyw[t1, 0]
        dy = y - oxyw[t1, 1]
        p1 = dx * dx + dy * dy - oxyw[t1, 2]
        j = t1 if p1 < p0 else a
    else:  # nearest owner in power distance (first in candidate order on a tie)
        best = np.inf
        for t in range(a, b):
            dx = x - oxyw[t, 0]
            dy = y - oxyw[t, 1]
            p = dx * dx + dy * dy - oxyw[t, 2]
            if p < best:
                best = p
                j = t
    bd = cap
    for t in range(lrange[j, 0], lrange[j, 1]):
        d = lines[t, 1] * x + lines[t, 2] * y + lines[t, 3]
        if d < bd:
            bd = d
    return oid[j], max(bd, 0.0), k


@njit(parallel=True, cache=True)
def _tile_kernel(xs, ys, tnx, tny, lx, ly, periodic, cap, trange, oxyw, oid, lrange, lines,
                 gid, dist):
    """Label points from the tile owner lists.  Non-periodic points outside the specimen box get
    ``gid = -1`` (left to the ring search), points in a tile not built yet ``gid = -2`` (left
    to :func:`_tile_fix`; not counted here: a per-point count costs ~4 % of the kernel).
    Returns the number of points outside."""
    inv_thx = tnx / lx
    inv_thy = tny / ly
    n = xs.shape[0]
    outside = 0
    for i in prange(n):
        x = xs[i]
        y = ys[i]
        if periodic:
            x = _wrap(x, lx)
            y = _wrap(y, ly)
        elif x < 0.0 or y < 0.0 or x >= lx or y >= ly:
            gid[i] = -1
            outside += 1
            continue
        g, d, _ = _tile_point(x, y, inv_thx, inv_thy, tnx, tny, cap, trange, oxyw, oid, lrange,
                              lines)
        gid[i] = g
        dist[i] = d
    return outside


@njit(parallel=True, cache=True)
def _tile_fix(xs, ys, tnx, tny, lx, ly, periodic, cap, trange, oxyw, oid, lrange, lines, gid,
              dist, need, mark):
    """The points :func:`_tile_kernel` left with ``gid = -2``: ``mark`` sets ``need[k] = 1``
    for their tiles, else (once those are built) labels them."""
    inv_thx = tnx / lx
    inv_thy = tny / ly
    for i in prange(xs.shape[0]):
        if gid[i] != -2:
            continue
        x = xs[i]
        y = ys[i]
        if periodic:
            x = _wrap(x, lx)
            y = _wrap(y, ly)
        g, d, k = _tile_point(x, y, inv_thx, inv_thy, tnx, tny, cap, trange, oxyw, oid, lrange,
                              lines)
        if mark:
            need[k] = 1  # (threads may store the same 1 concurrently)
        else:
            gid[i] = g
            dist[i] = d


class _TilePool:
    """Tile owner lists of one tessellation and cap, built lazily: only the tiles that labelled
    points fall in (a frame sees part of a larger specimen).  ``trange[k]`` is the owner range
    of tile ``k`` in the pools (``(0, 1)``, the sentinel owner: not built); owners (``oxyw``, ``oid``, ``lrange``) and
    lines are appended as tiles are built.  A tile's lists depend on the tile alone, so the
    labels do not depend on which tiles were built before, or in which batches.  ``lock``
    serialises building and labelling from several Python threads (a build may reallocate
    the pools a concurrent kernel reads)."""

    def __init__(self, grid: tuple, extent: tuple[float, float], periodic: bool, cap: float,
                 tnx: int, tny: int) -> None:
        self.grid = grid  # not the tessellation itself: no reference cycle through its cache
        self.extent = extent
        self.periodic = periodic
        self.cap = cap
        self.tnx = tnx
        self.tny = tny
        # owner 0 is a sentinel (id -2, no lines) that every tile not built yet points at, so
        # the kernel needs no test for them; a built tile's owners start at 1
        self.trange = np.zeros((tnx * tny, 2), dtype=np.int64)
        self.trange[:, 1] = 1
        self.oxyw = np.zeros((1, 3))
        self.oid = np.full(1, -2, dtype=np.int32)
        self.lrange = np.zeros((1, 2), dtype=np.int64)
        self.lines = np.empty((0, 4))
        self.n_owners = 1
        self.n_lines = 0
        self.n_built = 0
        self.lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return self.n_built == self.tnx * self.tny

    def build(self, tiles: np.ndarray) -> None:
        """Build the tiles ``tiles`` (ids ``ty·tnx + tx``, none built yet)."""
        tiles = np.ascontiguousarray(tiles, dtype=np.int64)
        if tiles.size == 0:
            return
        sx, sy, sw, sid, start, nx, ny, hx, hy = self.grid
        lx, ly = self.extent
        sc = _scratch()
        # a frame's batch (~1-3k tiles, 1-3 ms) runs on this thread: its five parallel regions
        # would cost more than they save where other processes share the cores (a region waits
        # for its slowest thread: 2 threads, load 4 on 2 cores: 110 instead of 51 ms/sample)
        # (and with one Numba thread every batch does: the parallel variants would only add
        # their launch and, once per process, loading them from the cache, ~25 ms)
        par = tiles.size >= _PARALLEL_BUILD_TILES and get_num_threads() > 1
        build_tiles, build_owners, pack_owners = (
            (_build_tiles, _build_owners, _pack_owners) if par
            else (_build_tiles_serial, _build_owners_serial, _pack_owners_serial))
        tstart, tcount, xyw, ids, dc = build_tiles(
            sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, self.periodic, self.cap, self.tnx,
            self.tny, tiles, sc["xyw"], sc["ids"], sc["dc"])
        ocount, tlines, co, cl, s_xyw, s_id, s_lc, s_lines = build_owners(
            tiles, tstart, tcount, xyw, ids, dc, self.tnx, self.tny, lx, ly, self.cap,
            sc["s_xyw"], sc["s_id"], sc["s_lc"], sc["s_lines"])
        sc.update(xyw=xyw, ids=ids, dc=dc, s_xyw=s_xyw, s_id=s_id, s_lc=s_lc, s_lines=s_lines)
        no = self.n_owners + int(ocount.sum())
        nl = self.n_lines + int(tlines.sum())
        # the first batch sizes the pools for every tile (pages never written are never
        # faulted in, so the reserve costs nothing); later growth is geometric
        nt = self.tnx * self.tny
        full = self.n_built + int(tiles.size)
        if no > self.oid.shape[0]:
            size = max(no, 2 * self.oid.shape[0], int(1.25 * no * nt / full))
            self.oxyw = _grown(self.oxyw, size, self.n_owners)
            self.oid = _grown(self.oid, size, self.n_owners)
            self.lrange = _grown(self.lrange, size, self.n_owners)
        if nl > self.lines.shape[0]:
            size = max(nl, 2 * self.lines.shape[0], int(1.25 * nl * nt / full))
            self.lines = _grown(self.lines, size, self.n_lines)
        pack_owners(tiles, ocount, tlines, co, cl, s_xyw, s_id, s_lc, s_lines,
                     self.n_owners, self.n_lines, self.trange, self.oxyw, self.oid, self.lrange,
                     self.lines)
        self.n_owners = no
        self.n_lines = nl
        self.n_built += int(tiles.size)

    def _span(self, lo: float, hi: float, length: float, nt: int) -> np.ndarray:
        """Tile columns (or rows) that points with coordinates in ``[lo, hi]`` fall in: the
        kernel's index of each end (wrapped when periodic), all between (cyclically) and one
        more each side."""
        if self.periodic and hi - lo >= length * (1.0 - 1.0 / nt):
            return np.arange(nt)

        def index(v: float) -> int:
            if self.periodic:
                v = v - length * math.floor(v / length)
            return min(max(int(v * (nt / length)), 0), nt - 1)

        a, b = index(lo), index(hi)
        if self.periodic and b < a:  # wrapped around (at most once: hi - lo < length)
            b += nt
        a, b = a - 1, b + 1  # a tile of margin each side, for rounding
        if not self.periodic:
            return np.arange(max(a, 0), min(b, nt - 1) + 1)
        if b - a + 1 >= nt:
            return np.arange(nt)
        return np.arange(a, b + 1) % nt  # cyclically

    def build_box(self, x0: float, x1: float, y0: float, y1: float) -> None:
        """Build the tiles not built yet that points in the box ``[x0, x1] × [y0, y1]`` fall in
        (those the kernel finds elsewhere, after rounding, it builds itself)."""
        lx, ly = self.extent
        cols = self._span(x0, x1, lx, self.tnx)
        rows = self._span(y0, y1, ly, self.tny)
        tiles = (rows[:, None] * self.tnx + cols[None, :]).ravel()
        self.build(tiles[self.trange[tiles, 0] == 0])

    def build_all(self) -> None:
        """Build every tile not built yet."""
        if not self.complete:
            self.build(np.flatnonzero(self.trange[:, 0] == 0))


#: batches of at least this many tiles are built in parallel (Numba threads), smaller ones on
#: the calling thread by the same functions compiled without ``parallel`` (same results)
_PARALLEL_BUILD_TILES = 4096
_build_tiles_serial = njit(cache=True)(_build_tiles.py_func)
_build_owners_serial = njit(cache=True)(_build_owners.py_func)
_pack_owners_serial = njit(cache=True)(_pack_owners.py_func)
_SCRATCH = threading.local()
_POOL_LOCK = threading.Lock()


def _scratch() -> dict:
    """This thread's scratch arrays of the tile build (grow-only, reused by every build: the
    temporaries of a specimen's build are several MB, and fresh memory costs a page fault per
    4 KiB, ~1.5 us each on the virtual machines measured: as much as a third of the build)."""
    d = getattr(_SCRATCH, "arrays", None)
    if d is None:
        d = _SCRATCH.arrays = dict(
            xyw=np.empty((0, 3)), ids=np.empty(0, dtype=np.int32), dc=np.empty(0),
            s_xyw=np.empty((0, 3)), s_id=np.empty(0, dtype=np.int32),
            s_lc=np.empty(0, dtype=np.int64), s_lines=np.empty((0, 4)))
    return d


def _grown(a: np.ndarray, size: int, used: int) -> np.ndarray:
    out = np.empty((size,) + a.shape[1:], dtype=a.dtype)
    out[:used] = a[:used]
    return out


@njit(parallel=True, cache=True)
def _label_subset(idx, xs, ys, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap,
                  gid, dist):
    for m in prange(idx.shape[0]):
        i = idx[m]
        g, d = _label_one(xs[i], ys[i], sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic,
                          cap)
        gid[i] = g
        dist[i] = d


@dataclass(frozen=True)
class Tessellation:
    """A Voronoi/Laguerre tessellation of a rectangular specimen.

    Parameters
    ----------
    seeds : ndarray, shape (n, 2), float64
        Seed positions ``(x, y)`` in px, inside ``[0, Lx) × [0, Ly)``.
    extent : (Lx, Ly)
        Specimen size in px.
    weights : ndarray, shape (n,), float64, optional
        Power weights in px² (larger → bigger cell). ``None`` → plain Voronoi.
    periodic : bool
        Whether the specimen is a periodic tile (points anywhere in the plane are wrapped).
    seeds_per_cell : float
        Mean number of seeds per acceleration-grid cell (a speed knob, not a result knob).
    """

    seeds: np.ndarray
    extent: tuple[float, float]
    weights: np.ndarray | None = None
    periodic: bool = True
    seeds_per_cell: float = 2.0
    tile_divisor: float = 4.0
    _grid: tuple = field(default=None, init=False, repr=False, compare=False)
    _tiles: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seeds = np.ascontiguousarray(self.seeds, dtype=np.float64)
        if seeds.ndim != 2 or seeds.shape[1] != 2 or seeds.shape[0] < 1:
            raise ValueError(f"seeds must have shape (n >= 1, 2), got {seeds.shape}")
        lx, ly = float(self.extent[0]), float(self.extent[1])
        if not (lx > 0 and ly > 0):
            raise ValueError(f"extent must be positive, got {self.extent}")
        if np.any(seeds < 0) or np.any(seeds[:, 0] >= lx) or np.any(seeds[:, 1] >= ly):
            raise ValueError("seeds must lie inside [0, Lx) x [0, Ly)")
        n = seeds.shape[0]
        w = np.zeros(n) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("weights must be finite")
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "extent", (lx, ly))
        object.__setattr__(self, "weights", None if self.weights is None else w)
        # grid of ~seeds_per_cell seeds per cell; the cells tile the specimen exactly
        h = math.sqrt(lx * ly * self.seeds_per_cell / n)
        nx = max(1, int(round(lx / h)))
        ny = max(1, int(round(ly / h)))
        hx, hy = lx / nx, ly / ny
        start, order = _build_grid(seeds, nx, ny, hx, hy)
        wn = w - w.max()  # the diagram is unchanged by a common shift; bounds need w <= 0
        grid = (
            np.ascontiguousarray(seeds[order, 0]),
            np.ascontiguousarray(seeds[order, 1]),
            np.ascontiguousarray(wn[order]),
            order.astype(np.int32),
            start,
            nx,
            ny,
            hx,
            hy,
        )
        object.__setattr__(self, "_grid", grid)

    def _tile_pool(self, cap: float) -> _TilePool:
        """The (lazily built) tile owner lists for boundary distances below ``cap`` (cached)."""
        pool = self._tiles.get(cap)
        if pool is None:
            with _POOL_LOCK:  # one pool per cap, also when threads ask at once
                pool = self._tiles.get(cap)
                if pool is None:
                    pool = self._new_pool(cap)
        return pool

    def _new_pool(self, cap: float) -> _TilePool:
        """An empty tile pool for ``cap`` (tiles of about a quarter of the seed spacing)."""
        lx, ly = self.extent
        spacing = math.sqrt(lx * ly / self.n_seeds)
        side = max(2.0, spacing / self.tile_divisor)
        tnx = max(1, int(round(lx / side)))
        tny = max(1, int(round(ly / side)))
        pool = self._tiles[cap] = _TilePool(self._grid, self.extent, bool(self.periodic), cap,
                                            tnx, tny)
        return pool

    def _tile_lists(self, cap: float) -> tuple:
        """Every tile's owner lists for boundary distances below ``cap``, all built (cached):
        ``(tnx, tny, trange, oxyw, oid, lrange, lines)``."""
        pool = self._tile_pool(cap)
        with pool.lock:
            pool.build_all()
        return (pool.tnx, pool.tny, pool.trange, pool.oxyw, pool.oid, pool.lrange, pool.lines)

    @property
    def n_seeds(self) -> int:
        """Number of seeds (grains, counting empty Laguerre cells)."""
        return int(self.seeds.shape[0])

    def label(
        self, x: np.ndarray, y: np.ndarray, max_distance: float = np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grain id and exact boundary distance at specimen coordinates.

        Parameters
        ----------
        x, y : ndarray, any shape (same for both), float
            Specimen coordinates in px.
        max_distance : float
            Cap on the returned distance in px; smaller caps are faster. ``inf`` → exact everywhere.

        Returns
        -------
        grain_id : ndarray, int32, shape of ``x``
            Index of the owning seed.
        distance : ndarray, float32, shape of ``x``
            Euclidean distance in px to the nearest grain boundary, ``min(d, max_distance)``.
        """
        return label_points(self, x, y, max_distance)


def label_points(
    tess: Tessellation, x: np.ndarray, y: np.ndarray, max_distance: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Functional form of :meth:`Tessellation.label`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    if not (max_distance > 0):
        raise ValueError(f"max_distance must be > 0 px, got {max_distance}")
    xs = np.ascontiguousarray(x.ravel())
    ys = np.ascontiguousarray(y.ravel())
    # the bounding box (min/max propagate NaN, so it also tells whether all are finite)
    bounds = (float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())) if xs.size \
        else (0.0, 0.0, 0.0, 0.0)
    if not all(math.isfinite(v) for v in bounds):
        raise ValueError("coordinates must be finite")
    sx, sy, sw, sid, start, nx, ny, hx, hy = tess._grid
    lx, ly = tess.extent
    periodic = bool(tess.periodic)
    gid = np.empty(xs.shape[0], dtype=np.int32)
    dist = np.empty(xs.shape[0], dtype=np.float32)
    cap = float(max_distance)
    if cap > 0.25 * min(lx, ly):  # (incl. inf) tile lists would span the specimen: ring search
        _label_kernel(xs, ys, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic, cap, gid, dist)
    else:
        pool = tess._tile_pool(cap)
        with pool.lock:
            if not pool.complete:  # the tiles of the points' bounding box
                pool.build_box(*bounds)
            outside = _tile_kernel(xs, ys, pool.tnx, pool.tny, lx, ly, periodic, cap,
                                   pool.trange, pool.oxyw, pool.oid, pool.lrange, pool.lines,
                                   gid, dist)
            # a tile the box missed (it has a margin of one tile for rounding): build it, label
            # its points (a check of ~1 % of the kernel, skipped once every tile is built)
            if not pool.complete and gid.size and gid.min() == -2:
                need = np.zeros(pool.tnx * pool.tny, dtype=np.uint8)
                for mark in (True, False):
                    if not mark:
                        pool.build(np.flatnonzero(need))
                    _tile_fix(xs, ys, pool.tnx, pool.tny, lx, ly, periodic, cap, pool.trange,
                              pool.oxyw, pool.oid, pool.lrange, pool.lines, gid, dist, need,
                              mark)
        if outside:  # non-periodic points beyond the specimen box: exact ring search
            idx = np.flatnonzero(gid < 0)
            _label_subset(idx, xs, ys, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, periodic,
                          cap, gid, dist)
    return gid.reshape(x.shape), dist.reshape(x.shape)
