"""Grain phases and particles against brute-force references and known statistics."""

import math

import numpy as np
import pytest

from generators.phases import (
    ParticleClass,
    Particles,
    ParticleSet,
    Phase,
    Phases,
    boundary_points,
    junction_points,
    particle_signal,
    phase_class_names,
    phase_label,
)
from generators.substructure import cell_polygons
from generators.voronoi import Tessellation, lognormal_weights, poisson_seeds


def make_tess(rng, periodic=True, laguerre=False, n=40, extent=(160.0, 120.0)):
    seeds = poisson_seeds(rng, n, extent)
    w = lognormal_weights(rng, n, math.sqrt(extent[0] * extent[1] / n), 0.5) if laguerre else None
    return Tessellation(seeds, extent, weights=w, periodic=periodic)


def brute_particles(ps, x, y):
    """Reference: lowest-index ellipse containing each point, every particle tested."""
    lx, ly = ps.extent
    if ps.periodic:
        x, y = np.mod(x, lx), np.mod(y, ly)
    dx = x[:, None] - ps.centres[None, :, 0]
    dy = y[:, None] - ps.centres[None, :, 1]
    if ps.periodic:
        dx -= lx * np.round(dx / lx)
        dy -= ly * np.round(dy / ly)
    c, s = np.cos(ps.angle), np.sin(ps.angle)
    u = (dx * c + dy * s) / ps.semi_axes[:, 0]
    v = (-dx * s + dy * c) / ps.semi_axes[:, 1]
    inside = u * u + v * v <= 1.0
    return np.where(inside.any(1), inside.argmax(1), -1)


THREE = (1 / 3, 1 / 3, 1 / 3)


@pytest.mark.parametrize("periodic", [False, True])
def test_particle_membership_matches_brute_force(rng, periodic):
    tess = make_tess(rng, periodic)
    parts = Particles((
        ParticleClass("precipitate", density=(40.0, 40.0), semi_major_px=(1.0, 9.0),
                      aspect=(0.2, 1.0), placement=THREE),
        ParticleClass("pore", density=(20.0, 20.0), semi_major_px=(0.5, 3.0),
                      intensity=(0.0, 0.1), placement=(1.0, 0.0, 0.0)),
    ))
    ps = parts.sample_specimen(rng, tess)
    assert ps.n_particles > 50
    lx, ly = tess.extent
    x = rng.uniform(-15, lx + 15, 20000)
    y = rng.uniform(-15, ly + 15, 20000)
    got = ps.label(x, y)
    ref = brute_particles(ps, x, y)
    assert np.array_equal(got, ref)
    assert (ref >= 0).sum() > 1000  # many hits, overlaps included
    # drawn shapes within the requested ranges
    a, b = ps.semi_axes.T
    pre = ps.class_id == 0
    assert np.all((a[pre] >= 1.0) & (a[pre] <= 9.0) & (b[pre] / a[pre] >= 0.2 - 1e-12))
    assert np.all((ps.intensity[~pre] >= 0.0) & (ps.intensity[~pre] <= 0.1))


def test_particles_wrap_on_periodic_specimen(rng):
    tess = make_tess(rng, True, n=10, extent=(50.0, 40.0))
    ps = ParticleSet(centres=np.array([[49.5, 0.5]]), semi_axes=np.array([[3.0, 2.0]]),
                     angle=np.array([0.3]), class_id=np.array([0], np.uint8),
                     intensity=np.array([1.2]), placement=np.array([0], np.uint8),
                     extent=tess.extent, periodic=True, class_names=("precipitate",))
    # the image of the particle across both edges
    assert ps.label(np.array([0.8, -0.2, 49.0, 50.8]), np.array([39.6, 0.2, 39.9, 40.3])).tolist() \
        == [0, 0, 0, 0]
    assert ps.label(np.array([25.0]), np.array([20.0])).tolist() == [-1]


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("laguerre", [False, True])
def test_boundary_and_junction_centres_lie_on_boundaries(rng, periodic, laguerre):
    tess = make_tess(rng, periodic, laguerre, n=60)
    cells = cell_polygons(tess)
    b = boundary_points(rng, cells, 300)
    j = junction_points(rng, cells, 100)
    lx, ly = tess.extent
    for pts in (b, j):
        assert np.all((pts >= 0) & (pts < [lx, ly]))
        _, dist = tess.label(pts[:, 0], pts[:, 1])
        assert dist.max() < 1e-6
    # a junction is power-equidistant from three seeds
    w = np.zeros(tess.n_seeds) if tess.weights is None else tess.weights
    shifts = [(0.0, 0.0)] if not periodic else [(a * lx, c * ly) for a in (-1, 0, 1)
                                                 for c in (-1, 0, 1)]
    s = np.concatenate([tess.seeds + np.array(sh) for sh in shifts])
    ww = np.tile(w, len(shifts))
    pw = ((j[:, None, :] - s[None]) ** 2).sum(-1) - ww[None]
    p3 = np.sort(pw, axis=1)[:, :3]
    assert np.abs(p3[:, 2] - p3[:, 0]).max() < 1e-6 * (1 + np.abs(p3).max())


def test_boundary_points_are_uniform_along_the_boundaries():
    """Share of points near each grain ≈ share of that grain's perimeter in the total length."""
    rng = np.random.default_rng(11)
    tess = make_tess(rng, True, False, n=30, extent=(100.0, 100.0))
    cells = cell_polygons(tess)
    perim = np.array([np.sum(np.hypot(*np.diff(np.vstack([v, v[:1]]), axis=0).T))
                      for v in (cells.polygon(i) for i in range(30))])
    k = 20000
    pts = boundary_points(rng, cells, k)
    # a boundary point belongs to both adjacent cells: nudge it towards each seed
    hits = np.zeros(30)
    lx, ly = tess.extent
    for i in range(30):
        d = pts - tess.seeds[i]
        d -= np.array([lx, ly]) * np.round(d / np.array([lx, ly]))
        q = tess.seeds[i] + d * (1 - 1e-6)
        hits[i] = np.sum(tess.label(np.mod(q[:, 0], lx), np.mod(q[:, 1], ly))[0] == i)
    expect = k * perim / perim.sum() * 2  # every boundary point counts for two cells
    chi2 = np.sum((hits - expect) ** 2 / expect)
    assert chi2 < 30 + 6 * math.sqrt(2 * 30)


def test_number_density_is_poisson():
    """Counts over many specimens: mean = density × area / 1e4 and variance = mean."""
    rng = np.random.default_rng(3)
    tess = make_tess(rng, True, False, n=20, extent=(100.0, 100.0))
    parts = Particles((ParticleClass("p", density=(7.0, 7.0)),))
    counts = np.array([parts.sample_specimen(rng, tess).n_particles for _ in range(400)])
    mean = 7.0
    assert abs(counts.mean() - mean) < 4 * math.sqrt(mean / 400)
    # sample variance of a Poisson: sd of the variance estimate ≈ sqrt((mean + 2 mean²)/n)
    assert abs(counts.var(ddof=1) - mean) < 4 * math.sqrt((mean + 2 * mean**2) / 400)


def test_placement_weights():
    rng = np.random.default_rng(4)
    tess = make_tess(rng, True, False, n=50, extent=(200.0, 200.0))
    parts = Particles((ParticleClass("p", density=(60.0, 60.0), placement=(0.2, 0.5, 0.3)),))
    ps = parts.sample_specimen(rng, tess)
    m = ps.n_particles
    for code, p in enumerate((0.2, 0.5, 0.3)):
        assert abs(np.mean(ps.placement == code) - p) < 4 * math.sqrt(p * (1 - p) / m)


def test_phase_area_fractions_match_request():
    rng = np.random.default_rng(8)
    n = 1500
    tess = make_tess(rng, True, False, n=n, extent=(600.0, 600.0))
    phases = Phases((Phase("matrix", 0.6, (0.3, 0.5)), Phase("beta", 0.3, (0.8, 1.0)),
                     Phase("gamma", 0.1, (1.2, 1.4))))
    asg = phases.sample_specimen(rng, n)
    assert asg.phase_id.dtype == np.uint8
    # areas from the tessellation itself, on a fine raster (the reference)
    yy, xx = np.mgrid[0:600:0.5, 0:600:0.5] + 0.25
    gid, _ = tess.label(xx, yy)
    area = np.bincount(gid.ravel(), minlength=n).astype(float)
    frac_sd = math.sqrt(np.sum(area**2)) / area.sum()
    for k, f in enumerate((0.6, 0.3, 0.1)):
        got = area[asg.phase_id == k].sum() / area.sum()
        assert abs(got - f) < 4 * math.sqrt(f * (1 - f)) * frac_sd
        sel = asg.phase_id == k
        lo, hi = phases.phases[k].intensity
        assert np.all((asg.intensity[sel] >= lo) & (asg.intensity[sel] <= hi))


def test_phase_label_and_class_names(rng):
    phases = Phases((Phase("matrix", 0.5), Phase("beta", 0.5)))
    parts = Particles((ParticleClass("precipitate"), ParticleClass("pore")))
    assert phase_class_names(phases, parts) == ("matrix", "beta", "precipitate", "pore")
    assert phase_class_names() == ("matrix",)
    assert phase_class_names(None, parts) == ("matrix", "precipitate", "pore")
    gid = rng.integers(0, 6, (5, 7))
    gphase = np.array([0, 1, 1, 0, 1, 0], np.uint8)
    pidx = np.full((5, 7), -1)
    pidx[1, 2], pidx[3, 4] = 0, 2
    pclass = np.array([1, 0, 0])
    lab = phase_label(gid, gphase, pidx, pclass, n_phases=2)
    ref = gphase[gid].astype(np.uint8)
    ref[1, 2], ref[3, 4] = 3, 2
    assert lab.dtype == np.uint8 and np.array_equal(lab, ref)
    sig = rng.random((5, 7)).astype(np.float32)
    out = particle_signal(sig, pidx, np.array([0.05, 1.3, 1.5]))
    assert out[1, 2] == np.float32(0.05) and out[3, 4] == np.float32(1.5)
    keep = pidx < 0
    assert np.array_equal(out[keep], sig[keep])


def test_determinism_and_thread_count(rng, thread_runs):
    tess = make_tess(np.random.default_rng(1), True, True)
    parts = Particles((ParticleClass("a", density=(20.0, 30.0), placement=THREE),
                       ParticleClass("b", density=(10.0, 10.0))))
    a = parts.sample_specimen(np.random.default_rng(2), tess)
    b = parts.sample_specimen(np.random.default_rng(2), tess)
    assert a.table().tobytes() == b.table().tobytes()
    ph = Phases((Phase("m", 0.7), Phase("b", 0.3)))
    pa, pb = ph.sample_specimen(np.random.default_rng(4), 40), ph.sample_specimen(
        np.random.default_rng(4), 40)
    assert pa.phase_id.tobytes() == pb.phase_id.tobytes()
    assert pa.intensity.tobytes() == pb.intensity.tobytes()
    yy, xx = np.mgrid[0:120.0, 0:160.0]
    xx = xx + rng.normal(0, 0.4, xx.shape)
    out = thread_runs(lambda: a.label(xx, yy))
    assert out[0].tobytes() == out[-1].tobytes()


def test_bad_input_raises(rng):
    with pytest.raises(ValueError, match="sum to 1"):
        Phases((Phase("m", 0.5), Phase("b", 0.2)))
    with pytest.raises(ValueError, match="unique"):
        Phases((Phase("m", 0.5), Phase("m", 0.5)))
    with pytest.raises(ValueError, match="fraction"):
        Phase("m", 1.5)
    with pytest.raises(ValueError, match="intensity"):
        Phase("m", 1.0, (0.5, 0.2))
    with pytest.raises(ValueError, match="placement"):
        ParticleClass("p", placement=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="aspect"):
        ParticleClass("p", aspect=(0.5, 1.5))
    with pytest.raises(ValueError, match="semi_major"):
        ParticleClass("p", semi_major_px=(0.0, 1.0))
    with pytest.raises(ValueError, match="non-empty"):
        ParticleClass("")
    with pytest.raises(ValueError, match="unique"):
        Particles((ParticleClass("p"), ParticleClass("p")))
    with pytest.raises(ValueError, match="unique"):
        phase_class_names(Phases((Phase("pore", 1.0),)), Particles((ParticleClass("pore"),)))
    tess = make_tess(rng, True, n=5, extent=(20.0, 20.0))
    with pytest.raises(ValueError, match="half the specimen"):
        Particles((ParticleClass("p", density=(500.0, 500.0), semi_major_px=(12.0, 12.0)),)
                  ).sample_specimen(rng, tess)
    one = Tessellation(np.array([[5.0, 5.0]]), (20.0, 20.0), periodic=False)
    with pytest.raises(ValueError, match="no grain boundaries"):
        boundary_points(rng, cell_polygons(one), 3)
    with pytest.raises(ValueError, match="n_grains"):
        Phases().sample_specimen(rng, 0)
    with pytest.raises(ValueError, match="shape"):
        phase_label(np.zeros((2, 2), int), None, np.zeros((3, 3), int), np.zeros(1), 1)
    with pytest.raises(ValueError, match="shape"):
        particle_signal(np.zeros((2, 2)), np.zeros((3, 3), int), np.zeros(1))


@pytest.mark.parametrize("periodic", [False, True])
def test_particle_membership_on_the_rims_matches_brute_force(thread_runs, periodic):
    """Points on and within rounding of the ellipses' rims (the bounding-box shortcut's edge),
    including the extreme points of each bounding box: the lowest-index particle of the full
    ellipse test, bit for bit, under 1 and 2 threads."""
    rng = np.random.default_rng(31 + periodic)
    tess = make_tess(rng, periodic)
    parts = Particles((ParticleClass("p", density=(60.0, 60.0), semi_major_px=(0.5, 12.0),
                                     aspect=(0.05, 1.0), placement=THREE),))
    ps = parts.sample_specimen(rng, tess)
    a, b = ps.semi_axes.T
    c, s = np.cos(ps.angle), np.sin(ps.angle)
    t = rng.uniform(0, 2 * np.pi, (ps.n_particles, 16))
    t[:, 0] = np.arctan2(-b * s, a * c)  # the x-extreme point of each ellipse
    t[:, 1] = np.arctan2(b * c, a * s)  # the y-extreme point
    xr = ps.centres[:, :1] + a[:, None] * np.cos(t) * c[:, None] - b[:, None] * np.sin(t) * s[:, None]
    yr = ps.centres[:, 1:] + a[:, None] * np.cos(t) * s[:, None] + b[:, None] * np.sin(t) * c[:, None]
    x = np.concatenate([xr.ravel() * f for f in (1.0, 1 - 1e-15, 1 + 1e-15)]
                       + [xr.ravel() + e for e in (-1e-12, 1e-12)])
    y = np.concatenate([yr.ravel() * f for f in (1.0, 1 + 1e-15, 1 - 1e-15)]
                       + [yr.ravel() + e for e in (1e-12, -1e-12)])
    ref = brute_particles(ps, x, y)
    assert (ref >= 0).mean() > 0.3 and (ref < 0).mean() > 0.1  # both sides of the rims
    for got in thread_runs(lambda: ps.label(x, y)):
        assert np.array_equal(got, ref)


def test_optical_colour_renders_phase_contrast():
    """Optical colour: a phase scales its grains' colours (it used to be ignored, so the
    ``phase`` label marked half the grains as a phase the image did not show)."""
    from twin.generate import build_pipeline
    from twin.recipe import parse_recipe

    text = ("name: op\nsize: [96, 96]\nsamples: 4\nspecimens: 2\nseed: 1\n"
            "instrument: generic-optical\ncontrast: {mode: optical-colour}\n"
            "detector: {dose: 10000}\nlabels: {names: [grain_id, boundary, phase]}\n"
            "specimen: {grains_per_field: 40, features: {phases: {enabled: true, phases: "
            "[{name: a, fraction: 0.5, intensity: 0.3}, {name: b, fraction: 0.5, "
            "intensity: 1.5}]}}}\n")
    pipe = build_pipeline(parse_recipe(text), None)[0]
    for i in range(4):
        s = pipe.generate(i)
        lum = s.image.astype(np.float64).mean(axis=-1)
        ph = s.labels["phase"]
        assert (ph == 0).any() and (ph == 1).any()
        # b: colours x 1.5 / 0.3 = 5 (clipped at 1): clearly brighter than a
        assert lum[ph == 1].mean() > 1.5 * lum[ph == 0].mean()
