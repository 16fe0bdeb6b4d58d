"""Non-convex and elongated grains: a smooth coordinate map applied before labelling.

The specimen is labelled at ``q = Φ(p)`` instead of the scan coordinates ``p`` (px):

    v = c + M (p − c),        q = v + u(v),

- ``M = R(α) diag(1/√e, √e) R(α)ᵀ``: an area-preserving affine stretch that makes grains ``e``
  times longer along the angle ``α`` (rad, from +x towards +y) than across it in the image
  (``c``: the centre of the specimen);
- ``u(v) = Σ_j a_j cos(k_j · v + φ_j)``: a smooth random displacement field (px), a sum of
  Fourier modes with wave vectors ``k_j = 2π (m_j / Lx, n_j / Ly)`` (integers, so ``u`` is
  periodic on the specimen), ``(m, n)`` drawn from a Gaussian of width ``L / (2π ℓ)`` (``ℓ``:
  correlation length, px), and amplitudes rescaled so that the RMS displacement ``√(Σ|a_j|²/2)``
  equals the requested amplitude.  It bends boundaries into curves, giving non-convex grains.
  The map stays one-to-one while ``|Du| < 1`` (``Σ |a_j| |k_j| < 1``, about amplitude < ℓ / 4).

The Jacobian ``J = (I + Du(v)) M``, ``Du = −Σ_j a_j k_jᵀ sin(k_j · v + φ_j)``, is analytic.
Distances to boundaries are computed in specimen space (``d_q``); a straight boundary with unit
normal ``n`` (specimen space) is at image-space distance

    d_p = d_q / |Jᵀ n|,

which is **exact for the affine stretch** (J constant, lines map to lines) and **first order in
``d`` for the warp** (``J`` taken at the pixel).  ``n`` is the normal of the nearest radical line:
from the pixel's own seed to the seed whose radical line is closest (:class:`CellNeighbours`,
exact: the cell's neighbours in the exact polygons; :func:`radical_normals` is a k-d-tree
variant for tessellations without polygons).

The map kernel evaluates the modes with a branch-free sine/cosine (:func:`_sincos`, ~1e-15) so
its pixel loop vectorises; :func:`image_space_distance` finds the normal and ``d_p`` in one pass.
:func:`label_warped_grains` does the grains, ``d_q``, the normal and ``d_p`` in one pass without
the tessellation's tile lists: the mapped points of a frame are smooth, so each starts from the
previous point's grain and walks to its power-nearest seed over the exact cell neighbours; the
lines are evaluated with the tile lists' own expressions (``voronoi._tile_owner_lines``), so the
bits are those of ``Tessellation.label`` + :func:`image_space_distance` (tested; a change of
those expressions must be mirrored in :func:`_tile_line`).

Units: px.  Kernels work on independent pixels (``prange``): results do not depend on thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange
from scipy.spatial import cKDTree

from generators._periodic import jt_norm, min_image
from generators.voronoi import _label_one, _wrap

__all__ = ["CoordinateMap", "Warp", "CellNeighbours", "stretch_matrix", "radical_normals",
           "image_space_distance", "image_space_distance_const", "label_warped_grains",
           "walk_grain_ids"]


def stretch_matrix(elongation: float, angle_rad: float) -> np.ndarray:
    """``M = R(α) diag(1/√e, √e) R(α)ᵀ`` (2, 2): grains ``e`` times longer along ``α`` in the image."""
    if not elongation > 0:
        raise ValueError(f"elongation must be > 0, got {elongation}")
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([1.0 / math.sqrt(elongation), math.sqrt(elongation)]) @ r.T


_HALF_PI = 0.5 * math.pi
_TWO_OVER_PI = 2.0 / math.pi
#: π/2 split in two parts (Cody–Waite) so that ``arg − q π/2`` keeps its accuracy
_PIO2_HI = 1.5707963267341256e+00
_PIO2_LO = 6.0771005065061922e-11


@njit(cache=True, inline="always")
def _sincos(arg):
    """``(sin, cos)`` of ``arg`` (rad) to ~1e-15 for ``|arg| < 1e6``: one Cody–Waite reduction to
    ``[−π/4, π/4]`` and Taylor polynomials (to x¹⁵ / x¹⁴); branch-free so loops over it vectorise."""
    q = math.floor(arg * _TWO_OVER_PI + 0.5)
    r = (arg - q * _PIO2_HI) - q * _PIO2_LO
    r2 = r * r
    sp = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (
        1.0 / 362880 + r2 * (-1.0 / 39916800 + r2 * (1.0 / 6227020800
                                                     - r2 / 1307674368000.0)))))))
    cp = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (
        -1.0 / 3628800 + r2 * (1.0 / 479001600 - r2 / 87178291200.0))))))
    # quadrant k = q mod 4: (sin, cos) = (sp, cp), (cp, −sp), (−sp, −cp), (−cp, sp)
    h = q * 0.5
    odd = h - math.floor(h)  # 0 or 0.5
    k2 = q * 0.25
    f = k2 - math.floor(k2)  # 0, 0.25, 0.5, 0.75
    swap = odd * 2.0  # 1 for k odd
    ss = 1.0 - 2.0 * math.floor(2.0 * f)  # + for k = 0, 1
    sc = 1.0 - 2.0 * math.floor(2.0 * f + 0.5 - 2.0 * math.floor(f + 0.25))  # + for k = 0, 3
    s = ss * (sp + swap * (cp - sp))
    c = sc * (cp + swap * (sp - cp))
    return s, c


#: pixels per block of the map kernel (fixed: the result does not depend on the thread count)
_MAP_BLOCK = 256
#: blocks per parallel task of the map kernel (one set of block buffers per task, not per
#: block; every pixel's arithmetic is its own, so neither constant changes a result)
_MAP_TASK = 16


@njit(parallel=True, cache=True, fastmath=True)
def _map_kernel(xs, ys, m, cx, cy, kv, av, ph, qx, qy, jac):
    """Map and Jacobian of every point; tasks of blocks of pixels in ``prange``, the mode loop
    outside the pixel loop (vectorised), each pixel's sums over the modes in mode order."""
    n = xs.shape[0]
    nm = kv.shape[0]
    nb = (n + _MAP_BLOCK - 1) // _MAP_BLOCK
    ntask = (nb + _MAP_TASK - 1) // _MAP_TASK
    for task in prange(ntask):
        vx = np.empty(_MAP_BLOCK)
        vy = np.empty(_MAP_BLOCK)
        ux = np.empty(_MAP_BLOCK)
        uy = np.empty(_MAP_BLOCK)
        d00 = np.empty(_MAP_BLOCK)
        d01 = np.empty(_MAP_BLOCK)
        d10 = np.empty(_MAP_BLOCK)
        d11 = np.empty(_MAP_BLOCK)
        for b in range(task * _MAP_TASK, min(nb, (task + 1) * _MAP_TASK)):
            lo = b * _MAP_BLOCK
            hi = min(n, lo + _MAP_BLOCK)
            cnt = hi - lo
            for t in range(cnt):
                px = xs[lo + t] - cx
                py = ys[lo + t] - cy
                vx[t] = cx + m[0, 0] * px + m[0, 1] * py
                vy[t] = cy + m[1, 0] * px + m[1, 1] * py
                ux[t] = 0.0
                uy[t] = 0.0
                d00[t] = 1.0
                d01[t] = 0.0
                d10[t] = 0.0
                d11[t] = 1.0
            for j in range(nm):
                k0 = kv[j, 0]
                k1 = kv[j, 1]
                a0 = av[j, 0]
                a1 = av[j, 1]
                p = ph[j]
                for t in range(cnt):
                    s, c = _sincos(k0 * vx[t] + k1 * vy[t] + p)
                    ux[t] += a0 * c
                    uy[t] += a1 * c
                    d00[t] -= a0 * k0 * s
                    d01[t] -= a0 * k1 * s
                    d10[t] -= a1 * k0 * s
                    d11[t] -= a1 * k1 * s
            for t in range(cnt):
                i = lo + t
                qx[i] = vx[t] + ux[t]
                qy[i] = vy[t] + uy[t]
                jac[i, 0] = d00[t] * m[0, 0] + d01[t] * m[1, 0]
                jac[i, 1] = d00[t] * m[0, 1] + d01[t] * m[1, 1]
                jac[i, 2] = d10[t] * m[0, 0] + d11[t] * m[1, 0]
                jac[i, 3] = d10[t] * m[0, 1] + d11[t] * m[1, 1]


@dataclass(frozen=True, eq=False)
class CoordinateMap:
    """A drawn map ``Φ`` (frozen; a specimen property).

    Attributes
    ----------
    matrix : ndarray (2, 2), the stretch ``M``
    centre : (cx, cy), px
    wavevectors : ndarray (K, 2), rad/px
    amplitudes : ndarray (K, 2), px
    phases : ndarray (K,), rad
    """

    matrix: np.ndarray
    centre: tuple[float, float]
    wavevectors: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray

    def apply(self, x: np.ndarray, y: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Specimen coordinates and Jacobian at scan coordinates ``(x, y)`` (px).

        Returns
        -------
        qx, qy : ndarray float64, shape of ``x``
        jacobian : ndarray float64, shape ``x.shape + (2, 2)``, ``∂q_a / ∂p_b``
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
        xs, ys = np.ascontiguousarray(x.ravel()), np.ascontiguousarray(y.ravel())
        qx = np.empty_like(xs)
        qy = np.empty_like(xs)
        jac = np.empty((xs.shape[0], 4))
        _map_kernel(xs, ys, np.ascontiguousarray(self.matrix, dtype=np.float64),
                    float(self.centre[0]), float(self.centre[1]),
                    np.ascontiguousarray(self.wavevectors, dtype=np.float64).reshape(-1, 2),
                    np.ascontiguousarray(self.amplitudes, dtype=np.float64).reshape(-1, 2),
                    np.ascontiguousarray(self.phases, dtype=np.float64).ravel(), qx, qy, jac)
        return qx.reshape(x.shape), qy.reshape(x.shape), jac.reshape(x.shape + (2, 2))

    def max_singular_value(self) -> float:
        """Upper bound of the largest singular value of ``J`` anywhere (for distance caps)."""
        du = float(np.sum(np.hypot(*self.amplitudes.T) * np.hypot(*self.wavevectors.T))) \
            if len(self.phases) else 0.0
        return float(np.linalg.norm(self.matrix, 2)) * (1.0 + du)

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "n_modes": int(len(self.phases)),
                "max_du": float(np.sum(np.hypot(*self.amplitudes.T)
                                       * np.hypot(*self.wavevectors.T))) if len(self.phases)
                else 0.0}


@dataclass(frozen=True)
class Warp:
    """Coordinate-map stage: smooth random displacement and/or affine stretch.

    Parameters
    ----------
    amplitude_px : (low, high)
        RMS displacement in px, drawn per specimen (0: no warp).
    correlation_px : (low, high)
        Correlation length ``ℓ`` in px, drawn per specimen (> 0).
    n_modes : int
        Number of Fourier modes.
    elongation : (low, high)
        Aspect ratio ``e`` of the grains in the image, drawn per specimen (1: equiaxed).
    angle_deg : (low, high)
        Elongation direction in degrees from +x towards +y, drawn per specimen.
    """

    amplitude_px: tuple[float, float] = (0.0, 0.0)
    correlation_px: tuple[float, float] = (20.0, 40.0)
    n_modes: int = 8
    elongation: tuple[float, float] = (1.0, 1.0)
    angle_deg: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name, r, lo in (("amplitude_px", self.amplitude_px, 0.0),
                            ("correlation_px", self.correlation_px, 1e-9),
                            ("elongation", self.elongation, 1e-9)):
            if len(r) != 2 or not (lo <= r[0] <= r[1]):
                raise ValueError(f"warp.{name} must be a (low, high) range >= {lo:g}, got {r}")
        if self.n_modes < 1:
            raise ValueError(f"warp.n_modes must be >= 1, got {self.n_modes}")

    def sample_specimen(self, rng: np.random.Generator, extent: tuple[float, float]
                        ) -> CoordinateMap:
        """Draw the map of one specimen of size ``extent`` = (Lx, Ly) px (fixed number of draws)."""
        lx, ly = float(extent[0]), float(extent[1])
        amp = float(rng.uniform(*self.amplitude_px))
        ell = float(rng.uniform(*self.correlation_px))
        e = float(rng.uniform(*self.elongation))
        ang = math.radians(float(rng.uniform(*self.angle_deg)))
        k = self.n_modes
        mn = np.rint(rng.standard_normal((k, 2)) * np.array([lx, ly]) / (2 * math.pi * ell))
        zero = (mn[:, 0] == 0) & (mn[:, 1] == 0)
        mn[zero, 0] = 1.0
        a = rng.standard_normal((k, 2))
        ph = rng.uniform(0.0, 2 * math.pi, k)
        rms = math.sqrt(0.5 * float(np.sum(a**2)))
        a = a * (amp / rms) if amp > 0 else np.zeros((0, 2))
        kv = 2 * math.pi * mn / np.array([lx, ly]) if amp > 0 else np.zeros((0, 2))
        ph = ph if amp > 0 else np.zeros(0)
        return CoordinateMap(matrix=stretch_matrix(e, ang), centre=(0.5 * lx, 0.5 * ly),
                             wavevectors=kv, amplitudes=a, phases=ph)

    @staticmethod
    def params(cmap: CoordinateMap) -> dict:
        return cmap.to_dict()


@njit(parallel=True, cache=True)
def _neighbour_normals_kernel(qx, qy, owner, seeds, w, nstart, nbr, lx, ly, periodic, out):
    m = qx.shape[0]
    for i in prange(m):
        x = qx[i]
        y = qy[i]
        o = owner[i]
        ox = seeds[o, 0] - x
        oy = seeds[o, 1] - y
        if periodic:
            ox -= lx * round(ox / lx)
            oy -= ly * round(oy / ly)
        po = ox * ox + oy * oy - w[o]
        bd = np.inf
        nxv = 1.0
        nyv = 0.0
        for t in range(nstart[o], nstart[o + 1]):
            j = nbr[t]
            dx = seeds[j, 0] - x
            dy = seeds[j, 1] - y
            if periodic:
                dx -= lx * round(dx / lx)
                dy -= ly * round(dy / ly)
            ex = dx - ox
            ey = dy - oy
            sep = math.sqrt(ex * ex + ey * ey)
            if sep == 0.0:
                continue
            d = (dx * dx + dy * dy - w[j] - po) / (2.0 * sep)
            if d < bd:
                bd = d
                nxv = ex / sep
                nyv = ey / sep
        out[i, 0] = nxv
        out[i, 1] = nyv


@dataclass(frozen=True, eq=False)
class CellNeighbours:
    """Neighbour lists of the cells of a tessellation (a specimen cache) for :meth:`normals`.

    Inside a convex cell the distance to its boundary is the smallest distance to the radical
    lines of its *neighbours* (the cell is the intersection of those half-planes), so the
    nearest radical line is found among them exactly.

    Attributes
    ----------
    seeds : ndarray (n, 2), px
    weights : ndarray (n,), px²
    start : ndarray (n + 1,) int64, CSR offsets into ``neighbours``
    neighbours : ndarray int64
    extent : (Lx, Ly)
    periodic : bool
    """

    seeds: np.ndarray
    weights: np.ndarray
    start: np.ndarray
    neighbours: np.ndarray
    extent: tuple[float, float]
    periodic: bool
    #: per cell the largest ``|v − p|`` along x and y over its polygon's vertices ``v`` (px, (n, 2));
    #: set by :meth:`from_polygons`, ``None`` otherwise (see :func:`label_warped_grains`)
    reach: np.ndarray | None = None
    _lines: tuple = field(default=None, init=False, repr=False, compare=False)
    _kimg: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _gap: tuple = field(default=None, init=False, repr=False, compare=False)

    def pair_lines(self) -> tuple:
        """Per neighbour pair: ``e`` (x, y), unit normal (x, y) and ``c`` (see
        :func:`_pair_lines`), computed once."""
        if self._lines is None:
            object.__setattr__(self, "_lines", _pair_lines(self))
        return self._lines

    @classmethod
    def from_polygons(cls, cells, weights: np.ndarray | None) -> "CellNeighbours":
        """From :class:`generators.substructure.CellPolygons` (its ``edge_neighbour`` labels)."""
        n = cells.n_cells
        owner = np.repeat(np.arange(n), np.diff(cells.start))
        nb = cells.edge_neighbour.astype(np.int64)
        keep = (nb >= 0) & (nb != owner)
        key = np.unique(owner[keep] * n + nb[keep])  # sorted (owner, neighbour) pairs
        pairs = np.c_[key // n, key % n]
        start = np.zeros(n + 1, dtype=np.int64)
        start[1:] = np.cumsum(np.bincount(pairs[:, 0], minlength=n))
        w = np.zeros(n) if weights is None else np.asarray(weights, dtype=np.float64)
        reach = np.zeros((n, 2))
        if cells.vertices.shape[0]:
            rel = np.abs(cells.vertices - cells.origins[owner])
            np.maximum.at(reach, owner, rel)
        return cls(seeds=np.ascontiguousarray(cells.origins, dtype=np.float64),
                   weights=np.ascontiguousarray(w), start=start,
                   neighbours=np.ascontiguousarray(pairs[:, 1]),
                   extent=(float(cells.extent[0]), float(cells.extent[1])),
                   periodic=bool(cells.periodic), reach=reach)

    def normals(self, qx: np.ndarray, qy: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """Unit normal (specimen space) of the nearest radical line of each point's own cell.

        Points from the owner's seed towards the neighbour ``j`` minimising
        ``(π_j(q) − π_o(q)) / (2 |p_j − p_o|)`` (minimum image on a periodic specimen).

        Parameters
        ----------
        qx, qy : ndarray, specimen coordinates, px
        owner : ndarray int, the points' grains (``Tessellation.label``)

        Returns
        -------
        ndarray (m, 2) float64
        """
        qx = np.ascontiguousarray(np.asarray(qx, dtype=np.float64).ravel())
        qy = np.ascontiguousarray(np.asarray(qy, dtype=np.float64).ravel())
        ow = np.ascontiguousarray(np.asarray(owner, dtype=np.int64).ravel())
        out = np.empty((qx.shape[0], 2))
        lx, ly = self.extent
        _neighbour_normals_kernel(qx, qy, ow, self.seeds, self.weights, self.start,
                                  self.neighbours, float(lx), float(ly), self.periodic, out)
        return out


def radical_normals(seeds: np.ndarray, weights: np.ndarray | None, extent: tuple[float, float],
                    periodic: bool, qx: np.ndarray, qy: np.ndarray, k: int = 12
                    ) -> np.ndarray:
    """Unit normal (specimen space) of the nearest radical line at each point.

    For a point ``q`` with power-nearest seed ``p_1`` it is ``(p_j − p_1) / |p_j − p_1|`` for the
    seed ``j`` minimising ``(π_j(q) − π_1(q)) / (2 |p_j − p_1|)``, searched among the ``k``
    Euclidean-nearest seeds (minimum image on a periodic specimen).

    Parameters
    ----------
    seeds : ndarray (n, 2), px
    weights : ndarray (n,) px² or None
    extent : (Lx, Ly)
    periodic : bool
    qx, qy : ndarray (m,), specimen coordinates, px

    Returns
    -------
    ndarray (m, 2) float64
    """
    qx = np.asarray(qx, dtype=np.float64).ravel()
    qy = np.asarray(qy, dtype=np.float64).ravel()
    n = seeds.shape[0]
    if qx.size == 0:
        return np.zeros((0, 2))
    k = min(k, n)
    lx, ly = extent
    q = np.c_[qx, qy]
    if periodic:
        q = q - np.array([lx, ly]) * np.floor(q / np.array([lx, ly]))
        q = np.minimum(q, np.nextafter(np.array([lx, ly]), 0))
        tree = cKDTree(seeds, boxsize=[lx, ly])
    else:
        tree = cKDTree(seeds)
    _, idx = tree.query(q, k=k, workers=-1)
    idx = idx.reshape(q.shape[0], k)
    rel = seeds[idx] - q[:, None, :]
    if periodic:
        rel[..., 0] -= lx * np.round(rel[..., 0] / lx)
        rel[..., 1] -= ly * np.round(rel[..., 1] / ly)
    w = np.zeros(n) if weights is None else np.asarray(weights, dtype=np.float64)
    out = np.empty((q.shape[0], 2))
    _normals_kernel(np.ascontiguousarray(q), np.ascontiguousarray(idx, dtype=np.int64),
                    np.ascontiguousarray(seeds, dtype=np.float64), w, float(lx), float(ly),
                    bool(periodic), out)
    return out


@njit(parallel=True, cache=True)
def _normals_kernel(q, idx, seeds, w, lx, ly, periodic, out):
    m, k = idx.shape
    for i in prange(m):
        best = np.inf
        o = 0
        for a in range(k):
            j = idx[i, a]
            dx = seeds[j, 0] - q[i, 0]
            dy = seeds[j, 1] - q[i, 1]
            if periodic:
                dx -= lx * round(dx / lx)
                dy -= ly * round(dy / ly)
            p = dx * dx + dy * dy - w[j]
            if p < best:
                best = p
                o = a
        jo = idx[i, o]
        ox = seeds[jo, 0] - q[i, 0]
        oy = seeds[jo, 1] - q[i, 1]
        if periodic:
            ox -= lx * round(ox / lx)
            oy -= ly * round(oy / ly)
        bd = np.inf
        nx = 1.0
        ny = 0.0
        for a in range(k):
            if a == o:
                continue
            j = idx[i, a]
            dx = seeds[j, 0] - q[i, 0]
            dy = seeds[j, 1] - q[i, 1]
            if periodic:
                dx -= lx * round(dx / lx)
                dy -= ly * round(dy / ly)
            ex = dx - ox
            ey = dy - oy
            sep = math.sqrt(ex * ex + ey * ey)
            if sep == 0.0:
                continue
            d = (dx * dx + dy * dy - w[j] - best) / (2.0 * sep)
            if d < bd:
                bd = d
                nx = ex / sep
                ny = ey / sep
        out[i, 0] = nx
        out[i, 1] = ny


@njit(cache=True, inline="always")
def _stored_line_min(pc, pnx, pny, t, rx, ry, bd, nxv, nyv):
    """The running minimum ``(d, n_x, n_y)`` of :func:`_nearest_line_normal` after the stored
    radical line ``t`` of :meth:`CellNeighbours.pair_lines` (distance ``c − n·r``)."""
    dd = pc[t] - (pnx[t] * rx + pny[t] * ry)
    if dd < bd:
        return dd, pnx[t], pny[t]
    return bd, nxv, nyv


@njit(cache=True, inline="always")
def _nearest_line_normal(x, y, o, seeds, w, nstart, nbr, pex, pey, pnx, pny, pc, lim, lx, ly,
                         hlx, hly, periodic):
    """Nearest radical line of grain ``o``'s neighbours from the point ``(x, y)``: its signed
    distance and unit normal ``(d, n_x, n_y)`` (``(inf, 1, 0)`` without neighbours).

    Per neighbour pair (minimum-image seed difference ``e``) the radical line is at ``c − n·r``
    from the point (``r``: the point relative to the owner's seed, minimum image); where ``e − r``
    is not the minimum image of the neighbour (``|e − r| ≥ hlx, hly``, half the extent, per
    axis: grains of about half the specimen) the distance is computed from the images nearest
    to the point, as in :meth:`CellNeighbours.normals`.  ``lim[o]``: ``|r| <`` it (per axis)
    proves ``e − r`` the minimum image for every pair of ``o`` (the usual case: one test per
    point, then a loop without per-pair tests; coincident seeds have ``c = inf`` and never win
    it either).  ``pex, pey, pnx, pny, pc, lim``: :meth:`CellNeighbours.pair_lines`."""
    rx = x - seeds[o, 0]
    ry = y - seeds[o, 1]
    if periodic:
        rx = min_image(rx, lx)
        ry = min_image(ry, ly)
    bd = np.inf
    nxv = 1.0
    nyv = 0.0
    if not periodic or (abs(rx) < lim[o, 0] and abs(ry) < lim[o, 1]):
        for t in range(nstart[o], nstart[o + 1]):
            bd, nxv, nyv = _stored_line_min(pc, pnx, pny, t, rx, ry, bd, nxv, nyv)
        return bd, nxv, nyv
    for t in range(nstart[o], nstart[o + 1]):
        if pc[t] == np.inf:
            continue  # coincident seeds: no radical line
        if periodic and (abs(pex[t] - rx) >= hlx or abs(pey[t] - ry) >= hly):
            j = nbr[t]  # rare: the nearest images are not e − r
            dx = seeds[j, 0] - x
            dy = seeds[j, 1] - y
            dx -= lx * round(dx / lx)
            dy -= ly * round(dy / ly)
            ex = dx + rx
            ey = dy + ry
            sep = math.sqrt(ex * ex + ey * ey)
            if sep == 0.0:
                continue
            dd = (dx * dx + dy * dy - w[j] - (rx * rx + ry * ry - w[o])) / (2.0 * sep)
            if dd < bd:
                bd = dd
                nxv = ex / sep
                nyv = ey / sep
        else:
            bd, nxv, nyv = _stored_line_min(pc, pnx, pny, t, rx, ry, bd, nxv, nyv)
    return bd, nxv, nyv


@njit(parallel=True, cache=True)
def _image_distance_kernel(qx, qy, owner, dist_q, jac, cap_q, cap, seeds, w, nstart, nbr,
                           pex, pey, pnx, pny, pc, lim, lx, ly, periodic, out):
    """``d_p = d_q / |Jᵀ n|``; ``n``: normal of the nearest radical line among the owner's
    neighbours (:func:`_nearest_line_normal`)."""
    m = qx.shape[0]
    hx = 0.5 * lx
    hy = 0.5 * ly
    for i in prange(m):
        d = dist_q[i]
        if not d < cap_q:
            out[i] = cap
            continue
        _, nxv, nyv = _nearest_line_normal(qx[i], qy[i], owner[i], seeds, w, nstart, nbr, pex,
                                           pey, pnx, pny, pc, lim, lx, ly, hx, hy, periodic)
        s = jt_norm(jac, i, nxv, nyv)
        out[i] = np.float32(min(d / max(s, 1e-12), cap))


@njit(parallel=True, cache=True)
def _const_normal_distance_kernel(dist_q, owner, normals, jac, cap_q, cap, out):
    for i in prange(dist_q.shape[0]):
        d = dist_q[i]
        if not d < cap_q:
            out[i] = cap
            continue
        o = owner[i]
        nxv = normals[o, 0]
        nyv = normals[o, 1]
        s = jt_norm(jac, i, nxv, nyv)
        out[i] = np.float32(min(d / max(s, 1e-12), cap))


def _pair_lines(cells: CellNeighbours):
    """Per neighbour pair ``(o, j)``: minimum-image ``e = p_j − p_o``, unit normal ``e/|e|`` and
    ``c = (|e|² − w_j + w_o) / (2|e|)`` (the radical line's distance from ``p_o``)."""
    o = np.repeat(np.arange(cells.start.shape[0] - 1), np.diff(cells.start))
    j = cells.neighbours
    e = cells.seeds[j] - cells.seeds[o]
    if cells.periodic:
        lx, ly = cells.extent
        e[:, 0] -= lx * np.round(e[:, 0] / lx)
        e[:, 1] -= ly * np.round(e[:, 1] / ly)
    sep = np.hypot(e[:, 0], e[:, 1])
    ok = sep > 0
    safe = np.where(ok, sep, 1.0)
    c = np.where(ok, ((e[:, 0] ** 2 + e[:, 1] ** 2) - cells.weights[j] + cells.weights[o])
                 / (2.0 * safe), np.inf)
    # per owner: |r| below L/2 − max |e| (a hair less) keeps every |e − r| below L/2
    n = cells.start.shape[0] - 1
    lim = np.empty((n, 2))
    for a, half in ((0, 0.5 * cells.extent[0]), (1, 0.5 * cells.extent[1])):
        emax = np.zeros(n)
        np.maximum.at(emax, o, np.abs(e[:, a]))
        lim[:, a] = (half - emax) - 1e-9 * half
    return (np.ascontiguousarray(e[:, 0]), np.ascontiguousarray(e[:, 1]),
            np.ascontiguousarray(e[:, 0] / safe), np.ascontiguousarray(e[:, 1] / safe),
            np.ascontiguousarray(c), lim)


def image_space_distance(cells: CellNeighbours, qx: np.ndarray, qy: np.ndarray,
                         owner: np.ndarray, dist_q: np.ndarray, jacobian: np.ndarray,
                         cap_q: float, cap: float) -> np.ndarray:
    """Image-space boundary distance ``d_p = d_q / |Jᵀ n|`` in one pass (px, float32).

    ``n``: the normal of :meth:`CellNeighbours.normals` at each point (nearest radical line of
    the point's own cell); ``d_q ≥ cap_q`` gives ``cap``, and ``d_p`` is capped at ``cap``.

    Parameters
    ----------
    cells : CellNeighbours
    qx, qy : ndarray, specimen coordinates, px
    owner : ndarray int, the points' grains
    dist_q : ndarray, specimen-space boundary distance (px), shape of ``qx``
    jacobian : ndarray, shape ``qx.shape + (2, 2)``
    cap_q, cap : float, px

    Returns
    -------
    ndarray float32, shape of ``qx``
    """
    shape = np.shape(qx)
    qx = np.ascontiguousarray(np.asarray(qx, dtype=np.float64).ravel())
    qy = np.ascontiguousarray(np.asarray(qy, dtype=np.float64).ravel())
    ow = np.asarray(owner).ravel()
    if ow.dtype not in (np.int32, np.int64):  # (label ids are int32: no copy)
        ow = ow.astype(np.int64)
    ow = np.ascontiguousarray(ow)
    dq = np.ascontiguousarray(np.asarray(dist_q).ravel())
    jac = np.ascontiguousarray(np.asarray(jacobian, dtype=np.float64).reshape(-1, 4))
    out = np.empty(qx.shape[0], dtype=np.float32)
    lx, ly = cells.extent
    _image_distance_kernel(qx, qy, ow, dq, jac, float(cap_q), float(cap), cells.seeds,
                           cells.weights, cells.start, cells.neighbours, *cells.pair_lines(),
                           float(lx), float(ly), cells.periodic, out)
    return out.reshape(shape)


def image_space_distance_const(dist_q: np.ndarray, owner: np.ndarray, normals: np.ndarray,
                               jacobian: np.ndarray, cap_q: float, cap: float) -> np.ndarray:
    """``d_p = d_q / |Jᵀ n|`` with one normal per owner (e.g. a grain's twin lamellae), px float32.

    Parameters
    ----------
    dist_q : ndarray, specimen-space distance (px)
    owner : ndarray int, shape of ``dist_q``
    normals : ndarray (n, 2), unit normals per owner
    jacobian : ndarray, shape ``dist_q.shape + (2, 2)``
    cap_q, cap : float, px (``d_q ≥ cap_q`` gives ``cap``; ``d_p`` capped at ``cap``)
    """
    shape = np.shape(dist_q)
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    _const_normal_distance_kernel(np.ascontiguousarray(np.asarray(dist_q).ravel()),
                                  np.ascontiguousarray(np.asarray(owner).ravel()),
                                  np.ascontiguousarray(normals, dtype=np.float64),
                                  np.ascontiguousarray(np.asarray(jacobian, dtype=np.float64)
                                                       .reshape(-1, 4)),
                                  float(cap_q), float(cap), out)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# grains and image-space distance in one pass (periodic specimens with exact cell neighbours)
# --------------------------------------------------------------------------------------------
#: pixels labelled in sequence by :func:`_warped_label_kernel` (each starts from the previous
#: pixel's grain); fixed, so any thread count gives the same result
_LABEL_CHUNK = 256
#: steps of the neighbour walk before a pixel falls back to the exact ring search
_WALK_STEPS = 64


@njit(cache=True, inline="always")
def _tile_line(px, py, wo, qx, qy, wq):
    """Radical line of the owner image ``(px, py)`` (weight ``wo``) with the image ``(qx, qy)``
    (weight ``wq``; weights shifted to ``≤ 0``) as ``(a_x, a_y, c)``, distance ``a·x + c``: the
    expressions of :func:`generators.voronoi._tile_owner_lines`, so the same bits; ``c = inf``
    for coincident seeds (no line)."""
    ex = qx - px
    ey = qy - py
    sep = math.sqrt(ex * ex + ey * ey)
    if sep == 0.0:
        return 0.0, 0.0, np.inf
    ax = -ex / sep
    ay = -ey / sep
    c = (qx ** 2 + qy ** 2 - px * px - py * py - wq + wo) / (2.0 * sep)
    return ax, ay, c


@njit(cache=True)
def _pair_images(seeds, wn, nstart, nbr, lx, ly):
    """Per neighbour pair ``(o, j)``: the shift ``k`` (periods, float) of ``j``'s image next to
    ``o`` (minimum image of ``p_j − p_o``) and the pair's :func:`_tile_line` with ``o`` at its
    own position, (m, 5): ``k_x, k_y, a_x, a_y, c``."""
    m = nbr.shape[0]
    k = np.zeros((m, 5))
    for o in range(nstart.shape[0] - 1):
        px = seeds[o, 0] + lx * 0.0
        py = seeds[o, 1] + ly * 0.0
        for t in range(nstart[o], nstart[o + 1]):
            j = nbr[t]
            kx = float(round((seeds[o, 0] - seeds[j, 0]) / lx))
            ky = float(round((seeds[o, 1] - seeds[j, 1]) / ly))
            k[t, 0] = kx
            k[t, 1] = ky
            ax, ay, c = _tile_line(px, py, wn[o], seeds[j, 0] + lx * (kx + 0.0),
                                   seeds[j, 1] + ly * (ky + 0.0), wn[j])
            k[t, 2] = ax
            k[t, 3] = ay
            k[t, 4] = c
    return k


@njit(cache=True, inline="always")
def _period_shift(v, lx):
    """``round(v / lx)`` (float), without the division when ``|v|`` is clearly below ``lx / 2``."""
    if abs(v) < 0.49 * lx:
        return 0.0
    return float(round(v / lx))


@njit(cache=True)
def _start_seed(xw, yw, sid, start, nx, ny, hx, hy, nstart):
    """A seed with neighbours in the nearest non-empty bucket of the labelling grid (-1: none)."""
    cx = min(int(xw / hx), nx - 1)
    cy = min(int(yw / hy), ny - 1)
    for k in range(max(nx, ny) + 1):
        for jy in range(cy - k, cy + k + 1):
            for jx in range(cx - k, cx + k + 1):
                if max(abs(jx - cx), abs(jy - cy)) != k:
                    continue
                c = (jy % ny) * nx + (jx % nx)
                for t in range(start[c], start[c + 1]):
                    g = sid[t]
                    if nstart[g + 1] > nstart[g]:
                        return g
    return -1


@njit(cache=True, inline="always")
def _walk(x, y, xw, yw, g, seeds, wn, nstart, nbr, kimg, sx, sy, sw, sid, start, nx, ny, hx, hy,
          lx, ly, cap_q):
    """Power-nearest seed of the point (``x, y``; wrapped ``xw, yw``) by a walk from grain ``g``
    (``-1``: the ring search), and the smallest of its radical lines' distances capped at
    ``cap_q``, as the tile lists evaluate them (see :func:`_warped_label_kernel`); then the
    index ``t1`` (into ``nbr``) of the line with the smallest distance (first of equals; ``-1``
    without lines) and the gap from it to the second smallest (``inf`` with one line, ``0`` on a
    tie): ``(g, bd, t1, gap)``."""
    steps = 0
    bd = cap_q
    t1 = -1
    d2 = np.inf
    while True:
        if g < 0 or steps > _WALK_STEPS:  # no walk: the exact ring search
            g = _label_one(x, y, sx, sy, sw, sid, start, nx, ny, hx, hy, lx, ly, True,
                           cap_q)[0]
            steps = -1
        kox = _period_shift(xw - seeds[g, 0], lx)
        koy = _period_shift(yw - seeds[g, 1], ly)
        px = seeds[g, 0] + lx * kox
        py = seeds[g, 1] + ly * koy
        bd = cap_q
        dmin = np.inf  # the smallest line distance (line t1) and the second smallest (d2)
        d2 = np.inf
        t1 = -1
        low = False
        if kox == 0.0 and koy == 0.0:  # the owner at its own position: stored lines
            for t in range(nstart[g], nstart[g + 1]):
                d = kimg[t, 2] * xw + kimg[t, 3] * yw + kimg[t, 4]
                if d < bd:
                    bd = d
                d2 = min(d2, max(d, dmin))  # branch-free (selects)
                t1 = t if d < dmin else t1
                dmin = min(dmin, d)
                if d < 1e-9:
                    low = True
        else:
            for t in range(nstart[g], nstart[g + 1]):
                j = nbr[t]
                ax, ay, c = _tile_line(px, py, wn[g],
                                       seeds[j, 0] + lx * (kimg[t, 0] + kox),
                                       seeds[j, 1] + ly * (kimg[t, 1] + koy), wn[j])
                d = ax * xw + ay * yw + c
                if d < bd:
                    bd = d
                d2 = min(d2, max(d, dmin))  # branch-free (selects)
                t1 = t if d < dmin else t1
                dmin = min(dmin, d)
                if d < 1e-9:
                    low = True
        if not low or steps < 0:
            break
        # a line at (or within rounding of) the point: move to the neighbour with the
        # smallest power distance if it beats the grain's (the tile lists' comparison)
        dx = xw - px
        dy = yw - py
        best = dx * dx + dy * dy - wn[g]
        jb = -1
        for t in range(nstart[g], nstart[g + 1]):
            j = nbr[t]
            dx = xw - (seeds[j, 0] + lx * (kimg[t, 0] + kox))
            dy = yw - (seeds[j, 1] + ly * (kimg[t, 1] + koy))
            p = dx * dx + dy * dy - wn[j]
            if p < best:
                best = p
                jb = j
        if jb < 0:
            if dmin < -1e-6:  # clearly outside, yet no neighbour nearer: the ring search
                steps = _WALK_STEPS + 1
                continue
            break  # a tie within rounding of the boundary
        g = jb
        steps += 1
    return g, bd, t1, d2 - dmin


@njit(parallel=True, cache=True)
def _warped_label_kernel(xs, ys, jac, seeds, wn, w, nstart, nbr, kimg, sx, sy, sw, sid, start,
                         nx, ny, hx, hy, lx, ly, cap_q, cap, pex, pey, pnx, pny, pc, lim,
                         gap, m0, out_gid, out_d):
    """Grain and image-space boundary distance of every point, from the cells' neighbours.

    Per point (specimen coordinates, wrapped into the specimen as the tile lists do): walk from
    the previous point's grain to a neighbour with a smaller power distance while one of the
    grain's radical lines lies on the point's wrong side (the cell is the intersection of its
    neighbours' half-planes; power distances strictly fall, so the walk ends, in the power-
    nearest seed).  The specimen-space distance is the smallest of those lines, evaluated as the
    tile lists evaluate them (:func:`_tile_line`, the owner's image next to the point), then
    ``d_p = d_q / |Jᵀ n|`` exactly as :func:`_image_distance_kernel`.

    The normal ``n`` is that of the walk's nearest line where the gap to its second nearest
    exceeds the tolerance of :func:`_normal_gap_coefficients` (``gap[g]``, ``m0 = 3 max(L)``;
    far above the rounding of either way of evaluating a line) and :func:`_nearest_line_normal`
    would take its stored lines (``|r| < lim``): then both find the same line, the first of a
    unique minimum, and its stored normal.  Otherwise (a tie within rounding, a cell across
    half the specimen): :func:`_nearest_line_normal` itself.  ``gap = inf``: that search
    everywhere."""
    n = xs.shape[0]
    hxl = 0.5 * lx
    hyl = 0.5 * ly
    nchunk = (n + _LABEL_CHUNK - 1) // _LABEL_CHUNK
    for b in prange(nchunk):
        g = -1
        for i in range(b * _LABEL_CHUNK, min(n, (b + 1) * _LABEL_CHUNK)):
            x = xs[i]
            y = ys[i]
            xw = _wrap(x, lx)
            yw = _wrap(y, ly)
            if g < 0:
                g = _start_seed(xw, yw, sid, start, nx, ny, hx, hy, nstart)
            g, bd, t1, gp = _walk(x, y, xw, yw, g, seeds, wn, nstart, nbr, kimg, sx, sy, sw,
                                   sid, start, nx, ny, hx, hy, lx, ly, cap_q)
            out_gid[i] = g
            dq = np.float32(max(bd, 0.0))
            d = float(dq)
            if not d < cap_q:
                out_d[i] = cap
                continue
            # the normal of the nearest radical line, as _image_distance_kernel finds it
            rx = min_image(x - seeds[g, 0], lx)
            ry = min_image(y - seeds[g, 1], ly)
            mq = m0 + max(abs(x), abs(y))
            tol = gap[g, 0] * (mq * mq) + 2.0 * _GAP_REL * mq + gap[g, 1]
            if gp > tol and abs(rx) < lim[g, 0] and abs(ry) < lim[g, 1]:
                nxv = pnx[t1]  # the walk's nearest line, clearly apart from the others
                nyv = pny[t1]
            else:
                _, nxv, nyv = _nearest_line_normal(x, y, g, seeds, w, nstart, nbr, pex, pey, pnx,
                                                   pny, pc, lim, lx, ly, hxl, hyl, True)
            s = jt_norm(jac, i, nxv, nyv)
            out_d[i] = np.float32(min(d / max(s, 1e-12), cap))


@njit(parallel=True, cache=True)
def _walk_gid_kernel(xs, ys, seeds, wn, nstart, nbr, kimg, sx, sy, sw, sid, start, nx, ny, hx,
                     hy, lx, ly, out_gid):
    """Grain of every point by :func:`_walk`, each from a seed of its own bucket (points in
    any order, e.g. scattered sub-seeds)."""
    n = xs.shape[0]
    nchunk = (n + _LABEL_CHUNK - 1) // _LABEL_CHUNK
    for b in prange(nchunk):
        for i in range(b * _LABEL_CHUNK, min(n, (b + 1) * _LABEL_CHUNK)):
            xw = _wrap(xs[i], lx)
            yw = _wrap(ys[i], ly)
            g = _start_seed(xw, yw, sid, start, nx, ny, hx, hy, nstart)  # scattered points
            g, _, _, _ = _walk(xs[i], ys[i], xw, yw, g, seeds, wn, nstart, nbr, kimg, sx, sy, sw,
                               sid, start, nx, ny, hx, hy, lx, ly, 1.0)
            out_gid[i] = g


def _walk_inputs(tess, cells: CellNeighbours):
    """The arrays of the walk, or ``None`` where it does not apply: periodic tessellations
    whose cells all lie well inside half the specimen about their seeds (unique neighbour
    images), ``cells`` from :meth:`CellNeighbours.from_polygons` of ``tess``."""
    if not (cells.periodic and tess.periodic) or cells.reach is None or tess.n_seeds < 2:
        return None
    if cells.seeds.shape != tess.seeds.shape or not np.array_equal(cells.seeds, tess.seeds):
        return None
    lines = cells.pair_lines()
    if not np.all(cells.reach < lines[5]):  # a cell too large for unique neighbour images
        return None
    w = np.zeros(tess.n_seeds) if tess.weights is None else tess.weights
    wn = np.ascontiguousarray(w - w.max())  # the tile lists' weights
    if cells._kimg is None:
        object.__setattr__(cells, "_kimg", _pair_images(cells.seeds, wn, cells.start,
                                                        cells.neighbours, *cells.extent))
    return wn, lines


#: relative margin of :func:`_normal_gap_coefficients` (~4500 double-precision epsilons)
_GAP_REL = 1e-12


def _normal_gap_coefficients(cells: CellNeighbours) -> np.ndarray:
    """Per cell ``(A, C)`` (n, 2): a gap ``A M² + 2 _GAP_REL M + C`` (px) between a point's
    nearest and second-nearest radical line above which :func:`_walk` and
    :func:`_nearest_line_normal` agree on the nearest (``M``, px: a bound on every coordinate
    involved, ``3 max(L) + max(|x|, |y|)`` for the point ``(x, y)``).

    The two evaluate a line's distance by different expressions (the tile lists' ``a·x + c``
    from the owner's image next to the point, and ``c − n·r`` from the owner's seed), each
    within a few rounding units of ``M²/|e| + M + |c| + (|w_j| + |w_o|)/|e|`` of the exact
    distance (``|e|``: the seeds' separation; ``c``: the line's distance from the owner's seed;
    weights shifted by at most ``max|w|``).  Twice ``_GAP_REL`` times the largest such scale
    over a cell's lines exceeds the sum of both errors for both lines by three orders of
    magnitude.  ``A = inf`` for a cell with coincident seeds (no line).  Computed once.
    """
    if cells._gap is None:
        pex, pey, _, _, pc, _ = cells.pair_lines()
        n = cells.start.shape[0] - 1
        owner = np.repeat(np.arange(n), np.diff(cells.start))
        sep = np.hypot(pex, pey)
        inv = np.full(sep.shape, np.inf)
        np.divide(1.0, sep, out=inv, where=sep > 0)
        inv_g = np.zeros(n)
        np.maximum.at(inv_g, owner, inv)
        c_g = np.zeros(n)
        np.maximum.at(c_g, owner, np.where(np.isfinite(pc), np.abs(pc), 0.0))
        wmax = float(np.abs(cells.weights).max()) if cells.weights.size else 0.0
        coef = np.empty((n, 2))
        coef[:, 0] = 2.0 * _GAP_REL * inv_g
        with np.errstate(invalid="ignore"):
            coef[:, 1] = 2.0 * _GAP_REL * (c_g + 4.0 * wmax * inv_g)
        coef[np.isnan(coef)] = np.inf
        object.__setattr__(cells, "_gap", np.ascontiguousarray(coef))
    return cells._gap


def _points(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float64).ravel())
    ys = np.ascontiguousarray(np.asarray(y, dtype=np.float64).ravel())
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same shape, got {np.shape(x)} and {np.shape(y)}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("coordinates must be finite")
    return xs, ys


def walk_grain_ids(tess, cells: CellNeighbours, x: np.ndarray, y: np.ndarray
                   ) -> np.ndarray | None:
    """Grain ids at specimen points by the neighbour walk of :func:`label_warped_grains`
    (``tess.label``'s ids without its tile lists), int32 of ``x``'s shape; ``None`` where the
    walk does not apply."""
    inp = _walk_inputs(tess, cells)
    if inp is None:
        return None
    wn, _ = inp
    xs, ys = _points(x, y)
    sx, sy, sw, sid, start, nx, ny, hx, hy = tess._grid
    gid = np.empty(xs.shape[0], dtype=np.int32)
    lx, ly = tess.extent
    _walk_gid_kernel(xs, ys, cells.seeds, wn, cells.start, cells.neighbours, cells._kimg, sx, sy,
                     sw, sid, start, nx, ny, hx, hy, float(lx), float(ly), gid)
    return gid.reshape(np.shape(x))


def label_warped_grains(tess, cells: CellNeighbours, qx: np.ndarray, qy: np.ndarray,
                        jacobian: np.ndarray, cap_q: float, cap: float,
                        _normal_shortcut: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """Grain ids and image-space boundary distances at mapped points in one pass, or ``None``
    where this path does not apply (then: ``tess.label`` and :func:`image_space_distance`).

    The same grains and distances as ``tess.label(qx, qy, max_distance=cap_q)`` followed by
    ``image_space_distance(cells, qx, qy, gid, d_q, jacobian, cap_q, cap)`` (the same
    expressions; a point within rounding of a boundary or a vertex of four cells may fall to the
    other side of a tie), without the tessellation's tile lists (:func:`_warped_label_kernel`).
    Applies to periodic tessellations whose cells all lie well inside half the specimen about
    their seeds (``cells`` from :meth:`CellNeighbours.from_polygons` of ``tess``), the usual case.

    Parameters
    ----------
    tess : generators.voronoi.Tessellation
    cells : CellNeighbours of ``tess`` (with ``reach``)
    qx, qy : ndarray, specimen coordinates, px
    jacobian : ndarray, shape ``qx.shape + (2, 2)``
    cap_q, cap : float, px (as :func:`image_space_distance`; ``cap_q`` also caps ``d_q``)
    _normal_shortcut : bool
        Take the normal from the walk's nearest line where it is clearly nearest (the default;
        the same bits); ``False``: search it afresh at every point (for the tests).

    Returns
    -------
    (grain_id int32, distance float32), shape of ``qx``; or ``None``
    """
    inp = _walk_inputs(tess, cells)
    if inp is None:
        return None
    wn, lines = inp
    lim = lines[5]
    shape = np.shape(qx)
    xs, ys = _points(qx, qy)
    jac = np.ascontiguousarray(np.asarray(jacobian, dtype=np.float64).reshape(-1, 4))
    sx, sy, sw, sid, start, nx, ny, hx, hy = tess._grid
    gid = np.empty(xs.shape[0], dtype=np.int32)
    dist = np.empty(xs.shape[0], dtype=np.float32)
    lx, ly = tess.extent
    gap = (_normal_gap_coefficients(cells) if _normal_shortcut
           else np.full((cells.seeds.shape[0], 2), np.inf))
    _warped_label_kernel(xs, ys, jac, cells.seeds, wn, cells.weights, cells.start,
                         cells.neighbours, cells._kimg, sx, sy, sw, sid, start, nx, ny, hx, hy,
                         float(lx), float(ly), float(cap_q), float(cap), *lines[:5], lim,
                         gap, 3.0 * max(float(lx), float(ly)), gid, dist)
    return gid.reshape(shape), dist.reshape(shape)
