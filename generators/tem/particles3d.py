"""Mesoscale nanoparticles as 3-D bodies and their exact projected thickness.

Every body is symmetric about one mid-plane ``z = 0`` (perpendicular to the beam), so along a
ray the body occupies ``[-t/2, t/2]`` and its projected thickness ``t(x, y)`` is analytic:

- ``sphere`` (radius R):      ``t = 2 sqrt(R² − r²)``
- ``ellipsoid`` (semi-axes a, b in the plane, rotated by θ; c along the beam):
                              ``t = 2 c sqrt(1 − (u/a)² − (v/b)²)``
- ``faceted``: a regular n-gon of circumradius a in projection, a slab of thickness 2c whose
  rim is bevelled by steep facets top and bottom (slope s = tan of the facet angle to the
  mid-plane, default 3 ≈ 72°; a truncated bipyramid):
                              ``t = min(2c, 2 s d)``,
  d = distance inside the n-gon to its nearest edge
- ``neck`` (sintering neck, never a particle of its own): an ellipsoid centred on the contact of
  two particles, long axis along the line joining them.

A *cluster* (one particle, or two particles sintered together with a neck) is the union of its
bodies.  All bodies of a cluster share the mid-plane, so the union's thickness along a ray is the
*maximum* of the bodies' thicknesses (intervals ``[-t_k/2, t_k/2]`` are nested) — exact, not an
approximation.  Separate clusters are placed without overlap in projection (random sequential
adsorption with a minimum gap), so the specimen thickness is the sum of the clusters'.

Coordinates are in pixels of the specimen grid: pixel ``(i, j)`` has its centre at ``x = j``,
``y = i``.  Thickness is returned in px (multiply by the pixel size for Å).

Instance labels: pixel ``(i, j)`` belongs to the particle whose own body is thickest there; a
pixel covered only by a neck belongs to the *nearer* particle (smallest distance from the pixel
to the particle's surface along the joining line, i.e. smallest ``|p − c_k| − R_k``).  Ids are
1, 2, … in placement order; 0 is the support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SHAPES", "Body", "Cluster", "ParticleSpecimen", "ParticleField", "body_thickness",
           "render_clusters"]

SHAPES = ("sphere", "ellipsoid", "faceted")


@dataclass(frozen=True)
class Body:
    """One convex body symmetric about z = 0.

    Attributes
    ----------
    shape : {"sphere", "ellipsoid", "faceted", "neck"}
    x, y : float
        Centre, px.
    a, b : float
        In-plane semi-axes, px (sphere: a = b = R; faceted: circumradius a, b unused).
    c : float
        Half thickness along the beam, px (sphere: R).
    angle : float
        In-plane rotation of the ``a`` axis from +x, rad.
    sides : int
        Number of facets of a ``faceted`` body (its projected n-gon).
    slope : float
        Facet slope of a ``faceted`` body (thickness gained per px inward from the rim, per side).
    """

    shape: str
    x: float
    y: float
    a: float
    b: float
    c: float
    angle: float = 0.0
    sides: int = 6
    slope: float = 3.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES + ("neck",):
            raise ValueError(f"unknown particle shape '{self.shape}': use one of {SHAPES}")
        if not (self.a > 0 and self.b > 0 and self.c > 0):
            raise ValueError(f"body semi-axes must be > 0 px, got a={self.a}, b={self.b}, "
                             f"c={self.c}")
        if self.shape == "faceted" and (self.sides < 3 or not self.slope > 0):
            raise ValueError(f"a faceted particle needs >= 3 sides and slope > 0, got "
                             f"{self.sides}, {self.slope}")

    @property
    def reach(self) -> float:
        """Radius of a circle around the centre containing the body's projection, px."""
        return float(max(self.a, self.b))

    def to_dict(self) -> dict:
        return {"shape": self.shape, "x_px": self.x, "y_px": self.y, "a_px": self.a,
                "b_px": self.b, "c_px": self.c, "angle_rad": self.angle, "sides": self.sides,
                "slope": self.slope}


def body_thickness(body: Body, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Projected thickness of ``body`` at points ``(x, y)`` (px), in px; 0 outside.

    Parameters
    ----------
    body : Body
    x, y : ndarray, broadcastable, px

    Returns
    -------
    ndarray of float64, the broadcast shape of ``x`` and ``y``
    """
    dx = np.asarray(x, dtype=np.float64) - body.x
    dy = np.asarray(y, dtype=np.float64) - body.y
    ca, sa = math.cos(body.angle), math.sin(body.angle)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    if body.shape == "faceted":
        n = body.sides
        apothem = body.a * math.cos(math.pi / n)
        d = np.full(np.broadcast(u, v).shape, np.inf)
        for k in range(n):
            th = (2 * k + 1) * math.pi / n  # outward normal of edge k
            d = np.minimum(d, apothem - (u * math.cos(th) + v * math.sin(th)))
        return np.clip(np.minimum(2.0 * body.c, 2.0 * body.slope * d), 0.0, None)
    q = 1.0 - (u / body.a) ** 2 - (v / body.b) ** 2
    return 2.0 * body.c * np.sqrt(np.clip(q, 0.0, None))


@dataclass(frozen=True)
class Cluster:
    """One particle, or particles sintered by necks; ``particles`` and ``necks`` are Bodies."""

    particles: tuple[Body, ...]
    necks: tuple[Body, ...] = ()

    @property
    def bodies(self) -> tuple[Body, ...]:
        return self.particles + self.necks

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) px containing every body's projection."""
        xs0 = [b.x - b.reach for b in self.bodies]
        xs1 = [b.x + b.reach for b in self.bodies]
        ys0 = [b.y - b.reach for b in self.bodies]
        ys1 = [b.y + b.reach for b in self.bodies]
        return min(xs0), min(ys0), max(xs1), max(ys1)

    def circle(self) -> tuple[float, float, float]:
        """(cx, cy, r) px: a circle containing the cluster's projection."""
        x0, y0, x1, y1 = self.bbox()
        cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
        r = max(math.hypot(b.x - cx, b.y - cy) + b.reach for b in self.bodies)
        return cx, cy, r


def render_clusters(clusters: list[Cluster] | tuple[Cluster, ...],
                    shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Projected thickness (px) and instance ids on a grid of ``shape`` (H, W).

    Returns
    -------
    thickness : ndarray (H, W) float64, px
    instance : ndarray (H, W) int32; particle ``k`` (0-based, over all clusters in order) has id
        ``k + 1``; 0 where no particle projects.
    """
    h, w = int(shape[0]), int(shape[1])
    thick = np.zeros((h, w), dtype=np.float64)
    inst = np.zeros((h, w), dtype=np.int32)
    next_id = 1
    for cl in clusters:
        x0, y0, x1, y1 = cl.bbox()
        j0, j1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, w)
        i0, i1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, h)
        ids = list(range(next_id, next_id + len(cl.particles)))
        next_id += len(cl.particles)
        if j0 >= j1 or i0 >= i1:
            continue
        yy = np.arange(i0, i1, dtype=np.float64)[:, None]
        xx = np.arange(j0, j1, dtype=np.float64)[None, :]
        own = np.stack([np.broadcast_to(body_thickness(p, xx, yy), (i1 - i0, j1 - j0))
                        for p in cl.particles])
        t = own.max(axis=0)
        for nk in cl.necks:
            t = np.maximum(t, body_thickness(nk, xx, yy))
        covered = t > 0
        if not covered.any():
            continue
        owner = np.argmax(own, axis=0)
        neck_only = covered & (own.max(axis=0) <= 0)
        if neck_only.any() and len(cl.particles) > 1:
            gap = np.stack([np.hypot(xx - p.x, yy - p.y) - p.reach for p in cl.particles])
            owner = np.where(neck_only, np.argmin(gap, axis=0), owner)
        thick[i0:i1, j0:j1] += t
        lab = np.asarray(ids, dtype=np.int32)[owner]
        inst[i0:i1, j0:j1] = np.where(covered, lab, inst[i0:i1, j0:j1])
    return thick, inst


@dataclass
class ParticleSpecimen:
    """A drawn particle specimen: its clusters and the drawn parameters (JSON-ready)."""

    clusters: list[Cluster]
    shape: tuple[int, int]
    params: dict = field(default_factory=dict)

    @property
    def particles(self) -> list[Body]:
        return [p for cl in self.clusters for p in cl.particles]

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """(thickness px, instance ids) on the specimen grid, see :func:`render_clusters`."""
        return render_clusters(self.clusters, self.shape)


@dataclass(frozen=True)
class ParticleField:
    """Specimen stage: particles with a lognormal size distribution placed without overlap.

    Parameters
    ----------
    shape : (int, int)
        Specimen grid (H, W), px.
    pixel_size_nm : float
        nm per px.
    coverage : (float, float)
        Projected area fraction aimed at, drawn uniformly per specimen.
    diameter_median_nm : (float, float)
        Median of the lognormal diameter distribution, drawn per specimen, nm.
    diameter_sigma : float
        Standard deviation of ln(diameter).
    diameter_range_nm : (float, float)
        Diameters are drawn from the lognormal truncated to this range, nm.
    shape_weights : dict
        Relative frequency of each shape in :data:`SHAPES`.
    aspect : (float, float)
        In-plane axis ratio a/b of ellipsoids, drawn per particle (≥ 1).
    thickness_ratio : (float, float)
        c / (in-plane radius) of ellipsoids and faceted particles, drawn per particle.
    neck_probability : float
        Probability that a placed cluster is a sintered pair of spheres joined by a neck.
    neck_radius_fraction : (float, float)
        Neck radius / smaller sphere radius, drawn per pair.
    min_gap_nm : float
        Minimum gap between separate clusters in projection, nm.
    """

    shape: tuple[int, int]
    pixel_size_nm: float
    coverage: tuple[float, float] = (0.13, 0.23)
    diameter_median_nm: tuple[float, float] = (15.0, 25.0)
    diameter_sigma: float = 0.35
    diameter_range_nm: tuple[float, float] = (5.0, 50.0)
    shape_weights: tuple[tuple[str, float], ...] = (("sphere", 0.6), ("ellipsoid", 0.3),
                                                    ("faceted", 0.1))
    aspect: tuple[float, float] = (1.0, 1.3)
    thickness_ratio: tuple[float, float] = (0.8, 1.0)
    neck_probability: float = 0.1
    neck_radius_fraction: tuple[float, float] = (0.3, 0.6)
    min_gap_nm: float = 1.0

    def __post_init__(self) -> None:
        names = [s for s, _ in self.shape_weights]
        for s in names:
            if s not in SHAPES:
                raise ValueError(f"unknown particle shape '{s}': use one of {SHAPES}")
        if sum(wt for _, wt in self.shape_weights) <= 0:
            raise ValueError("shape weights must sum to > 0")
        lo, hi = self.diameter_range_nm
        if not 0 < lo <= hi:
            raise ValueError(f"diameter range must satisfy 0 < min <= max nm, got [{lo}, {hi}]")
        field_nm = min(self.shape) * self.pixel_size_nm
        if hi > field_nm:
            raise ValueError(f"particle larger than the field: max diameter {hi:g} nm > field side "
                             f"{field_nm:g} nm ({min(self.shape)} px x {self.pixel_size_nm:g} nm)")
        if lo / self.pixel_size_nm < 2.0:
            raise ValueError(f"sampling too coarse: the smallest particle ({lo:g} nm) spans "
                             f"{lo / self.pixel_size_nm:.2f} px < 2 px at {self.pixel_size_nm:g} "
                             "nm/px")

    def _diameter(self, rng: np.random.Generator, median: float) -> float:
        lo, hi = self.diameter_range_nm
        for _ in range(1000):
            d = median * math.exp(self.diameter_sigma * rng.standard_normal())
            if lo <= d <= hi:
                return d
        return float(np.clip(median, lo, hi))

    def _body(self, rng: np.random.Generator, shape: str, x: float, y: float, r: float) -> Body:
        if shape == "sphere":
            return Body("sphere", x, y, r, r, r)
        ratio = float(rng.uniform(*self.thickness_ratio))
        angle = float(rng.uniform(0.0, math.pi))
        if shape == "ellipsoid":
            asp = float(rng.uniform(*self.aspect))
            a, b = r * math.sqrt(asp), r / math.sqrt(asp)  # same projected area as the disc
            return Body("ellipsoid", x, y, a, b, ratio * r)
        sides = int(rng.choice([5, 6, 8]))
        return Body("faceted", x, y, r, r, ratio * r, angle=angle, sides=sides)

    def sample(self, rng: np.random.Generator) -> ParticleSpecimen:
        """Draw coverage, size distribution and particles (placement order = instance ids)."""
        h, w = self.shape
        px = self.pixel_size_nm
        coverage = float(rng.uniform(*self.coverage))
        median = float(rng.uniform(*self.diameter_median_nm))
        names = [s for s, _ in self.shape_weights]
        wts = np.array([wt for _, wt in self.shape_weights], dtype=np.float64)
        wts /= wts.sum()
        gap = self.min_gap_nm / px
        target = coverage * h * w
        area = 0.0
        clusters: list[Cluster] = []
        circles = np.zeros((0, 3))
        failures = 0
        while area < target and failures < 2000:
            r = 0.5 * self._diameter(rng, median) / px
            pair = rng.random() < self.neck_probability
            x, y = float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))
            if pair:
                r2 = 0.5 * self._diameter(rng, median) / px
                direction = float(rng.uniform(0.0, 2.0 * math.pi))
                overlap = float(rng.uniform(0.0, 0.2)) * min(r, r2)
                dist = r + r2 - overlap
                x2, y2 = x + dist * math.cos(direction), y + dist * math.sin(direction)
                rn = float(rng.uniform(*self.neck_radius_fraction)) * min(r, r2)
                # neck: ellipsoid on the contact point, long axis along the joining line
                cx = x + (r - 0.5 * overlap) * math.cos(direction)
                cy = y + (r - 0.5 * overlap) * math.sin(direction)
                half_len = 0.5 * min(r, r2)
                neck = Body("neck", cx, cy, half_len, rn, rn, angle=direction)
                cl = Cluster((Body("sphere", x, y, r, r, r), Body("sphere", x2, y2, r2, r2, r2)),
                             (neck,))
                a_est = math.pi * (r * r + r2 * r2)
            else:
                kind = names[int(rng.choice(len(names), p=wts))]
                body = self._body(rng, kind, x, y, r)
                cl = Cluster((body,))
                a_est = math.pi * r * r
            cx, cy, cr = cl.circle()
            if circles.shape[0]:
                d = np.hypot(circles[:, 0] - cx, circles[:, 1] - cy)
                if np.any(d < circles[:, 2] + cr + gap):
                    failures += 1
                    continue
            clusters.append(cl)
            circles = np.vstack([circles, [cx, cy, cr]])
            # count only the part inside the specimen grid (approx. by the bounding circle)
            inside = (min(cx, w - cx, cr) + cr) * (min(cy, h - cy, cr) + cr) / (4 * cr * cr)
            area += a_est * float(np.clip(inside, 0.0, 1.0))
        params = {"coverage_target": coverage, "diameter_median_nm": median,
                  "n_clusters": len(clusters),
                  "n_particles": sum(len(c.particles) for c in clusters),
                  "n_necks": sum(len(c.necks) for c in clusters)}
        return ParticleSpecimen(clusters=clusters, shape=(h, w), params=params)
