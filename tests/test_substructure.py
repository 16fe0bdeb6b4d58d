"""Cell polygons, sub-grains and orientation gradients against brute-force / shapely references."""

import math

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPoint, Point, Polygon

from generators.substructure import (
    OrientationGradients,
    Subgrains,
    build_subgrains,
    cell_polygons,
    subgrain_factor,
)
from generators.voronoi import Tessellation, lognormal_weights, poisson_seeds

EXTENT = (100.0, 80.0)


def make_tess(rng, periodic, laguerre, n=12, extent=EXTENT):
    seeds = poisson_seeds(rng, n, extent)
    w = lognormal_weights(rng, n, math.sqrt(extent[0] * extent[1] / n), 0.5) if laguerre else None
    return Tessellation(seeds, extent, weights=w, periodic=periodic)


def image_shifts(extent, periodic):
    lx, ly = extent
    if not periodic:
        return np.zeros((1, 2))
    return np.array([(a * lx, b * ly) for a in (-1, 0, 1) for b in (-1, 0, 1)])


def halfplane(a, c, big=1e5):
    """Shapely polygon of {u : a·u ≤ c} (large but finite)."""
    na = np.hypot(*a)
    x0 = a * c / na**2
    t = np.array([-a[1], a[0]]) / na
    inward = -a / na
    return Polygon([x0 + big * t, x0 - big * t, x0 - big * t + 2 * big * inward,
                    x0 + big * t + 2 * big * inward])


def reference_cells(tess):
    """Brute-force power cells: a box clipped by the half-planes of ALL seeds and images (shapely)."""
    lx, ly = tess.extent
    w = np.zeros(tess.n_seeds) if tess.weights is None else tess.weights
    shifts = image_shifts(tess.extent, tess.periodic)
    m = max(lx, ly)  # the non-periodic clip box of cell_polygons (periodic cells are bounded)
    cells = []
    for i, p in enumerate(tess.seeds):
        poly = Polygon([(-m, -m), (lx + m, -m), (lx + m, ly + m), (-m, ly + m)])
        for sh in shifts:
            for j, q in enumerate(tess.seeds):
                qq = q + sh
                if np.allclose(qq, p):
                    continue
                a = 2 * (qq - p)
                c = qq @ qq - p @ p - w[j] + w[i]
                poly = poly.intersection(halfplane(a, c))
        cells.append(poly)
    return cells


def to_cell(poly, x, y, extent, periodic):
    """The periodic image of (x, y) lying in (or nearest to) polygon ``poly``."""
    best, out = np.inf, (x, y)
    for sh in image_shifts(extent, periodic):
        d = poly.distance(Point(x + sh[0], y + sh[1]))
        if d < best:
            best, out = d, (x + sh[0], y + sh[1])
    return out


@pytest.mark.parametrize("ring", [True, False])
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("laguerre", [False, True])
def test_cell_polygons_match_labels_and_tile_the_specimen(rng, periodic, laguerre, ring):
    tess = make_tess(rng, periodic, laguerre, n=30)
    # ring=False, small start: exercises the k-d-tree certificate loop
    cells = cell_polygons(tess, first_candidates=4, ring_search=ring)
    lx, ly = tess.extent
    areas = cells.areas()
    if periodic:
        assert areas.sum() == pytest.approx(lx * ly, rel=1e-9)
    else:
        m = max(lx, ly)
        assert areas.sum() == pytest.approx((lx + 2 * m) * (ly + 2 * m), rel=1e-9)
    x = rng.uniform(-5, lx + 5, 3000)
    y = rng.uniform(-5, ly + 5, 3000)
    gid, _ = tess.label(x, y)
    fx, fy = cells.to_frame(gid, x, y)
    polys = [Polygon(cells.polygon(i)) if len(cells.polygon(i)) >= 3 else Polygon()
             for i in range(tess.n_seeds)]
    dist = np.array([polys[g].distance(Point(a, b)) for g, a, b in zip(gid, fx, fy)])
    assert dist.max() < 1e-9
    # the same cells as the brute-force construction (area of the symmetric difference ≈ 0)
    ref = reference_cells(tess)
    for i in range(tess.n_seeds):
        assert polys[i].symmetric_difference(ref[i]).area < 1e-6 * max(ref[i].area, 1.0)


@pytest.mark.parametrize("periodic", [False, True])
def test_edge_neighbours_are_power_equidistant(rng, periodic):
    tess = make_tess(rng, periodic, True, n=25)
    cells = cell_polygons(tess)
    w = tess.weights
    lx, ly = tess.extent
    for i in range(tess.n_seeds):
        v = cells.polygon(i)
        e = cells.edge_neighbour[cells.start[i]:cells.start[i + 1]]
        for k in range(len(v)):
            if e[k] < 0:
                continue
            mid = 0.5 * (v[k] + v[(k + 1) % len(v)])
            pi = np.sum((mid - tess.seeds[i]) ** 2) - w[i]
            pq = min(np.sum((mid - tess.seeds[e[k]] - sh) ** 2) - w[e[k]]
                     for sh in image_shifts((lx, ly), periodic))
            assert pi == pytest.approx(pq, abs=1e-6 * (1 + abs(pi)))


def brute_subgrain(tess, sub, x, y):
    """Reference: nearest sub-seed among those of the point's parent grain (minimum image)."""
    lx, ly = tess.extent
    parent_sub = tess.label(sub[:, 0], sub[:, 1])[0]
    gid = tess.label(x, y)[0]
    dx = x[:, None] - sub[None, :, 0]
    dy = y[:, None] - sub[None, :, 1]
    if tess.periodic:
        dx -= lx * np.round(dx / lx)
        dy -= ly * np.round(dy / ly)
    d2 = np.where(parent_sub[None, :] == gid[:, None], dx * dx + dy * dy, np.inf)
    out = np.where(np.isfinite(d2).any(1), d2.argmin(1), -1)
    return gid, out


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("laguerre", [False, True])
def test_subgrain_ids_match_brute_force(rng, periodic, laguerre):
    tess = make_tess(rng, periodic, laguerre, n=15)
    lx, ly = tess.extent
    sub = rng.random((60, 2)) * np.array([lx, ly])
    st = build_subgrains(tess, sub)
    # random points, and a distorted raster (consecutive pixels: the row-coherent path)
    yy, xx = np.mgrid[-5:ly + 5:0.7, -5:lx + 5:0.7]
    xx = xx + rng.normal(0, 0.2, xx.shape)
    x = np.r_[rng.uniform(-10, lx + 10, 4000), xx.ravel()]
    y = np.r_[rng.uniform(-10, ly + 10, 4000), yy.ravel()]
    gid, ref = brute_subgrain(tess, sub, x, y)
    sid, dist = st.label(x, y, gid)
    # the order of the points does not matter
    perm = rng.permutation(len(x))
    sid_p, dist_p = st.label(x[perm], y[perm], gid[perm])
    assert np.array_equal(sid_p, sid[perm]) and np.array_equal(dist_p, dist[perm])
    has = ref >= 0
    # seeded sub-grains: the same sub-seed (compare positions, wrapped into the specimen)
    got = st.seeds[sid[has]]
    got = np.c_[np.mod(got[:, 0], lx), np.mod(got[:, 1], ly)] if periodic else got
    np.testing.assert_allclose(got, sub[ref[has]], atol=1e-9)
    # grains without sub-seeds: one whole-grain sub-grain, no sub-boundary
    assert np.array_equal(sid[~has], st.n_seeded + gid[~has])
    assert np.all(np.isinf(dist[~has]))
    # sub-grains never cross grain boundaries
    assert np.array_equal(st.parent[sid], gid)


def reference_subgrain_distance(tess, sub, x, y):
    """Distance to the sub-boundary set inside the point's grain, built with shapely/GEOS:
    plain Voronoi cells of the grain's sub-seeds (shapely.voronoi_polygons), their edges
    intersected with the brute-force grain polygon."""
    cells = reference_cells(tess)
    parent_sub = tess.label(sub[:, 0], sub[:, 1])[0]
    gid = tess.label(x, y)[0]
    lines = {}
    for g in range(tess.n_seeds):
        own = [to_cell(cells[g], *s, tess.extent, tess.periodic) for s in sub[parent_sub == g]]
        if len(own) < 2:
            lines[g] = None
            continue
        env = shapely.box(-1e4, -1e4, 1e4, 1e4)
        vor = shapely.voronoi_polygons(MultiPoint(own), extend_to=env)
        edges = shapely.union_all([p.exterior for p in vor.geoms])
        lines[g] = edges.intersection(cells[g])
    out = np.full(len(x), np.inf)
    for i in range(len(x)):
        g = gid[i]
        if lines[g] is None or lines[g].is_empty:
            continue
        px, py = to_cell(cells[g], x[i], y[i], tess.extent, tess.periodic)
        out[i] = lines[g].distance(Point(px, py))
    return gid, out


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("laguerre", [False, True])
def test_subgrain_distance_matches_shapely_reference(rng, periodic, laguerre):
    tess = make_tess(rng, periodic, laguerre, n=10)
    lx, ly = tess.extent
    sub = rng.random((45, 2)) * np.array([lx, ly])
    st = build_subgrains(tess, sub)
    x = rng.uniform(-3, lx + 3, 600)
    y = rng.uniform(-3, ly + 3, 600)
    gid, ref = reference_subgrain_distance(tess, sub, x, y)
    _, dist = st.label(x, y, gid)
    assert np.array_equal(np.isinf(dist), np.isinf(ref))
    fin = np.isfinite(ref)
    assert fin.sum() > 300
    np.testing.assert_allclose(dist[fin], ref[fin], rtol=1e-5, atol=1e-4)
    # the cap
    _, capped = st.label(x, y, gid, max_distance=2.0)
    np.testing.assert_allclose(capped, np.minimum(ref, 2.0), rtol=1e-5, atol=1e-4)


def test_subgrain_boundary_band_is_where_the_id_changes(rng):
    """On a fine raster, pixel pairs whose sub-grain differs inside one grain lie within one
    pixel diagonal of a sub-boundary (distance exact from geometry)."""
    tess = make_tess(rng, True, False, n=8)
    lx, ly = tess.extent
    st = Subgrains(subgrains_per_grain=(6.0, 6.0)).sample_specimen(rng, tess)
    yy, xx = np.mgrid[0:ly:0.5, 0:lx:0.5]
    gid, _ = tess.label(xx, yy)
    sid, dist = st.label(xx, yy, gid)
    change = (sid[:, 1:] != sid[:, :-1]) & (gid[:, 1:] == gid[:, :-1])
    assert change.sum() > 50
    assert np.all(np.minimum(dist[:, 1:], dist[:, :-1])[change] <= 0.5 + 1e-4)
    # and pixels far from every sub-boundary have no id change next to them
    far = (dist[:, 1:] > 0.6) & (dist[:, :-1] > 0.6) & (gid[:, 1:] == gid[:, :-1])
    assert not np.any((sid[:, 1:] != sid[:, :-1]) & far)


def test_subgrains_sample_statistics_and_fraction(rng):
    tess = make_tess(rng, True, False, n=400, extent=(400.0, 400.0))
    st = Subgrains(subgrains_per_grain=(5.0, 5.0), grain_fraction=0.5,
                   intensity_delta=(0.04, 0.04)).sample_specimen(rng, tess)
    divided = st.params["n_divided_grains"]
    assert abs(divided - 200) < 4 * math.sqrt(400 * 0.25)
    counts = np.diff(st.grain_start)
    # sub-seeds only in divided grains; their total is Poisson(5 n) thinned to the divided area
    assert st.params["n_subgrain_seeds"] == counts.sum()
    assert abs(counts.sum() - 5 * divided) < 5 * math.sqrt(5 * 400)
    d = st.delta[: st.n_seeded]
    assert np.all(np.abs(d) <= 0.04) and np.all(st.delta[st.n_seeded:] == 0)
    assert abs(d.std() - 0.04 / math.sqrt(3)) < 0.1 * 0.04 / math.sqrt(3)


def test_subgrain_factor_formula(rng):
    sid = rng.integers(0, 5, (7, 9)).astype(np.int32)
    dist = rng.uniform(0, 4, (7, 9)).astype(np.float32)
    dist[0, 0] = np.inf
    delta = rng.uniform(-0.05, 0.05, 5)
    f = subgrain_factor(sid, dist, delta, 1.5, 0.1)
    sigma = 1.5 / (2 * math.sqrt(2 * math.log(2)))
    ref = (1 + delta[sid]) * (1 - 0.1 * np.exp(-dist.astype(np.float64) ** 2 / (2 * sigma**2)))
    np.testing.assert_allclose(f, ref, rtol=1e-6)
    assert f.dtype == np.float32
    # no groove → only the intensity deltas
    np.testing.assert_allclose(subgrain_factor(sid, dist, delta, 0.0, 0.1), 1 + delta[sid],
                               rtol=1e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_gradient_is_linear_with_the_drawn_slope(rng, periodic):
    tess = make_tess(rng, periodic, False, n=20)
    lx, ly = tess.extent
    grad = OrientationGradients(amplitude=(0.05, 0.2)).sample_specimen(rng, tess)
    spacing = math.sqrt(lx * ly / 20)
    mag = np.hypot(*grad.slope.T) * spacing
    assert np.all((mag >= 0.05 - 1e-12) & (mag <= 0.2 + 1e-12))
    yy, xx = np.mgrid[0:ly:1.0, 0:lx:1.0]
    xx = xx + rng.normal(0, 0.3, xx.shape)  # distorted coordinates
    gid, _ = tess.label(xx, yy)
    f = grad.factor(xx, yy, gid).astype(np.float64)
    for g in range(tess.n_seeds):
        sel = gid == g
        if sel.sum() < 20:
            continue
        dx = xx[sel] - tess.seeds[g, 0]
        dy = yy[sel] - tess.seeds[g, 1]
        if periodic:
            dx -= lx * np.round(dx / lx)
            dy -= ly * np.round(dy / ly)
        a = np.c_[np.ones(sel.sum()), dx, dy]
        coef, *_ = np.linalg.lstsq(a, f[sel], rcond=None)
        resid = f[sel] - a @ coef
        assert np.abs(resid).max() < 1e-6
        np.testing.assert_allclose(coef, [1.0, *grad.slope[g]], atol=1e-7)


def test_gradient_directions_are_isotropic():
    rng = np.random.default_rng(7)
    tess = make_tess(rng, True, False, n=4000, extent=(1000.0, 1000.0))
    grad = OrientationGradients(amplitude=(0.1, 0.1)).sample_specimen(rng, tess)
    ang = np.arctan2(grad.slope[:, 1], grad.slope[:, 0])
    # mean resultant length of uniform directions ~ 1/sqrt(n)
    assert np.hypot(np.cos(ang).mean(), np.sin(ang).mean()) < 4 / math.sqrt(4000)


def test_determinism_and_thread_count(rng, thread_runs):
    tess = make_tess(np.random.default_rng(5), True, True, n=60, extent=(200.0, 160.0))
    a = Subgrains().sample_specimen(np.random.default_rng(9), tess)
    b = Subgrains().sample_specimen(np.random.default_rng(9), tess)
    for name in ("seeds", "parent", "delta", "grain_start", "segments", "segment_start"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert Subgrains().sample(np.random.default_rng(3)) == Subgrains().sample(np.random.default_rng(3))
    yy, xx = np.mgrid[0:160.0, 0:200.0]
    xx = xx + rng.normal(0, 0.4, xx.shape)
    gid, _ = tess.label(xx, yy)
    grad = OrientationGradients().sample_specimen(np.random.default_rng(2), tess)
    out = thread_runs(lambda: a.label(xx, yy, gid) + (grad.factor(xx, yy, gid),))
    for u, v in zip(out[0], out[-1]):
        assert u.tobytes() == v.tobytes()


@pytest.mark.parametrize("periodic", [False, True])
def test_ring_and_tree_searches_agree_and_ignore_thread_count(periodic, thread_runs):
    """The grid ring search (fast path) and the k-d-tree search give the same cells (strongly
    unequal Laguerre weights, few grid cells a side), whatever the number of Numba threads."""
    rng = np.random.default_rng(11)
    n = 200
    seeds = rng.uniform(0, 300, (n, 2))
    w = -rng.uniform(0, 400, n)  # ~ the spread of fitted lognormal weights
    tess = Tessellation(seeds, (300.0, 300.0), weights=w, periodic=periodic)
    runs = thread_runs(lambda: cell_polygons(tess))
    a, b = runs[0], runs[-1]
    assert a.vertices.tobytes() == b.vertices.tobytes()
    assert a.edge_neighbour.tobytes() == b.edge_neighbour.tobytes()
    ref = cell_polygons(tess, ring_search=False)
    assert np.array_equal(a.start, ref.start)  # same vertex count per cell
    for i in range(n):
        pa, pr = a.polygon(i), ref.polygon(i)
        if len(pr) < 3:
            assert len(pa) < 3
            continue
        assert Polygon(pa).symmetric_difference(Polygon(pr)).area < 1e-9 * Polygon(pr).area
        # the same neighbour labels around the cell (start vertex may differ)
        assert sorted(a.edge_neighbour[a.start[i]:a.start[i + 1]]) == \
            sorted(ref.edge_neighbour[ref.start[i]:ref.start[i + 1]])


def test_bad_input_raises(rng):
    tess = make_tess(rng, True, False)
    with pytest.raises(ValueError, match="subgrains_per_grain"):
        Subgrains(subgrains_per_grain=(0.0, 2.0))
    with pytest.raises(ValueError, match="grain_fraction"):
        Subgrains(grain_fraction=1.5)
    with pytest.raises(ValueError, match="groove_depth"):
        Subgrains(groove_depth=(0.1, 1.5))
    with pytest.raises(ValueError, match="amplitude"):
        OrientationGradients(amplitude=(0.2, 0.1))
    with pytest.raises(ValueError, match="inside"):
        build_subgrains(tess, np.array([[-1.0, 5.0]]))
    with pytest.raises(ValueError, match="delta"):
        build_subgrains(tess, np.array([[1.0, 5.0]]), delta=np.zeros(3))
    st = build_subgrains(tess, np.array([[1.0, 5.0], [50.0, 40.0]]))
    x = np.zeros((3, 3))
    with pytest.raises(ValueError, match="shape"):
        st.label(x, x, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="grain ids"):
        st.label(x, x, np.full((3, 3), 99, np.int32))
    with pytest.raises(ValueError, match="finite"):
        st.label(x + np.nan, x, np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match="depth"):
        subgrain_factor(np.zeros(2, np.int32), np.zeros(2), np.zeros(3), 1.0, 2.0)
    with pytest.raises(ValueError, match="out of range"):
        subgrain_factor(np.full(2, 5, np.int32), np.zeros(2), np.zeros(3), 1.0, 0.5)
    with pytest.raises(ValueError, match="first_candidates"):
        cell_polygons(tess, first_candidates=0)


@pytest.mark.parametrize("periodic", [True, False])
def test_hinted_polygon_search_finds_the_same_cells(periodic):
    """A hint (neighbours clipped first) changes the clip order, never the cells: same areas
    (shoelace, to rounding), same neighbour sets, same vertices up to rounding — for the hint
    of the same tessellation with other weights (the weight fit's use) and for a wrong hint
    (random neighbour lists, which only add true constraints)."""
    from generators.sizes import _areas_kernel
    from generators.substructure import cell_polygons_of

    for k in range(6):
        rng = np.random.default_rng(70 + k)
        n = int(rng.integers(30, 500))
        ext = (float(rng.uniform(150, 400)), float(rng.uniform(150, 400)))
        seeds = poisson_seeds(rng, n, ext)
        w0 = -rng.uniform(0, 0.5 * ext[0] * ext[1] / n, n)
        w1 = w0 + rng.normal(0, 0.05 * ext[0] * ext[1] / n, n)
        prev = cell_polygons_of(seeds, w0, ext, periodic)
        wrong = prev.__class__(vertices=prev.vertices,
                               edge_neighbour=rng.integers(-1, n, prev.edge_neighbour.shape[0])
                               .astype(np.int32), start=prev.start, origins=prev.origins,
                               extent=prev.extent, periodic=prev.periodic)
        ref = cell_polygons_of(seeds, w1, ext, periodic)
        a_ref = _areas_kernel(ref.vertices, ref.start)
        for hint in (prev, wrong):
            got = cell_polygons_of(seeds, w1, ext, periodic, hint=hint)
            a = _areas_kernel(got.vertices, got.start)
            np.testing.assert_allclose(a, a_ref, rtol=1e-9, atol=1e-9)
            for i in range(n):
                e_ref = ref.edge_neighbour[ref.start[i]:ref.start[i + 1]]
                e_got = got.edge_neighbour[got.start[i]:got.start[i + 1]]
                assert set(e_got.tolist()) == set(e_ref.tolist()), i
                v_ref = ref.vertices[ref.start[i]:ref.start[i + 1]]
                v_got = got.vertices[got.start[i]:got.start[i + 1]]
                if len(v_ref):  # every vertex found again (order and start may differ)
                    d = np.hypot(*(v_got[:, None, :] - v_ref[None, :, :]).transpose(2, 0, 1))
                    assert d.min(axis=0).max() < 1e-7 and d.min(axis=1).max() < 1e-7
