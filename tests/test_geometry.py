"""Grain polygons and the grain table (shapely) against pixel counting and Crofton's formula."""

from __future__ import annotations

import math

import numpy as np

from generators.geometry import grain_polygons, grain_table, polygon_rows, polygons_from_rows
from generators.substructure import cell_polygons
from generators.voronoi import Tessellation, lognormal_weights, poisson_seeds
from twin.generate import build_pipeline
from twin.recipe import parse_recipe


def _tess(periodic=True):
    rng = np.random.default_rng(5)
    ext = (120.0, 100.0)
    n = 40
    seeds = poisson_seeds(rng, n, ext)
    return Tessellation(seeds, ext, weights=lognormal_weights(rng, n, 17.0, 0.4),
                        periodic=periodic)


def test_areas_and_perimeters_match_pixel_counts_and_crofton():
    tess = _tess()
    cells = cell_polygons(tess)
    ids = np.arange(tess.n_seeds)
    table = grain_table(ids, grain_polygons(cells, ids))
    step = 0.25
    lx, ly = tess.extent
    yy, xx = np.mgrid[0:ly:step, 0:lx:step] + 0.5 * step
    g, _ = tess.label(xx, yy, max_distance=1.0)
    counted = np.bincount(g.ravel(), minlength=tess.n_seeds) * step * step
    big = counted > 50
    assert np.allclose(table[big, 1], counted[big], rtol=0.02)
    assert math.isclose(table[:, 1].sum(), lx * ly, rel_tol=1e-9)
    # total boundary length by Crofton (two line directions): L = pi/4 * crossings * step
    crossings = (g[:, 1:] != g[:, :-1]).sum() + (g[1:, :] != g[:-1, :]).sum()
    # periodic wrap edges count too
    crossings += (g[:, 0] != g[:, -1]).sum() + (g[0, :] != g[-1, :]).sum()
    crofton = math.pi / 4 * crossings * step
    assert math.isclose(table[:, 2].sum() / 2, crofton, rel_tol=0.04)
    assert np.allclose(table[:, 3], 2 * np.sqrt(table[:, 1] / math.pi))


def test_bounded_specimen_polygons_are_clipped_to_it():
    """periodic: false — the grain table's areas are those inside the specimen (they used to
    include the margin the polygon search bounds cells by: one border grain had 19,434 px² of
    which 450 were inside)."""
    tess = _tess(periodic=False)
    cells = cell_polygons(tess)
    ids = np.arange(tess.n_seeds)
    polys = grain_polygons(cells, ids)
    table = grain_table(ids, polys)
    lx, ly = tess.extent
    assert math.isclose(table[:, 1].sum(), lx * ly, rel_tol=1e-9)
    step = 0.25
    yy, xx = np.mgrid[0:ly:step, 0:lx:step] + 0.5 * step
    g, _ = tess.label(xx, yy, max_distance=1.0)
    counted = np.bincount(g.ravel(), minlength=tess.n_seeds) * step * step
    big = counted > 50
    assert np.allclose(table[big, 1], counted[big], rtol=0.02)
    for p in polys:
        if not p.is_empty:
            x0, y0, x1, y1 = p.bounds
            assert x0 >= 0 and y0 >= 0 and x1 <= lx and y1 <= ly


def test_polygon_rows_round_trip_and_wkb():
    tess = _tess()
    cells = cell_polygons(tess)
    ids = np.array([3, 7, 11])
    polys = grain_polygons(cells, ids)
    back = polygons_from_rows(polygon_rows(ids, polys))
    assert sorted(back) == [3, 7, 11]
    for g, p in zip(ids, polys):
        assert back[g].equals(p) and back[g].wkb == p.wkb


def test_pipeline_geometry_lists_the_grains_in_the_frame():
    p = build_pipeline(parse_recipe(
        "name: g\nsize: [64, 64]\nsamples: 2\nspecimens: 1\nseed: 2\n"
        "specimen: {grains_per_field: [20, 20]}\noutput: {geometry: true}\n"), None)[0]
    s = p.generate(0)
    t = s.geometry["grain_table"]
    assert np.array_equal(t[:, 0].astype(int), np.unique(s.labels["grain_id"]))
    assert set(polygons_from_rows(s.geometry["grain_polygons"])) == set(t[:, 0].astype(int))


def test_generated_file_carries_geometry(tmp_path):
    """`output.geometry: true` reaches the HDF5 file through the sharded writer."""
    from twin.dataset import open_dataset
    from twin.generate import generate_dataset

    r = tmp_path / "geo.yaml"
    r.write_text("name: geo\nsize: [48, 48]\nsamples: 2\nspecimens: 1\n"
                 "specimen: {grains_per_field: [8, 10]}\noutput: {geometry: true}\n")
    out = generate_dataset(r, tmp_path / "geo.h5", progress=False)
    with open_dataset(out) as ds:
        assert set(ds.geometry_names) >= {"grain_table", "grain_polygons"}
        table = ds.geometry("grain_table", 0)
        gid = ds.label("grain_id", 0)
    assert table.shape[1] == 4 and len(table) >= len(set(gid.ravel().tolist()))
