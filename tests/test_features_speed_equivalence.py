"""Speed paths of issue 4 give the bits of the reference paths they replace.

* ``sem.shaded_signal`` (groove contrast × twin-groove × sub-grain × gradient factors in one
  pass) against ``groove_signal`` times ``twin_groove_factor``, ``subgrain_factor`` and
  ``GradientField.factor`` taken separately (float32 products in pipeline order);
* ``TwinSet.label_warped`` against ``TwinSet.label`` + ``warp.image_space_distance_const``;
* the weight-aware pruning of the Laguerre tile candidate lists (``voronoi._may_matter``): labels
  from the pruned lists against a brute-force NumPy evaluation of every seed and image, and the
  bound itself against brute-force minima of the radical-line distance;
* ``warp.label_warped_grains`` (neighbour walk: grains, normals and image-space distance in one
  pass) against ``Tessellation.label`` + ``warp.image_space_distance``, and
  ``warp.walk_grain_ids`` against ``Tessellation.label``'s ids, for any thread count;
* clip / block buffers allocated once per parallel task (the coordinate map against a copy of
  the kernel with buffers per block; cell and sub-grain polygons against hashes of the kernels
  with buffers per cell, taken before the change), for any thread count.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from numba import njit, prange

from generators.sem import groove_signal, shaded_signal
from generators.substructure import OrientationGradients, Subgrains, subgrain_factor
from generators.twins import AnnealingTwins, twin_groove_factor
from generators.voronoi import Tessellation, _may_matter, lognormal_weights, poisson_seeds
from generators.warp import Warp, _sincos, image_space_distance_const


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


def _specimen(rng, n=60, ext=(160.0, 120.0), sigma=0.6, periodic=True):
    seeds = poisson_seeds(rng, n, ext)
    w = lognormal_weights(rng, n, math.sqrt(ext[0] * ext[1] / n), sigma)
    return Tessellation(seeds, ext, weights=w, periodic=periodic)


@pytest.mark.parametrize("parts", [(), ("twin",), ("sub",), ("grad",), ("twin", "sub"),
                                   ("twin", "grad"), ("sub", "grad"), ("twin", "sub", "grad")])
def test_shaded_signal_bitwise_equals_separate_factors(rng, parts):
    tess = _specimen(rng)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    qx, qy = 1.7 * xx + 3.1, 1.3 * yy + 2.2
    gid, dist = tess.label(qx, qy, max_distance=6.0)
    n = tess.n_seeds
    twins = AnnealingTwins(probability=0.6).sample_specimen(rng, tess.seeds, tess.extent, True)
    tin, tdist = twins.label(qx, qy, gid, max_distance=3.0)
    gsig = gid + n * tin.astype(np.int32)
    table = np.concatenate([rng.uniform(0.2, 1.0, n), twins.intensity])
    width, depth = 2.5, 0.4
    ref = groove_signal(gsig, dist, table, width, depth)
    factor = None
    kw = {}
    if "twin" in parts:
        factor = twin_groove_factor(tdist, 1.1, 0.07)
        kw["twin"] = (tdist, 1.1, 0.07)
    if "sub" in parts:
        sub = Subgrains().sample_specimen(rng, tess, label_cap=6.0)
        sid, sd = sub.label(qx, qy, gid, max_distance=6.0)
        f = subgrain_factor(sid, sd, sub.delta, 1.3, 0.05)
        factor = f if factor is None else factor * f
        kw["subgrains"] = (sid, sd, sub.delta, 1.3, 0.05)
    if "grad" in parts:
        gr = OrientationGradients(amplitude=(0.05, 0.3)).sample_specimen(rng, tess)
        f = gr.factor(qx, qy, gid)
        factor = f if factor is None else factor * f
        kw["gradient"] = (qx, qy, gid, gr.origins, gr.slope, gr.extent, gr.periodic)
    if factor is not None:
        ref = (ref * factor).astype(np.float32)
    out = shaded_signal(gsig, dist, table, width, depth, **kw)
    assert out.dtype == np.float32 and out.shape == (h, w)
    assert out.tobytes() == ref.tobytes()
    if factor is not None:  # the factors did something (the comparison can fail)
        assert not np.array_equal(out, groove_signal(gsig, dist, table, width, depth))


def test_shaded_signal_rejects_bad_input(rng):
    g = np.zeros((4, 4), np.int32)
    d = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        shaded_signal(g + 3, d, np.ones(2), 1.0, 0.2)
    with pytest.raises(ValueError, match="twin groove depth"):
        shaded_signal(g, d, np.ones(2), 1.0, 0.2, twin=(d, 1.0, 1.5))
    with pytest.raises(ValueError, match="delta table"):
        shaded_signal(g, d, np.ones(2), 1.0, 0.2, subgrains=(g + 5, d, np.zeros(2), 1.0, 0.1))


@pytest.mark.parametrize("periodic", [True, False])
def test_twin_label_warped_bitwise_equals_two_passes(rng, periodic):
    tess = _specimen(rng, periodic=periodic)
    cmap = Warp(amplitude_px=(2.0, 3.0), correlation_px=(15.0, 25.0), elongation=(1.4, 1.6),
                angle_deg=(10.0, 30.0)).sample_specimen(rng, tess.extent)
    yy, xx = np.mgrid[0:40, 0:56].astype(np.float64)
    qx, qy, jac = cmap.apply(2.0 * xx + 5.0, 2.0 * yy + 4.0)
    gid, _ = tess.label(qx, qy, max_distance=8.0)
    twins = AnnealingTwins(probability=0.7).sample_specimen(rng, tess.seeds, tess.extent,
                                                            periodic)
    cap_q, cap = 2.7, 1.9
    tin_ref, td = twins.label(qx, qy, gid, max_distance=cap_q)
    td_ref = image_space_distance_const(td, gid, twins.normals, jac, cap_q, cap)
    tin, tdist = twins.label_warped(qx, qy, gid, jac, cap_q, cap)
    assert tin.tobytes() == tin_ref.tobytes()
    assert tdist.dtype == np.float32 and tdist.tobytes() == td_ref.tobytes()
    assert tin.any() and (tdist < cap).any()


def _brute_label(tess, x, y, cap):
    """Nearest seed (all 9 periodic images) and capped distance to its radical lines (NumPy)."""
    lx, ly = tess.extent
    w = tess.weights - tess.weights.max()
    shifts = np.array([(a * lx, b * ly) for a in (-1, 0, 1) for b in (-1, 0, 1)])
    img = (tess.seeds[None, :, :] + shifts[:, None, :]).reshape(-1, 2)
    wi = np.tile(w, 9)
    ids = np.tile(np.arange(tess.n_seeds), 9)
    px = np.c_[x.ravel() % lx, y.ravel() % ly]
    pw = ((px[:, None, :] - img[None]) ** 2).sum(-1) - wi[None]
    o = pw.argmin(1)
    sep = np.linalg.norm(img[None] - img[o][:, None], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (pw - pw[np.arange(len(o)), o][:, None]) / (2 * sep)
    d[sep == 0] = np.inf
    return ids[o], np.minimum(d.min(1), cap)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_pruned_laguerre_tile_lists_label_exactly(rng, sigma):
    tess = _specimen(rng, n=50, ext=(100.0, 90.0), sigma=sigma)
    x = rng.uniform(-20, 120, 3000)
    y = rng.uniform(-20, 110, 3000)
    cap = 6.0
    gid, dist = tess.label(x, y, max_distance=cap)
    ref_id, ref_d = _brute_label(tess, x, y, cap)
    assert np.array_equal(gid, ref_id)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-4)


def test_may_matter_bound_is_a_lower_bound(rng):
    """Where the bound rules a seed out, brute force finds no point of the tile at which it is
    nearest or its radical line with the nearest seed lies closer than the cap."""
    tess = _specimen(rng, n=40, ext=(80.0, 80.0), sigma=1.0, periodic=False)
    w = tess.weights - tess.weights.max()
    s = tess.seeds
    cap = 5.0
    ruled_out = 0
    for _ in range(20):
        x0, y0 = rng.uniform(10, 60, 2)
        x1, y1 = x0 + 5.0, y0 + 5.0
        corners = np.array([(x0, y0), (x1, y0), (x0, y1), (x1, y1)])
        # U: the smallest power distance at a seed's farthest tile corner (as _build_tiles)
        u = (np.abs(s[:, None, :] - corners[None]).max(1) ** 2).sum(1) - w
        u = float(u.min())
        gx, gy = np.meshgrid(np.linspace(x0, x1, 21), np.linspace(y0, y1, 21))
        pts = np.c_[gx.ravel(), gy.ravel()]
        pw = ((pts[:, None, :] - s[None]) ** 2).sum(-1) - w[None]
        o = pw.argmin(1)
        for q in range(len(s)):
            dxr = max(x0 - s[q, 0], s[q, 0] - x1, 0.0)
            dyr = max(y0 - s[q, 1], s[q, 1] - y1, 0.0)
            if _may_matter(math.hypot(dxr, dyr), w[q], u, cap):
                continue
            ruled_out += 1
            assert not np.any(o == q)
            sep = np.linalg.norm(s[q] - s[o], axis=1)
            d = (pw[:, q] - pw[np.arange(len(o)), o]) / (2 * sep)
            assert d.min() >= cap
    assert ruled_out > 50  # the bound does prune


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_warped_label_walk_bitwise_equals_tiles_and_image_distance(rng, thread_runs, sigma):
    from generators.substructure import cell_polygons
    from generators.warp import (CellNeighbours, image_space_distance, label_warped_grains,
                                 walk_grain_ids)

    tess = _specimen(rng, n=170, ext=(320.0, 280.0), sigma=sigma)  # the pipeline's grain size
    nb = CellNeighbours.from_polygons(cell_polygons(tess), tess.weights)
    cm = Warp(amplitude_px=(3, 3), correlation_px=(20, 20), elongation=(1.5, 1.5),
              angle_deg=(20, 20)).sample_specimen(np.random.default_rng(8), tess.extent)
    # a frame sticking out of the specimen on every side (periodic wrap), sub-pixel offsets
    yy, xx = np.mgrid[-40:240.0, -30:270.0] + 0.37
    qx, qy, jac = cm.apply(xx, yy)
    cap_q, cap = 9.0, 6.0
    gid, dq = tess.label(qx, qy, max_distance=cap_q)
    ref = image_space_distance(nb, qx, qy, gid, dq, jac, cap_q, cap)
    runs = thread_runs(lambda: label_warped_grains(tess, nb, qx, qy, jac, cap_q, cap))
    for g, d in runs:
        assert g.dtype == np.int32 and d.dtype == np.float32 and g.shape == qx.shape
        assert np.array_equal(g, gid)
        assert d.tobytes() == ref.tobytes()
    assert (ref < cap).mean() > 0.3  # real distances, not only the cap
    # ids alone at scattered points (each chunk starts afresh; far jumps walk or fall back)
    px = rng.uniform(-300, 500, 5000)
    py = rng.uniform(-300, 400, 5000)
    for g in thread_runs(lambda: walk_grain_ids(tess, nb, px, py)):
        assert np.array_equal(g, tess.label(px, py, max_distance=cap_q)[0])


def test_warped_label_walk_declines_where_it_does_not_apply(rng):
    from generators.substructure import cell_polygons
    from generators.warp import CellNeighbours, label_warped_grains

    q = np.zeros((2, 2))
    jac = np.broadcast_to(np.eye(2), (2, 2, 2, 2))
    flat = _specimen(rng, periodic=False)
    nb = CellNeighbours.from_polygons(cell_polygons(flat), flat.weights)
    assert label_warped_grains(flat, nb, q, q, jac, 5.0, 4.0) is None
    few = _specimen(rng, n=3)  # cells of about half the specimen: neighbour images not unique
    nb = CellNeighbours.from_polygons(cell_polygons(few), few.weights)
    assert label_warped_grains(few, nb, q, q, jac, 5.0, 4.0) is None


def _lattice_specimen(rng):
    """Seeds on a square lattice (equal weights): whole rows of pixels on boundaries and at
    four-cell vertices, exact ties between radical lines."""
    gx, gy = np.meshgrid(np.arange(12) * 20.0 + 10.0, np.arange(10) * 20.0 + 10.0)
    return Tessellation(np.c_[gx.ravel(), gy.ravel()], (240.0, 200.0), periodic=True)


@pytest.mark.parametrize("case", range(12))
def test_warped_label_normal_shortcut_bitwise_equals_search(thread_runs, case):
    """The normal taken from the walk's nearest line (where it is clearly nearest) gives the
    bits of the per-point search (``_normal_shortcut=False``): random Laguerre and Voronoi
    specimens, a lattice with exact ties, a pair of nearly coincident seeds; dense warped frames
    that leave the specimen, and points on the cells' vertices and edges."""
    from generators.substructure import cell_polygons
    from generators.warp import CellNeighbours, _walk_inputs, label_warped_grains

    rng = np.random.default_rng(7000 + case)
    while True:  # a specimen the walk applies to (cells well inside half the specimen)
        if case == 0:
            tess = _lattice_specimen(rng)
        else:
            n = int(rng.integers(120, 300))
            ext = (float(rng.uniform(200, 400)), float(rng.uniform(200, 400)))
            seeds = poisson_seeds(rng, n, ext)
            if case == 1:  # two seeds 1e-7 px apart
                seeds[1] = seeds[0] + 1e-7
            sigma = 0.0 if case % 3 == 0 else float(rng.uniform(0.2, 0.6))
            w = lognormal_weights(rng, n, math.sqrt(ext[0] * ext[1] / n), sigma) if sigma else None
            tess = Tessellation(seeds, ext, weights=w, periodic=True)
        if _walk_inputs(tess, CellNeighbours.from_polygons(cell_polygons(tess),
                                                           tess.weights)) is not None:
            break
    cells = cell_polygons(tess)
    nb = CellNeighbours.from_polygons(cells, tess.weights)
    cm = Warp(amplitude_px=(0, 4), correlation_px=(15, 30), elongation=(1.0, 2.0),
              angle_deg=(0, 90)).sample_specimen(rng, tess.extent)
    off = rng.uniform(-60, 60, 2)
    yy, xx = np.mgrid[0:160.0, 0:200.0]
    qx, qy, jac = cm.apply(xx + off[0], yy + off[1])
    # near-ties on top: vertices, edge midpoints, and points on the bisectors of the cells'
    # corners (equidistant from two radical lines up to rounding), under a sheared Jacobian
    v = cells.vertices
    nxt = np.arange(len(v)) + 1
    prv = np.arange(len(v)) - 1
    full = np.diff(cells.start) > 0
    nxt[cells.start[1:][full] - 1] = cells.start[:-1][full]
    prv[cells.start[:-1][full]] = cells.start[1:][full] - 1
    u1 = v[prv] - v
    u2 = v[nxt] - v
    n1 = np.linalg.norm(u1, axis=1)[:, None]
    n2 = np.linalg.norm(u2, axis=1)[:, None]
    ok = (n1[:, 0] > 0) & (n2[:, 0] > 0)
    bis = u1[ok] / n1[ok] + u2[ok] / n2[ok]
    nb_ = np.linalg.norm(bis, axis=1)
    bis = bis[nb_ > 0] / nb_[nb_ > 0, None]
    vb = v[ok][nb_ > 0]
    extra = np.concatenate([v, 0.5 * (v + v[nxt])] + [vb + t * bis for t in (0.3, 1.0, 3.0)]
                           + [v + rng.normal(0, e, v.shape) for e in (1e-9, 1e-13)])
    ex_x = np.concatenate([qx.ravel(), extra[:, 0]])
    ex_y = np.concatenate([qy.ravel(), extra[:, 1]])
    shear = np.array([[1.3, 0.4], [0.1, 0.8]])
    ex_j = np.concatenate([jac.reshape(-1, 2, 2), np.broadcast_to(shear, (len(extra), 2, 2))])
    if case == 0:
        gy, gx = np.mgrid[0:200.0, 0:240.0]
        ex_x = np.concatenate([ex_x, gx.ravel()])
        ex_y = np.concatenate([ex_y, gy.ravel()])
        ex_j = np.concatenate([ex_j, np.broadcast_to(shear, (gx.size, 2, 2))])
    cap_q, cap = 9.0, 6.0
    ref = label_warped_grains(tess, nb, ex_x, ex_y, ex_j, cap_q, cap, _normal_shortcut=False)
    assert ref is not None
    for g, d in thread_runs(lambda: label_warped_grains(tess, nb, ex_x, ex_y, ex_j, cap_q, cap)):
        assert np.array_equal(g, ref[0])
        assert d.tobytes() == ref[1].tobytes()
    assert (ref[1] < cap).mean() > 0.3
    if case > 0:  # the near-ties matter: a shortcut blind to them changes distances here
        object.__setattr__(nb, "_gap", np.full((tess.n_seeds, 2), -np.inf))
        blind = label_warped_grains(tess, nb, ex_x, ex_y, ex_j, cap_q, cap)
        assert np.any(blind[1] != ref[1])


# --------------------------------------------------------------------------------------------
# buffers per parallel task (not per block / cell): the coordinate map, the cell polygons and
# the sub-grain polygons give the bits of the kernels that allocated per block / cell
# --------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=True)
def _map_reference(xs, ys, m, cx, cy, kv, av, ph, qx, qy, jac):
    """The coordinate-map kernel as it was: buffers allocated per block of 256 pixels."""
    n = xs.shape[0]
    nm = kv.shape[0]
    nb = (n + 255) // 256
    for b in prange(nb):
        lo = b * 256
        hi = min(n, lo + 256)
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


@pytest.mark.parametrize("shape", [(256, 256), (37, 61), (1, 5000), (3, 1)])
@pytest.mark.parametrize("amp", [0.0, 3.0])
def test_coordinate_map_task_buffers_bitwise_equal_block_buffers(rng, thread_runs, shape, amp):
    ext = (float(shape[1]) * 1.2 + 10.0, float(shape[0]) * 1.1 + 10.0)
    cm = Warp(amplitude_px=(amp, amp), correlation_px=(10, 40), elongation=(0.6, 1.8),
              angle_deg=(-90, 90)).sample_specimen(rng, ext)
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    x = x + rng.normal(0, 0.4, shape)
    y = y + rng.normal(0, 0.4, shape)
    xs, ys = x.ravel().copy(), y.ravel().copy()
    ref = (np.empty_like(xs), np.empty_like(xs), np.empty((xs.size, 4)))
    _map_reference(xs, ys, np.ascontiguousarray(cm.matrix), float(cm.centre[0]),
                   float(cm.centre[1]), np.ascontiguousarray(cm.wavevectors).reshape(-1, 2),
                   np.ascontiguousarray(cm.amplitudes).reshape(-1, 2),
                   np.ascontiguousarray(cm.phases).ravel(), *ref)
    for qx, qy, jac in thread_runs(lambda: cm.apply(x, y)):
        assert qx.tobytes() == ref[0].tobytes()
        assert qy.tobytes() == ref[1].tobytes()
        assert jac.reshape(-1, 4).tobytes() == ref[2].tobytes()


def _hash(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def test_cell_polygons_task_buffers_keep_the_bits(thread_runs):
    """Polygons of random (Laguerre, periodic or not) tessellations: the hash of the kernels
    that allocated their clip buffers per cell (measured before the change)."""
    from generators.substructure import cell_polygons_of

    cases = []
    for s in range(30):
        r = np.random.default_rng(s)
        n = int(r.integers(2, 700))
        ext = (float(r.uniform(100, 400)), float(r.uniform(100, 400)))
        seeds = r.uniform(0, 1, (n, 2)) * ext
        w = None if s % 3 == 0 else -r.uniform(0, 200, n)
        cases.append((seeds, w, ext, bool(s % 4)))

    def run():
        out = []
        for c in cases:
            cp = cell_polygons_of(*c)
            out += [cp.vertices, cp.edge_neighbour, cp.start]
        return _hash(out)

    assert thread_runs(run) == ["2f9c6f27b0a8907b"] * len(thread_runs(lambda: 0))


def test_subgrain_polygons_task_buffers_keep_the_bits(thread_runs):
    """Sub-grain polygons of random grains and sub-seeds: the hash of the kernel that allocated
    its clip buffers per sub-seed (measured before the change)."""
    from generators.substructure import build_subgrains

    def run():
        out = []
        for s in range(12):
            r = np.random.default_rng(100 + s)
            ext = (float(r.uniform(80, 200)), float(r.uniform(80, 200)))
            n = int(r.integers(3, 60))
            tess = Tessellation(poisson_seeds(r, n, ext), ext,
                                weights=lognormal_weights(r, n, 15.0, 0.5), periodic=bool(s % 2))
            sub = r.uniform(0, 1, (int(r.integers(1, 200)), 2)) * ext
            st = build_subgrains(tess, sub)
            out += [st.seeds, st.parent, st.segments, st.segment_start, st.segment_neighbour,
                    st.grain_start]
        return _hash(out)

    assert thread_runs(run) == ["dd75e568df9f1a0a"] * len(thread_runs(lambda: 0))


@pytest.mark.parametrize("periodic", [True, False])
def test_subgrain_label_fused_keep_loop_bitwise_equals_numpy(rng, thread_runs, periodic):
    """Sub-grain ids and edge distances (the keep test and the kept sub-seed's edge distances
    in one loop) against a NumPy evaluation: the nearest sub-seed of the pixel's grain (first
    of equals) and the same segment-distance expressions over its edges, for rows of pixels
    (the kept path) and scattered points (the search)."""
    from generators.substructure import build_subgrains

    tess = _specimen(rng, n=40, ext=(150.0, 110.0), sigma=0.5, periodic=periodic)
    lx, ly = tess.extent
    st = build_subgrains(tess, rng.uniform(0, 1, (160, 2)) * tess.extent)
    gy, gx = np.mgrid[0:110:0.37, 0:150:0.41]
    x = np.concatenate([gx.ravel(), rng.uniform(0, lx, 4000)])
    y = np.concatenate([gy.ravel(), rng.uniform(0, ly, 4000)])
    gid, _ = tess.label(x, y)
    cap = 7.5
    runs = thread_runs(lambda: st.label(x, y, gid, max_distance=cap))
    o = st.polygons.origins[gid]
    if periodic:
        dx, dy = x - o[:, 0], y - o[:, 1]
        xf = o[:, 0] + dx - lx * np.floor(dx / lx + 0.5)
        yf = o[:, 1] + dy - ly * np.floor(dy / ly + 0.5)
    else:
        xf, yf = x, y
    ref_id = np.empty(x.size, np.int64)
    ref_d = np.empty(x.size, np.float32)
    gs = st.grain_start
    for i in range(x.size):
        a, b = gs[gid[i]], gs[gid[i] + 1]
        if a == b:
            ref_id[i] = st.n_seeded + gid[i]
            ref_d[i] = cap
            continue
        d2 = (xf[i] - st.seeds[a:b, 0]) ** 2 + (yf[i] - st.seeds[a:b, 1]) ** 2
        k = a + int(np.argmin(d2))
        seg = st.segments[st.segment_start[k]:st.segment_start[k + 1]]
        ex, ey = seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]
        l2 = ex * ex + ey * ey
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(l2 > 0, np.minimum(np.maximum(
                ((xf[i] - seg[:, 0]) * ex + (yf[i] - seg[:, 1]) * ey) / l2, 0.0), 1.0), 0.0)
        ddx = xf[i] - (seg[:, 0] + t * ex)
        ddy = yf[i] - (seg[:, 1] + t * ey)
        v = ddx * ddx + ddy * ddy
        ref_id[i] = k
        ref_d[i] = min(np.sqrt(v.min()) if v.size else np.inf, cap)
    for sid, sd in runs:
        assert np.array_equal(sid, ref_id)
        assert sd.tobytes() == ref_d.tobytes()
    assert (ref_d < cap).mean() > 0.2
