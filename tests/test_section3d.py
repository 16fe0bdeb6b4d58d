"""Planar sections of 3D Voronoi/Laguerre tessellations: exact labels and stereology."""

import json
import math

import numba
import numpy as np
import pytest
from scipy import stats
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from generators.section3d import (
    POISSON_VORONOI_BREADTH,
    Section3DGrains,
    SectionSpecimen,
    hardcore_seeds_3d,
    plane_basis,
)
from generators.voronoi import Tessellation, lognormal_weights, poisson_seeds


def brute_force(spec, x, y):
    """Nearest seed (power distance, all 27 periodic images) and the min over every other seed
    image of the in-plane distance to the trace of its radical plane with the owner."""
    b = np.array(spec.box)
    X = spec.points(x, y).reshape(-1, 3)
    w = np.zeros(spec.n_seeds) if spec.weights is None else spec.weights
    if spec.periodic:
        X = np.mod(X, b)
        shifts = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    else:
        shifts = np.zeros((1, 3))
    s = np.concatenate([spec.seeds + sh * b for sh in shifts])
    ww = np.tile(w, len(shifts))
    ids = np.tile(np.arange(spec.n_seeds), len(shifts))
    p = ((X[:, None, :] - s[None]) ** 2).sum(-1) - ww[None]
    j = p.argmin(1)
    delta = s[None] - s[j][:, None]  # (points, seeds, 3)
    g = np.hypot(delta @ spec.e1, delta @ spec.e2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (p - p[np.arange(len(X)), j][:, None]) / (2 * g)
    d[g == 0] = np.inf
    return ids[j], d.min(1)


@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("laguerre", [False, True])
@pytest.mark.parametrize("tilt", [0.0, 35.0])
@pytest.mark.parametrize("cap", [np.inf, 3.0])
def test_labels_match_brute_force(rng, periodic, laguerre, tilt, cap):
    box = (40.0, 32.0, 24.0)
    n = 50
    seeds = rng.random((n, 3)) * box
    w = lognormal_weights(rng, n, 8.0, 0.5) if laguerre else None
    e1, e2, _ = plane_basis(tilt, 57.0)
    spec = SectionSpecimen(seeds, box, np.array([3.0, 5.0, 11.0]), e1, e2, weights=w,
                           periodic=periodic)
    # mostly inside the extent (planar-diagram path), some far outside it (3D-search fallback)
    x = np.r_[rng.uniform(-15, 55, 1500), rng.uniform(-150, 200, 300)]
    y = np.r_[rng.uniform(-15, 47, 1500), rng.uniform(-150, 200, 300)]
    ref_id, ref_d = brute_force(spec, x, y)
    for gid, dist in (spec.label(x, y, max_distance=cap), spec._label_3d(x, y, cap)):
        assert np.array_equal(gid, ref_id)
        np.testing.assert_allclose(dist, np.minimum(ref_d, cap), rtol=2e-5, atol=2e-4)


def test_plane_basis_is_a_rotation():
    e1, e2, nrm = plane_basis(30.0, 120.0)
    m = np.c_[e1, e2, nrm]
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(m), 1.0)
    assert np.isclose(math.degrees(math.acos(nrm[2])), 30.0)
    np.testing.assert_allclose(plane_basis(0.0, 77.0)[2], [0, 0, 1], atol=1e-12)


def test_same_seed_same_bytes_and_thread_count_independent():
    g = Section3DGrains((64, 64), grains_per_field=(40, 60), tilt=(10, 40),
                        weights="lognormal")
    old = numba.get_num_threads()
    outs = []
    x = np.random.default_rng(1).uniform(-20, 150, (64, 64))
    y = np.random.default_rng(2).uniform(-20, 150, (64, 64))
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}) * 2:
            numba.set_num_threads(t)
            spec, params = g.sample(np.random.default_rng(7))
            gid, d = spec.label(x, y, max_distance=5.0)
            outs.append((gid.tobytes(), d.tobytes(), json.dumps(params)))
    finally:
        numba.set_num_threads(old)
    assert all(o == outs[0] for o in outs)
    assert gid.min() >= 0 and gid.max() < spec.n_seeds == params["n_grains"]


def test_hardcore_seeds_respect_min_distance(rng):
    box = (60.0, 50.0, 40.0)
    s = hardcore_seeds_3d(rng, 300, box, 4.0)
    d = s[:, None, :] - s[None]
    d -= np.round(d / box) * box
    r = np.sqrt((d**2).sum(-1))[np.triu_indices(len(s), 1)]
    assert r.min() >= 4.0
    assert np.all((s >= 0) & (s < box))
    g = Section3DGrains((64, 64), grains_per_field=(50, 50), seeds="hardcore", min_distance=0.6)
    spec, _ = g.sample(rng)
    assert pdist(spec.seeds).min() > 0


# --------------------------------------------------------------------------------------------
# stereology
# --------------------------------------------------------------------------------------------
def section_areas(gid):
    """Areas (px²) of the section cells of a periodic label raster (one piece per grain)."""
    return np.unique(gid, return_counts=True)[1].astype(float)


def reference_section_areas(rng, lam, box, n_planes):
    """Plain SciPy: Poisson seeds, cKDTree nearest seed of the pixel centres of a z = z0 plane."""
    lx, ly, lz = box
    yy, xx = np.mgrid[: int(ly), : int(lx)] + 0.5
    out = []
    for _ in range(n_planes):
        n = rng.poisson(lam * lx * ly * lz)
        seeds = rng.random((n, 3)) * box
        pts = np.c_[xx.ravel(), yy.ravel(), np.full(xx.size, rng.uniform(0, lz))]
        _, j = cKDTree(seeds, boxsize=box).query(pts)
        out.append(section_areas(j))
    return np.concatenate(out)


def test_section_sizes_follow_3d_stereology_not_2d_voronoi(rng):
    """Section cells of a Poisson–Voronoi tessellation vs a 2D Poisson–Voronoi map.

    * module vs plain-SciPy Monte-Carlo reference (independent realisations): KS two-sample test
      does not reject (p > 0.01), means agree within 6 %, CVs within 0.06;
    * mean section area = 1 / N_A with N_A = 1.458 λ^(2/3) (mean breadth of the Poisson–Voronoi
      cell) within 5 %;
    * the CV of section areas exceeds the 2D Poisson–Voronoi CV (0.53) by > 0.1, and the KS test
      rejects 2D cell areas of the same mean (p < 1e-6).
    """
    field = (128, 128)
    g = Section3DGrains(field, grains_per_field=(150, 150), specimen_scale=1.0)
    lam = (150 / (field[0] * field[1]) / POISSON_VORONOI_BREADTH) ** 1.5
    yy, xx = np.mgrid[: field[0], : field[1]] + 0.5
    mine = []
    for _ in range(12):
        spec, params = g.sample(rng)
        assert params["tilt_deg"] == 0.0  # untilted: the section is periodic in x, y
        gid, _ = spec.label(xx, yy, max_distance=1.0)
        mine.append(section_areas(gid))
    mine = np.concatenate(mine)
    ref = reference_section_areas(rng, lam, g.box, 12)
    n2d = int(round(field[0] * field[1] / mine.mean()))
    flat = []
    for _ in range(6):
        tess = Tessellation(poisson_seeds(rng, n2d, (128.0, 128.0)), (128.0, 128.0))
        flat.append(section_areas(tess.label(xx, yy, max_distance=1.0)[0]))
    flat = np.concatenate(flat)

    def cv(a):
        return a.std() / a.mean()

    assert stats.ks_2samp(mine, ref).pvalue > 0.01
    assert abs(mine.mean() / ref.mean() - 1) < 0.06
    assert abs(cv(mine) - cv(ref)) < 0.06
    theory = 1.0 / (POISSON_VORONOI_BREADTH * lam ** (2 / 3))
    assert abs(mine.mean() / theory - 1) < 0.05, (mine.mean(), theory)
    assert abs(cv(flat) - 0.53) < 0.05, cv(flat)
    assert cv(mine) > cv(flat) + 0.1, (cv(mine), cv(flat))
    assert stats.ks_2samp(mine, flat).pvalue < 1e-6


def test_tilted_sections_have_the_same_density(rng):
    """An isotropic tessellation: a tilted plane cuts as many grains per area as an untilted one."""
    counts = {}
    for tilt in ((0.0, 0.0), (50.0, 50.0)):
        g = Section3DGrains((96, 96), grains_per_field=(120, 120), specimen_scale=2.0, tilt=tilt)
        yy, xx = np.mgrid[:96, :96] + 0.5  # one field (the box is two fields wide)
        c = []
        for _ in range(8):
            spec, _ = g.sample(rng)
            gid, _ = spec.label(xx, yy, max_distance=1.0)
            c.append(np.unique(gid).size)
        counts[tilt[0]] = np.mean(c)
    assert abs(counts[50.0] / counts[0.0] - 1) < 0.1, counts


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(grains_per_field=(0, 5)), dict(seeds="lattice"), dict(weights="gamma"),
    dict(tilt=(-5.0, 10.0)), dict(tilt=(30.0, 10.0)), dict(tilt=(0.0, 95.0)),
    dict(specimen_scale=0.9), dict(min_distance=0.0), dict(field_shape=(0, 8)),
])
def test_bad_recipe_knobs_raise(kwargs):
    base = dict(field_shape=(32, 32))
    base.update(kwargs)
    with pytest.raises(ValueError):
        Section3DGrains(**base)


def test_bad_specimens_and_points_raise(rng):
    e1, e2, _ = plane_basis(0.0, 0.0)
    box = (10.0, 10.0, 10.0)
    with pytest.raises(ValueError, match="seeds"):
        SectionSpecimen(np.zeros((3, 2)), box, np.zeros(3), e1, e2)
    with pytest.raises(ValueError, match="inside"):
        SectionSpecimen(np.full((3, 3), 11.0), box, np.zeros(3), e1, e2)
    with pytest.raises(ValueError, match="orthonormal"):
        SectionSpecimen(rng.random((3, 3)), box, np.zeros(3), e1, 2 * e2)
    with pytest.raises(ValueError, match="box"):
        SectionSpecimen(rng.random((3, 3)), (10.0, -1.0, 10.0), np.zeros(3), e1, e2)
    with pytest.raises(ValueError):
        hardcore_seeds_3d(rng, 1000, box, 3.0)
    spec = SectionSpecimen(rng.random((3, 3)) * 10, box, np.zeros(3), e1, e2)
    with pytest.raises(ValueError):
        spec.label(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        spec.label(np.array([np.inf]), np.array([0.0]))
    with pytest.raises(ValueError):
        spec.label(np.zeros(2), np.zeros(2), max_distance=-1.0)
