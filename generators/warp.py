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

Units: px.  Kernels work on independent pixels (``prange``): results do not depend on thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from scipy.spatial import cKDTree

__all__ = ["CoordinateMap", "Warp", "CellNeighbours", "stretch_matrix", "radical_normals"]


def stretch_matrix(elongation: float, angle_rad: float) -> np.ndarray:
    """``M = R(α) diag(1/√e, √e) R(α)ᵀ`` (2, 2): grains ``e`` times longer along ``α`` in the image."""
    if not elongation > 0:
        raise ValueError(f"elongation must be > 0, got {elongation}")
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([1.0 / math.sqrt(elongation), math.sqrt(elongation)]) @ r.T


@njit(parallel=True, cache=True, fastmath=True)
def _map_kernel(xs, ys, m, cx, cy, kv, av, ph, qx, qy, jac):
    n = xs.shape[0]
    nm = kv.shape[0]
    for i in prange(n):
        px = xs[i] - cx
        py = ys[i] - cy
        vx = cx + m[0, 0] * px + m[0, 1] * py
        vy = cy + m[1, 0] * px + m[1, 1] * py
        ux = 0.0
        uy = 0.0
        d00 = 1.0
        d01 = 0.0
        d10 = 0.0
        d11 = 1.0
        for j in range(nm):
            arg = kv[j, 0] * vx + kv[j, 1] * vy + ph[j]
            c = math.cos(arg)
            s = math.sin(arg)
            ux += av[j, 0] * c
            uy += av[j, 1] * c
            d00 -= av[j, 0] * kv[j, 0] * s
            d01 -= av[j, 0] * kv[j, 1] * s
            d10 -= av[j, 1] * kv[j, 0] * s
            d11 -= av[j, 1] * kv[j, 1] * s
        qx[i] = vx + ux
        qy[i] = vy + uy
        jac[i, 0] = d00 * m[0, 0] + d01 * m[1, 0]
        jac[i, 1] = d00 * m[0, 1] + d01 * m[1, 1]
        jac[i, 2] = d10 * m[0, 0] + d11 * m[1, 0]
        jac[i, 3] = d10 * m[0, 1] + d11 * m[1, 1]


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

    @classmethod
    def from_polygons(cls, cells, weights: np.ndarray | None) -> "CellNeighbours":
        """From :class:`generators.substructure.CellPolygons` (its ``edge_neighbour`` labels)."""
        n = cells.n_cells
        owner = np.repeat(np.arange(n), np.diff(cells.start))
        nb = cells.edge_neighbour.astype(np.int64)
        keep = (nb >= 0) & (nb != owner)
        pairs = np.unique(np.c_[owner[keep], nb[keep]], axis=0)
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
