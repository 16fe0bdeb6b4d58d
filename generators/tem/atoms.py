"""Atomic specimens for HRTEM/STEM: FCC nanoparticles (ASE cluster builders) on amorphous carbon.

Coordinates are Å in a cell ``(Lx, Ly, Lz)``; the beam travels along +z (abTEM's convention), the
image plane is (x, y).  Particles sit on top of the film (smaller z: the beam meets them first).

Particle shapes (all from :mod:`ase.cluster`): ``octahedron`` (truncated octahedron, a Wulff-like
single crystal), ``decahedron`` (Marks/Ino decahedron: five twinned tetrahedra) and ``icosahedron``
(twenty twinned tetrahedra).  The size parameter of each shape is chosen as the one whose
*diameter* (twice the largest distance of an atom from the centroid) is
nearest the drawn diameter.

Label rule (exact, from geometry): the mask of a particle is the set of points inside the convex
hull of its projected atom positions (x, y) dilated by ``radius_a``
(:func:`particle_footprints`).  A single atom gives a disc of radius ``radius_a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["AtomicSpecimen", "SpecimenSpec", "fcc_lattice_constant", "make_cluster",
           "carbon_film", "rotation_to_zone_axis", "particle_footprints", "rasterize_footprints",
           "atom_columns", "SHAPES"]

SHAPES = ("octahedron", "decahedron", "icosahedron")
_AVOGADRO = 6.02214076e23


def fcc_lattice_constant(element: str) -> float:
    """FCC lattice constant of ``element`` from ASE's reference states, Å.

    Raises
    ------
    ValueError
        Unknown element, or one whose reference structure is not FCC.
    """
    from ase.data import atomic_numbers, reference_states

    if element not in atomic_numbers:
        raise ValueError(f"unknown element {element!r} (use a chemical symbol, e.g. 'Au')")
    ref = reference_states[atomic_numbers[element]]
    if not ref or ref.get("symmetry") != "fcc":
        sym = ref.get("symmetry") if ref else None
        raise ValueError(f"element {element!r} is not FCC (ASE reference structure: {sym}); "
                         "nanoparticles need an FCC metal such as Au, Pt, Pd, Ag, Cu")
    return float(ref["a"])


def _cluster(element: str, shape: str, n: int):
    from ase.cluster import Decahedron, Icosahedron, Octahedron

    a = fcc_lattice_constant(element)
    if shape == "octahedron":
        # truncated octahedron: edge length 2n+1 atoms, corners cut by n
        return Octahedron(element, length=2 * n + 1, cutoff=n, latticeconstant=a)
    if shape == "decahedron":
        return Decahedron(element, p=n + 1, q=n + 1, r=0, latticeconstant=a)
    if shape == "icosahedron":
        return Icosahedron(element, noshells=n + 1, latticeconstant=a)
    raise ValueError(f"unknown particle shape {shape!r} (allowed: {', '.join(SHAPES)})")


@lru_cache(maxsize=256)
def _cluster_positions(element: str, shape: str, n: int) -> tuple[np.ndarray, float]:
    pos = _cluster(element, shape, n).get_positions()
    pos = pos - pos.mean(axis=0)
    diam = 2.0 * float(np.sqrt((pos ** 2).sum(axis=1)).max())
    pos.setflags(write=False)
    return pos, diam


def make_cluster(element: str, shape: str, diameter_a: float) -> np.ndarray:
    """Atom positions (n, 3), Å, centred at the origin, of the ``shape`` nearest ``diameter_a``.

    Raises
    ------
    ValueError
        Unknown element or shape, or a diameter <= 0.
    """
    if not diameter_a > 0:
        raise ValueError(f"particle diameter must be > 0 Å, got {diameter_a}")
    best = None
    for n in range(0, 40):
        pos, d = _cluster_positions(element, shape, n)
        err = abs(d - diameter_a)
        if best is None or err < best[0]:
            best = (err, pos)
        if d > diameter_a:
            break
    return np.array(best[1])


def rotation_to_zone_axis(zone_axis: tuple[float, float, float], in_plane_rad: float) -> np.ndarray:
    """Rotation matrix (3, 3) taking crystal direction ``zone_axis`` onto +z, then rotating by
    ``in_plane_rad`` about z.  Apply as ``positions @ R.T``."""
    from scipy.spatial.transform import Rotation

    v = np.asarray(zone_axis, float)
    if not np.linalg.norm(v) > 0:
        raise ValueError(f"zone axis must be a non-zero vector, got {zone_axis}")
    r, _ = Rotation.align_vectors([[0.0, 0.0, 1.0]], [v / np.linalg.norm(v)])
    return (Rotation.from_rotvec([0.0, 0.0, in_plane_rad]) * r).as_matrix()


def carbon_film(extent_a: tuple[float, float], thickness_a: float, z0_a: float,
                density_g_cm3: float, min_distance_a: float, rng: np.random.Generator,
                max_rounds: int = 200) -> np.ndarray:
    """Amorphous carbon: random positions (n, 3), Å, with a minimum pair distance.

    ``n = round(ρ N_A / M_C · V)``; positions are uniform in ``[0, Lx) × [0, Ly) × [z0, z0 + t)``
    (periodic in x and y like the abTEM potential); members of pairs closer than
    ``min_distance_a`` are redrawn until none remain.

    Raises
    ------
    ValueError
        If the density and distance cannot be met (packing too dense) within ``max_rounds``.
    """
    from scipy.spatial import cKDTree

    lx, ly = extent_a
    if thickness_a <= 0:
        return np.zeros((0, 3))
    n_per_a3 = density_g_cm3 / 12.011 * _AVOGADRO * 1e-24
    n = int(round(n_per_a3 * lx * ly * thickness_a))
    if n_per_a3 * (4.0 / 3.0) * math.pi * (min_distance_a / 2) ** 3 > 0.3:
        raise ValueError(f"carbon density {density_g_cm3:g} g/cm³ with min distance "
                         f"{min_distance_a:g} Å is too dense to pack randomly")
    lo = np.array([0.0, 0.0, z0_a])
    span = np.array([lx, ly, thickness_a])
    pos = lo + rng.random((n, 3)) * span
    box = np.array([lx, ly, thickness_a + 4 * min_distance_a + 1.0])
    for _ in range(max_rounds):
        tree = cKDTree(pos - lo, boxsize=box)
        pairs = tree.query_pairs(min_distance_a, output_type="ndarray")
        if len(pairs) == 0:
            return pos
        bad = np.unique(pairs[:, 1])
        pos[bad] = lo + rng.random((len(bad), 3)) * span
    raise ValueError("carbon film: could not reach the minimum distance (too dense)")


@dataclass
class AtomicSpecimen:
    """A drawn specimen.

    Attributes
    ----------
    positions : (n, 3) float, Å
    numbers : (n,) int, atomic numbers
    particle_id : (n,) int32, 0 = support atom, k ≥ 1 = particle k
    cell : (Lx, Ly, Lz), Å
    params : JSON-ready description (per particle: shape, diameter, centre, orientation)
    """

    positions: np.ndarray
    numbers: np.ndarray
    particle_id: np.ndarray
    cell: tuple[float, float, float]
    params: dict

    def to_ase(self):
        """The specimen as :class:`ase.Atoms` (periodic in x, y)."""
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=list(self.cell),
                     pbc=[True, True, False])

    @property
    def n_particles(self) -> int:
        return int(self.particle_id.max(initial=0))

    def particle_xy(self, k: int) -> np.ndarray:
        """Projected positions (m, 2), Å, of particle ``k`` (1-based)."""
        return self.positions[self.particle_id == k, :2]


@dataclass(frozen=True)
class SpecimenSpec:
    """How to draw an :class:`AtomicSpecimen`.

    Parameters
    ----------
    extent_a : (Lx, Ly), Å
    element : FCC metal symbol
    shape_weights : ((shape, weight), ...)
    diameter_a : (low, high), Å, uniform per particle
    particles : (low, high), number per field (uniform integer)
    orientation : "random" (uniform on SO(3)) or "zone-axis"
    zone_axis : crystal direction put along the beam for "zone-axis" (random in-plane angle)
    min_gap_a : minimum gap between projected particle footprints, Å
    support_thickness_a : (low, high), Å (0: no film)
    support_density_g_cm3 : float
    support_min_distance_a : float
    vacuum_a : vacuum above/below the atoms along z, Å
    """

    extent_a: tuple[float, float]
    element: str = "Au"
    shape_weights: tuple[tuple[str, float], ...] = (("octahedron", 1.0),)
    diameter_a: tuple[float, float] = (20.0, 40.0)
    particles: tuple[int, int] = (1, 1)
    orientation: str = "random"
    zone_axis: tuple[float, float, float] = (1.0, 1.0, 0.0)
    min_gap_a: float = 5.0
    support_thickness_a: tuple[float, float] = (20.0, 30.0)
    support_density_g_cm3: float = 2.0
    support_min_distance_a: float = 1.3
    vacuum_a: float = 2.0
    max_tries: int = 200

    def __post_init__(self) -> None:
        fcc_lattice_constant(self.element)
        for s, w in self.shape_weights:
            if s not in SHAPES:
                raise ValueError(f"unknown particle shape {s!r} (allowed: {', '.join(SHAPES)})")
            if w < 0:
                raise ValueError("shape weights must be >= 0")
        if sum(w for _, w in self.shape_weights) <= 0:
            raise ValueError("at least one shape weight must be > 0")
        if self.orientation not in ("random", "zone-axis"):
            raise ValueError(f"orientation must be 'random' or 'zone-axis', "
                             f"got {self.orientation!r}")
        side = min(self.extent_a)
        if self.diameter_a[1] >= side:
            raise ValueError(f"particle larger than the field: diameter up to "
                             f"{self.diameter_a[1] / 10:g} nm >= field side {side / 10:g} nm")

    def sample(self, rng: np.random.Generator) -> AtomicSpecimen:
        """Draw particles (shape, diameter, orientation, position) and the carbon film."""
        from scipy.spatial.transform import Rotation

        lx, ly = self.extent_a
        names = [s for s, _ in self.shape_weights]
        w = np.array([x for _, x in self.shape_weights], float)
        n_target = int(rng.integers(self.particles[0], self.particles[1] + 1))
        placed: list[tuple[np.ndarray, float, float, float]] = []   # (pos, r, cx, cy)
        info = []
        for _ in range(n_target):
            shape = names[int(rng.choice(len(names), p=w / w.sum()))]
            diam = float(rng.uniform(*self.diameter_a))
            pos = make_cluster(self.element, shape, diam)
            if self.orientation == "random":
                rot = Rotation.random(random_state=rng).as_matrix()
            else:
                rot = rotation_to_zone_axis(self.zone_axis, float(rng.uniform(0, 2 * math.pi)))
            pos = pos @ rot.T
            r = float(np.sqrt((pos[:, :2] ** 2).sum(axis=1)).max())
            ok = False
            for _t in range(self.max_tries):
                cx = float(rng.uniform(r + 1.0, lx - r - 1.0))
                cy = float(rng.uniform(r + 1.0, ly - r - 1.0))
                if all(math.hypot(cx - px, cy - py) >= r + pr + self.min_gap_a
                       for _, pr, px, py in placed):
                    ok = True
                    break
            if not ok:
                continue
            placed.append((pos, r, cx, cy))
            info.append({"shape": shape, "diameter_a": float(2 * np.sqrt((pos ** 2).sum(1)).max()),
                         "drawn_diameter_a": diam, "n_atoms": int(len(pos)),
                         "centre_xy_a": [cx, cy], "rotation": rot.round(12).tolist()})
        t_film = float(rng.uniform(*self.support_thickness_a))
        zmax_particle = max((float(p[:, 2].max() - p[:, 2].min()) for p, *_ in placed),
                            default=0.0)
        z_particles = self.vacuum_a
        z_film = self.vacuum_a + zmax_particle + 0.5
        parts, nums, ids = [], [], []
        for k, (pos, _r, cx, cy) in enumerate(placed, start=1):
            p = pos + np.array([cx, cy, z_particles - pos[:, 2].min()])
            parts.append(p)
            nums.append(np.full(len(p), _number(self.element)))
            ids.append(np.full(len(p), k, np.int32))
        film = carbon_film((lx, ly), t_film, z_film, self.support_density_g_cm3,
                           self.support_min_distance_a, rng)
        parts.append(film)
        nums.append(np.full(len(film), 6))
        ids.append(np.zeros(len(film), np.int32))
        lz = z_film + t_film + self.vacuum_a
        params = {"element": self.element, "n_particles": len(placed),
                  "n_particles_drawn": n_target, "particles": info,
                  "support": {"thickness_a": t_film, "n_atoms": int(len(film)),
                              "density_g_cm3": self.support_density_g_cm3},
                  "cell_a": [lx, ly, lz]}
        return AtomicSpecimen(np.concatenate(parts) if parts else np.zeros((0, 3)),
                              np.concatenate(nums).astype(np.int64), np.concatenate(ids),
                              (lx, ly, lz), params)


def _number(element: str) -> int:
    from ase.data import atomic_numbers

    return int(atomic_numbers[element])


def particle_footprints(specimen: AtomicSpecimen, radius_a: float) -> list:
    """Shapely polygons (one per particle, id order): convex hull of the projected atoms of each
    particle dilated by ``radius_a`` (Å)."""
    import shapely

    if not radius_a > 0:
        raise ValueError(f"label radius must be > 0 Å, got {radius_a}")
    out = []
    for k in range(1, specimen.n_particles + 1):
        xy = specimen.particle_xy(k)
        out.append(shapely.MultiPoint(xy).convex_hull.buffer(radius_a, quad_segs=32))
    return out


def rasterize_footprints(footprints: list, x_a: np.ndarray, y_a: np.ndarray) -> np.ndarray:
    """Instance map (int32, shape of ``x_a``): id k ≥ 1 where the point (x, y) in Å lies inside
    footprint k (the highest id where footprints overlap), 0 elsewhere."""
    import shapely

    x = np.asarray(x_a, float).ravel()
    y = np.asarray(y_a, float).ravel()
    inst = np.zeros(x.shape, np.int32)
    for k, poly in enumerate(footprints, start=1):
        minx, miny, maxx, maxy = poly.bounds
        idx = np.nonzero((x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy))[0]
        if len(idx):
            inst[idx[shapely.contains_xy(poly, x[idx], y[idx])]] = k
    return inst.reshape(np.shape(x_a))


def atom_columns(specimen: AtomicSpecimen, tolerance_a: float = 0.1) -> np.ndarray:
    """Projected particle atom columns: rows ``(x_a, y_a, n_atoms, particle_id)``.

    Atoms of one particle whose projections lie within ``tolerance_a`` (grid-merged) form one
    column; in a zone-axis orientation these are the lattice columns, otherwise mostly single
    atoms.
    """
    rows = []
    for k in range(1, specimen.n_particles + 1):
        xy = specimen.particle_xy(k)
        key = np.round(xy / tolerance_a).astype(np.int64)
        _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        cx = np.bincount(inv, xy[:, 0]) / counts
        cy = np.bincount(inv, xy[:, 1]) / counts
        rows.append(np.column_stack([cx, cy, counts, np.full(len(counts), k)]))
    return np.concatenate(rows) if rows else np.zeros((0, 4))
