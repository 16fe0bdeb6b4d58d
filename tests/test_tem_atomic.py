"""Atomic TEM twin: ASE specimens, carbon film, exact labels, recipe errors, exit-wave reuse."""

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from generators.tem.atoms import (AtomicSpecimen, SpecimenSpec, carbon_film, make_cluster,
                                  particle_footprints, rasterize_footprints)
from twin.errors import RecipeError
from twin.instrument import load_instrument
from twin.recipe import parse_recipe

RECIPE = """
name: hrtem-tiny
size: [32, 40]
pixel_size: {value: 0.5, unit: Å}
samples: 4
specimens: 2
seed: 5
specimen:
  kind: atomic-nanoparticles
  element: Au
  diameter_nm: [0.6, 0.9]
  particles_per_field: [1, 2]
  min_gap_nm: 0.2
  support: {thickness_nm: [0.5, 0.5]}
imaging: {mode: hrtem, sampling_a: 0.25, hrtem: {max_angle_mrad: 20}}
detector: {dose_e_per_a2: [1000, 1000]}
"""


def make_pipe(text=RECIPE, seed=None):
    from twin.pipeline_tem import AtomicTEMPipeline

    r = parse_recipe(text)
    inst, _ = load_instrument(r.instrument)
    return AtomicTEMPipeline(r, inst, root_seed=seed)


def _distance_to_hull_brute(px, py, pts):
    """Distance from points to the convex polygon through ``pts`` (0 inside), brute force."""
    from scipy.spatial import ConvexHull

    if len(pts) < 3:
        d = np.min(np.hypot(px[..., None] - pts[:, 0], py[..., None] - pts[:, 1]), axis=-1)
        if len(pts) == 2:
            a, b = pts
            ab = b - a
            t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab), 0, 1)
            d = np.minimum(d, np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]))
        return d
    v = pts[ConvexHull(pts).vertices]  # counter-clockwise
    inside = np.ones(px.shape, bool)
    dist = np.full(px.shape, np.inf)
    for i in range(len(v)):
        a, b = v[i], v[(i + 1) % len(v)]
        ab = b - a
        cross = ab[0] * (py - a[1]) - ab[1] * (px - a[0])
        inside &= cross >= 0
        t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab), 0, 1)
        dist = np.minimum(dist, np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]))
    return np.where(inside, 0.0, dist)


@pytest.mark.parametrize("xy", [
    [[10.0, 12.0]],                                   # one atom: a disc
    [[5.0, 5.0], [14.0, 7.0], [8.0, 15.0]],           # a triangle
    [[5.0, 5.0], [15.0, 5.0], [15.0, 15.0], [5.0, 15.0], [10.0, 10.0]],  # square + interior atom
])
def test_particle_mask_is_dilated_projected_hull(xy):
    xy = np.array(xy)
    pos = np.column_stack([xy, np.arange(len(xy), dtype=float)])  # z does not matter
    spec = AtomicSpecimen(pos, np.full(len(xy), 79), np.ones(len(xy), np.int32),
                          (20.0, 20.0, 10.0), {})
    r = 1.4
    g = np.arange(0, 20, 0.1) + 0.05
    X, Y = np.meshgrid(g, g)
    inst = rasterize_footprints(particle_footprints(spec, r), X, Y)
    d = _distance_to_hull_brute(X, Y, xy)
    expect = d <= r
    bad = (inst > 0) != expect
    # only where the polygonised circle (32 segments per quarter) differs from the true one
    assert np.all(np.abs(d[bad] - r) < 1e-3)
    assert expect.sum() > 100 and bad.sum() <= 0.002 * expect.sum()
    if len(xy) == 1:
        assert abs((inst > 0).sum() * 0.01 - math.pi * r * r) < 0.05 * math.pi * r * r


def test_overlapping_footprints_higher_id_wins():
    pos = np.array([[5.0, 5.0, 0.0], [6.0, 5.0, 0.0]])
    spec = AtomicSpecimen(pos, np.array([79, 79]), np.array([1, 2], np.int32), (10, 10, 5), {})
    inst = rasterize_footprints(particle_footprints(spec, 1.0), np.array([5.5, 4.2, 6.8]),
                                np.array([5.0, 5.0, 5.0]))
    assert inst.tolist() == [2, 1, 2]


def test_carbon_film_density_and_min_distance():
    rng = np.random.default_rng(1)
    pos = carbon_film((30.0, 25.0), 12.0, 3.0, 2.0, 1.3, rng)
    n_expect = 2.0 / 12.011 * 6.02214076e23 * 1e-24 * 30 * 25 * 12
    assert len(pos) == round(n_expect)
    # min distance, periodic in x and y (minimum image), brute force
    d = pos[:, None, :] - pos[None, :, :]
    d[..., 0] -= 30.0 * np.round(d[..., 0] / 30.0)
    d[..., 1] -= 25.0 * np.round(d[..., 1] / 25.0)
    r = np.sqrt((d ** 2).sum(-1))
    np.fill_diagonal(r, np.inf)
    assert r.min() >= 1.3
    assert pos[:, 2].min() >= 3.0 and pos[:, 2].max() < 15.0


def test_clusters_fcc_nearest_neighbour_and_size():
    for shape in ("octahedron", "decahedron", "icosahedron"):
        pos = make_cluster("Au", shape, 15.0)
        nn = np.sort(pdist(pos))[0]
        assert abs(nn - 4.08 / math.sqrt(2)) < 0.15, shape  # Au a = 4.08 Å
        diam = 2 * np.sqrt((pos ** 2).sum(1)).max()
        assert 10.0 < diam < 20.0


def test_specimen_particles_inside_field_and_separated():
    spec = SpecimenSpec(extent_a=(60.0, 50.0), diameter_a=(8.0, 12.0), particles=(3, 3),
                        min_gap_a=3.0, support_thickness_a=(3.0, 3.0))
    s = spec.sample(np.random.default_rng(2))
    assert s.n_particles == 3
    fps = particle_footprints(s, 0.01)
    for k in range(1, 4):
        xy = s.particle_xy(k)
        assert xy[:, 0].min() > 0 and xy[:, 0].max() < 60 and xy[:, 1].max() < 50
        for j in range(k + 1, 4):
            assert fps[k - 1].distance(fps[j - 1]) >= 3.0 - 0.02
    # the particles lie above the film (beam meets them first)
    assert s.positions[s.particle_id > 0, 2].max() < s.positions[s.particle_id == 0, 2].min()


@pytest.mark.parametrize("bad, needle", [("Qq", "unknown element 'Qq'"), ("Fe", "not FCC")])
def test_bad_element(bad, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(RECIPE.replace("element: Au", f"element: {bad}"))
    with pytest.raises(ValueError, match=needle):
        SpecimenSpec(extent_a=(10, 10), element=bad, diameter_a=(1, 2))


def test_particle_larger_than_field():
    with pytest.raises(RecipeError, match="particle larger than the field"):
        make_pipe(RECIPE.replace("diameter_nm: [0.6, 0.9]", "diameter_nm: [0.6, 1.7]"))


def test_sampling_too_coarse_for_voltage():
    # 300 kV, 0.25 Å passes ~26 mrad < 40 mrad
    with pytest.raises(RecipeError, match="sampling too coarse for 300 kV"):
        make_pipe(RECIPE.replace("max_angle_mrad: 20", "max_angle_mrad: 40"))


def test_unknown_key_refused():
    with pytest.raises(RecipeError, match="unknown key 'imaging.hrtem.foo'"):
        parse_recipe(RECIPE.replace("max_angle_mrad: 20}", "max_angle_mrad: 20, foo: 1}"))


def test_labels_geometry_and_params(monkeypatch):
    import twin.pipeline_tem as pt

    calls = []
    real = pt.exit_wave
    monkeypatch.setattr(pt, "exit_wave", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = make_pipe()
    samples = [pipe.generate(i) for i in range(4)]
    # exit-wave reuse: 2 specimens, 4 samples → 2 multislice runs
    assert len(calls) == 2
    assert [s.specimen_id for s in samples] == [0, 0, 1, 1]
    assert samples[0].params["imaging"]["defocus_a"] != samples[1].params["imaging"]["defocus_a"]
    assert [s.params["exit_wave"]["draw"] for s in samples] == [0, 1, 0, 1]
    for s in samples:
        json.dumps(s.params)
        inst, part = s.labels["instance"], s.labels["particle"]
        assert inst.shape == part.shape == (32, 40)
        assert np.array_equal(part, (inst > 0).astype(np.uint8))
        assert inst.max() == s.params["specimen"]["n_particles"] >= 1
        cols = s.geometry["atom_columns"]
        assert cols.shape[1] == 4 and cols[:, 2].sum() == sum(
            p["n_atoms"] for p in s.params["specimen"]["particles"])
        # every column lies on a pixel labelled with its particle
        r = np.clip(np.round(cols[:, 1]).astype(int), 0, 31)
        c = np.clip(np.round(cols[:, 0]).astype(int), 0, 39)
        assert np.array_equal(inst[r, c], cols[:, 3].astype(int))
    # determinism: a fresh pipeline regenerates sample 3 alone, bit for bit
    again = make_pipe().generate(3)
    assert np.array_equal(again.image, samples[3].image)
    assert np.array_equal(again.labels["instance"], samples[3].labels["instance"])


def test_samples_write_with_geometry(tmp_path):
    """A TEMSample's labels and atom columns round-trip through the dataset writer/reader."""
    from twin.dataset import DatasetWriter, open_dataset

    pipe = make_pipe()
    path = tmp_path / "tem.h5"
    samples = [pipe.generate(i) for i in range(2)]
    with DatasetWriter(path, n_samples=2, image_shape=pipe.image_shape,
                       image_dtype=pipe.image_dtype, labels=pipe.label_specs, attrs={}) as w:
        for k, s in enumerate(samples):
            w.write(k, s.image, s.labels, specimen_id=s.specimen_id, index=s.index,
                    params=s.params, geometry=s.geometry)
    ds = open_dataset(path)
    assert ds.geometry_names == ["atom_columns"]
    np.testing.assert_array_equal(ds.geometry("atom_columns", 1),
                                  samples[1].geometry["atom_columns"])
    assert ds.label_attrs("particle")["classes"] == ["support", "particle"]
