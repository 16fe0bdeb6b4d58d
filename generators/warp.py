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

Units: px.  Kernels work on independent pixels (``prange``): results do not depend on thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange
from scipy.spatial import cKDTree

__all__ = ["CoordinateMap", "Warp", "CellNeighbours", "stretch_matrix", "radical_normals",
           "image_space_distance", "image_space_distance_const"]


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


@njit(parallel=True, cache=True, fastmath=True)
def _map_kernel(xs, ys, m, cx, cy, kv, av, ph, qx, qy, jac):
    """Map and Jacobian of every point; blocks of pixels in ``prange``, the mode loop outside the
    pixel loop (vectorised), each pixel's sums over the modes in mode order."""
    n = xs.shape[0]
    nm = kv.shape[0]
    nb = (n + _MAP_BLOCK - 1) // _MAP_BLOCK
    for b in prange(nb):
        lo = b * _MAP_BLOCK
        hi = min(n, lo + _MAP_BLOCK)
        cnt = hi - lo
        vx = np.empty(cnt)
        vy = np.empty(cnt)
        ux = np.zeros(cnt)
        uy = np.zeros(cnt)
        d00 = np.ones(cnt)
        d01 = np.zeros(cnt)
        d10 = np.zeros(cnt)
        d11 = np.ones(cnt)
        for t in range(cnt):
            px = xs[lo + t] - cx
            py = ys[lo + t] - cy
            vx[t] = cx + m[0, 0] * px + m[0, 1] * py
            vy[t] = cy + m[1, 0] * px + m[1, 1] * py
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
    _lines: tuple = field(default=None, init=False, repr=False, compare=False)

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
        return cls(seeds=np.ascontiguousarray(cells.origins, dtype=np.float64),
                   weights=np.ascontiguousarray(w), start=start,
                   neighbours=np.ascontiguousarray(pairs[:, 1]),
                   extent=(float(cells.extent[0]), float(cells.extent[1])),
                   periodic=bool(cells.periodic))

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


@njit(parallel=True, cache=True)
def _image_distance_kernel(qx, qy, owner, dist_q, jac, cap_q, cap, seeds, w, nstart, nbr,
                           pex, pey, pnx, pny, pc, lim, lx, ly, periodic, out):
    """``d_p = d_q / |Jᵀ n|``; ``n``: normal of the nearest radical line among the owner's
    neighbours.  Per neighbour pair (minimum-image seed difference ``e``) the radical line is at
    ``c − n·r`` from the point (``r``: the point relative to the owner's seed); where ``e − r`` is
    not the minimum image of the neighbour (grains of about half the specimen) the distance is
    computed from the images nearest to the point, as in :meth:`CellNeighbours.normals`.
    ``lim[o]``: ``|r| <`` it (per axis) proves ``e − r`` the minimum image for every pair of
    ``o`` (the usual case: one test per point, then a loop without per-pair tests; coincident
    seeds have ``c = inf`` and never win it either)."""
    m = qx.shape[0]
    hx = 0.5 * lx
    hy = 0.5 * ly
    for i in prange(m):
        d = dist_q[i]
        if not d < cap_q:
            out[i] = cap
            continue
        x = qx[i]
        y = qy[i]
        o = owner[i]
        rx = x - seeds[o, 0]
        ry = y - seeds[o, 1]
        if periodic:
            rx -= lx * round(rx / lx)
            ry -= ly * round(ry / ly)
        bd = np.inf
        nxv = 1.0
        nyv = 0.0
        if not periodic or (abs(rx) < lim[o, 0] and abs(ry) < lim[o, 1]):
            for t in range(nstart[o], nstart[o + 1]):
                dd = pc[t] - (pnx[t] * rx + pny[t] * ry)
                if dd < bd:
                    bd = dd
                    nxv = pnx[t]
                    nyv = pny[t]
            s = math.hypot(jac[i, 0] * nxv + jac[i, 2] * nyv, jac[i, 1] * nxv + jac[i, 3] * nyv)
            out[i] = np.float32(min(d / max(s, 1e-12), cap))
            continue
        for t in range(nstart[o], nstart[o + 1]):
            if pc[t] == np.inf:
                continue  # coincident seeds: no radical line
            if periodic and (abs(pex[t] - rx) >= hx or abs(pey[t] - ry) >= hy):
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
                dd = pc[t] - (pnx[t] * rx + pny[t] * ry)
                if dd < bd:
                    bd = dd
                    nxv = pnx[t]
                    nyv = pny[t]
        s = math.hypot(jac[i, 0] * nxv + jac[i, 2] * nyv, jac[i, 1] * nxv + jac[i, 3] * nyv)
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
        s = math.hypot(jac[i, 0] * nxv + jac[i, 2] * nyv, jac[i, 1] * nxv + jac[i, 3] * nyv)
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
