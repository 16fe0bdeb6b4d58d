"""Second phases and particles: per-grain phase ids, precipitates and pores, the ``phase`` label.

**Phases.**  Each grain belongs to one phase, drawn independently with probabilities equal to the
requested fractions, so the expected *area* fraction of phase ``k`` is its fraction too (the
variance is ``f (1 − f) Σ A_g² / (Σ A_g)²``).  Each phase has its own range of relative yield:
the per-grain intensities ``I_g`` are drawn from the range of the grain's phase.  Phase 0 is the
matrix.

**Particles.**  Precipitates or pores are ellipses with centre ``c``, semi-axes ``a ≥ b`` (px) and
angle ``θ`` (rad, from +x towards +y).  A point ``x`` is inside when

    ((u·e₁) / a)² + ((u·e₂) / b)² ≤ 1,   u = x − c,  e₁ = (cos θ, sin θ),  e₂ = (−sin θ, cos θ)

(with the minimum image ``u`` on a periodic specimen, so particles wrap).  Particle classes are
drawn per specimen: a Poisson number with mean ``density × Lx Ly / 10⁴`` per class, each placed
inside grains (centre uniform over the specimen), on grain boundaries (uniform along the boundary
network: a point on a cell-polygon edge) or at triple junctions (a cell-polygon vertex), by the
class's placement weights.  Where particles overlap, the lowest particle index wins.  Inside a
particle the signal is the particle's own relative yield (pores dark, precipitates bright or
dark), replacing the grain's.

**Phase label** (uint8): ``0`` = matrix (phase 0), ``1 … P−1`` the other grain phases, then
``P + k`` for particle class ``k``; :func:`phase_class_names` gives the names in that order.

Evaluation uses a bucket grid of particles (each particle listed in every grid cell its bounding
box touches), so labelling costs O(pixels × particles per cell); pixels are independent
(``prange``), so results do not depend on the thread count.  Units: px, relative yields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from generators._periodic import min_image, wrap_floor
from generators.substructure import CellPolygons, cell_polygons
from generators.voronoi import Tessellation

__all__ = [
    "Phase",
    "Phases",
    "PhaseAssignment",
    "ParticleClass",
    "Particles",
    "ParticleSet",
    "phase_class_names",
    "phase_label",
    "particle_signal",
    "boundary_points",
    "junction_points",
    "PLACEMENTS",
]

#: particle placement codes (index) and names
PLACEMENTS = ("interior", "boundary", "junction")


def _check_range(name: str, r, lo: float = 0.0, hi: float = math.inf) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must be a (low, high) range within [{lo}, {hi}], got {r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"class names must be non-empty strings, got {name!r}")


# --------------------------------------------------------------------------------------------
# grain phases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One grain phase.

    Parameters
    ----------
    name : str
        Class name in the ``phase`` label.
    fraction : float
        Expected area fraction (probability of a grain), 0–1.
    intensity : (low, high)
        Range of the per-grain relative yield of this phase.
    """

    name: str
    fraction: float
    intensity: tuple[float, float] = (0.25, 1.0)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"phase {self.name!r}: fraction must be within [0, 1], got "
                             f"{self.fraction}")
        _check_range(f"phase {self.name!r} intensity", self.intensity, 0.0)


@dataclass(frozen=True, eq=False)
class PhaseAssignment:
    """Drawn phases of one specimen's grains (frozen).

    Attributes
    ----------
    phase_id : ndarray (n_grains,) uint8
    intensity : ndarray (n_grains,) float64
        Per-grain relative yield drawn from the phase's range (use in place of the channelling
        stage's ``sample_grains``).
    """

    phase_id: np.ndarray
    intensity: np.ndarray

    def to_dict(self) -> dict:
        counts = np.bincount(self.phase_id, minlength=1)
        return {"grains_per_phase": [int(c) for c in counts]}


@dataclass(frozen=True)
class Phases:
    """Grain phases (phase 0 = matrix).

    Parameters
    ----------
    phases : tuple of Phase
        At least one; fractions must sum to 1 (within 1e-6).
    """

    phases: tuple[Phase, ...] = (Phase("matrix", 1.0),)

    def __post_init__(self) -> None:
        if len(self.phases) < 1:
            raise ValueError("at least one phase is needed")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        total = sum(p.fraction for p in self.phases)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"phase fractions must sum to 1, got {total:g}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)

    def sample_specimen(self, rng: np.random.Generator, n_grains: int) -> PhaseAssignment:
        """Phase of every grain (probabilities = fractions) and its intensity from that phase."""
        if n_grains < 1:
            raise ValueError(f"n_grains must be >= 1, got {n_grains}")
        f = np.array([p.fraction for p in self.phases], dtype=np.float64)
        phase = rng.choice(len(f), size=n_grains, p=f / f.sum()).astype(np.uint8)
        lo = np.array([p.intensity[0] for p in self.phases])
        hi = np.array([p.intensity[1] for p in self.phases])
        u = rng.random(n_grains)
        intensity = lo[phase] + (hi[phase] - lo[phase]) * u
        return PhaseAssignment(phase_id=phase, intensity=intensity)


# --------------------------------------------------------------------------------------------
# boundary geometry (from exact cell polygons)
# --------------------------------------------------------------------------------------------
def _clip_segments(p0: np.ndarray, p1: np.ndarray, extent) -> tuple[np.ndarray, np.ndarray]:
    """Liang–Barsky: parameter interval [t0, t1] of each segment inside [0, Lx] × [0, Ly]."""
    d = p1 - p0
    t0 = np.zeros(len(p0))
    t1 = np.ones(len(p0))
    for ax, hi in ((0, extent[0]), (1, extent[1])):
        for p, q in ((-d[:, ax], p0[:, ax]), (d[:, ax], hi - p0[:, ax])):
            with np.errstate(divide="ignore", invalid="ignore"):
                r = q / p
            par = p == 0
            t1 = np.where(~par & (p > 0), np.minimum(t1, r), t1)
            t0 = np.where(~par & (p < 0), np.maximum(t0, r), t0)
            out = par & (q < 0)
            t1 = np.where(out, -1.0, t1)
    return t0, t1


def _real_edges(cells: CellPolygons) -> tuple[np.ndarray, np.ndarray]:
    """Endpoints of every cell edge on a grain boundary (each boundary twice: once per side)."""
    n = cells.n_cells
    counts = np.diff(cells.start)
    cell_of = np.repeat(np.arange(n), counts)
    nxt = np.arange(len(cell_of)) + 1
    last = cells.start[1:] - 1
    nxt[last[counts > 0]] = cells.start[:-1][counts > 0]
    real = cells.edge_neighbour >= 0
    return cells.vertices[real], cells.vertices[nxt[real]]


def boundary_points(rng: np.random.Generator, cells: CellPolygons, k: int) -> np.ndarray:
    """``k`` points uniform along the grain-boundary network, wrapped into ``[0, L)``.

    Parameters
    ----------
    rng : numpy.random.Generator
    cells : CellPolygons
    k : int

    Returns
    -------
    ndarray (k, 2) float64, px
    """
    p0, p1 = _real_edges(cells)
    lx, ly = cells.extent
    if not cells.periodic:  # keep the parts inside the specimen
        t0, t1 = _clip_segments(p0, p1, (lx, ly))
        keep = t1 > t0
        d = p1 - p0
        p0, p1 = p0[keep] + t0[keep, None] * d[keep], p0[keep] + t1[keep, None] * d[keep]
    length = np.hypot(*(p1 - p0).T)
    if k and not length.sum() > 0:
        raise ValueError("the specimen has no grain boundaries to place particles on")
    e = rng.choice(len(length), size=k, p=length / length.sum()) if k else np.zeros(0, int)
    t = rng.random(k)
    pts = p0[e] + t[:, None] * (p1[e] - p0[e])
    return _wrap(pts, (lx, ly), cells.periodic)


def junction_points(rng: np.random.Generator, cells: CellPolygons, k: int) -> np.ndarray:
    """``k`` triple junctions (cell vertices between two boundary edges), uniform, in ``[0, L)``.

    Each junction is a vertex of all the cells meeting there, so drawing cell vertices uniformly
    draws junctions uniformly (all junctions are triple in a generic tessellation).

    Returns
    -------
    ndarray (k, 2) float64, px
    """
    counts = np.diff(cells.start)
    prev = np.arange(len(cells.edge_neighbour)) - 1
    first = cells.start[:-1][counts > 0]
    prev[first] = (cells.start[1:] - 1)[counts > 0]
    ok = (cells.edge_neighbour >= 0) & (cells.edge_neighbour[prev] >= 0)
    v = cells.vertices[ok]
    lx, ly = cells.extent
    if not cells.periodic:
        v = v[(v[:, 0] >= 0) & (v[:, 0] < lx) & (v[:, 1] >= 0) & (v[:, 1] < ly)]
    if k and len(v) == 0:
        raise ValueError("the specimen has no triple junctions to place particles on")
    pick = rng.integers(0, len(v), size=k) if k else np.zeros(0, int)
    return _wrap(v[pick], (lx, ly), cells.periodic)


def _wrap(pts: np.ndarray, extent, periodic: bool) -> np.ndarray:
    pts = np.array(pts, dtype=np.float64).reshape(-1, 2)
    lx, ly = extent
    if periodic:
        pts[:, 0] = np.mod(pts[:, 0], lx)
        pts[:, 1] = np.mod(pts[:, 1], ly)
        pts[pts[:, 0] >= lx, 0] = 0.0  # mod can round up to L
        pts[pts[:, 1] >= ly, 1] = 0.0
    else:
        pts[:, 0] = np.clip(pts[:, 0], 0.0, np.nextafter(lx, 0))
        pts[:, 1] = np.clip(pts[:, 1], 0.0, np.nextafter(ly, 0))
    return pts


# --------------------------------------------------------------------------------------------
# particles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParticleClass:
    """One particle class (a class of the ``phase`` label).

    Parameters
    ----------
    name : str
        Class name, e.g. ``"precipitate"`` or ``"pore"``.
    density : (low, high)
        Number per 10⁴ px² of specimen, drawn per specimen; the count is Poisson.
    semi_major_px : (low, high)
        Semi-major axis ``a`` in px, drawn per particle.
    aspect : (low, high)
        Ratio ``b / a`` within (0, 1], drawn per particle (1 = disc).
    intensity : (low, high)
        Relative yield inside the particle, drawn per particle (pores ≈ 0, precipitates bright
        or dark relative to the grains' yields).
    placement : (interior, boundary, junction)
        Weights of the three placements (normalised; at least one > 0).
    """

    name: str
    density: tuple[float, float] = (0.5, 2.0)
    semi_major_px: tuple[float, float] = (1.5, 5.0)
    aspect: tuple[float, float] = (0.5, 1.0)
    intensity: tuple[float, float] = (1.1, 1.5)
    placement: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_range(f"particle {self.name!r} density", self.density, 0.0, 1e4)
        _check_range(f"particle {self.name!r} semi_major_px", self.semi_major_px, 0.0)
        if not self.semi_major_px[0] > 0:
            raise ValueError(f"particle {self.name!r} semi_major_px must be > 0, got "
                             f"{self.semi_major_px}")
        _check_range(f"particle {self.name!r} aspect", self.aspect, 0.0, 1.0)
        if not self.aspect[0] > 0:
            raise ValueError(f"particle {self.name!r} aspect must be > 0, got {self.aspect}")
        _check_range(f"particle {self.name!r} intensity", self.intensity, 0.0)
        pl = self.placement
        if len(pl) != 3 or min(pl) < 0 or not sum(pl) > 0:
            raise ValueError(f"particle {self.name!r} placement must be three weights >= 0 "
                             f"(interior, boundary, junction) with a positive sum, got {pl}")


@njit(cache=True)
def _bucket_range(cx, cy, hxr, hyr, nx, ny, hx, hy, periodic):
    """Grid cell range (unwrapped) touched by one particle's bounding box."""
    jx0 = int(math.floor((cx - hxr) / hx))
    jx1 = int(math.floor((cx + hxr) / hx))
    jy0 = int(math.floor((cy - hyr) / hy))
    jy1 = int(math.floor((cy + hyr) / hy))
    if periodic:
        jx1 = min(jx1, jx0 + nx - 1)
        jy1 = min(jy1, jy0 + ny - 1)
    else:  # clamping is monotone: a point's clamped cell lies in its particles' clamped ranges
        jx0 = min(max(jx0, 0), nx - 1)
        jx1 = min(max(jx1, 0), nx - 1)
        jy0 = min(max(jy0, 0), ny - 1)
        jy1 = min(max(jy1, 0), ny - 1)
    return jx0, jx1, jy0, jy1


@njit(cache=True)
def _build_buckets(cx, cy, hxr, hyr, nx, ny, hx, hy, periodic):
    """CSR lists of the particles whose bounding box touches each grid cell (index order)."""
    m = cx.shape[0]
    counts = np.zeros(nx * ny + 1, dtype=np.int64)
    for i in range(m):
        jx0, jx1, jy0, jy1 = _bucket_range(cx[i], cy[i], hxr[i], hyr[i], nx, ny, hx, hy, periodic)
        for jy in range(jy0, jy1 + 1):
            for jx in range(jx0, jx1 + 1):
                counts[(jy % ny) * nx + (jx % nx) + 1] += 1
    start = np.cumsum(counts)
    fill = start[:-1].copy()
    items = np.empty(start[-1], dtype=np.int64)
    for i in range(m):
        jx0, jx1, jy0, jy1 = _bucket_range(cx[i], cy[i], hxr[i], hyr[i], nx, ny, hx, hy, periodic)
        for jy in range(jy0, jy1 + 1):
            for jx in range(jx0, jx1 + 1):
                c = (jy % ny) * nx + (jx % nx)
                items[fill[c]] = i
                fill[c] += 1
    return start, items


#: relative enlargement of a particle's bounding box before its ellipse test is skipped:
#: the exact box of ``u² + v² ≤ 1`` (``co, si``: the kernel's own cosine and sine) is
#: ``sqrt((a cos)² + (b sin)²)`` up to a few rounding units, and a point the test accepts lies
#: within ``1 + few eps`` of it
_BOX_MARGIN = 1e-6


@njit(parallel=True, cache=True)
def _particle_kernel(xs, ys, cx, cy, ca, cb, cco, csi, bx, by, start, items, nx, ny, hx, hy,
                     lx, ly, periodic, out):
    """Lowest-index particle whose ellipse test ``u² + v² ≤ 1`` holds at each point (``-1``:
    none).  ``bx, by``: each particle's bounding-box half-sides enlarged by a relative 1e-6
    (:data:`_BOX_MARGIN`): a point outside fails the test by far more than its rounding, so
    the test (two divisions) is skipped there without changing a result."""
    n = xs.shape[0]
    for i in prange(n):
        x = xs[i]
        y = ys[i]
        if periodic:
            x = wrap_floor(x, lx)
            y = wrap_floor(y, ly)
        jx = min(max(int(math.floor(x / hx)), 0), nx - 1)
        jy = min(max(int(math.floor(y / hy)), 0), ny - 1)
        c = jy * nx + jx
        hit = -1
        for t in range(start[c], start[c + 1]):
            p = items[t]
            dx = x - cx[p]
            dy = y - cy[p]
            if periodic:
                dx = min_image(dx, lx)
                dy = min_image(dy, ly)
            if abs(dx) > bx[p] or abs(dy) > by[p]:
                continue
            co = cco[p]
            si = csi[p]
            u = (dx * co + dy * si) / ca[p]
            v = (-dx * si + dy * co) / cb[p]
            if u * u + v * v <= 1.0:
                hit = p  # lists are in index order: the first hit is the lowest index
                break
        out[i] = hit


@dataclass(frozen=True, eq=False)
class ParticleSet:
    """Drawn particles of one specimen (frozen).

    Attributes
    ----------
    centres : ndarray (m, 2) float64, px, in ``[0, Lx) × [0, Ly)``
    semi_axes : ndarray (m, 2) float64, px, ``(a, b)`` with ``a ≥ b``
    angle : ndarray (m,) float64, rad
    class_id : ndarray (m,) uint8, index into the particle classes
    intensity : ndarray (m,) float64, relative yield
    placement : ndarray (m,) uint8, index into :data:`PLACEMENTS`
    extent : (Lx, Ly)
    periodic : bool
    class_names : tuple of str
    """

    centres: np.ndarray
    semi_axes: np.ndarray
    angle: np.ndarray
    class_id: np.ndarray
    intensity: np.ndarray
    placement: np.ndarray
    extent: tuple[float, float]
    periodic: bool
    class_names: tuple[str, ...] = ()
    _grid: tuple = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = self.centres.shape[0]
        for name in ("semi_axes", "angle", "class_id", "intensity", "placement"):
            if getattr(self, name).shape[0] != m:
                raise ValueError(f"particle {name} must have {m} rows")
        lx, ly = self.extent
        a = self.semi_axes[:, 0] if m else np.zeros(0)
        b = self.semi_axes[:, 1] if m else np.zeros(0)
        if m and (np.any(b <= 0) or np.any(b > a)):
            raise ValueError("particle semi-axes must satisfy 0 < b <= a")
        if m and self.periodic and a.max() >= 0.5 * min(lx, ly):
            raise ValueError(f"particle semi-major axis {a.max():g} px must be below half the "
                             f"specimen side {0.5 * min(lx, ly):g} px on a periodic specimen")
        th = self.angle
        hxr = np.sqrt((a * np.cos(th)) ** 2 + (b * np.sin(th)) ** 2)
        hyr = np.sqrt((a * np.sin(th)) ** 2 + (b * np.cos(th)) ** 2)
        # about four cells per particle, cells no smaller than the typical particle
        h = max(0.5 * math.sqrt(lx * ly / max(m, 1)), 2.0 * float(np.median(a)) if m else 1.0, 1.0)
        nx = max(1, min(int(lx / h), 4096))
        ny = max(1, min(int(ly / h), 4096))
        hx, hy = lx / nx, ly / ny
        cx = np.ascontiguousarray(self.centres[:, 0]) if m else np.zeros(0)
        cy = np.ascontiguousarray(self.centres[:, 1]) if m else np.zeros(0)
        start, items = _build_buckets(cx, cy, hxr, hyr, nx, ny, hx, hy, bool(self.periodic))
        object.__setattr__(self, "_grid", (cx, cy, np.ascontiguousarray(a),
                                           np.ascontiguousarray(b),
                                           np.cos(np.asarray(th, dtype=np.float64)),
                                           np.sin(np.asarray(th, dtype=np.float64)),
                                           np.ascontiguousarray(hxr * (1.0 + _BOX_MARGIN)),
                                           np.ascontiguousarray(hyr * (1.0 + _BOX_MARGIN)),
                                           start, items, nx, ny, hx, hy))

    @property
    def n_particles(self) -> int:
        return int(self.centres.shape[0])

    def label(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index of the particle containing each point (lowest index on overlap), ``-1`` outside.

        Parameters
        ----------
        x, y : ndarray, any shape, float
            Specimen coordinates in px.

        Returns
        -------
        ndarray int32, shape of ``x``
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
        xs = np.ascontiguousarray(x.ravel())
        ys = np.ascontiguousarray(y.ravel())
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise ValueError("coordinates must be finite")
        out = np.empty(xs.shape[0], dtype=np.int32)
        if self.n_particles == 0:
            out[:] = -1
            return out.reshape(x.shape)
        cx, cy, a, b, co, si, bx, by, start, items, nx, ny, hx, hy = self._grid
        lx, ly = self.extent
        _particle_kernel(xs, ys, cx, cy, a, b, co, si, bx, by, start, items, nx, ny, hx, hy, lx,
                         ly, bool(self.periodic), out)
        return out.reshape(x.shape)

    def to_dict(self) -> dict:
        """Summary (JSON-ready): counts per class and placement."""
        out = {"n_particles": self.n_particles}
        for k, name in enumerate(self.class_names):
            sel = self.class_id == k
            out[name] = {pl: int(np.sum(sel & (self.placement == j)))
                         for j, pl in enumerate(PLACEMENTS)}
        return out

    def table(self) -> np.ndarray:
        """(m, 8) float64: x, y, a, b, angle, class_id, intensity, placement (for storage)."""
        return np.c_[self.centres, self.semi_axes, self.angle, self.class_id, self.intensity,
                     self.placement].astype(np.float64).reshape(-1, 8)


@dataclass(frozen=True)
class Particles:
    """Particle stage: precipitates and pores of several classes.

    Parameters
    ----------
    classes : tuple of ParticleClass
        At most 255 − (number of grain phases) classes, unique names.
    """

    classes: tuple[ParticleClass, ...] = (
        ParticleClass("precipitate"),
        ParticleClass("pore", density=(0.2, 1.0), semi_major_px=(1.0, 3.0), aspect=(0.7, 1.0),
                      intensity=(0.0, 0.1)),
    )

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"particle class names must be unique, got {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def sample_specimen(self, rng: np.random.Generator, tess: Tessellation,
                        polygons: CellPolygons | None = None) -> ParticleSet:
        """Draw the particles of a specimen (counts, placements, sizes, shapes, yields)."""
        lx, ly = tess.extent
        area = lx * ly
        cells = polygons
        rows = []
        for k, c in enumerate(self.classes):
            dens = float(rng.uniform(*c.density))
            m = int(rng.poisson(dens * area / 1e4))
            w = np.asarray(c.placement, dtype=np.float64)
            where = rng.choice(3, size=m, p=w / w.sum()) if m else np.zeros(0, int)
            centres = np.empty((m, 2))
            n_int = int(np.sum(where == 0))
            centres[where == 0] = rng.random((n_int, 2)) * np.array([lx, ly])
            for code, draw in ((1, boundary_points), (2, junction_points)):
                sel = where == code
                if sel.any():
                    if cells is None:
                        cells = cell_polygons(tess)
                    centres[sel] = draw(rng, cells, int(sel.sum()))
            a = rng.uniform(c.semi_major_px[0], c.semi_major_px[1], m)
            b = a * rng.uniform(c.aspect[0], c.aspect[1], m)
            ang = rng.uniform(0.0, math.pi, m)
            inten = rng.uniform(c.intensity[0], c.intensity[1], m)
            rows.append((centres, np.c_[a, b], ang, np.full(m, k), inten, where))
        cat = [np.concatenate([r[j] for r in rows]) if rows else None for j in range(6)]
        if not rows:
            cat = [np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0),
                   np.zeros(0)]
        return ParticleSet(centres=cat[0].reshape(-1, 2), semi_axes=cat[1].reshape(-1, 2),
                           angle=cat[2].astype(np.float64), class_id=cat[3].astype(np.uint8),
                           intensity=cat[4].astype(np.float64),
                           placement=cat[5].astype(np.uint8), extent=(lx, ly),
                           periodic=bool(tess.periodic), class_names=self.names)

    def apply(self, signal: np.ndarray, particle_index: np.ndarray,
              particles: ParticleSet) -> np.ndarray:
        """Signal with each particle's yield inside it (float32); see :func:`particle_signal`."""
        return particle_signal(signal, particle_index, particles.intensity)


def particle_signal(signal: np.ndarray, particle_index: np.ndarray,
                    intensity: np.ndarray) -> np.ndarray:
    """Replace the signal inside particles by their relative yield.

    Parameters
    ----------
    signal : ndarray (H, W) float
    particle_index : ndarray (H, W) int, ``-1`` outside particles
    intensity : ndarray (m,) float

    Returns
    -------
    ndarray (H, W) float32
    """
    s = np.array(signal, dtype=np.float32)
    p = np.asarray(particle_index)
    if p.shape != s.shape:
        raise ValueError(f"particle_index must have the shape of signal {s.shape}, got {p.shape}")
    inside = p >= 0
    if inside.any() and p.max() >= len(intensity):
        raise ValueError("particle index out of range of the intensity table")
    s[inside] = np.asarray(intensity, dtype=np.float32)[p[inside]]
    return s


def phase_class_names(phases: Phases | None = None,
                      particles: Particles | None = None) -> tuple[str, ...]:
    """Class names of the ``phase`` label: grain phases (matrix first), then particle classes.

    Without ``phases`` the grains are one phase named ``"matrix"``.
    """
    grain = phases.names if phases is not None else ("matrix",)
    part = particles.names if particles is not None else ()
    names = grain + part
    if len(set(names)) != len(names):
        raise ValueError(f"phase and particle class names must be unique, got {names}")
    if len(names) > 255:
        raise ValueError(f"at most 255 phase classes fit a uint8 label, got {len(names)}")
    return names


def phase_label(grain_id: np.ndarray, grain_phase: np.ndarray | None = None,
                particle_index: np.ndarray | None = None,
                particle_class: np.ndarray | None = None, n_phases: int = 1) -> np.ndarray:
    """The ``phase`` label (uint8): grain phase, or ``n_phases + class`` inside a particle.

    Parameters
    ----------
    grain_id : ndarray (H, W) int
    grain_phase : ndarray (n_grains,) uint8, optional
        Phase of every grain (``None``: all matrix, 0).
    particle_index : ndarray (H, W) int, optional
        From :meth:`ParticleSet.label` (``-1`` outside particles).
    particle_class : ndarray (m,) int, optional
        Class of every particle.
    n_phases : int
        Number of grain phases ``P``.

    Returns
    -------
    ndarray (H, W) uint8
    """
    g = np.asarray(grain_id)
    if grain_phase is None:
        out = np.zeros(g.shape, dtype=np.uint8)
    else:
        gp = np.asarray(grain_phase, dtype=np.uint8)
        if g.size and (g.min() < 0 or g.max() >= len(gp)):
            raise ValueError("grain ids out of range of the grain phase table")
        out = gp[g]
    if particle_index is not None:
        p = np.asarray(particle_index)
        if p.shape != g.shape:
            raise ValueError(f"particle_index must have the shape of grain_id {g.shape}, "
                             f"got {p.shape}")
        if particle_class is None:
            raise ValueError("particle_class is needed with particle_index")
        pc = np.asarray(particle_class, dtype=np.int64)
        inside = p >= 0
        cls = n_phases + pc[p[inside]]
        if cls.size and cls.max() > 255:
            raise ValueError("phase label value exceeds 255")
        out[inside] = cls.astype(np.uint8)
    return out
