"""Grain growth: a Voronoi start evolved by Monte-Carlo Potts; the evolved raster is the specimen.

Model (Anderson, Srolovitz, Grest & Sahni, Acta Metall. 32 (1984) 783; Holm & Battaile, JOM 53
(2001) 20): every raster cell carries a grain id (spin, ``Q`` = number of grains).  The energy is
``E = J Σ_<ij> (1 − δ(s_i, s_j))`` over the 8 Moore neighbours (first and second neighbours, equal
weights: less lattice anisotropy than the 4-neighbourhood).  A Monte-Carlo step (MCS) is one
attempted flip per cell: the proposed spin is that of a random neighbour (interior cells, whose 8
neighbours all agree, are skipped: their only proposal is a no-op), accepted with the Metropolis
probability ``min(1, exp(−ΔE / kT))`` (``kT`` in units of ``J``).  Curvature-driven boundary motion
gives the parabolic growth law ``<A>(t) ≈ A0 + k t`` and 120° triple junctions.

Determinism: cells are updated on four sublattices ``(i mod 2, j mod 2)`` in turn; cells of one
sublattice are never Moore neighbours (the raster has even sides), so the rows of a sublattice are
updated in parallel and each row draws from its own counter-based stream
(:mod:`generators._rng`, stream number ``(step·4 + sublattice)·ny + row``).  The result is a pure
function of the key, identical for any Numba thread count.

Labels: the raster is the specimen.  A point belongs to the raster cell containing it (cells are
half-open squares ``[j h, (j+1) h) × [i h, (i+1) h)``, ``h`` = cell size in px); grain boundaries
are the cell edges between cells of different ids.  :meth:`PottsSpecimen.label` returns the exact
Euclidean distance (px, float32 rounding) from the point to that union of edge segments: for each
point a ring search over raster cells, started at a ring proven empty of boundary edges by a
precomputed chessboard distance transform of the cells owning an edge, and stopped when the next
ring cannot hold a closer edge (or the cap is reached).  The distance is exact for the raster
specimen; against the underlying continuum it carries the raster's own discretisation (``h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange
from scipy import ndimage

from generators._rng import stream_start, uniform
from generators.voronoi import Tessellation, poisson_seeds

__all__ = ["PottsGrains", "PottsSpecimen", "potts_evolve", "voronoi_raster"]

# --------------------------------------------------------------------------------------------
# Monte-Carlo Potts evolution
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _potts_kernel(spins, steps, step0, kT, key, rows, cols):
    """``rows[i] = (i-1, i, i+1)`` and ``cols[j] = (j-1, j, j+1)`` wrapped, or -1 outside."""
    ny, nx = spins.shape
    for s in range(steps):
        for sub in range(4):
            oy = sub // 2
            ox = sub % 2
            nrows = (ny - oy + 1) // 2
            for r in prange(nrows):
                i = oy + 2 * r
                nb = np.empty(8, dtype=np.int32)
                state = stream_start(key, ((step0 + s) * 4 + sub) * ny + i)
                for j in range(ox, nx, 2):
                    cur = spins[i, j]
                    nv = 0
                    same = True
                    for ta in range(3):  # Moore neighbours in row-major order
                        a = rows[i, ta]
                        if a < 0:
                            continue
                        for tb in range(3):
                            b = cols[j, tb]
                            if b < 0 or (ta == 1 and tb == 1):
                                continue
                            v = spins[a, b]
                            nb[nv] = v
                            nv += 1
                            if v != cur:
                                same = False
                    if same:
                        continue
                    u, state = uniform(state)
                    new = nb[min(int(u * nv), nv - 1)]
                    if new == cur:
                        continue
                    de = 0
                    for t in range(nv):
                        de += (nb[t] != new) - (nb[t] != cur)
                    if de <= 0:
                        spins[i, j] = new
                    elif kT > 0.0:
                        u, state = uniform(state)
                        if u < math.exp(-de / kT):
                            spins[i, j] = new


def _neighbour_index(n: int, periodic: bool) -> np.ndarray:
    """(n, 3) int64 table ``(k-1, k, k+1)``, wrapped (periodic) or -1 outside."""
    k = np.arange(n)
    t = np.stack([k - 1, k, k + 1], axis=1)
    if periodic:
        return np.ascontiguousarray(t % n)
    t[(t < 0) | (t >= n)] = -1
    return np.ascontiguousarray(t)


def potts_evolve(
    spins: np.ndarray,
    steps: int,
    temperature: float,
    key: int,
    *,
    periodic: bool = True,
    step0: int = 0,
) -> np.ndarray:
    """Evolve a grain-id raster by ``steps`` MC steps of the Moore-neighbourhood Potts model.

    Parameters
    ----------
    spins : ndarray, shape (ny, nx), integer
        Grain ids per raster cell (not modified). ``ny`` and ``nx`` must be even when periodic.
    steps : int
        Monte-Carlo steps (attempted flips per cell), ≥ 0.
    temperature : float
        ``kT`` in units of the boundary energy ``J`` (≥ 0; ~0.3–0.7 roughens lattice pinning away).
    key : int
        64-bit key of the counter-based random streams (draw it from a ``numpy.random.Generator``).
    periodic : bool
        Periodic raster (else free edges: border cells have fewer neighbours).
    step0 : int
        Index of the first step (continuing: ``evolve(evolve(s, a), b, step0=a)`` equals
        ``evolve(s, a + b)``).

    Returns
    -------
    ndarray, shape (ny, nx), int32
    """
    s = np.array(spins, dtype=np.int32, copy=True, order="C")
    if s.ndim != 2 or s.shape[0] < 2 or s.shape[1] < 2:
        raise ValueError(f"spins must be a 2D raster of at least 2x2 cells, got shape {s.shape}")
    if periodic and (s.shape[0] % 2 or s.shape[1] % 2):
        raise ValueError(f"a periodic Potts raster needs even sides, got {s.shape}")
    if int(steps) < 0 or int(step0) < 0:
        raise ValueError(f"steps and step0 must be >= 0, got {steps}, {step0}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0 (units of J), got {temperature}")
    _potts_kernel(s, int(steps), int(step0), float(temperature), np.uint64(key),
                  _neighbour_index(s.shape[0], periodic), _neighbour_index(s.shape[1], periodic))
    return s


def voronoi_raster(tess: Tessellation, shape: tuple[int, int]) -> np.ndarray:
    """Grain ids of a tessellation at the cell centres of a ``(ny, nx)`` raster covering its extent.

    Returns
    -------
    ndarray, shape (ny, nx), int32
    """
    ny, nx = shape
    lx, ly = tess.extent
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    gid, _ = tess.label((xx + 0.5) * (lx / nx), (yy + 0.5) * (ly / ny), max_distance=1.0)
    return gid


# --------------------------------------------------------------------------------------------
# exact labels of a raster specimen
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _seg_d2(px, py, x0, y0, x1, y1):
    """Squared distance from (px, py) to the axis-aligned segment (x0, y0)–(x1, y1)."""
    dx = max(x0 - px, 0.0, px - x1)
    dy = max(y0 - py, 0.0, py - y1)
    return dx * dx + dy * dy


@njit(parallel=True, cache=True)
def _raster_label_kernel(xs, ys, spins, ev, eh, kstart, inv_h, periodic, cap_c, kmax, gid, dist):
    """``ev[i, j]``: edge x = j+1, y ∈ [i, i+1] (cells (i, j), (i, j+1)); ``eh``: y = i+1."""
    ny, nx = spins.shape
    for n in prange(xs.shape[0]):
        px = xs[n] * inv_h
        py = ys[n] * inv_h
        if periodic:
            px = px - nx * math.floor(px / nx)
            py = py - ny * math.floor(py / ny)
        j = min(max(int(math.floor(px)), 0), nx - 1)
        i = min(max(int(math.floor(py)), 0), ny - 1)
        gid[n] = spins[i, j]
        k0 = kstart[i, j]
        best2 = cap_c * cap_c
        # every edge owned by a cell of Chebyshev ring k is >= k - 1 cells away
        k = k0
        while k <= kmax:
            if (k - 1) > 0 and float(k - 1) * (k - 1) >= best2:
                break
            for a in range(i - k, i + k + 1):
                edge_row = a == i - k or a == i + k
                step = 1 if (edge_row or k == 0) else 2 * k
                b = j - k
                while b <= j + k:
                    if periodic:
                        ga = a % ny
                        gb = b % nx
                    else:
                        ga = a
                        gb = b
                        if a < 0 or a >= ny or b < 0 or b >= nx:
                            b += step
                            continue
                    if ev[ga, gb]:
                        d2 = _seg_d2(px, py, b + 1.0, float(a), b + 1.0, a + 1.0)
                        if d2 < best2:
                            best2 = d2
                    if eh[ga, gb]:
                        d2 = _seg_d2(px, py, float(b), a + 1.0, b + 1.0, a + 1.0)
                        if d2 < best2:
                            best2 = d2
                    b += step
            k += 1
        dist[n] = min(math.sqrt(best2), cap_c) / inv_h


@dataclass(frozen=True)
class PottsSpecimen:
    """A grain map given as a raster of grain ids (e.g. an evolved Potts state).

    Parameters
    ----------
    spins : ndarray, shape (ny, nx), integer
        Grain id of each raster cell; ids in ``[0, n_seeds)``.
    cell_size : float
        Raster cell side in px (cells are squares; extent = ``(nx h, ny h)``).
    n_seeds : int
        Size of per-grain tables (ids need not all occur: grains vanish during growth).
    periodic : bool
        Whether the specimen is a periodic tile (points anywhere in the plane are wrapped; else a
        point outside belongs to the nearest border cell and no boundary lies on the raster edge).
    """

    spins: np.ndarray
    cell_size: float
    n_seeds: int
    periodic: bool = True
    _edges: tuple = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = np.ascontiguousarray(self.spins, dtype=np.int32)
        if s.ndim != 2 or s.shape[0] < 2 or s.shape[1] < 2:
            raise ValueError(f"spins must be a 2D raster of at least 2x2 cells, got {s.shape}")
        if not (self.cell_size > 0 and math.isfinite(self.cell_size)):
            raise ValueError(f"cell_size must be a positive number of px, got {self.cell_size}")
        if s.min() < 0 or s.max() >= self.n_seeds:
            raise ValueError(f"grain ids must lie in [0, n_seeds={self.n_seeds})")
        object.__setattr__(self, "spins", s)
        object.__setattr__(self, "cell_size", float(self.cell_size))
        object.__setattr__(self, "n_seeds", int(self.n_seeds))
        if self.periodic:
            ev = s != np.roll(s, -1, axis=1)
            eh = s != np.roll(s, -1, axis=0)
        else:
            ev = np.zeros(s.shape, bool)
            eh = np.zeros(s.shape, bool)
            ev[:, :-1] = s[:, :-1] != s[:, 1:]
            eh[:-1, :] = s[:-1, :] != s[1:, :]
        owner = ev | eh
        ny, nx = s.shape
        if not owner.any():  # a single grain: no boundary anywhere
            kstart = np.full(s.shape, max(ny, nx) + 2, dtype=np.int64)
        else:
            # Chebyshev (chessboard) distance from each cell to the nearest edge-owning cell:
            # the rings of cells around a point below it hold no boundary edge
            if self.periodic:  # a 3x3 tiling gives periodic distances for the centre tile
                big = np.tile(~owner, (3, 3))
                d = ndimage.distance_transform_cdt(big, metric="chessboard")[ny:2 * ny, nx:2 * nx]
            else:
                d = ndimage.distance_transform_cdt(~owner, metric="chessboard")
            kstart = d.astype(np.int64)
        object.__setattr__(self, "_edges", (np.ascontiguousarray(ev), np.ascontiguousarray(eh),
                                            np.ascontiguousarray(kstart)))

    @property
    def extent(self) -> tuple[float, float]:
        """Specimen size (Lx, Ly) in px."""
        ny, nx = self.spins.shape
        return (nx * self.cell_size, ny * self.cell_size)

    def label(
        self, x: np.ndarray, y: np.ndarray, max_distance: float = np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grain id of the raster cell containing each point and exact distance to the boundaries.

        Parameters
        ----------
        x, y : ndarray, any shape (same for both), float
            Specimen coordinates in px.
        max_distance : float
            Cap on the returned distance in px (smaller caps are faster).

        Returns
        -------
        grain_id : ndarray, int32, shape of ``x``
        distance : ndarray, float32, shape of ``x``
            Euclidean distance in px to the nearest cell edge separating different ids,
            ``min(d, max_distance)``.
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
        ev, eh, kstart = self._edges
        ny, nx = self.spins.shape
        inv_h = 1.0 / self.cell_size
        cap_c = float(max_distance) * inv_h
        # beyond this ring every edge (of every periodic image) has been seen
        kmax = max(ny, nx) + 2
        gid = np.empty(xs.shape[0], dtype=np.int32)
        dist = np.empty(xs.shape[0], dtype=np.float32)
        _raster_label_kernel(xs, ys, self.spins, ev, eh, kstart, inv_h, bool(self.periodic),
                             cap_c, kmax, gid, dist)
        return gid.reshape(x.shape), dist.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# recipe-level stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PottsGrains:
    """Specimen stage: a Poisson–Voronoi start evolved by Monte-Carlo Potts grain growth.

    Parameters
    ----------
    field_shape : (H, W)
        Field of view in px.
    grains_per_field : (low, high)
        Target mean number of grains per field of view *after* growth (drawn per specimen).  The
        Voronoi start is finer, with mean grain area ``A0 = max(A − k t, A / 5)`` (raster cells²;
        ``A`` = target area, ``t`` = steps, ``k`` = ``growth_rate``) by the parabolic law
        ``<A>(t) = A0 + k t``; the count actually reached is reported in the params.
    steps : (low, high)
        Monte-Carlo steps (drawn as an integer per specimen).  Cost ∝ steps × raster cells.
    growth_rate : float
        ``k`` in raster cells² per MCS used to size the start (measured with this kernel on
        256² rasters: ≈ 1.1 at kT = 0.5, ≈ 0.95 at kT ≤ 0.3).
    temperature : float
        ``kT`` in units of the boundary energy (small, ~0.5).
    periodic : bool
        Periodic specimen.
    specimen_scale : float
        Specimen side / field side (≥ 1).
    resolution : float
        Raster cells per image px (≥ 1: the raster is at least as fine as the image).
    """

    field_shape: tuple[int, int]
    grains_per_field: tuple[int, int] = (150, 400)
    steps: tuple[int, int] = (50, 200)
    temperature: float = 0.5
    periodic: bool = True
    specimen_scale: float = 2.0
    resolution: float = 1.0
    growth_rate: float = 1.1

    def __post_init__(self) -> None:
        h, w = self.field_shape
        if h < 1 or w < 1:
            raise ValueError(f"field_shape must be positive, got {self.field_shape}")
        lo, hi = self.grains_per_field
        if not (1 <= lo <= hi):
            raise ValueError(f"grains_per_field must satisfy 1 <= low <= high, got {(lo, hi)}")
        slo, shi = self.steps
        if not (0 <= slo <= shi):
            raise ValueError(f"steps must satisfy 0 <= low <= high, got {(slo, shi)}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0 (J), got {self.temperature}")
        if self.specimen_scale < 1:
            raise ValueError(f"specimen_scale must be >= 1, got {self.specimen_scale}")
        if not (self.resolution >= 1 and math.isfinite(self.resolution)):
            raise ValueError(f"resolution must be >= 1 raster cell per px, got {self.resolution}")
        if not (self.growth_rate >= 0 and math.isfinite(self.growth_rate)):
            raise ValueError(f"growth_rate must be finite and >= 0, got {self.growth_rate}")

    @property
    def raster_shape(self) -> tuple[int, int]:
        """Raster (ny, nx): specimen sides × resolution, rounded up to even."""
        h, w = self.field_shape
        ny = 2 * math.ceil(h * self.specimen_scale * self.resolution / 2)
        nx = 2 * math.ceil(w * self.specimen_scale * self.resolution / 2)
        return ny, nx

    @property
    def extent(self) -> tuple[float, float]:
        """Specimen size (Lx, Ly) in px (field × scale, rounded up to whole even raster sides)."""
        ny, nx = self.raster_shape
        return (nx / self.resolution, ny / self.resolution)

    def sample(self, rng: np.random.Generator) -> tuple[PottsSpecimen, dict]:
        """Draw one specimen: Voronoi start, then ``steps`` MCS of Potts growth.

        Returns
        -------
        specimen : PottsSpecimen
        params : dict
            ``n_grains`` (seeds of the start = size of per-grain tables), ``grains_per_field``
            (target), ``start_grains_per_field``, ``steps``, ``temperature``,
            ``surviving_grains``, ``final_grains_per_field`` (reached), ``raster_shape``,
            ``extent_px``.
        """
        lo, hi = self.grains_per_field
        per_field = int(rng.integers(lo, hi + 1))
        steps = int(rng.integers(self.steps[0], self.steps[1] + 1))
        extent = self.extent
        h, w = self.field_shape
        target_area = h * w * self.resolution**2 / per_field  # raster cells²
        start_area = max(target_area - self.growth_rate * steps, 0.2 * target_area)
        start_per_field = h * w * self.resolution**2 / start_area
        n = max(1, int(round(start_per_field * extent[0] * extent[1] / (h * w))))
        seeds = poisson_seeds(rng, n, extent)
        key = int(rng.integers(0, 2**63, dtype=np.int64))
        tess = Tessellation(seeds, extent, periodic=self.periodic)
        spins = voronoi_raster(tess, self.raster_shape)
        spins = potts_evolve(spins, steps, self.temperature, key, periodic=self.periodic)
        surviving = int(np.unique(spins).size)
        spec = PottsSpecimen(spins, 1.0 / self.resolution, n, self.periodic)
        return spec, {
            "n_grains": n,
            "grains_per_field": per_field,
            "start_grains_per_field": start_per_field,
            "steps": steps,
            "temperature": float(self.temperature),
            "surviving_grains": surviving,
            "final_grains_per_field": surviving * h * w / (extent[0] * extent[1]),
            "raster_shape": list(self.raster_shape),
            "extent_px": list(extent),
        }
