"""Mesoscale bright-field TEM twin: geometry, phase object, abTEM CTF, camera, recipe, dataset."""

import json
import math

import numpy as np
import pytest

from generators.tem.bf import (apply_ctf, ctf_kernel, interaction_constant, max_edge_phase_step,
                               support_screen, transmission, wavelength)
from generators.tem.particles3d import Body, Cluster, ParticleField, body_thickness, render_clusters
from twin.errors import RecipeError
from twin.instrument import load_instrument
from twin.pipeline_bftem import BFTEMPipeline
from twin.recipe import parse_recipe

RECIPE = """
name: bf-tiny
size: [64, 80]
pixel_size: {value: 0.5, unit: nm}
samples: 6
specimens: 2
seed: 3
specimen:
  kind: mesoscale-nanoparticles
  coverage: [0.15, 0.2]
  diameter_median_nm: [6, 8]
  diameter_range_nm: [3, 15]
  neck_probability: 0.3
  material: {texture: [0.2, 0.4]}
imaging: {defocus_nm: [300, 800], margin_px: 8}
detector: {dose: [50, 100]}
"""


def make_pipe(text=RECIPE, seed=None):
    r = parse_recipe(text)
    inst, _ = load_instrument(r.instrument)
    return BFTEMPipeline(r, inst, root_seed=seed)


# ------------------------------------------------------------------------------------- geometry

def test_single_sphere_mask_is_the_disc_and_thickness_the_chord():
    r, x0, y0 = 7.3, 15.4, 12.2
    t, inst = render_clusters([Cluster((Body("sphere", x0, y0, r, r, r),))], (30, 32))
    yy, xx = np.mgrid[:30, :32].astype(float)
    rho2 = (xx - x0) ** 2 + (yy - y0) ** 2
    disc = rho2 < r * r
    assert np.array_equal(t > 0, disc) and np.array_equal(inst, disc.astype(np.int32))
    np.testing.assert_allclose(t, 2 * np.sqrt(np.clip(r * r - rho2, 0, None)), rtol=0, atol=1e-12)
    # the centre pixel of a sphere centred on a pixel has thickness 2R
    t2, _ = render_clusters([Cluster((Body("sphere", 10, 10, 5, 5, 5),))], (21, 21))
    assert t2[10, 10] == 10.0 and t2[10, 15] == 0.0 and t2[10, 14] == pytest.approx(6.0)


def test_ellipsoid_and_faceted_thickness_match_their_definitions():
    yy, xx = np.mgrid[:40, :40].astype(float)
    e = Body("ellipsoid", 20, 19, 12, 6, 5, angle=math.pi / 6)
    u = (xx - 20) * math.cos(math.pi / 6) + (yy - 19) * math.sin(math.pi / 6)
    v = -(xx - 20) * math.sin(math.pi / 6) + (yy - 19) * math.cos(math.pi / 6)
    q = 1 - (u / 12) ** 2 - (v / 6) ** 2
    np.testing.assert_allclose(body_thickness(e, xx, yy), 10 * np.sqrt(np.clip(q, 0, None)))
    # faceted: inside the regular hexagon (shapely) ⇔ thickness > 0; plateau 2c in the middle
    from shapely import contains_xy
    from shapely.geometry import Polygon
    f = Body("faceted", 20, 20, 10, 10, 4, angle=0.3, sides=6, slope=3.0)
    ang = 0.3 + 2 * np.pi * np.arange(6) / 6
    hexagon = Polygon(np.c_[20 + 10 * np.cos(ang), 20 + 10 * np.sin(ang)])
    tf = body_thickness(f, xx, yy)
    inside = contains_xy(hexagon, xx, yy)
    edge = np.abs(tf) < 1e-9
    assert np.array_equal(tf > 1e-9, inside & ~edge)
    assert tf[20, 20] == 8.0 and tf.max() == 8.0


def test_sintered_pair_is_the_union_and_the_neck_goes_to_the_nearer_particle():
    a = Body("sphere", 10, 10, 6, 6, 6)
    b = Body("sphere", 21, 10, 6, 6, 6)  # overlapping by 1 px
    neck = Body("neck", 15.5, 10, 3, 5, 5)
    t, inst = render_clusters([Cluster((a, b), (neck,))], (21, 32))
    yy, xx = np.mgrid[:21, :32].astype(float)
    ta, tb, tn = (body_thickness(k, xx, yy) for k in (a, b, neck))
    np.testing.assert_allclose(t, np.maximum(np.maximum(ta, tb), tn))  # union of nested intervals
    assert set(np.unique(inst)) == {0, 1, 2}
    own = np.where(ta >= tb, 1, 2)
    both = (ta > 0) | (tb > 0)
    assert np.array_equal(inst[both], own[both])
    neck_only = (tn > 0) & ~both
    assert neck_only.any()
    nearer = np.where(np.hypot(xx - 10, yy - 10) <= np.hypot(xx - 21, yy - 10), 1, 2)
    assert np.array_equal(inst[neck_only], nearer[neck_only])


def test_particle_field_reaches_the_coverage_without_overlaps(rng):
    f = ParticleField(shape=(160, 160), pixel_size_nm=0.5, coverage=(0.2, 0.2),
                      diameter_median_nm=(8, 8), diameter_range_nm=(3, 20), neck_probability=0.0,
                      min_gap_nm=1.0)
    spec = f.sample(rng)
    t, inst = spec.render()
    assert 0.15 < np.mean(t > 0) < 0.25
    # separate clusters never overlap in projection: the rendered thickness of each pixel is that
    # of the one body owning it
    yy, xx = np.mgrid[:160, :160].astype(float)
    total = sum(body_thickness(p, xx, yy) for p in spec.particles)
    np.testing.assert_allclose(t, total, atol=1e-9)
    diam = np.array([2 * p.reach * 0.5 for p in spec.particles if p.shape == "sphere"])
    assert np.all((diam >= 3) & (diam <= 20))


# ------------------------------------------------------------------------------ phase object

def test_interaction_constant_matches_first_principles():
    from ase import units

    for kv in (80, 200, 300):
        e = kv * 1e3 * units._e
        m = units._me + e / units._c**2                    # relativistic mass
        lam = units._hplanck / math.sqrt(2 * units._me * e
                                         * (1 + e / (2 * units._me * units._c**2)))
        sigma_si = 2 * math.pi * m * units._e * lam / units._hplanck**2   # rad / (V m)
        assert interaction_constant(kv) == pytest.approx(sigma_si * 1e-10, rel=1e-4)
        assert wavelength(kv) == pytest.approx(lam * 1e10, rel=1e-4)
    # 7.29e-4 rad/(V·Å) = 0.00729 rad/(V·nm) at 200 kV (PHYSICS.md's number is per V·nm)
    assert interaction_constant(200) == pytest.approx(7.29e-4, rel=2e-3)
    assert wavelength(200) == pytest.approx(0.02508, rel=1e-3)


def test_exit_wave_phase_is_sigma_v_t_and_intensity_beer_lambert():
    t, _ = render_clusters([Cluster((Body("sphere", 16, 16, 10, 10, 10),))], (32, 32))
    tp = t * 5.0                                 # 5 Å / px
    ts = np.full_like(tp, 100.0)
    s = interaction_constant(200)
    w = transmission(tp, ts, sigma=s, mip_particle_v=25.0, mip_support_v=9.0,
                     mfp_particle_a=400.0, mfp_support_a=2000.0)
    expected_phase = s * (25.0 * tp + 9.0 * ts)
    np.testing.assert_allclose(np.unwrap(np.unwrap(np.angle(w), axis=0), axis=1),
                               expected_phase - 2 * np.pi * np.round((expected_phase[0, 0]
                                                                      - np.angle(w)[0, 0])
                                                                     / (2 * np.pi)), atol=2e-5)
    np.testing.assert_allclose(np.abs(w) ** 2, np.exp(-tp / 400.0 - ts / 2000.0), rtol=1e-5)
    # the diffraction-contrast factor scales the particles' absorption only, never the phase
    g = np.random.default_rng(0).uniform(0.5, 1.5, tp.shape)
    wg = transmission(tp, ts, sigma=s, mip_particle_v=25.0, mip_support_v=9.0,
                      mfp_particle_a=400.0, mfp_support_a=2000.0, particle_absorption=g)
    np.testing.assert_allclose(np.abs(wg) ** 2, np.exp(-g * tp / 400.0 - ts / 2000.0), rtol=1e-5)
    np.testing.assert_allclose(np.angle(wg / w), 0.0, atol=1e-5)
    # centre: 2R = 100 Å of gold-like material, phase 25 V × 100 Å × σ
    assert float(np.angle(w[16, 16] / w[0, 0])) == pytest.approx(s * 25 * 100, abs=1e-4)


def test_ctf_application_equals_a_direct_abtem_call():
    import abtem

    rng = np.random.default_rng(1)
    psi = transmission(rng.uniform(0, 80, (48, 64)), np.zeros((48, 64)),
                       sigma=interaction_constant(300), mip_particle_v=20.0, mip_support_v=1.0,
                       mfp_particle_a=500.0, mfp_support_a=1e4)
    kw = dict(defocus=8000.0, Cs=1.2e7, focal_spread=40.0, angular_spread=0.3,
              semiangle_cutoff=12.0)
    ours = apply_ctf(psi, ctf_kernel(psi.shape, 2.0, 300.0, kw["defocus"], kw["Cs"],
                                     kw["focal_spread"], kw["angular_spread"],
                                     kw["semiangle_cutoff"]))
    direct = abtem.Waves(psi, energy=300e3, sampling=2.0).apply_ctf(
        abtem.CTF(energy=300e3, **kw)).intensity().compute().array
    # tolerance: float32 FFT round-off
    np.testing.assert_allclose(ours, direct, rtol=0, atol=1e-5 * float(direct.max()))
    assert np.std(ours) > 1e-3  # the comparison is not between two flat images


def test_no_defocus_no_aberration_gives_the_exit_wave_intensity():
    t, _ = render_clusters([Cluster((Body("sphere", 20, 20, 9, 9, 9),))], (40, 40))
    w = transmission(t * 4.0, np.full(t.shape, 80.0), sigma=interaction_constant(300),
                     mip_particle_v=25, mip_support_v=9, mfp_particle_a=300, mfp_support_a=1500)
    img = apply_ctf(w, ctf_kernel(w.shape, 4.0, 300.0, 0.0))
    np.testing.assert_allclose(img, np.abs(w) ** 2, rtol=2e-6)


def test_defocus_gives_the_transport_of_intensity_fringe_sign_and_size():
    # weak smooth phase bump: for small defocus I ≈ 1 + (λ Δf / 2π) ∇²φ (abTEM: Δf > 0 underfocus)
    n, p = 128, 2.0
    yy, xx = (np.mgrid[:n, :n] - n / 2) * p
    phi = 0.05 * np.exp(-(xx**2 + yy**2) / (2 * 12.0**2))
    lam, df = wavelength(300), 200.0
    img = apply_ctf(np.exp(1j * phi).astype(np.complex64), ctf_kernel((n, n), p, 300.0, df))
    k2 = (np.fft.fftfreq(n, p)[:, None] ** 2 + np.fft.fftfreq(n, p)[None, :] ** 2)
    lap = np.real(np.fft.ifft2(-4 * np.pi**2 * k2 * np.fft.fft2(phi)))
    tie = lam * df / (2 * np.pi) * lap
    np.testing.assert_allclose(img - 1, tie, atol=0.03 * np.abs(tie).max())


def test_underfocus_gives_a_bright_fringe_outside_a_dark_particle():
    r = 12
    t, _ = render_clusters([Cluster((Body("sphere", 32, 32, r, r, r),))], (64, 64))
    w = transmission(t * 3.5, np.zeros(t.shape), sigma=interaction_constant(300),
                     mip_particle_v=25, mip_support_v=9, mfp_particle_a=400, mfp_support_a=1e4)
    yy, xx = np.mgrid[:64, :64]
    rho = np.hypot(xx - 32, yy - 32)
    ring = (rho > r) & (rho < r + 3)
    far = rho > r + 10
    under = apply_ctf(w, ctf_kernel(w.shape, 3.5, 300.0, +5000.0))
    over = apply_ctf(w, ctf_kernel(w.shape, 3.5, 300.0, -5000.0))
    focus = apply_ctf(w, ctf_kernel(w.shape, 3.5, 300.0, 0.0))
    assert abs(under[far].mean() - 1.0) < 0.02                     # vacuum far away
    assert under[ring].max() > 1.05 * under[far].mean()            # overshoot: bright halo
    assert over[ring].min() < 0.95                                 # undershoot: dark ring
    assert abs(focus[ring].mean() - 1.0) < 1e-5                    # in focus: no fringe
    assert under[ring].mean() > focus[ring].mean() > over[ring].mean()


def test_support_screen_has_unit_variance_and_the_model_spectrum():
    n, xi = 256, 3.0
    s = support_screen((n, n), xi, 3.0, key=7)
    assert abs(s.mean()) < 1e-12 and s.std() == pytest.approx(1.0)
    power = sum(np.abs(np.fft.fft2(support_screen((n, n), xi, 3.0, key=k))) ** 2
                for k in range(7, 11))
    k = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    model = (1 + (2 * np.pi * xi * k) ** 2) ** -1.5  # |filter|² for alpha = 3

    def band(lo, hi):
        m = (k >= lo) & (k < hi)
        return np.mean(power[m] / model[m])

    # power / model is flat over a 100x range of the model (each band: >= 1000 modes, ~3 %)
    ratios = [band(lo, lo + 0.03) for lo in (0.01, 0.08, 0.2, 0.35)]
    assert model[(k > 0.35) & (k < 0.38)].mean() < 0.01 * model[(k > 0.01) & (k < 0.04)].mean()
    np.testing.assert_allclose(ratios, np.mean(ratios), rtol=0.12)
    assert not np.allclose(support_screen((n, n), xi, 3.0, key=8), s)


# --------------------------------------------------------------------------------- pipeline

def test_mean_counts_follow_the_dose():
    text = RECIPE.replace("coverage: [0.15, 0.2]", "coverage: 0\n  support: {thickness_nm: 0}")
    text = text.replace("dose: [50, 100]", "dose: [20, 400]")
    pipe = make_pipe(text)
    d = pipe.instrument.detector
    for i in range(4):
        s = pipe.generate(i)
        assert s.labels["particle"].sum() == 0
        dose = s.params["detector"]["dose_e_per_px"]
        n = s.image.size
        # vacuum: signal 1 → E[counts] = offset + gain · dose; 5 sigma of Poisson + fixed pattern
        pattern = 3 * (1.2 / math.sqrt(80) + 0.4 / math.sqrt(64))  # mean of the fixed pattern
        tol = 5 * d.gain * math.sqrt(dose / n) + pattern + 0.5      # + rounding
        assert s.image.mean() == pytest.approx(d.offset + d.gain * dose, abs=tol)


def test_labels_are_the_projected_geometry_of_the_view():
    pipe = make_pipe()
    s = pipe.generate(4)
    ox, oy = s.params["view"]["offset_px"]
    bodies = s.params["specimen"]["particles"]
    necks = s.params["specimen"]["necks"]
    yy, xx = np.mgrid[:64, :80].astype(float)
    yy += oy
    xx += ox

    def body(d):
        return Body(d["shape"], d["x_px"], d["y_px"], d["a_px"], d["b_px"], d["c_px"],
                    d["angle_rad"], d["sides"], d["slope"])

    covered = np.zeros((64, 80), bool)
    for d in bodies + necks:
        covered |= body_thickness(body(d), xx, yy) > 0
    assert np.array_equal(s.labels["particle"].astype(bool), covered)
    assert np.array_equal(s.labels["particle"].astype(bool), s.labels["instance"] > 0)
    assert covered.any() and not covered.all()
    # a pixel inside only particle k carries id k
    for d in bodies:
        inside = body_thickness(body(d), xx, yy) > 0
        if inside.sum() > 4:
            others = np.zeros_like(inside)
            for e in bodies + necks:
                if e is not d:
                    others |= body_thickness(body(e), xx, yy) > 0
            only = inside & ~others
            assert np.all(s.labels["instance"][only] == d["id"])


def test_determinism_and_specimen_sharing():
    a, b = make_pipe(), make_pipe()
    for i in (5, 0, 5, 2):
        s1, s2 = a.generate(i), b.generate(i)
        assert s1.image.tobytes() == s2.image.tobytes()
        assert all(np.array_equal(s1.labels[k], s2.labels[k]) for k in s1.labels)
        assert json.dumps(s1.params, sort_keys=True) == json.dumps(s2.params, sort_keys=True)
    s0, s1, s3 = a.generate(0), a.generate(1), a.generate(3)
    assert s0.specimen_id == s1.specimen_id == 0 and s3.specimen_id == 1
    assert s0.params["specimen"] == s1.params["specimen"] != s3.params["specimen"]
    assert not np.array_equal(s0.image, s1.image)
    assert make_pipe(seed=9).generate(0).image.tobytes() != s0.image.tobytes()
    assert s0.image.dtype == np.uint16 and s0.image.shape == (64, 80)
    assert s0.labels["instance"].dtype == np.int32 and s0.labels["particle"].dtype == np.uint8


@pytest.mark.parametrize("change, message", [
    ("diameter_range_nm: [3, 15]", "particle larger than the field"),
    ("shapes: {cube: 1}", "unknown key 'specimen.shapes.cube'"),
    ("coverage: 0.9", "specimen.coverage"),
])
def test_bad_recipes_are_refused(change, message):
    text = RECIPE
    if "larger" in message:
        text = text.replace("diameter_range_nm: [3, 15]", "diameter_range_nm: [3, 40]")
    else:
        text = text.replace("coverage: [0.15, 0.2]", change if "shapes" not in change
                            else "coverage: [0.15, 0.2]\n  " + change)
    with pytest.raises(RecipeError, match=message):
        make_pipe(text)


def test_sampling_too_coarse_is_refused():
    # the smallest particle under 2 px
    with pytest.raises(RecipeError, match="sampling too coarse"):
        make_pipe(RECIPE.replace("value: 0.5", "value: 2.0"))
    # the phase of the largest particle steps by >= pi across its outermost pixel
    text = RECIPE.replace("value: 0.5", "value: 1.5").replace("[3, 15]", "[4, 60]")
    text = text.replace("size: [64, 80]", "size: [64, 64]").replace("[6, 8]", "[10, 12]")
    with pytest.raises(RecipeError, match="sampling too coarse for 300 kV"):
        make_pipe(text)
    assert max_edge_phase_step(20.0, 15.0, 30.0, interaction_constant(300)) > math.pi


def test_generators_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown particle shape 'cube'"):
        Body("cube", 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown particle shape"):
        ParticleField(shape=(64, 64), pixel_size_nm=0.5, shape_weights=(("cube", 1.0),),
                      diameter_range_nm=(3, 10))
    with pytest.raises(ValueError, match="particle larger than the field"):
        ParticleField(shape=(64, 64), pixel_size_nm=0.5, diameter_range_nm=(3, 40))
    with pytest.raises(ValueError, match="sampling too coarse"):
        ParticleField(shape=(64, 64), pixel_size_nm=2.0, diameter_range_nm=(3, 40))
    with pytest.raises(ValueError, match="CTF shape"):
        apply_ctf(np.ones((8, 8), np.complex64), ctf_kernel((8, 10), 1.0, 300.0, 0.0))


def test_a_non_tem_instrument_is_refused():
    r = parse_recipe(RECIPE)
    inst, _ = load_instrument("generic-sem")
    with pytest.raises(RecipeError, match="no 'tem:' section"):
        BFTEMPipeline(r, inst)


def test_the_shipped_recipe_validates_and_generates():
    from pathlib import Path

    from twin.generate import build_pipeline
    from twin.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "tem_bf_nanoparticles.yaml"
    recipe, _ = load_recipe(path)
    pipe, _ = build_pipeline(recipe, path.parent)
    assert type(pipe).__name__ == "BFTEMPipeline" and pipe.image_shape == (512, 512)
    s = pipe.generate(0)
    assert s.image.shape == (512, 512) and 0.08 < s.labels["particle"].mean() < 0.3
    assert s.params["specimen"]["texture"] > 0


def test_generate_hdf5_round_trip(tmp_path):
    from twin.dataset import open_dataset
    from twin.generate import generate_dataset

    (tmp_path / "bf.yaml").write_text(RECIPE)
    out = generate_dataset(tmp_path / "bf.yaml", tmp_path / "bf.h5", n=3, workers=1,
                           progress=False)
    pipe = make_pipe()
    with open_dataset(out) as ds:
        assert len(ds) == 3
        for i in range(3):
            got, ref = ds[i], pipe.generate(i)
            assert got["image"].tobytes() == ref.image.tobytes()
            for k in ("particle", "instance"):
                assert np.array_equal(got["labels"][k], ref.labels[k])
            assert got["params"] == json.loads(json.dumps(ref.params))
            assert got["specimen_id"] == ref.specimen_id


# ------------------------------------------------------------------------------- particle motion

def test_motion_blur_is_the_average_over_gaussian_displacements(rng):
    """Monte-Carlo reference: the mean of the thickness map shifted by Gaussian displacements."""
    from scipy import ndimage

    from generators.tem.bf import particle_motion_blur

    t = np.zeros((48, 48))
    t[18:30, 14:34] = 50.0                     # a slab, Å
    a = np.full_like(t, 1.0)
    a[18:30, 24:34] = 3.0                      # one half absorbs 3x more
    sigma = 1.5
    shifts = rng.normal(0.0, sigma, size=(4000, 2))
    ref_t = np.mean([ndimage.shift(t, s, order=1, mode="nearest") for s in shifts], axis=0)
    ref_ta = np.mean([ndimage.shift(t * a, s, order=1, mode="nearest") for s in shifts], axis=0)
    tb, ab = particle_motion_blur(t, a, sigma)
    # linear interpolation of the shifts adds a little blur of its own (~0.3 px): loose tolerance
    assert np.max(np.abs(tb - ref_t)) < 0.06 * t.max()
    assert np.isclose(tb.sum(), t.sum(), rtol=1e-4)           # volume is conserved
    inside = ref_t > 5
    assert np.max(np.abs(tb * ab - ref_ta)[inside]) < 0.06 * (t * a).max()
    t0, a0 = particle_motion_blur(t, a, 0.0)
    assert t0 is t and a0 is a
    with pytest.raises(ValueError, match="motion blur"):
        particle_motion_blur(t, a, -1.0)


def test_particle_motion_softens_the_image_but_keeps_labels_and_the_support():
    plain = make_pipe()
    moving = make_pipe(RECIPE.replace("  neck_probability: 0.3\n",
                                      "  neck_probability: 0.3\n  motion_blur_nm: [2.0, 2.0]\n"))
    s0, s1 = plain.generate(4), moving.generate(4)
    for k in s0.labels:
        assert np.array_equal(s0.labels[k], s1.labels[k])        # labels: geometry at the mean position
    assert s1.params["particle_motion_px"] == pytest.approx(4.0)  # 2 nm at 0.5 nm/px
    assert "particle_motion_px" not in s0.params                 # off: the old params and bytes
    assert s0.params["view"] == s1.params["view"]
    # the particle edges soften: the image gradient across label edges drops
    from scipy import ndimage
    edge = ndimage.binary_dilation(s0.labels["particle"] > 0, iterations=2) & \
        ~ndimage.binary_erosion(s0.labels["particle"] > 0, iterations=2)
    far = ~ndimage.binary_dilation(s0.labels["particle"] > 0, iterations=10)

    def grad(img):
        g = ndimage.gaussian_filter(img.astype(float), 2.0)  # beyond the shot noise
        return np.hypot(*np.gradient(g))
    assert grad(s1.image)[edge].mean() < 0.8 * grad(s0.image)[edge].mean()
    if far.sum() > 50:  # the support (away from particles) keeps its texture statistics
        assert grad(s1.image)[far].mean() == pytest.approx(grad(s0.image)[far].mean(), rel=0.25)
