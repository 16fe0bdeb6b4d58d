"""Planar sections of 3D Voronoi/Laguerre tessellations: stereologically correct 2D grain maps.

Seeds ``s_k`` (px) with optional power weights ``w_k`` (px²) fill a box ``Lx × Ly × Lz`` (periodic
or not).  The image plane is ``X(x, y) = o + x e1 + y e2`` (specimen px ``(x, y)``; ``e1, e2``
orthonormal, the plane normal tilted by ``tilt`` from the box z axis towards azimuth ``azimuth``).
A point belongs to the seed of smallest power distance ``π_k(X) = |X − s_k|² − w_k``; its section
cell is the convex polygon cut from the convex 3D cell, bounded by the traces of the radical planes
with the other seeds.  ``π_j − π_i`` is affine in ``X`` with in-plane gradient ``2 P(s_i − s_j)``
(``P`` = projection onto the plane), so the in-plane distance from ``X`` to the trace of the
radical plane of owner ``i`` and seed ``j`` is

    d_j(X) = (π_j(X) − π_i(X)) / (2 |P(s_j − s_i)|)      (∞ when the plane is parallel to it)

and the exact in-plane boundary distance is ``min_j d_j`` (the section cell is the intersection of
the half-planes ``d_j ≥ 0``).

Fast path (exact, used for almost every point): the power distance splits as
``π_k(X) = |x − p_k|² + h_k² − w_k`` with ``p_k`` the projection of ``s_k`` into the plane and
``h_k`` its height above it, so the section *is* the 2D power diagram of the projected seeds with
weights ``w_k − h_k²``, and the in-plane distance above is exactly its radical-line distance.
:meth:`SectionSpecimen.label` evaluates it with :class:`generators.voronoi.Tessellation` (tiled,
exact) built from the seed images within ``reach`` (3 mean spacings) of the plane whose projections
fall on the extent widened by ``margin`` (3 spacings).  A seed left out is at 3D distance
``ρ ≥ r = min(reach, in-plane gap of x to the widened extent)``, hence has ``π ≥ r²`` (weights
shifted to ``w ≤ 0``) and in-plane distance ``≥ (r² − π_1) / (2 (r + d_1))`` (``|P(s_q − s_i)|
≤ |s_q − s_i| ≤ ρ + d_1``, ``d_1 = |X − s_i|``, the bound increasing in ``ρ``).  Each point
whose result this bound does not certify (``r² > π_1`` and bound ≥ distance) is recomputed by
the 3D search below.

3D search (fallback, any point): seeds are binned in a uniform 3D grid (~2 per cell); shells of
cells at Chebyshev index distance ``k`` around the point's cell are visited in turn.  A seed in
shell ``k + 1`` or beyond lies at 3D distance ``ρ ≥ r_k`` from ``X``, ``r_k`` = distance from ``X``
to the outside of the block of shells ``0..k``.  The nearest-seed search stops once
``r_k² ≥ π_best``, the distance search once ``(r_k² − π_i) / (2 (r_k + d_1))`` reaches the best
distance (or the cap).  Both paths are therefore exact; points are independent, so results do not
depend on the Numba thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from generators.voronoi import Tessellation, lognormal_weights

__all__ = ["Section3DGrains", "SectionSpecimen", "plane_basis", "hardcore_seeds_3d",
           "POISSON_VORONOI_BREADTH"]

#: mean breadth of the typical Poisson–Voronoi cell in units of λ^(−1/3) (Meijering 1953);
#: the mean number of section cells per unit area is N_A = 1.4580 λ^(2/3).
POISSON_VORONOI_BREADTH = 1.4580


def plane_basis(tilt_deg: float, azimuth_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-plane axes ``e1, e2`` and normal ``n`` of the xy plane tilted by ``tilt`` to ``azimuth``.

    The rotation (angle ``tilt`` about the in-plane axis ``(−sin φ, cos φ, 0)``) maps the box
    axes ``x, y, z`` to ``e1, e2, n``.
    """
    t = math.radians(tilt_deg)
    p = math.radians(azimuth_deg)
    k = np.array([-math.sin(p), math.cos(p), 0.0])
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = np.eye(3) + math.sin(t) * kx + (1.0 - math.cos(t)) * (kx @ kx)
    return rot[:, 0].copy(), rot[:, 1].copy(), rot[:, 2].copy()


@njit(cache=True)
def _rsa3(cand, n, box, dmin, periodic):
    cell = dmin / math.sqrt(3.0)  # at most one accepted seed per cell
    nc = np.empty(3, dtype=np.int64)
    h = np.empty(3)
    for a in range(3):
        nc[a] = max(1, int(box[a] / cell))
        h[a] = box[a] / nc[a]
    grid = -np.ones((nc[2], nc[1], nc[0]), dtype=np.int64)
    out = np.empty((n, 3))
    m = 0
    reach = np.empty(3, dtype=np.int64)
    for a in range(3):
        reach[a] = int(math.ceil(dmin / h[a]))
    d2 = dmin * dmin
    for c in range(cand.shape[0]):
        if m == n:
            break
        ci = np.empty(3, dtype=np.int64)
        for a in range(3):
            ci[a] = min(int(cand[c, a] / h[a]), nc[a] - 1)
        ok = True
        for jz in range(ci[2] - reach[2], ci[2] + reach[2] + 1):
            if not ok:
                break
            for jy in range(ci[1] - reach[1], ci[1] + reach[1] + 1):
                if not ok:
                    break
                for jx in range(ci[0] - reach[0], ci[0] + reach[0] + 1):
                    if periodic:
                        gx, gy, gz = jx % nc[0], jy % nc[1], jz % nc[2]
                    elif (jx < 0 or jx >= nc[0] or jy < 0 or jy >= nc[1]
                          or jz < 0 or jz >= nc[2]):
                        continue
                    else:
                        gx, gy, gz = jx, jy, jz
                    k = grid[gz, gy, gx]
                    if k < 0:
                        continue
                    s = 0.0
                    for a in range(3):
                        d = out[k, a] - cand[c, a]
                        if periodic:
                            d -= box[a] * round(d / box[a])
                        s += d * d
                    if s < d2:
                        ok = False
                        break
        if ok:
            for a in range(3):
                out[m, a] = cand[c, a]
            grid[ci[2], ci[1], ci[0]] = m
            m += 1
    return out[:m]


def hardcore_seeds_3d(
    rng: np.random.Generator,
    n: int,
    box: tuple[float, float, float],
    min_distance: float,
    *,
    periodic: bool = True,
    attempts_per_seed: int = 50,
) -> np.ndarray:
    """Draw ``n`` 3D seeds (px) in ``box`` at least ``min_distance`` apart (sequential adsorption).

    Returns
    -------
    ndarray, shape (n, 3), float64

    Raises
    ------
    ValueError
        If ``n`` seeds cannot be placed (sphere packing fraction near the RSA jamming limit ≈ 0.38).
    """
    if min_distance <= 0:
        raise ValueError(f"min_distance must be > 0 px, got {min_distance}")
    b = np.asarray(box, dtype=np.float64)
    cand = rng.random((n * attempts_per_seed, 3)) * b
    out = _rsa3(cand, n, b, float(min_distance), bool(periodic))
    if out.shape[0] < n:
        frac = n * math.pi * min_distance**3 / (6 * float(np.prod(b)))
        raise ValueError(
            f"could place only {out.shape[0]} of {n} seeds with min_distance={min_distance:g} px "
            f"(sphere packing fraction {frac:.2f}; 3D RSA jams near 0.38): lower min_distance")
    return out


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _build_grid3(seeds, nc, h):
    n = seeds.shape[0]
    cell_of = np.empty(n, dtype=np.int64)
    counts = np.zeros(nc[0] * nc[1] * nc[2] + 1, dtype=np.int64)
    for i in range(n):
        c = 0
        for a in (2, 1, 0):
            ca = min(max(int(math.floor(seeds[i, a] / h[a])), 0), nc[a] - 1)
            c = c * nc[a] + ca
        cell_of[i] = c
        counts[c + 1] += 1
    start = np.cumsum(counts)
    fill = start[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        c = cell_of[i]
        order[fill[c]] = i
        fill[c] += 1
    return start, order


@njit(cache=True)
def _shell(k, mode, X, gs, gw, start, nc, h, box, periodic, e1, e2,
           best, bx, by, bz, bt, bd, ox, oy, oz):
    """Visit shell ``k``; mode 0: nearest seed (best, its position, grid slot); mode 1: distance."""
    cx = min(max(int(math.floor(X[0] / h[0])), 0), nc[0] - 1)
    cy = min(max(int(math.floor(X[1] / h[1])), 0), nc[1] - 1)
    cz = min(max(int(math.floor(X[2] / h[2])), 0), nc[2] - 1)
    for jz in range(cz - k, cz + k + 1):
        zedge = jz == cz - k or jz == cz + k
        if periodic:
            gz = jz % nc[2]
            shz = box[2] * ((jz - gz) // nc[2])
        elif jz < 0 or jz >= nc[2]:
            continue
        else:
            gz = jz
            shz = 0.0
        for jy in range(cy - k, cy + k + 1):
            yedge = jy == cy - k or jy == cy + k
            if periodic:
                gy = jy % nc[1]
                shy = box[1] * ((jy - gy) // nc[1])
            elif jy < 0 or jy >= nc[1]:
                continue
            else:
                gy = jy
                shy = 0.0
            step = 1 if (zedge or yedge or k == 0) else 2 * k
            jx = cx - k
            while jx <= cx + k:
                if periodic:
                    gx = jx % nc[0]
                    shx = box[0] * ((jx - gx) // nc[0])
                elif jx < 0 or jx >= nc[0]:
                    jx += step
                    continue
                else:
                    gx = jx
                    shx = 0.0
                c = (gz * nc[1] + gy) * nc[0] + gx
                for t in range(start[c], start[c + 1]):
                    px = gs[t, 0] + shx
                    py = gs[t, 1] + shy
                    pz = gs[t, 2] + shz
                    dx = X[0] - px
                    dy = X[1] - py
                    dz = X[2] - pz
                    p = dx * dx + dy * dy + dz * dz - gw[t]
                    if mode == 0:
                        if p < best:
                            best = p
                            bx = px
                            by = py
                            bz = pz
                            bt = t
                        continue
                    ex = px - bx
                    ey = py - by
                    ez = pz - bz
                    if t == bt and ex * ex + ey * ey + ez * ez == 0.0:
                        continue
                    u = ex * e1[0] + ey * e1[1] + ez * e1[2]
                    v = ex * e2[0] + ey * e2[1] + ez * e2[2]
                    g = math.sqrt(u * u + v * v)
                    if g == 0.0:
                        continue
                    d = (p - best) / (2.0 * g)
                    if d < bd:
                        bd = d
                jx += step
    return best, bx, by, bz, bt, bd


@njit(cache=True, inline="always")
def _outside_gap(k, X, nc, h):
    """Distance from ``X`` to any cell of shell ``k + 1`` or beyond (the outside of the block of
    shells ``0..k`` around the cell containing ``X``, clamped into the grid)."""
    r = np.inf
    for a in range(3):
        c = min(max(int(math.floor(X[a] / h[a])), 0), nc[a] - 1)
        lo = X[a] - (c - k) * h[a]
        hi = (c + k + 1) * h[a] - X[a]
        r = min(r, max(0.0, min(lo, hi)))
    return r


@njit(parallel=True, cache=True)
def _section_kernel(xs, ys, o, e1, e2, gs, gw, gid_of, start, nc, h, box, periodic, cap,
                    kmax, gid, dist):
    for n in prange(xs.shape[0]):
        X = np.empty(3)
        for a in range(3):
            X[a] = o[a] + xs[n] * e1[a] + ys[n] * e2[a]
            if periodic:
                X[a] -= box[a] * math.floor(X[a] / box[a])
        best = np.inf
        bx = 0.0
        by = 0.0
        bz = 0.0
        bt = -1
        bd = cap
        k = 0
        while k <= kmax:
            best, bx, by, bz, bt, bd = _shell(k, 0, X, gs, gw, start, nc, h, box, periodic, e1,
                                              e2, best, bx, by, bz, bt, bd, 0.0, 0.0, 0.0)
            r = _outside_gap(k, X, nc, h)  # unvisited seeds are at least this far
            if bt >= 0 and r * r >= best:
                break
            k += 1
        d1 = math.sqrt((X[0] - bx) ** 2 + (X[1] - by) ** 2 + (X[2] - bz) ** 2)
        k = 0
        while k <= kmax:
            best, bx, by, bz, bt, bd = _shell(k, 1, X, gs, gw, start, nc, h, box, periodic, e1,
                                              e2, best, bx, by, bz, bt, bd, 0.0, 0.0, 0.0)
            r = _outside_gap(k, X, nc, h)
            if (r * r - best) / (2.0 * (r + d1)) >= bd:
                break
            k += 1
        gid[n] = gid_of[bt]
        dist[n] = max(bd, 0.0)


@dataclass(frozen=True, eq=False)
class SectionSpecimen:
    """A plane section of a 3D Voronoi/Laguerre tessellation.

    Parameters
    ----------
    seeds : ndarray, shape (n, 3), float64
        Seed positions in px inside the box.
    box : (Lx, Ly, Lz)
        Box size in px.
    origin : ndarray, shape (3,)
        3D point (px) of specimen coordinate ``(0, 0)``.
    e1, e2 : ndarray, shape (3,)
        Orthonormal in-plane axes (specimen x and y).
    weights : ndarray, shape (n,), optional
        Power weights in px²; ``None`` → Voronoi.
    periodic : bool
        Periodic box.  The section is defined for any ``(x, y)``; it is periodic in ``(x, y)`` with
        period ``(Lx, Ly)`` only for an untilted plane.
    extent : (Lx, Ly)
        Nominal specimen size in px (fields are drawn inside it).
    """

    seeds: np.ndarray
    box: tuple[float, float, float]
    origin: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    weights: np.ndarray | None = None
    periodic: bool = True
    extent: tuple[float, float] = (0.0, 0.0)
    _planar: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = np.ascontiguousarray(self.seeds, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != 3 or s.shape[0] < 1:
            raise ValueError(f"seeds must have shape (n >= 1, 3), got {s.shape}")
        b = np.asarray(self.box, dtype=np.float64)
        if b.shape != (3,) or not np.all(b > 0):
            raise ValueError(f"box must be three positive lengths (px), got {self.box}")
        if np.any(s < 0) or np.any(s >= b):
            raise ValueError("seeds must lie inside the box [0, Lx) x [0, Ly) x [0, Lz)")
        e1 = np.asarray(self.e1, dtype=np.float64)
        e2 = np.asarray(self.e2, dtype=np.float64)
        if (e1.shape != (3,) or e2.shape != (3,) or abs(e1 @ e1 - 1) > 1e-9
                or abs(e2 @ e2 - 1) > 1e-9 or abs(e1 @ e2) > 1e-9):
            raise ValueError("e1 and e2 must be orthonormal 3-vectors")
        n = s.shape[0]
        w = np.zeros(n) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be finite with shape ({n},)")
        object.__setattr__(self, "seeds", s)
        object.__setattr__(self, "box", tuple(float(v) for v in b))
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "e1", e1)
        object.__setattr__(self, "e2", e2)
        if self.extent == (0.0, 0.0):
            object.__setattr__(self, "extent", (float(b[0]), float(b[1])))
        hh = (float(np.prod(b)) * 2.0 / n) ** (1.0 / 3.0)  # ~2 seeds per cell
        nc = np.array([max(1, int(round(v / hh))) for v in b], dtype=np.int64)
        h = b / nc
        start, order = _build_grid3(s, nc, h)
        wn = w - w.max()  # the diagram is unchanged by a common shift; bounds need w <= 0
        object.__setattr__(self, "_grid", (np.ascontiguousarray(s[order]),
                                           np.ascontiguousarray(wn[order]),
                                           order.astype(np.int32), start, nc, h, b))

    @property
    def n_seeds(self) -> int:
        """Number of 3D seeds (grains; most are not cut by the plane)."""
        return int(self.seeds.shape[0])

    def points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """3D positions (px, shape ``x.shape + (3,)``) of specimen coordinates, unwrapped."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        y = np.asarray(y, dtype=np.float64)[..., None]
        return self.origin + x * self.e1 + y * self.e2

    def label(
        self, x: np.ndarray, y: np.ndarray, max_distance: float = np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grain id (nearest 3D seed in power distance) and exact in-plane boundary distance.

        Parameters
        ----------
        x, y : ndarray, any shape (same for both), float
            Specimen (in-plane) coordinates in px.
        max_distance : float
            Cap on the returned distance in px.

        Returns
        -------
        grain_id : ndarray, int32, shape of ``x``
        distance : ndarray, float32, shape of ``x``
            In-plane Euclidean distance in px to the nearest section-cell edge, capped.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
        if not (max_distance > 0):
            raise ValueError(f"max_distance must be > 0 px, got {max_distance}")
        xs = np.ascontiguousarray(x.ravel())
        ys = np.ascontiguousarray(y.ravel())
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise ValueError("coordinates must be finite")
        cap = float(max_distance)
        gid = np.empty(xs.shape[0], dtype=np.int32)
        dist = np.empty(xs.shape[0], dtype=np.float32)
        todo = np.ones(xs.shape[0], dtype=bool)
        planar = self._planar_diagram()
        if planar is not None:
            tess, img_id, u, v, wp, wn, margin, reach = planar
            lx, ly = self.extent
            px = xs + margin
            py = ys + margin
            j, d = tess.label(px, py, max_distance=cap)
            # exact unless a seed left out of the 2D diagram (farther than r in 3D) could own
            # the point or cut its boundary distance: such seeds have π ≥ r² and in-plane
            # distance ≥ (r² − π_1) / (2 (r + d_1))
            gap = np.minimum(np.minimum(px, lx + 2 * margin - px),
                             np.minimum(py, ly + 2 * margin - py))
            r = np.minimum(np.maximum(gap, 0.0), reach)
            pi1 = (px - u[j]) ** 2 + (py - v[j]) ** 2 - wp[j]
            d1 = np.sqrt(np.maximum(pi1 + wn[j], 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                ok = (r * r > pi1) & ((r * r - pi1) / (2.0 * (r + d1)) >= d)
            gid[ok] = img_id[j[ok]]
            dist[ok] = d[ok]
            todo = ~ok
        if todo.any():
            g3, d3 = self._label_3d(xs[todo], ys[todo], cap)
            gid[todo] = g3
            dist[todo] = d3
        return gid.reshape(x.shape), dist.reshape(x.shape)

    def _planar_diagram(self):
        """The section as a 2D power diagram (cached): seed images within ``reach`` of the plane,
        projected, with weights ``w − h²`` (``h`` = height above the plane), on the specimen extent
        widened by ``margin`` on every side; ``None`` if no seed is that close."""
        if not self._planar:
            b = np.array(self.box)
            n = self.n_seeds
            spacing = (float(np.prod(b)) / n) ** (1.0 / 3.0)
            reach = 3.0 * spacing
            margin = 3.0 * spacing
            lx, ly = self.extent
            nrm = np.cross(self.e1, self.e2)
            corners = np.array([self.origin + a * self.e1 + c * self.e2
                                for a in (-margin, lx + margin) for c in (-margin, ly + margin)])
            if self.periodic:
                lo = np.floor((corners.min(0) - reach) / b).astype(int) - 1
                hi = np.floor((corners.max(0) + reach) / b).astype(int) + 1
                shifts = np.array(np.meshgrid(*[np.arange(lo[a], hi[a] + 1) for a in range(3)],
                                              indexing="ij")).reshape(3, -1).T * b
            else:
                shifts = np.zeros((1, 3))
            w = np.zeros(n) if self.weights is None else self.weights
            wn = w - w.max()
            us, vs, ws, wns, ids = [], [], [], [], []
            for sh in shifts:
                rel = self.seeds + sh - self.origin
                hgt = rel @ nrm
                u = rel @ self.e1 + margin
                v = rel @ self.e2 + margin
                keep = ((np.abs(hgt) <= reach) & (u >= 0) & (u < lx + 2 * margin)
                        & (v >= 0) & (v < ly + 2 * margin))
                us.append(u[keep])
                vs.append(v[keep])
                ws.append(wn[keep] - hgt[keep] ** 2)
                wns.append(wn[keep])
                ids.append(np.nonzero(keep)[0])
            u = np.concatenate(us)
            if u.size == 0:
                self._planar.append(None)
            else:
                v = np.concatenate(vs)
                wp = np.concatenate(ws)
                tess = Tessellation(np.c_[u, v], (lx + 2 * margin, ly + 2 * margin), weights=wp,
                                    periodic=False)
                self._planar.append((tess, np.concatenate(ids).astype(np.int32), u, v, wp,
                                     np.concatenate(wns), margin, reach))
        return self._planar[0]

    def _label_3d(self, xs: np.ndarray, ys: np.ndarray, cap: float):
        """Exact labels by the 3D shell search (any point)."""
        gs, gw, gid_of, start, nc, h, b = self._grid
        if self.periodic:
            kmax = int(nc.max()) + 2
        else:  # points may lie far outside the box
            far = float(np.abs(self.points(xs, ys)).max(initial=0.0)) if xs.size else 0.0
            kmax = int(nc.max()) + 2 + int(far / h.min())
        gid = np.empty(xs.shape[0], dtype=np.int32)
        dist = np.empty(xs.shape[0], dtype=np.float32)
        _section_kernel(np.ascontiguousarray(xs), np.ascontiguousarray(ys), self.origin, self.e1,
                        self.e2, gs, gw, gid_of, start, nc, h, b, bool(self.periodic), cap, kmax,
                        gid, dist)
        return gid, dist


@dataclass(frozen=True)
class Section3DGrains:
    """Specimen stage: a planar section through a 3D Voronoi/Laguerre tessellation.

    Parameters
    ----------
    field_shape : (H, W)
        Field of view in px.
    grains_per_field : (low, high)
        Mean number of section grains per field (drawn per specimen); sets the seed density
        through ``N_A = 1.458 λ^(2/3)`` (exact for Poisson seeds without weights, approximate else).
    seeds : {"poisson", "hardcore"}
    min_distance : float
        Hard-core distance as a fraction of the mean 3D seed spacing ``λ^(−1/3)``.
    weights : {"none", "lognormal"}
    weight_sigma : float
        Log-sd of the Laguerre radii.
    tilt : (low, high)
        Plane tilt from the box z axis in degrees (drawn uniformly; azimuth uniform in [0, 360)).
    periodic : bool
        Periodic box.
    specimen_scale : float
        Specimen side / field side (≥ 1); the box is ``W s × H s × min(W, H) s``.
    """

    field_shape: tuple[int, int]
    grains_per_field: tuple[int, int] = (80, 300)
    seeds: str = "poisson"
    min_distance: float = 0.5
    weights: str = "none"
    weight_sigma: float = 0.35
    tilt: tuple[float, float] = (0.0, 0.0)
    periodic: bool = True
    specimen_scale: float = 2.0

    def __post_init__(self) -> None:
        h, w = self.field_shape
        if h < 1 or w < 1:
            raise ValueError(f"field_shape must be positive, got {self.field_shape}")
        lo, hi = self.grains_per_field
        if not (1 <= lo <= hi):
            raise ValueError(f"grains_per_field must satisfy 1 <= low <= high, got {(lo, hi)}")
        if self.seeds not in ("poisson", "hardcore"):
            raise ValueError(f"seeds must be 'poisson' or 'hardcore', got {self.seeds!r}")
        if self.weights not in ("none", "lognormal"):
            raise ValueError(f"weights must be 'none' or 'lognormal', got {self.weights!r}")
        t0, t1 = self.tilt
        if not (0 <= t0 <= t1 <= 90):
            raise ValueError(f"tilt must satisfy 0 <= low <= high <= 90 degrees, got {self.tilt}")
        if self.specimen_scale < 1:
            raise ValueError(f"specimen_scale must be >= 1, got {self.specimen_scale}")
        if not self.min_distance > 0 or not self.weight_sigma >= 0:
            raise ValueError("min_distance must be > 0 and weight_sigma >= 0")

    @property
    def extent(self) -> tuple[float, float]:
        """Specimen size (Lx, Ly) in px."""
        h, w = self.field_shape
        return (w * self.specimen_scale, h * self.specimen_scale)

    @property
    def box(self) -> tuple[float, float, float]:
        """3D box (Lx, Ly, Lz) in px."""
        lx, ly = self.extent
        return (lx, ly, min(lx, ly))

    def sample(self, rng: np.random.Generator) -> tuple[SectionSpecimen, dict]:
        """Draw one specimen.

        Returns
        -------
        specimen : SectionSpecimen
        params : dict
            ``n_grains`` (3D seeds = size of per-grain tables), ``grains_per_field``,
            ``tilt_deg``, ``azimuth_deg``, ``box_px``, ``origin_px``, ``extent_px``.
        """
        lo, hi = self.grains_per_field
        per_field = int(rng.integers(lo, hi + 1))
        h, w = self.field_shape
        box = self.box
        na = per_field / (h * w)
        lam = (na / POISSON_VORONOI_BREADTH) ** 1.5
        n = max(1, int(round(lam * box[0] * box[1] * box[2])))
        spacing = lam ** (-1.0 / 3.0)
        if self.seeds == "poisson":
            seeds = rng.random((n, 3)) * np.array(box)
        else:
            seeds = hardcore_seeds_3d(rng, n, box, self.min_distance * spacing,
                                      periodic=self.periodic)
        wts = None
        if self.weights == "lognormal" and self.weight_sigma > 0:
            wts = lognormal_weights(rng, n, spacing, self.weight_sigma)
        tilt = float(rng.uniform(*self.tilt))
        azim = float(rng.uniform(0.0, 360.0))
        e1, e2, _ = plane_basis(tilt, azim)
        origin = np.array([0.0, 0.0, float(rng.uniform(0.0, box[2]))])
        spec = SectionSpecimen(seeds, box, origin, e1, e2, weights=wts, periodic=self.periodic,
                               extent=self.extent)
        return spec, {
            "n_grains": n,
            "grains_per_field": per_field,
            "tilt_deg": tilt,
            "azimuth_deg": azim,
            "box_px": list(box),
            "origin_px": origin.tolist(),
            "extent_px": list(self.extent),
        }
