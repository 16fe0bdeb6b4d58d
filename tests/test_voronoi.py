"""Voronoi/Laguerre kernel: exact against brute force, label consistency, Poisson–Voronoi statistics."""

import math

import numba
from numba import njit
import numpy as np
import pytest

from generators.sem import boundary_label
from generators.voronoi import Tessellation, hardcore_seeds, lognormal_weights, poisson_seeds


def brute_force(points, seeds, weights, extent, periodic):
    """Reference: nearest seed (power distance) and min distance to all radical lines, all seeds."""
    w = np.zeros(len(seeds)) if weights is None else np.asarray(weights)
    if periodic:
        lx, ly = extent
        shifts = [(a * lx, b * ly) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    else:
        shifts = [(0.0, 0.0)]
    s = np.concatenate([seeds + np.array(sh) for sh in shifts])
    ww = np.tile(w, len(shifts))
    ids = np.tile(np.arange(len(seeds)), len(shifts))
    p = ((points[:, None, :] - s[None]) ** 2).sum(-1) - ww[None]
    j = p.argmin(1)
    sep = np.sqrt(((s[None] - s[j][:, None]) ** 2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (p - p[np.arange(len(points)), j][:, None]) / (2 * sep)
    d[sep == 0] = np.inf
    return ids[j], d.min(1)


def grid_points(h, w, offset=(0.0, 0.0)):
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    return xx + offset[0], yy + offset[1]


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("laguerre", [False, True])
@pytest.mark.parametrize("cap", [np.inf, 6.0])
def test_labels_match_brute_force(rng, periodic, laguerre, cap):
    extent = (160.0, 128.0)
    seeds = poisson_seeds(rng, 40, extent)
    weights = lognormal_weights(rng, 40, 20.0, 0.5) if laguerre else None
    tess = Tessellation(seeds, extent, weights=weights, periodic=periodic)
    # points inside, and (distorted) points outside the specimen box
    x = rng.uniform(-30, extent[0] + 30, 4000)
    y = rng.uniform(-30, extent[1] + 30, 4000)
    gid, dist = tess.label(x, y, max_distance=cap)
    pts = np.c_[x, y]
    if periodic:
        pts = np.c_[np.mod(x, extent[0]), np.mod(y, extent[1])]
    ref_id, ref_d = brute_force(pts, seeds, weights, extent, periodic)
    assert np.array_equal(gid, ref_id)
    np.testing.assert_allclose(dist, np.minimum(ref_d, cap), rtol=1e-5, atol=1e-4)


def test_thread_count_does_not_change_result(rng):
    extent = (512.0, 512.0)
    tess = Tessellation(poisson_seeds(rng, 300, extent), extent,
                        weights=lognormal_weights(rng, 300, 30.0, 0.4))
    x, y = grid_points(256, 256, (3.3, 7.7))
    x = x + rng.normal(0, 0.5, x.shape)
    old = numba.get_num_threads()
    out = []
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            out.append(tess.label(x, y, max_distance=8.0))
            out.append(tess.label(x, y))
    finally:
        numba.set_num_threads(old)
    for a, b in zip(out[0:2], out[2:4] if len(out) > 2 else out[0:2]):
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


@pytest.mark.parametrize("periodic", [False, True])
def test_boundary_band_and_grain_id_changes(rng, periodic):
    """Boundary = exact distance < width/2; as width → 0 it pins down where grain_id changes.

    For a convex cell, if d(a) < 1/√2 some 4-neighbour lies across the nearest radical line, hence
    in another grain; if 4-neighbours a, b differ, the segment ab crosses their radical line, so
    d(a) + d(b) <= 1.  Hence band(√2) ⊆ {pixels with a differing 4-neighbour} ⊆ band(2), and every
    differing pair touches band(1).
    """
    extent = (200.0, 200.0)
    tess = Tessellation(poisson_seeds(rng, 60, extent), extent, periodic=periodic)
    x, y = grid_points(200, 200)
    gid, dist = tess.label(x, y)
    # the label is exactly the thresholded exact distance (reference: brute force)
    _, ref_d = brute_force(np.c_[x.ravel(), y.ravel()], tess.seeds, None, extent, periodic)
    for width in (0.5, 1.0, 2.0, 3.0):
        lab = boundary_label(dist, width)
        ref = (ref_d.reshape(dist.shape) < width / 2).astype(np.uint8)
        # float32 storage may flip pixels within 1e-5 px of the threshold only
        near = np.abs(ref_d.reshape(dist.shape) - width / 2) < 1e-4
        assert np.array_equal(lab[~near], ref[~near])
    diff_h = gid[:, 1:] != gid[:, :-1]
    diff_v = gid[1:, :] != gid[:-1, :]
    edge = np.zeros(gid.shape, bool)
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    edge[1:, :] |= diff_v
    edge[:-1, :] |= diff_v
    inner = np.zeros(gid.shape, bool)  # pixels whose four neighbours all exist
    inner[1:-1, 1:-1] = True
    band_small = boundary_label(dist, math.sqrt(2) - 1e-6).astype(bool)
    assert np.all(edge[band_small & inner])
    assert np.all(boundary_label(dist, 2.0 + 1e-6).astype(bool)[edge])
    band1 = dist <= 0.5 + 1e-6
    assert np.all((band1[:, 1:] | band1[:, :-1])[diff_h])
    assert np.all((band1[1:, :] | band1[:-1, :])[diff_v])
    assert edge.sum() > 1000  # the test is not vacuous


def _cell_stats(tess, side):
    x, y = grid_points(side, side)
    gid, _ = tess.label(x, y, max_distance=1.0)
    n = tess.n_seeds
    pairs = set()
    for a, b in ((gid, np.roll(gid, 1, 0)), (gid, np.roll(gid, 1, 1))):
        m = a != b
        lo = np.minimum(a[m], b[m]).astype(np.int64)
        hi = np.maximum(a[m], b[m]).astype(np.int64)
        pairs.update(np.unique(lo * n + hi).tolist())
    nb = np.zeros(n, int)
    for p in pairs:
        nb[p // n] += 1
        nb[p % n] += 1
    area = np.bincount(gid.ravel(), minlength=n).astype(float)
    return nb, area


def test_poisson_voronoi_statistics():
    """2D Poisson–Voronoi: mean sides 6, variance ≈ 1.781; normalised area variance ≈ 0.280."""
    rng = np.random.default_rng(2024)
    side = 1024
    nbs, areas = [], []
    for _ in range(12):
        tess = Tessellation(poisson_seeds(rng, 250, (side, side)), (side, side), periodic=True)
        nb, area = _cell_stats(tess, side)
        nbs.append(nb)
        areas.append(area / area.mean())
    nb = np.concatenate(nbs)
    area = np.concatenate(areas)
    # mean is exactly 6 on a torus (Euler); raster misses edges shorter than ~1 px (rare here)
    assert abs(nb.mean() - 6.0) < 0.03
    assert abs(nb.var() - 1.781) < 0.12  # 3000 cells: standard error ≈ 0.05
    assert abs(area.var() - 0.280) < 0.025  # standard error ≈ 0.008


def test_hardcore_seeds_respect_min_distance(rng):
    extent = (300.0, 200.0)
    s = hardcore_seeds(rng, 150, extent, 12.0, periodic=True)
    assert s.shape == (150, 2)
    d = s[:, None, :] - s[None]
    d -= np.array(extent) * np.round(d / np.array(extent))
    r = np.sqrt((d**2).sum(-1)) + np.eye(150) * 1e9
    assert r.min() >= 12.0
    # a hard core regularises the cells: fewer small areas than Poisson
    tess = Tessellation(s, extent, periodic=True)
    x, y = grid_points(200, 300)
    gid, _ = tess.label(x, y, 1.0)
    area = np.bincount(gid.ravel(), minlength=150) / (300 * 200 / 150)
    assert area.var() < 0.2


def test_hardcore_impossible_packing_raises(rng):
    with pytest.raises(ValueError, match="could place only"):
        hardcore_seeds(rng, 500, (100.0, 100.0), 10.0)


def test_laguerre_weights_grow_cells(rng):
    extent = (400.0, 400.0)
    seeds = poisson_seeds(rng, 100, extent)
    w = np.zeros(100)
    w[0] = 40.0**2
    tess0 = Tessellation(seeds, extent)
    tess1 = Tessellation(seeds, extent, weights=w)
    x, y = grid_points(400, 400)
    a0 = np.sum(tess0.label(x, y, 1.0)[0] == 0)
    a1 = np.sum(tess1.label(x, y, 1.0)[0] == 0)
    assert a1 > a0 * 1.5


def test_bad_input():
    with pytest.raises(ValueError):
        Tessellation(np.array([[10.0, 200.0]]), (100.0, 100.0))
    t = Tessellation(np.array([[10.0, 20.0], [50.0, 50.0]]), (100.0, 100.0))
    with pytest.raises(ValueError):
        t.label(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        t.label(np.array([np.nan]), np.array([1.0]))


@pytest.mark.parametrize("tile_divisor", [0.5, 4.0, 9.0])
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 1.2])
def test_tile_owner_lists_match_brute_force(rng, tile_divisor, periodic, sigma):
    """Per-tile owners and their radical lines, for big and small tiles and strong Laguerre weights
    (empty cells), at points on tile corners/edges, inside the box and wrapped from far outside."""
    extent = (150.0, 110.0)
    n = 45
    seeds = poisson_seeds(rng, n, extent)
    weights = lognormal_weights(rng, n, 18.0, sigma) if sigma > 0 else None
    tess = Tessellation(seeds, extent, weights=weights, periodic=periodic,
                        tile_divisor=tile_divisor)
    tnx, tny = tess._tile_lists(5.0)[:2]
    # tile corners and edge midpoints exactly, plus random points (outside the box too)
    gx = np.linspace(0.0, extent[0], 2 * tnx + 1)[:-1]
    gy = np.linspace(0.0, extent[1], 2 * tny + 1)[:-1]
    cx, cy = np.meshgrid(gx, gy)
    span = 300.0 if periodic else 20.0
    x = np.concatenate([cx.ravel(), rng.uniform(-span, extent[0] + span, 3000)])
    y = np.concatenate([cy.ravel(), rng.uniform(-span, extent[1] + span, 3000)])
    gid, dist = tess.label(x, y, max_distance=5.0)
    pts = np.c_[np.mod(x, extent[0]), np.mod(y, extent[1])] if periodic else np.c_[x, y]
    ref_id, ref_d = brute_force(pts, seeds, weights, extent, periodic)
    # a point exactly equidistant from two seeds may go to either: compare power distances there
    w = np.zeros(n) if weights is None else weights
    ok = gid == ref_id
    if not ok.all():
        bad = ~ok
        pw = lambda g: _min_image_power(pts[bad], seeds[g], w[g], extent, periodic)  # noqa: E731
        np.testing.assert_allclose(pw(gid[bad]), pw(ref_id[bad]), rtol=0, atol=1e-9)
        assert bad.mean() < 1e-3
    np.testing.assert_allclose(dist, np.minimum(ref_d, 5.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_lazy_tile_lists_give_the_labels_of_the_complete_lists(rng, periodic, sigma, monkeypatch):
    """Tiles are built as frames reach them (their bounding box, or the kernel's fallback for
    points found outside it): labels equal, bit for bit, those of lists built all at once."""
    extent = (400.0, 300.0)
    n = 160
    seeds = poisson_seeds(rng, n, extent)
    weights = lognormal_weights(rng, n, 27.0, sigma) if sigma > 0 else None
    cap = 6.0
    frames = []
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float64)
    for _ in range(5):  # frames at random offsets (beyond the box too), with jitter and drift
        off = rng.uniform(-100.0, 450.0, 2)
        frames.append((xx + off[0] + 0.01 * yy + rng.normal(0, 0.3, (64, 1)), yy + off[1]))
    frames.append((rng.uniform(-50, 450, 500), rng.uniform(-50, 350, 500)))  # scattered
    full = Tessellation(seeds, extent, weights=weights, periodic=periodic)
    full._tile_lists(cap)
    lazy = Tessellation(seeds, extent, weights=weights, periodic=periodic)
    fallback = Tessellation(seeds, extent, weights=weights, periodic=periodic)
    for x, y in frames:
        want = full.label(x, y, max_distance=cap)
        got = lazy.label(x, y, max_distance=cap)
        with monkeypatch.context() as m:  # no box: every tile through the kernel's fallback
            m.setattr(type(fallback._tile_pool(cap)), "build_box", lambda self, *a: None)
            got_fb = fallback.label(x, y, max_distance=cap)
        for g in (got, got_fb):
            np.testing.assert_array_equal(g[0], want[0])
            np.testing.assert_array_equal(g[1], want[1])
    pool = lazy._tile_pool(cap)
    assert 0 < pool.n_built <= pool.tnx * pool.tny


def _min_image_power(pts, s, w, extent, periodic):
    d = pts - s
    if periodic:
        d -= np.array(extent) * np.round(d / np.array(extent))
    return (d * d).sum(-1) - w


def test_periodic_wrap_one_and_many_periods_out(rng):
    """Points one period out (fast wrap) and many periods out (general wrap) get the labels of
    their image in the box, exactly (the same bytes)."""
    extent = (96.0, 80.0)
    tess = Tessellation(poisson_seeds(rng, 30, extent), extent, periodic=True)
    x = rng.uniform(0, extent[0], 2000)
    y = rng.uniform(0, extent[1], 2000)
    x[:5] = [0.0, np.nextafter(extent[0], 0), 1e-300, 5.0, 7.0]
    y[:5] = [0.0, 3.0, 4.0, np.nextafter(extent[1], 0), 1e-300]
    g0, d0 = tess.label(x, y, max_distance=4.0)
    for kx, ky in [(1, 0), (-1, 1), (1, -1), (7, -5), (-13, 9)]:
        g, d = tess.label(x + kx * extent[0], y + ky * extent[1], max_distance=4.0)
        same = (x + kx * extent[0]) - kx * extent[0] == x  # the shifted value is representable
        same &= (y + ky * extent[1]) - ky * extent[1] == y
        assert np.array_equal(g[same], g0[same])
        np.testing.assert_allclose(d, d0, rtol=0, atol=1e-9)


def test_lazy_tile_lists_from_concurrent_threads(rng):
    """Python threads labelling frames of one tessellation at once (e.g. a multi-threaded Dask
    worker sharing a pipeline) build its tile pool under a lock: the labels of each frame equal
    those of a tessellation with every tile built up front."""
    from concurrent.futures import ThreadPoolExecutor

    extent = (600.0, 600.0)
    seeds = poisson_seeds(rng, 300, extent)
    full = Tessellation(seeds, extent)
    full._tile_lists(6.0)
    shared = Tessellation(seeds, extent)
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float64)
    offs = rng.uniform(0, 600, (16, 2))

    def one(o):
        return shared.label(xx + o[0], yy + o[1], max_distance=6.0)

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, offs))
    for o, (g, d) in zip(offs, got):
        wg, wd = full.label(xx + o[0], yy + o[1], max_distance=6.0)
        np.testing.assert_array_equal(g, wg)
        np.testing.assert_array_equal(d, wd)


@njit(cache=True)
def _early_exit_labels(xs, ys, tnx, tny, lx, ly, periodic, cap, trange, oxyw, oid, lrange,
                       lines):
    """The tile kernel as it was up to 2026-11: the owner's lines in ``lmin`` order, stopping
    at the first whose ``lmin`` reaches the best distance so far (reference for the bits)."""
    n = xs.shape[0]
    gid = np.full(n, -1, dtype=np.int32)
    dist = np.zeros(n, dtype=np.float32)
    inv_thx = tnx / lx
    inv_thy = tny / ly
    for i in range(n):
        x = xs[i]
        y = ys[i]
        if periodic:
            x = x - lx * np.floor(x / lx)
            y = y - ly * np.floor(y / ly)
        elif x < 0.0 or y < 0.0 or x >= lx or y >= ly:
            continue
        k = min(int(y * inv_thy), tny - 1) * tnx + min(int(x * inv_thx), tnx - 1)
        j = trange[k, 0]
        if trange[k, 1] - trange[k, 0] > 1:
            best = np.inf
            for t in range(trange[k, 0], trange[k, 1]):
                p = (x - oxyw[t, 0]) ** 2 + (y - oxyw[t, 1]) ** 2 - oxyw[t, 2]
                if p < best:
                    best = p
                    j = t
        bd = cap
        for t in range(lrange[j, 0], lrange[j, 1]):
            if lines[t, 0] >= bd:
                break
            d = lines[t, 1] * x + lines[t, 2] * y + lines[t, 3]
            if d < bd:
                bd = d
        gid[i] = oid[j]
        dist[i] = max(bd, 0.0)
    return gid, dist


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 0.6, 1.5])
def test_tile_kernel_equals_the_early_exit_form(rng, periodic, sigma, thread_runs):
    """The tile kernel evaluates every line of the owner; the early-exit form it replaced stopped
    at the first line whose stored lower bound reached the best distance: same grain ids and
    same distance bits (signed zeros included), on many random tessellations (Poisson,
    hard-core, Laguerre with empty cells), caps and frames (jittered rasters, scattered points
    with tile corners and edges exactly), under 1 and 2 threads."""
    for trial in range(6):
        extent = (float(rng.uniform(150, 500)), float(rng.uniform(150, 500)))
        n = int(rng.integers(20, 300))
        if trial % 2:
            seeds = hardcore_seeds(rng, n, extent, 0.5 * math.sqrt(extent[0] * extent[1] / n))
        else:
            seeds = poisson_seeds(rng, n, extent)
        spacing = math.sqrt(extent[0] * extent[1] / n)
        weights = lognormal_weights(rng, n, 0.5 * spacing, sigma) if sigma > 0 else None
        tess = Tessellation(seeds, extent, weights=weights, periodic=periodic,
                            tile_divisor=float(rng.choice([1.0, 4.0, 7.0])))
        cap = float(rng.choice([1.5, 4.0, 9.0]))
        lists = tess._tile_lists(cap)
        tnx, tny = lists[:2]
        yy, xx = np.mgrid[0:96, 0:128].astype(np.float64)
        off = rng.uniform(-extent[0], 2 * extent[0], 2)
        gx = np.linspace(0.0, extent[0], tnx + 1)
        gy = np.linspace(0.0, extent[1], tny + 1)
        cx, cy = np.meshgrid(gx, gy)
        x = np.concatenate([(xx + off[0] + rng.normal(0, 0.3, (96, 1))).ravel(),
                            rng.uniform(-extent[0], 2 * extent[0], 4000), cx.ravel()])
        y = np.concatenate([(yy + off[1] + 0.01 * xx).ravel(),
                            rng.uniform(-extent[1], 2 * extent[1], 4000), cy.ravel()])
        want = _early_exit_labels(x, y, tnx, tny, *tess.extent, periodic, cap, *lists[2:])
        inside = want[0] >= 0  # (non-periodic points outside the box: the ring search's)
        for gid, dist in thread_runs(lambda: tess.label(x, y, max_distance=cap)):
            np.testing.assert_array_equal(gid[inside], want[0][inside])
            np.testing.assert_array_equal(dist[inside].view(np.int32),
                                          want[1][inside].view(np.int32))


#: :func:`_tile_lists_digest` (2026) of the build on main at 6697f64 (cell-by-cell scans)
_TILE_LISTS_DIGEST = "cfa08eea1c0018620948503e3143ed45200cfe0ad75073dcd123cf0b87e58e33"


def _tile_lists_digest(seed: int) -> str:
    """SHA-256 of the complete tile lists (ranges, owners, lines as built) of 8 tessellations:
    Poisson and Laguerre (with empty cells), periodic and not, several caps and tile sizes."""
    import hashlib

    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    for k in range(8):
        extent = (1024.0, 1024.0) if k == 0 else (float(rng.uniform(120, 400)),
                                                  float(rng.uniform(120, 400)))
        n = 700 if k == 0 else int(rng.integers(30, 250))
        seeds = poisson_seeds(rng, n, extent)
        spacing = math.sqrt(extent[0] * extent[1] / n)
        weights = lognormal_weights(rng, n, spacing, 0.5 + 0.5 * (k % 2)) if k % 3 == 1 else None
        tess = Tessellation(seeds, extent, weights=weights, periodic=k % 4 != 3,
                            tile_divisor=(4.0, 1.5, 7.0)[k % 3])
        cap = (8.29, 3.0, 12.0)[k % 3]
        tess._tile_lists(cap)
        pool = tess._tile_pool(cap)
        no, nl = pool.n_owners, pool.n_lines
        for a in (pool.trange, pool.oxyw[:no], pool.oid[:no], pool.lrange[:no], pool.lines[:nl]):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_tile_lists_are_those_of_the_reference_build(thread_runs):
    """The tile lists, bit for bit, as the per-cell scans built them (digest taken with the
    build of 2026-11 before its scans went run by run), under 1 and 2 threads (the first
    tessellation has ~11,000 tiles: the parallel build)."""
    for digest in thread_runs(lambda: _tile_lists_digest(2026)):
        assert digest == _TILE_LISTS_DIGEST
